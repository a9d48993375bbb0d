// Fused neighborhood attention, backward, FlashAttention-style: probabilities are recomputed
// from the logits, and no [tokens x window] buffer exists. The CUDA twin of
// rust/src/cpu/fused_bwd.rs. Every output element is summed by one warp or block in a fixed
// order (no atomics), so results do not depend on scheduling.
//
// With p = softmax(logits) of a query row, dp_j = d_out . v_j and
// delta = d_out . out - d_lse, the logit gradients are ds_j = p_j (dp_j - delta); then
// d_query = scale sum_j ds_j k_j, d_key_j = scale sum_x ds_xj q_x, d_value_j = sum_x p_xj d_out_x
// and d_rpb sums ds over the queries that see each offset. Four kernels, launched in order:
//   na_fused_backward_query   one warp per query row: lse (recomputed at the accumulator's
//                             precision, as the CPU does, not read from the float32 lse), delta,
//                             d_query; (lse, delta) go to `stats` for the kernels after it
//   na_fused_backward_keys    one warp per key row: d_key, d_value over the queries that see it
//   na_fused_backward_extras  one warp per additional token: its d_key, d_value over all queries
//   na_fused_backward_bias    one block per rpb entry: d_rpb, a tree reduction
// On tensor cores (na_fused_bwd_tc.cu: half types, head dims in eights up to 128), tile kernels
// take the place of the first three; the bias kernel runs after them all the same.
#include "fused_bwd.cuh"

extern "C" __global__ void NA_FUSED_BOUNDS
    na_fused_backward_query(const NaFusedBwdParams p) {
    const NaFusedParams& f = p.f;
    const int lane = threadIdx.x % NA_WARP;
    const long long warps = blockDim.x / NA_WARP;
    const long long rows = f.batch * f.heads * na_fused_tokens(f);
    for (long long row = blockIdx.x * warps + threadIdx.x / NA_WARP; row < rows;
         row += (long long)gridDim.x * warps) {
        const NaRow r = na_row_of(f.heads, f.length, row);
        const long long hk = r.h / f.group;
        acc_t q[NA_LANE_DIM], d_out[NA_LANE_DIM_V];
        na_lane_load<NA_DIM>(q, na_row_ptr(f.query, r.b, r.h, r.x[0], r.x[1], r.x[2]),
                             f.query.stride[5], acc_t(f.scale), lane);
        na_lane_load<NA_DIM_V>(d_out, na_row_ptr(p.d_out, r.b, r.h, r.x[0], r.x[1], r.x[2]),
                               p.d_out.stride[5], acc_t(1), lane);
        acc_t delta = na_warp_dot<NA_DIM_V>(
            d_out, na_row_ptr(f.out, r.b, r.h, r.x[0], r.x[1], r.x[2]), f.out.stride[5], lane);
        if (p.has_d_lse) {
            delta -= na_load_f32(p.d_lse, r.b, r.h, r.x[0], r.x[1], r.x[2]);
        }
        // The logsumexp, by a running max and sum.
        acc_t max = neg_inf(), sum = 0;
        na_for_each_key(f, r, hk,
                        [&](const elem_t* key, const elem_t*, acc_t bias, long long k_step,
                            long long) {
                            const acc_t logit = na_warp_dot<NA_DIM>(q, key, k_step, lane) + bias;
                            if (logit != neg_inf()) {
                                const acc_t next = logit > max ? logit : max;
                                sum = (max == neg_inf() ? acc_t(0) : sum * na_exp(max - next)) +
                                      na_exp(logit - next);
                                max = next;
                            }
                        });
        const acc_t lse = sum > acc_t(0) ? max + na_log(sum) : neg_inf();
        acc_t d_query[NA_LANE_DIM];
#pragma unroll
        for (int k = 0; k < NA_LANE_DIM; ++k) {
            d_query[k] = 0;
        }
        if (sum > acc_t(0)) {
            na_for_each_key(f, r, hk,
                            [&](const elem_t* key, const elem_t* value, acc_t bias,
                                long long k_step, long long v_step) {
                                const acc_t logit =
                                    na_warp_dot<NA_DIM>(q, key, k_step, lane) + bias;
                                const acc_t dp = na_warp_dot<NA_DIM_V>(d_out, value, v_step, lane);
                                const NaPair g = na_pair(logit, lse, dp, delta);
                                na_lane_axpy<NA_DIM>(d_query, g.ds, key, k_step, lane);
                            });
        }
        const long long out = na_offset(p.d_query, r.b, r.h, r.x[0], r.x[1], r.x[2], 0);
        na_lane_store<NA_DIM>(p.d_query, out, d_query, acc_t(f.scale), lane);
        if (lane == 0) {
            na_stats(p)[2 * row] = lse;
            na_stats(p)[2 * row + 1] = delta;
        }
    }
}

