// Device code shared by the fused kernels (na_fused_fwd.cu, na_fused_bwd.cu): one warp per row,
// each lane holding a strided share of the row's channels; warp-wide dot products; and the walk
// over a query's keys (its window, then the additional tokens) that the forward and the backward
// both make, so that both see the same keys, bias and logits.
//
// Beyond the constants of common.cuh, the head dims are -D flags (their channels live in
// registers):
//   NA_DIM    channels of queries and keys
//   NA_DIM_V  channels of values and outputs
#pragma once
#include "common.cuh"

#if !defined(NA_DIM) || !defined(NA_DIM_V)
#error "the fused kernels need NA_DIM and NA_DIM_V"
#endif

// The fused kernels' launch bounds: NA_BLOCK threads, and a minimum of one block per SM, so that
// ptxas gives a kernel the registers it needs instead of capping them for occupancy and spilling.
#define NA_FUSED_BOUNDS __launch_bounds__(NA_BLOCK, 1)

#define NA_WARP 32
// Channels per lane of a query row and of an output row.
#define NA_LANE_DIM ((NA_DIM + NA_WARP - 1) / NA_WARP)
#define NA_LANE_DIM_V ((NA_DIM_V + NA_WARP - 1) / NA_WARP)

__device__ __forceinline__ float na_exp(float x) { return expf(x); }
__device__ __forceinline__ double na_exp(double x) { return exp(x); }
// 2^x on the special-function unit (ex2.approx.ftz: about 2 ulps; results below 2^-126 flush
// to zero, and 2^-inf is 0). One instruction: expf's full-precision path, and even __expf's
// handling of denormal results, take several.
__device__ __forceinline__ float na_exp2(float x) {
#ifdef NA_HOST
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

#define NA_LOG2E 1.4426950408889634f
// The least positive normal float, and the greatest finite one (NVRTC has no <cfloat>).
#define NA_FLOAT_MIN 1.17549435e-38f
#define NA_FLOAT_MAX 3.40282347e+38f

// The tensor-core kernels take exp(x) as na_exp2(x log2 e), the log2 e folded into a multiply-add
// they need anyway. CUDA documents __expf's error (the same sequence) as 2 + 1.2 |x| ulps, about
// 1e-5 relative at worst over the arguments a softmax sees (<= 0, down to underflow), far below
// the 16-bit rounding of their probabilities. Their forward and backward both take it, so they
// agree.
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

// Address of channel 0 of row `[i0, i1, i2, i3, i4, -]` of a view.
__device__ __forceinline__ const elem_t* na_row_ptr(const NaView& v, long long i0, long long i1,
                                                    long long i2, long long i3, long long i4) {
    return na_ptr(v) + na_offset(v, i0, i1, i2, i3, i4, 0);
}

// Element `[i0, i1, i2, i3, i4, 0]` of a float32 view (lse and its gradient), whatever elem_t is.
__device__ __forceinline__ acc_t na_load_f32(const NaView& v, long long i0, long long i1,
                                             long long i2, long long i3, long long i4) {
    return acc_t(reinterpret_cast<const float*>(v.data)[na_offset(v, i0, i1, i2, i3, i4, 0)]);
}

// This lane's share of a row of `N` channels (channel stride `step`), times `factor`; zeros
// past the row's end.
template <int N>
__device__ __forceinline__ void na_lane_load(acc_t share[(N + NA_WARP - 1) / NA_WARP],
                                             const elem_t* row, long long step, acc_t factor,
                                             int lane) {
#pragma unroll
    for (int k = 0; k < (N + NA_WARP - 1) / NA_WARP; ++k) {
        const int c = lane + k * NA_WARP;
        share[k] = c < N ? to_acc(row[c * step]) * factor : acc_t(0);
    }
}

// Store this lane's share of a row of `N` channels (times `factor`) at `offset` of `v`.
template <int N>
__device__ __forceinline__ void na_lane_store(const NaView& v, long long offset,
                                              const acc_t share[(N + NA_WARP - 1) / NA_WARP],
                                              acc_t factor, int lane) {
#pragma unroll
    for (int k = 0; k < (N + NA_WARP - 1) / NA_WARP; ++k) {
        const int c = lane + k * NA_WARP;
        if (c < N) {
            na_store(v, offset + c * v.stride[5], share[k] * factor);
        }
    }
}

// share . row over the warp: `share` is this lane's share of one row of `N` channels, `row`
// the other row (channel stride `step`).
template <int N>
__device__ __forceinline__ acc_t na_warp_dot(const acc_t share[(N + NA_WARP - 1) / NA_WARP],
                                             const elem_t* row, long long step, int lane) {
    acc_t partial = 0;
#pragma unroll
    for (int k = 0; k < (N + NA_WARP - 1) / NA_WARP; ++k) {
        const int c = lane + k * NA_WARP;
        if (c < N) {
            partial += share[k] * to_acc(row[c * step]);
        }
    }
    return na_warp_sum(partial);
}

// (factor * a) . b over the warp for two rows of `N` channels read from memory (channel strides
// `a_step`, `b_step`); with `a` a query row and `factor` the scale, the same products in the same
// order as na_warp_dot of the scaled query's share.
template <int N>
__device__ __forceinline__ acc_t na_warp_dot_rows(const elem_t* a, long long a_step, acc_t factor,
                                                  const elem_t* b, long long b_step, int lane) {
    acc_t partial = 0;
#pragma unroll
    for (int k = 0; k < (N + NA_WARP - 1) / NA_WARP; ++k) {
        const int c = lane + k * NA_WARP;
        if (c < N) {
            partial += to_acc(a[c * a_step]) * factor * to_acc(b[c * b_step]);
        }
    }
    return na_warp_sum(partial);
}

// share += weight * row, over this lane's channels of a row of `N` channels.
template <int N>
__device__ __forceinline__ void na_lane_axpy(acc_t share[(N + NA_WARP - 1) / NA_WARP],
                                             acc_t weight, const elem_t* row, long long step,
                                             int lane) {
#pragma unroll
    for (int k = 0; k < (N + NA_WARP - 1) / NA_WARP; ++k) {
        const int c = lane + k * NA_WARP;
        if (c < N) {
            share[k] += weight * to_acc(row[c * step]);
        }
    }
}

// Call `visit(key_row, value_row, bias)` for every key the query at `r` (kv head `hk`) attends:
// its window in slot order, then the additional tokens (bias 0). Rows are channel-0 pointers;
// channel strides are p.key/p.value.stride[5] (window) or p.extra_*.stride[5] (extras), passed
// as the last two arguments.
template <class Visit>
__device__ __forceinline__ void na_for_each_key(const NaFusedParams& p, const NaRow& r,
                                                long long hk, Visit&& visit) {
    if (p.has_window) {
        const NaWindow w = na_window_of(p.length, p.dilation, r.x);
        const long long k_step = p.key.stride[5], v_step = p.value.stride[5];
        for (long long s0 = 0; s0 < w.range[0].end - w.range[0].start; ++s0) {
            const long long y0 = na_key_of(p.dilation, w, 0, s0);
            for (long long s1 = 0; s1 < w.range[1].end - w.range[1].start; ++s1) {
                const long long y1 = na_key_of(p.dilation, w, 1, s1);
                for (long long s2 = 0; s2 < w.range[2].end - w.range[2].start; ++s2) {
                    const long long y2 = na_key_of(p.dilation, w, 2, s2);
                    const acc_t bias =
                        p.has_bias ? na_load(p.bias, r.h, na_bias_index(w, 0, s0),
                                             na_bias_index(w, 1, s1), na_bias_index(w, 2, s2), 0, 0)
                                   : acc_t(0);
                    visit(na_row_ptr(p.key, r.b, hk, y0, y1, y2),
                          na_row_ptr(p.value, r.b, hk, y0, y1, y2), bias, k_step, v_step);
                }
            }
        }
    }
    for (long long e = 0; e < p.extra_count; ++e) {
        visit(na_row_ptr(p.extra_key, r.b, hk, e, 0, 0),
              na_row_ptr(p.extra_value, r.b, hk, e, 0, 0), acc_t(0), p.extra_key.stride[5],
              p.extra_value.stride[5]);
    }
}
