// The d_query kernel's static shared memory and its share of d_rpb (na_fused_bwd_tc.cu): where
// a tile's bias table and its gradient's per-warp copies fit beside its rows, and the copies
// themselves (NaTileBiasGrads), whose sums the bias kernels add up in a fixed order.
#pragma once
#include "bwd_tc.cuh"

// ---- the bias's gradient ------------------------------------------------------------------------
// d_rpb[h, key - query + K - 1] (group steps per axis; rpb takes stride 1) sums dS over head h's
// pairs in the window. Where the table is small enough (NA_TCB_BIAS_GRADS, the host's choice),
// the d_query kernel adds up each tile's share in shared memory and leaves it in the scratch
// after the statistics, one row per (head, batch, tile); two kernels add those rows up in a fixed
// order: slices of NA_BIAS_SLICE rows, then the slices.

// Rows of tile sums per head (every batch's tiles), the row of a query tile's task, and slices
// of rows.
__device__ __forceinline__ long long na_bias_rows(const NaFusedBwdParams& p) {
    return p.f.batch * p.tiling.per_head.divisor;
}
__device__ __forceinline__ long long na_bias_row(const NaFusedBwdParams& p, const NaTcTask& job) {
    return (job.head * p.f.batch + job.batch) * p.tiling.per_head.divisor + job.tile;
}
__device__ __forceinline__ long long na_bias_slice_count(const NaFusedBwdParams& p) {
    return (na_bias_rows(p) + NA_BIAS_SLICE - 1) / NA_BIAS_SLICE;
}

// The tile sums [heads][rows][span], after the statistics in the scratch; then the slices'
// sums [heads][slices][span].
__device__ __forceinline__ float* na_bias_tile_sums(const NaFusedBwdParams& p) {
    return na_stats(p) + 2 * p.f.batch * p.f.heads * na_fused_tokens(p.f);
}
__device__ __forceinline__ float* na_bias_slice_sums(const NaFusedBwdParams& p) {
    return na_bias_tile_sums(p) + p.f.heads * na_bias_rows(p) * NA_BIAS_SPAN;
}

// On the host: the lanes of a warp meet here, so that what each read above comes before what any
// writes below, as when a warp runs one instruction on the GPU (where this is nothing): a race
// between lanes then loses updates on the host too.
__device__ __forceinline__ void na_warp_lockstep() {
#ifdef NA_HOST
    __syncwarp();
#endif
}

#if NA_TCB_WGMMA
// The d_query kernel's static shared memory beside the bias gradients': none (its rows are in
// dynamic shared memory).
struct NaQueryGradShared {};
#else
// The d_query kernel's static shared memory beside the bias gradients': two slabs' key rows
// (the next one's copies overlap this one's products), a slab's value rows, and the tile's own
// output gradient rows (their fragments are read per slab: in registers beside the query's and
// d_query's they would spill).
struct NaQueryGradShared {
    __align__(16) elem_t keys[2][NA_TCB_KEYS][NA_TCB_PITCH];
    __align__(16) elem_t values[NA_TCB_KEYS][NA_TCB_PITCH_V];
    __align__(16) elem_t d_outs[NA_TC_ROWS][NA_TCB_PITCH_V];
};
#endif

// The d_query kernel's bias table (NaBiasTable), its entries staged where they fit: on mma.sync,
// beside its rows and one copy per warp of the table for its gradient (where it sums it) in 48 KiB
// of static shared memory.
constexpr bool na_tcb_query_bias_staged =
    NA_TCB_WGMMA ? 4 * NA_BIAS_SPAN <= NA_TC_BIAS_STAGE_MAX
                 : sizeof(NaQueryGradShared) + sizeof(NaBiasTable<NA_TCB_KEYS, true>) +
                           (NA_TCB_BIAS_GRADS ? NA_TC_WARPS * 4 * NA_BIAS_SPAN : 0) <=
                       48 * 1024;
using NaQueryBias = NaBiasTable<NA_TCB_KEYS, na_tcb_query_bias_staged>;

// Entries of bias tables each warp has room for in the d_query kernel: what its 48 KiB of static
// shared memory leaves beside its rows and bias table on mma.sync; on warpgroup products, whose
// rows take dynamic shared memory, the host's room for one table (kernels.rs,
// max_tensor_core_bias_span: 512 entries up to head dims 64, else 256).
#define NA_TCB_BIAS_ROOM                                                                           \
    (NA_TCB_WGMMA ? (NA_DIM <= 64 && NA_DIM_V <= 64 ? 512 : 256)                                   \
                  : (48 * 1024 - (int)sizeof(NaQueryGradShared) - (int)sizeof(NaQueryBias)) /     \
                        (NA_TC_WARPS * 4))
