// Fused neighborhood attention, forward: out = softmax(scale * q.k (+ rpb)) . v over each
// query's window and the additional tokens, and lse = the logsumexp of those logits. The CUDA
// twin of rust/src/cpu/fused.rs.
//
// One warp per query row (batch, head, token). Each lane holds a strided share of the query's
// channels and of the output's, so key and value rows are read by the whole warp at once,
// coalesced along the head dim. Keys are visited once, in window order then the extras, with an
// online softmax (running max and sum, fp32 or fp64): no logit row is stored anywhere.
//
// Beyond the constants of common.cuh, the head dims are -D flags too (their channels live in
// registers):
//   NA_DIM    channels of queries and keys
//   NA_DIM_V  channels of values and outputs
#include "common.cuh"

#if !defined(NA_DIM) || !defined(NA_DIM_V)
#error "na_fused_fwd.cu needs NA_DIM and NA_DIM_V"
#endif

#define NA_WARP 32
// Channels per lane of a query row and of an output row.
#define NA_LANE_DIM ((NA_DIM + NA_WARP - 1) / NA_WARP)
#define NA_LANE_DIM_V ((NA_DIM_V + NA_WARP - 1) / NA_WARP)

__device__ __forceinline__ float na_exp(float x) { return expf(x); }
__device__ __forceinline__ double na_exp(double x) { return exp(x); }
__device__ __forceinline__ float na_log(float x) { return logf(x); }
__device__ __forceinline__ double na_log(double x) { return log(x); }

// The sum of `x` over the warp, in every lane (a butterfly: the same order in every lane, so
// every lane holds the same bits).
__device__ __forceinline__ acc_t na_warp_sum(acc_t x) {
#pragma unroll
    for (int mask = NA_WARP / 2; mask > 0; mask /= 2) {
        x += __shfl_xor_sync(0xffffffffu, x, mask);
    }
    return x;
}

// Running softmax state of one query row: the largest logit so far, the sum of exp(logit - max)
// and the matching weighted sum of values (this lane's channels).
struct NaOnline {
    acc_t max;
    acc_t sum;
    acc_t acc[NA_LANE_DIM_V];
};

// Address of channel 0 of row `[i0, i1, i2, i3, i4, -]` of a view.
__device__ __forceinline__ const elem_t* na_row_ptr(const NaView& v, long long i0, long long i1,
                                                    long long i2, long long i3, long long i4) {
    return na_ptr(v) + na_offset(v, i0, i1, i2, i3, i4, 0);
}

// q . key over the warp (key row at `key`, channel stride `step`); `q` is this lane's share.
__device__ __forceinline__ acc_t na_logit(const acc_t q[NA_LANE_DIM], const elem_t* key,
                                          long long step, int lane) {
    acc_t partial = 0;
#pragma unroll
    for (int k = 0; k < NA_LANE_DIM; ++k) {
        const int c = lane + k * NA_WARP;
        if (c < NA_DIM) {
            partial += q[k] * to_acc(key[c * step]);
        }
    }
    return na_warp_sum(partial);
}

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

// Every key of the window of the query at `r` (its kv head `hk`), in slot order.
__device__ __forceinline__ void na_attend_window(const NaFusedParams& p, const NaRow& r,
                                                 long long hk, const acc_t q[NA_LANE_DIM],
                                                 NaOnline& s, int lane) {
    const NaWindow w = na_window_of(p.length, p.dilation, r.x);
    const long long k_step = p.key.stride[5], v_step = p.value.stride[5];
    for (long long s0 = 0; s0 < w.range[0].end - w.range[0].start; ++s0) {
        const long long y0 = na_key_of(p.dilation, w, 0, s0);
        for (long long s1 = 0; s1 < w.range[1].end - w.range[1].start; ++s1) {
            const long long y1 = na_key_of(p.dilation, w, 1, s1);
            for (long long s2 = 0; s2 < w.range[2].end - w.range[2].start; ++s2) {
                const long long y2 = na_key_of(p.dilation, w, 2, s2);
                acc_t logit = na_logit(q, na_row_ptr(p.key, r.b, hk, y0, y1, y2), k_step, lane);
                if (p.has_bias) {
                    logit += na_load(p.bias, r.h, na_bias_index(w, 0, s0), na_bias_index(w, 1, s1),
                                     na_bias_index(w, 2, s2), 0, 0);
                }
                na_attend(s, logit, na_row_ptr(p.value, r.b, hk, y0, y1, y2), v_step, lane);
            }
        }
    }
}

// out[b, x, h] and lse[b, x, h] for every query row; one warp per row.
extern "C" __global__ void __launch_bounds__(NA_BLOCK) na_fused_forward(const NaFusedParams p) {
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
#pragma unroll
        for (int k = 0; k < NA_LANE_DIM; ++k) {
            const int c = lane + k * NA_WARP;
            q[k] = c < NA_DIM ? to_acc(query[c * p.query.stride[5]]) * acc_t(p.scale) : acc_t(0);
        }
        NaOnline s;
        s.max = neg_inf();
        s.sum = 0;
#pragma unroll
        for (int k = 0; k < NA_LANE_DIM_V; ++k) {
            s.acc[k] = 0;
        }
        if (p.has_window) {
            na_attend_window(p, r, hk, q, s, lane);
        }
        for (long long e = 0; e < p.extra_count; ++e) {
            const acc_t logit = na_logit(q, na_row_ptr(p.extra_key, r.b, hk, e, 0, 0),
                                         p.extra_key.stride[5], lane);
            na_attend(s, logit, na_row_ptr(p.extra_value, r.b, hk, e, 0, 0),
                      p.extra_value.stride[5], lane);
        }
        // A row that sees no key (dense attention over no extras) gives zeros and lse -inf.
        const acc_t inv = s.sum > acc_t(0) ? acc_t(1) / s.sum : acc_t(0);
        const long long out = na_offset(p.out, r.b, r.h, r.x[0], r.x[1], r.x[2], 0);
#pragma unroll
        for (int k = 0; k < NA_LANE_DIM_V; ++k) {
            const int c = lane + k * NA_WARP;
            if (c < NA_DIM_V) {
                na_store(p.out, out + c * p.out.stride[5], s.acc[k] * inv);
            }
        }
        if (lane == 0) {
            float* lse = reinterpret_cast<float*>(p.lse.data);
            lse[na_offset(p.lse, r.b, r.h, r.x[0], r.x[1], r.x[2], 0)] =
                (float)(s.max + na_log(s.sum));
        }
    }
}