// The gradients of one key-side row (a key and its value, in the window or additional), this
// lane's channels, summed over the (query, head) pairs that see it.
struct NaKeyGrads {
    acc_t d_key[NA_LANE_DIM];
    acc_t d_value[NA_LANE_DIM_V];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int k = 0; k < NA_LANE_DIM; ++k) {
            d_key[k] = 0;
        }
#pragma unroll
        for (int k = 0; k < NA_LANE_DIM_V; ++k) {
            d_value[k] = 0;
        }
    }

    // Add the terms of query row (b, h, x), whose logit with `key` gets `bias`: d_value += p
    // d_out, d_key += scale ds q. The query and d_out rows are read where they lie (twice each,
    // the second time from cache), so only the gradients stay in registers.
    __device__ __forceinline__ void add(const NaFusedBwdParams& p, const elem_t* key,
                                        long long k_step, const elem_t* value, long long v_step,
                                        acc_t bias, long long b, long long h, const long long x[3],
                                        int lane) {
        const NaFusedParams& f = p.f;
        const elem_t* q = na_row_ptr(f.query, b, h, x[0], x[1], x[2]);
        const elem_t* d_out = na_row_ptr(p.d_out, b, h, x[0], x[1], x[2]);
        const long long q_step = f.query.stride[5], d_step = p.d_out.stride[5];
        const acc_t scale = acc_t(f.scale);
        const acc_t logit = na_warp_dot_rows<NA_DIM>(q, q_step, scale, key, k_step, lane) + bias;
        const acc_t dp = na_warp_dot_rows<NA_DIM_V>(d_out, d_step, acc_t(1), value, v_step, lane);
        const long long n = na_query_row(f, b, h, x);
        const NaPair g = na_pair(logit, na_stats(p)[2 * n], dp, na_stats(p)[2 * n + 1]);
        na_lane_axpy<NA_DIM>(d_key, g.ds * scale, q, q_step, lane);
        na_lane_axpy<NA_DIM_V>(d_value, g.prob, d_out, d_step, lane);
    }

    __device__ __forceinline__ void store(const NaView& dk, long long dk_offset, const NaView& dv,
                                          long long dv_offset, int lane) const {
        na_lane_store<NA_DIM>(dk, dk_offset, d_key, acc_t(1), lane);
        na_lane_store<NA_DIM_V>(dv, dv_offset, d_value, acc_t(1), lane);
    }
};