// Copies of the bias table per warp that a tile's d_rpb is added up in: one for each of the
// four quad positions where they fit the room, else two, else one; position t adds into copy
// t % NA_TCB_COPIES. The lanes of one position never meet in an entry (below); the positions
// sharing a copy take turns.
#define NA_TCB_COPIES                                                                              \
    (4 * NA_BIAS_SPAN <= NA_TCB_BIAS_ROOM ? 4 : 2 * NA_BIAS_SPAN <= NA_TCB_BIAS_ROOM ? 2 : 1)

// A query tile's share of its head's d_rpb, added up in shared memory: NA_TCB_COPIES copies of
// the table per warp, so that no two warps (nor lanes of one warp in one turn) add into one
// entry. Empty without NA_TCB_BIAS_GRADS.
struct NaTileBiasGrads {
#if NA_TCB_BIAS_GRADS
    float copies[NA_TC_WARPS][NA_TCB_COPIES][NA_BIAS_SPAN];
#endif

    // Add warp `warp`'s logit gradients of the slab `s` of tile `tl` (C layout of `BLOCKS`
    // 8-column blocks; `seen` and `live` as na_slab_mask and its warp-wide or give them; the
    // keys' numbers from `bias`). The lanes of one quad position t hold one key column and
    // sixteen different queries, so different entries; lanes of different t may meet in one, so
    // positions that share a copy take turns.
    template <int BLOCKS>
    __device__ __forceinline__ void add(int warp, const float ds[BLOCKS][4], unsigned seen,
                                        unsigned live, const NaQueryBias& bias,
                                        const NaTcTile& tl, const NaSlab& s,
                                        const NaTcRow rows[2], int t) {
#if NA_TCB_BIAS_GRADS
        if (s.extra) {
            return;
        }
        constexpr int TURNS = 4 / NA_TCB_COPIES;
        float* copy = copies[warp][t % NA_TCB_COPIES];
        // Entry = key - query + centre, as byte offsets (na_at_bytes): the key's its slab's and
        // its column's.
        const int slab = bias.slab_offset(tl, s);
        int query[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int* x = rows[r].index;
            query[r] = 4 * (na_bias_number(x[0], x[1], x[2]) - NA_TC_BIAS_CENTRE) - slab;
        }
#pragma unroll
        for (int kb = 0; kb < BLOCKS; ++kb) {
            if (!na_block_live(live, kb)) {
                continue;
            }
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = bias.column(8 * kb + 2 * t + e);
                for (int turn = 0; turn < TURNS; ++turn) {
                    bool mine[2];
                    float sum[2];
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        mine[r] = t / NA_TCB_COPIES == turn && na_seen(seen, kb, r, e);
                        sum[r] = mine[r] ? na_at_bytes(copy, key - query[r]) + ds[kb][2 * r + e]
                                         : 0.0f;
                    }
                    na_warp_lockstep();
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        if (mine[r]) {
                            na_at_bytes(copy, key - query[r]) = sum[r];
                        }
                    }
                    __syncwarp();
                }
            }
        }
#endif
    }

    // Store the tile's sums (the copies added up in order) at `row`, and zero the copies; the
    // block calls it after a barrier that ends the additions. Thread n takes entries n,
    // n + NA_TC_THREADS, ...: the same thread zeroes them at the start (`zero`).
    __device__ __forceinline__ void flush(float* row) {
#if NA_TCB_BIAS_GRADS
        for (int n = threadIdx.x; n < NA_BIAS_SPAN; n += NA_TC_THREADS) {
            float sum = 0;
#pragma unroll
            for (int w = 0; w < NA_TC_WARPS; ++w) {
#pragma unroll
                for (int c = 0; c < NA_TCB_COPIES; ++c) {
                    sum += copies[w][c][n];
                    copies[w][c][n] = 0;
                }
            }
            row[n] = sum;
        }
#endif
    }

    __device__ __forceinline__ void zero() {
#if NA_TCB_BIAS_GRADS
        for (int n = threadIdx.x; n < NA_BIAS_SPAN; n += NA_TC_THREADS) {
#pragma unroll
            for (int w = 0; w < NA_TC_WARPS; ++w) {
#pragma unroll
                for (int c = 0; c < NA_TCB_COPIES; ++c) {
                    copies[w][c][n] = 0;
                }
            }
        }
#endif
    }
};
