// Device code shared by the fused backward kernels (na_fused_bwd.cu, one warp per row;
// na_fused_bwd_tc.cu, tensor cores): their parameter block, the per-row statistics the first
// kernel leaves for the others, and the logit gradient of one (query, key) pair.
#pragma once
#include "fused.cuh"

// The backward's parameter block: the forward's (with `out` and `lse` the forward's outputs;
// the tensor-core kernels read that lse, the warp kernels form it again at their own precision)
// and the gradients. Mirrors fused_launch::FusedBackwardParams.
struct NaFusedBwdParams {
    NaFusedParams f;
    NaView d_out;          // [b, h, s0, s1, s2, c]
    NaView d_lse;          // [b, h, s0, s1, s2, -], float32; when has_d_lse
    NaView d_query;        // written: [b, h, s0, s1, s2, c]
    NaView d_key;          // written: [b, kv head, s0, s1, s2, c]
    NaView d_value;        // written: [b, kv head, s0, s1, s2, c]
    NaView d_extra_key;    // written: [b, kv head, e, -, -, c]
    NaView d_extra_value;  // written: [b, kv head, e, -, -, c]
    NaView d_bias;         // written: [h, r0, r1, r2, -, -]
    unsigned long long stats;  // acc_t (lse, delta) per query row, rows numbered as na_row_of's
    int has_d_lse;
    int reserved;
    NaTcTiling tiling;   // the launch's tasks and tiles (tensor-core kernels; else unused)
    NaTmaParams tma;     // the d_query kernel's bulk copies (NA_TCB_TMA variants; else zeros)
};

static_assert(sizeof(NaFusedBwdParams) ==
                  (sizeof(NaFusedParams) + 8 * 56 + 8 + 2 * 4 + sizeof(NaTcTiling) + 127) / 128 *
                          128 +
                      sizeof(NaTmaParams),
              "NaFusedBwdParams must match fused_launch::FusedBackwardParams");

__device__ __forceinline__ long long na_fused_tokens(const NaFusedParams& p) {
    return p.length[0] * p.length[1] * p.length[2];
}

__device__ __forceinline__ acc_t* na_stats(const NaFusedBwdParams& p) {
    return reinterpret_cast<acc_t*>(p.stats);
}

// Row number (as na_row_of numbers them) of query (b, h, x).
__device__ __forceinline__ long long na_query_row(const NaFusedParams& p, long long b, long long h,
                                                  const long long x[3]) {
    return ((b * p.heads + h) * p.length[0] + x[0]) * p.length[1] * p.length[2] +
           x[1] * p.length[2] + x[2];
}

// The logit gradient of one (query, key) pair: p (dp - delta), with p = exp(logit - lse).
struct NaPair {
    acc_t prob;
    acc_t ds;
};

__device__ __forceinline__ NaPair na_pair(acc_t logit, acc_t lse, acc_t dp, acc_t delta) {
    // A key at -inf (or a row that sees none) has probability 0.
    const acc_t prob = logit == neg_inf() ? acc_t(0) : na_exp(logit - lse);
    return {prob, prob * (dp - delta)};
}

// Queries (group indices) whose windows along axis `a` hold some key of group indices
// `[first, last]` (na_window_run), in the type of the indices (na_group_window).
template <class Index>
__device__ __forceinline__ NaRange na_fused_inverse_run(Index first, Index last, Index lg, int a) {
    return na_window_run(first, last, lg, na_kernel(a), na_stride(a), na_causal(a));
}
