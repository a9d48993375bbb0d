// The fused backward's tensor-core configuration and the pieces its d_query and key-row kernels
// share (na_fused_bwd_tc.cu): slab and tile sizes per head dim, the rows' statistics, the logit
// gradients dS = P (dP - delta), the stores of a tile's gradient rows, and (on sm_90a) the
// warpgroup products of staged rows.
#pragma once
#include "fused_bwd.cuh"
#include "fused_tc.cuh"

#if NA_DIM > 128 || NA_DIM_V > 128
#error "the tensor-core backward takes head dims up to 128"
#endif

#define NA_TCB_STEPS (NA_TC_PAD(NA_DIM) / 16)
#define NA_TCB_STEPS_V (NA_TC_PAD(NA_DIM_V) / 16)
#define NA_TCB_PITCH (NA_TC_PAD(NA_DIM) + NA_TC_SKEW)
#define NA_TCB_PITCH_V (NA_TC_PAD(NA_DIM_V) + NA_TC_SKEW)
// Columns per slab: fewer for wide rows, whose fragments and gradients take more registers (and,
// in the key kernel, whose staged tile takes more shared memory).
#define NA_TCB_WIDE (NA_DIM > 64 || NA_DIM_V > 64)
// The d_query kernel multiplies on warpgroup products (wgmma) where the host asks for them
// (NA_WGMMA) and the target has them (sm_90a): its slabs are then 64 keys whatever the rows.
#define NA_TCB_WGMMA NA_HAS_WGMMA
// Whether the warpgroup kernels take their slabs by bulk tensor copies onto a barrier per ring
// buffer, laid out chunk-major, as the forward's NA_TC_TMA variants do (NA_TMA: kernels.rs): the
// d_query kernel its slabs' keys and values, the key-row kernel its slabs' queries and output
// gradients. The tiles' own rows still come by cp.async.
#if NA_TCB_WGMMA && defined(NA_TMA) && NA_TMA
#define NA_TCB_TMA 1
#else
#define NA_TCB_TMA 0
#endif
#define NA_TCB_KEYS (NA_TCB_WIDE && !NA_TCB_WGMMA ? 32 : 64)
// 8-channel blocks per lane of a gradient row (of a query or key, and of a value): a
// warpgroup product's width is whole 16 channels.
#define NA_TCB_BLOCKS (NA_TCB_WGMMA ? NA_TC_PAD(NA_DIM) / 8 : NA_DIM / 8)
#define NA_TCB_BLOCKS_V (NA_TCB_WGMMA ? NA_TC_PAD(NA_DIM_V) / 8 : NA_DIM_V / 8)
// Queries per slab of the key-row kernels, whose gradients (d_key and d_value) take the most
// registers: on mma.sync fewer for wide rows, whose products take the tile's rows as fragments
// in registers too; on warpgroup products (which read them from shared memory) the host's
// choice, which plans the bulk copies' slabs by it (cuda/tma.rs, key_row_slab_queries).
#if NA_TCB_WGMMA
#ifndef NA_TCB_WGMMA_QUERIES
#error "NA_TCB_WGMMA_QUERIES: the host sets it (kernels.rs)"
#endif
#define NA_TCB_QUERIES NA_TCB_WGMMA_QUERIES
#else
#define NA_TCB_QUERIES (NA_TCB_WIDE ? 16 : 32)
#endif

// Store this lane's share of rows g and g + 8 (C layout, `BLOCKS` 8-channel blocks) times
// `factor` at `offset[r]` of `v`, for the rows that exist.
template <int BLOCKS>
__device__ __forceinline__ void na_store_rows(const NaView& v, const long long offset[2],
                                              const NaTcRow rows[2], const float acc[BLOCKS][4],
                                              float factor, int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (!rows[r].valid) {
            continue;
        }
#pragma unroll
        for (int o = 0; o < BLOCKS; ++o) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int c = 8 * o + 2 * t + e;
                na_store(v, offset[r] + c * v.stride[5], acc[o][2 * r + e] * factor);
            }
        }
    }
}

// A query row's statistics, as the logits' gradients take them: the exponent (base 2) offset
// of its probabilities, -lse log2 e (+inf for a row that saw no key, lse -inf: na_logit_grads
// gives it no probabilities), and delta = d_out . out - d_lse.
struct NaStat {
    float offset;
    float delta;
};

__device__ __forceinline__ NaStat na_stat(float lse, float delta) {
    return {-lse * NA_LOG2E, delta};
}

// A query row's statistics as the d_query kernel leaves them in the scratch (na_stats: lse, then
// delta), which the key-row kernels stage as they are and turn into a NaStat where they use them.
struct NaRowStats {
    float lse;
    float delta;

    __device__ __forceinline__ NaStat stat() const { return na_stat(lse, delta); }
};

