// Fused neighborhood attention, forward: out = softmax(scale * q.k (+ rpb)) . v over each
// query's window and the additional tokens, and lse = the logsumexp of those logits. The CUDA
// twin of rust/src/cpu/fused.rs.
//
// One warp per query row (batch, head, token). Each lane holds a strided share of the query's
// channels and of the output's, so key and value rows are read by the whole warp at once,
// coalesced along the head dim. Keys are visited once, in window order then the extras, with an
// online softmax (running max and sum, fp32 or fp64): no logit row is stored anywhere.
#include "fused.cuh"

// Running softmax state of one query row: the largest logit so far, the sum of exp(logit - max)
// and the matching weighted sum of values (this lane's channels).
struct NaOnline {
    acc_t max;
    acc_t sum;
    acc_t acc[NA_LANE_DIM_V];
};

// Fold the key with logit `logit` and value row `value` into the running state.
__device__ __forceinline__ void na_attend(NaOnline& s, acc_t logit, const elem_t* value,
                                          long long step, int lane) {
    const acc_t max = logit > s.max ? logit : s.max;
    // The first key rescales nothing (exp(-inf) = 0); a key at -inf adds nothing.
    const acc_t rescale = s.max == neg_inf() ? acc_t(0) : na_exp(s.max - max);
    const acc_t weight = logit == neg_inf() ? acc_t(0) : na_exp(logit - max);
    s.max = max;
    s.sum = s.sum * rescale + weight;
#pragma unroll
    for (int k = 0; k < NA_LANE_DIM_V; ++k) {
        const int c = lane + k * NA_WARP;
        const acc_t v = c < NA_DIM_V ? to_acc(value[c * step]) : acc_t(0);
        s.acc[k] = s.acc[k] * rescale + weight * v;
    }
}

// out[b, x, h] and lse[b, x, h] for every query row; one warp per row.
extern "C" __global__ void NA_FUSED_BOUNDS na_fused_forward(const NaFusedParams p) {
    const int lane = threadIdx.x % NA_WARP;
    const long long warps = blockDim.x / NA_WARP;
    const long long rows = p.batch * p.heads * p.length[0] * p.length[1] * p.length[2];
    // The row is the same in every lane of a warp: whole warps take the loop and the shuffles.
    for (long long row = blockIdx.x * warps + threadIdx.x / NA_WARP; row < rows;
         row += (long long)gridDim.x * warps) {
        const NaRow r = na_row_of(p.heads, p.length, row);
        const long long hk = r.h / p.group;
        acc_t q[NA_LANE_DIM];
        const elem_t* query = na_row_ptr(p.query, r.b, r.h, r.x[0], r.x[1], r.x[2]);
        na_lane_load<NA_DIM>(q, query, p.query.stride[5], acc_t(p.scale), lane);
        NaOnline s;
        s.max = neg_inf();
        s.sum = 0;
#pragma unroll
        for (int k = 0; k < NA_LANE_DIM_V; ++k) {
            s.acc[k] = 0;
        }
        na_for_each_key(p, r, hk,
                        [&](const elem_t* key, const elem_t* value, acc_t bias, long long k_step,
                            long long v_step) {
                            const acc_t logit = na_warp_dot<NA_DIM>(q, key, k_step, lane) + bias;
                            na_attend(s, logit, value, v_step, lane);
                        });
        // A row that sees no key (dense attention over no extras) gives zeros and lse -inf.
        const acc_t inv = s.sum > acc_t(0) ? acc_t(1) / s.sum : acc_t(0);
        const long long out = na_offset(p.out, r.b, r.h, r.x[0], r.x[1], r.x[2], 0);
        na_lane_store<NA_DIM_V>(p.out, out, s.acc, inv, lane);
        if (lane == 0) {
            float* lse = reinterpret_cast<float*>(p.lse.data);
            lse[na_offset(p.lse, r.b, r.h, r.x[0], r.x[1], r.x[2], 0)] =
                (float)(s.max + na_log(s.sum));
        }
    }
}