// d_key and d_value of key row (b, kv head, y): over every query x whose window holds y and every
// query head of the kv head's group, in a fixed order.
extern "C" __global__ void NA_FUSED_BOUNDS
    na_fused_backward_keys(const NaFusedBwdParams p) {
    const NaFusedParams& f = p.f;
    const int lane = threadIdx.x % NA_WARP;
    const long long warps = blockDim.x / NA_WARP;
    const long long heads_kv = f.heads / f.group;
    const long long rows = f.batch * heads_kv * na_fused_tokens(f);
    for (long long row = blockIdx.x * warps + threadIdx.x / NA_WARP; row < rows;
         row += (long long)gridDim.x * warps) {
        const NaRow r = na_row_of(heads_kv, f.length, row);  // r.h is the kv head
        const elem_t* key = na_row_ptr(f.key, r.b, r.h, r.x[0], r.x[1], r.x[2]);
        const elem_t* value = na_row_ptr(f.value, r.b, r.h, r.x[0], r.x[1], r.x[2]);
        NaKeyGrads g;
        g.zero();
        NaGroupPos pos[3];
        NaRange run[3];
#pragma unroll
        for (int a = 0; a < 3; ++a) {
            pos[a] = na_group_pos(r.x[a], f.length[a], f.dilation[a]);
            run[a] = na_fused_inverse_run(pos[a].index, pos[a].index, pos[a].len, a);
        }
        for (long long q0 = run[0].start; q0 < run[0].end; ++q0) {
            for (long long q1 = run[1].start; q1 < run[1].end; ++q1) {
                for (long long q2 = run[2].start; q2 < run[2].end; ++q2) {
                    const long long x[3] = {q0 * f.dilation[0] + pos[0].group,
                                            q1 * f.dilation[1] + pos[1].group,
                                            q2 * f.dilation[2] + pos[2].group};
                    // rpb needs stride 1: the offset is key - query in group steps.
                    const long long rel[3] = {pos[0].index - q0 + NA_K0 - 1,
                                              pos[1].index - q1 + NA_K1 - 1,
                                              pos[2].index - q2 + NA_K2 - 1};
                    for (long long h = r.h * f.group; h < (r.h + 1) * f.group; ++h) {
                        const acc_t bias =
                            f.has_bias ? na_load(f.bias, h, rel[0], rel[1], rel[2], 0, 0)
                                       : acc_t(0);
                        g.add(p, key, f.key.stride[5], value, f.value.stride[5], bias, r.b, h, x,
                              lane);
                    }
                }
            }
        }
        g.store(p.d_key, na_offset(p.d_key, r.b, r.h, r.x[0], r.x[1], r.x[2], 0), p.d_value,
                na_offset(p.d_value, r.b, r.h, r.x[0], r.x[1], r.x[2], 0), lane);
    }
}

// d_key and d_value of additional token (b, kv head, e): over every query and every query head
// of the group, in a fixed order.
extern "C" __global__ void NA_FUSED_BOUNDS
    na_fused_backward_extras(const NaFusedBwdParams p) {
    const NaFusedParams& f = p.f;
    const int lane = threadIdx.x % NA_WARP;
    const long long warps = blockDim.x / NA_WARP;
    const long long heads_kv = f.heads / f.group;
    const long long tokens = na_fused_tokens(f);
    const long long rows = f.batch * heads_kv * f.extra_count;
    for (long long row = blockIdx.x * warps + threadIdx.x / NA_WARP; row < rows;
         row += (long long)gridDim.x * warps) {
        const NaDivMod be = na_divmod(row, f.extra_count);
        const NaDivMod bh = na_divmod(be.quot, heads_kv);
        const long long e = be.rem, hk = bh.rem, b = bh.quot;
        const elem_t* key = na_row_ptr(f.extra_key, b, hk, e, 0, 0);
        const elem_t* value = na_row_ptr(f.extra_value, b, hk, e, 0, 0);
        NaKeyGrads g;
        g.zero();
        for (long long t = 0; t < tokens; ++t) {
            long long x[3];
            na_token_of(f.length, t, x);
            for (long long h = hk * f.group; h < (hk + 1) * f.group; ++h) {
                g.add(p, key, f.extra_key.stride[5], value, f.extra_value.stride[5], acc_t(0), b,
                      h, x, lane);
            }
        }
        g.store(p.d_extra_key, na_offset(p.d_extra_key, b, hk, e, 0, 0, 0), p.d_extra_value,
                na_offset(p.d_extra_value, b, hk, e, 0, 0, 0), lane);
    }
}