// dS = P (dP - delta) in place of dP, with P = exp(logit - lse) in place of the logits as
// na_logits leaves them (in units of which `factor` is the base-2 exponent: NaExponent); P is 0
// where they do not count (-inf) and for a row that saw no key. `stat(kb, i)` gives the
// statistics of the query of product i of block kb.
template <int BLOCKS, class Stat>
__device__ __forceinline__ void na_logit_grads(float probs[BLOCKS][4], float dp[BLOCKS][4],
                                               float factor, Stat&& stat) {
#pragma unroll
    for (int kb = 0; kb < BLOCKS; ++kb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const NaStat q = stat(kb, i);
            // (The test of -inf is for the register allocator: without it, the key kernels'
            // gradients spill at head dim 128 on sm_80. 2^-inf is 0 either way.)
            const float l = probs[kb][i];
            const bool none = l == neg_inf() || q.offset == -neg_inf();
            const float prob = none ? 0.0f : na_exp2(fmaf(l, factor, q.offset));
            probs[kb][i] = prob;
            dp[kb][i] = prob * (dp[kb][i] - q.delta);
        }
    }
}

#if NA_TCB_WGMMA
// ---- warpgroup products of staged rows ----------------------------------------------------------
// Rows staged in core matrices (NaStaged<N, true>) are the factors of the warpgroup kernels' two
// kinds of product: a tile's rows times a slab's (channels along K), and weights times a slab's
// rows (rows along K, channels along N).

// Issue products = A B^T (COLUMNS wide) over the 16-channel steps of rows of N channels: A the
// tile's 64 rows and B a slab's COLUMNS, laid out as NaStaged<N, true> (B chunk-major, as bulk
// tensor copies land it, where SLAB_CHUNK_ROWS says so).
template <int N, int COLUMNS, int SLAB_CHUNK_ROWS = 0>
__device__ __forceinline__ void na_issue_row_products(float products[COLUMNS / 8][4],
                                                      const elem_t* a, const elem_t* b) {
    using Rows = NaStaged<N, true>;
    using SlabRows = NaStaged<N, true, SLAB_CHUNK_ROWS>;
#pragma unroll
    for (int s = 0; s < NA_TC_PAD(N) / 16; ++s) {
        const NaSmemMatrix a_step = {a, 2 * Rows::chunk_bytes * s, Rows::chunk_bytes,
                                     Rows::group_bytes};
        const NaSmemMatrix b_step = {b, 2 * SlabRows::chunk_bytes * s, SlabRows::chunk_bytes,
                                     SlabRows::group_bytes};
        na_wgmma_ss<COLUMNS, 0>(&products[0][0], a_step, b_step, s > 0);
    }
}

// The first group of a pipelined slab's products, zeroed first, and committed whether issued or
// not (`run`), so that the waits count the same groups: logits = a b^T (query and key rows) and
// dp = a_v b_v^T (output-gradient and value rows), COLUMNS wide (b and b_v as
// na_issue_row_products's B).
template <int COLUMNS, int SLAB_CHUNK_ROWS = 0>
__device__ __forceinline__ void na_issue_logits_and_dp(float logits[COLUMNS / 8][4],
                                                       float dp[COLUMNS / 8][4], bool run,
                                                       const elem_t* a, const elem_t* b,
                                                       const elem_t* a_v, const elem_t* b_v) {
    na_zero<COLUMNS / 8>(logits);
    na_zero<COLUMNS / 8>(dp);
    if (run) {
        na_wgmma_fence();
        na_issue_row_products<NA_DIM, COLUMNS, SLAB_CHUNK_ROWS>(logits, a, b);
        na_issue_row_products<NA_DIM_V, COLUMNS, SLAB_CHUNK_ROWS>(dp, a_v, b_v);
    }
    na_wgmma_commit();
}

// Rows 16 k .. 16 k + 15 of staged rows of N channels (NaStaged<N, true, CHUNK_ROWS>) as the B
// factor of a product that weighs them: the rows along K (two 8-row groups), the channels along
// N.
template <int N, int CHUNK_ROWS = 0>
__device__ __forceinline__ NaSmemMatrix na_row_step(const elem_t* rows, int k) {
    using Rows = NaStaged<N, true, CHUNK_ROWS>;
    return {rows, 2 * Rows::group_bytes * k, Rows::group_bytes, Rows::chunk_bytes};
}

// The waits of a pipelined slab's two groups of products, issued in this order: the next slab's
// logits (and dP), then this slab's weighted rows. With OVERLAP, `logits_done` runs as soon as
// the first group is done, while the second runs, and `rows_done` once that is done; without,
// both groups are waited for first (so that the registers of both are not live at once).
template <bool OVERLAP, class LogitsDone, class RowsDone>
__device__ __forceinline__ void na_wait_slab_products(LogitsDone&& logits_done,
                                                      RowsDone&& rows_done) {
    if (OVERLAP) {
        na_wgmma_wait<1>();
        logits_done();
        na_wgmma_wait<0>();
        rows_done();
    } else {
        na_wgmma_wait<0>();
        rows_done();
        logits_done();
    }
}
#endif