// This thread's share of d_rpb[h, at - (K - 1)]: ds summed over a fixed subset of the (batch,
// query) pairs whose window holds the key at relative offset `rel` (group steps).
__device__ __forceinline__ acc_t na_bias_partial(const NaFusedBwdParams& p, long long h,
                                                 const long long rel[3]) {
    const NaFusedParams& f = p.f;
    const long long tokens = na_fused_tokens(f), hk = h / f.group;
    acc_t sum = 0;
    for (long long n = threadIdx.x; n < f.batch * tokens; n += blockDim.x) {
        const NaDivMod bt = na_divmod(n, tokens);
        long long x[3], y[3];
        na_token_of(f.length, bt.rem, x);
        const NaWindow w = na_window_of(f.length, f.dilation, x);
        bool seen = true;
#pragma unroll
        for (int a = 0; a < 3; ++a) {
            const long long kj = w.pos[a].index + rel[a];
            seen = seen && w.range[a].start <= kj && kj < w.range[a].end;
            y[a] = kj * f.dilation[a] + w.pos[a].group;
        }
        if (!seen) {
            continue;
        }
        const elem_t* q = na_row_ptr(f.query, bt.quot, h, x[0], x[1], x[2]);
        const elem_t* k = na_row_ptr(f.key, bt.quot, hk, y[0], y[1], y[2]);
        const elem_t* d_out = na_row_ptr(p.d_out, bt.quot, h, x[0], x[1], x[2]);
        const elem_t* v = na_row_ptr(f.value, bt.quot, hk, y[0], y[1], y[2]);
        acc_t logit = 0, dp = 0;
        for (int c = 0; c < NA_DIM; ++c) {
            logit += to_acc(q[c * f.query.stride[5]]) * acc_t(f.scale) *
                     to_acc(k[c * f.key.stride[5]]);
        }
        for (int c = 0; c < NA_DIM_V; ++c) {
            dp += to_acc(d_out[c * p.d_out.stride[5]]) * to_acc(v[c * f.value.stride[5]]);
        }
        logit += na_load(f.bias, h, rel[0] + NA_K0 - 1, rel[1] + NA_K1 - 1, rel[2] + NA_K2 - 1, 0,
                         0);
        const long long row = na_query_row(f, bt.quot, h, x);
        sum += na_pair(logit, na_stats(p)[2 * row], dp, na_stats(p)[2 * row + 1]).ds;
    }
    return sum;
}

// d_rpb[h, r0, r1, r2]: one block per entry, a fixed-shape tree reduction (no atomics).
extern "C" __global__ void __launch_bounds__(NA_REDUCE_THREADS)
    na_fused_backward_bias(const NaFusedBwdParams p) {
    __shared__ acc_t partial[NA_REDUCE_THREADS];
    const long long span[3] = {2 * NA_K0 - 1, 2 * NA_K1 - 1, 2 * NA_K2 - 1};
    const long long entries = p.f.heads * span[0] * span[1] * span[2];
    for (long long o = blockIdx.x; o < entries; o += gridDim.x) {
        const long long h = o / (span[0] * span[1] * span[2]);
        const long long r = o % (span[0] * span[1] * span[2]);
        const long long at[3] = {r / (span[1] * span[2]), (r / span[2]) % span[1], r % span[2]};
        const long long rel[3] = {at[0] - (NA_K0 - 1), at[1] - (NA_K1 - 1), at[2] - (NA_K2 - 1)};
        partial[threadIdx.x] = na_bias_partial(p, h, rel);
        na_tree_sum(partial);
        if (threadIdx.x == 0) {
            na_store(p.d_bias, na_offset(p.d_bias, h, at[0], at[1], at[2], 0, 0), partial[0]);
        }
        __syncthreads();
    }
}
