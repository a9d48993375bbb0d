// The key-row kernels' machinery (na_fused_bwd_tc.cu): staging a slab of queries with their
// statistics, and walking a key tile's box of queries for d_key and d_value, on warpgroup
// products (sm_90a, NA_WGMMA) or mma.sync.
#pragma once
#include "bwd_tc.cuh"

// ---- the key-row kernels ------------------------------------------------------------------------
// A tile of 64 key rows (of one kv head) walks the box of queries whose windows hold its keys, a
// slab of NA_TCB_QUERIES queries at a time, for d_value += P^T dO and d_key += dS^T Q: the
// tile's key and value rows are staged once, each slab's query and output gradient rows (and its
// queries' statistics) in turn.

// Start copying the statistics of column `n` of slab `s` (query head h) into `stats[n]`
// (cp.async), or zeros where the column does not exist; whether a copy was started.
__device__ __forceinline__ bool na_stage_query_stats(const NaFusedBwdParams& p, const NaTcTile& tl,
                                                     const NaSlab& s, int n, long long b,
                                                     long long h, NaRowStats* stats) {
    int c[3];
    if (!na_column(tl, s, n, c)) {
        stats[n] = {0, 0};
        return false;
    }
    long long x[3];
    na_tile_positions(p.f, tl, c, x);
    na_copy8_async(&stats[n], na_stats(p) + 2 * na_query_row(p.f, b, h, x));
    return true;
}

// Start staging slab `s`'s query and output gradient rows into `queries` and `d_outs` (laid out
// as NaStaged<., CORE_MATRICES, CHUNK_ROWS>) and its queries' statistics into `stats`, all
// asynchronously (a load of the statistics would hold the thread up until it arrived); columns
// that do not exist as zeros. Every thread of the block calls it, after a barrier that ends the
// reads of what it overwrites, and waits for its copies before the barrier that publishes them.
template <bool CORE_MATRICES, int CHUNK_ROWS = 0>
__device__ __forceinline__ void na_stage_query_slab(const NaFusedBwdParams& p, const NaTcTile& tl,
                                                    const NaSlab& s, long long b, long long h,
                                                    elem_t* queries, elem_t* d_outs,
                                                    NaRowStats* stats) {
    const NaFusedParams& f = p.f;
    na_stage_pairs<NA_TCB_QUERIES, NA_DIM, NA_DIM_V, CORE_MATRICES, CHUNK_ROWS>(
        queries, d_outs, [&](int n, const elem_t* src[2], long long step[2]) {
            int c[3];
            if (!na_column(tl, s, n, c)) {
                return;
            }
            src[0] = na_tile_row_ptr(f, tl, f.query, b, h, c);
            src[1] = na_tile_row_ptr(f, tl, p.d_out, b, h, c);
            step[0] = f.query.stride[5];
            step[1] = p.d_out.stride[5];
        });
    for (int n = threadIdx.x; n < NA_TCB_QUERIES; n += NA_TC_THREADS) {
        na_stage_query_stats(p, tl, s, n, b, h, stats);
    }
}

// A key-row tile's gradients: this lane's share (C layout) of rows g and g + 8 of its warp.
struct NaKeyTileGrads {
    float d_key[NA_TCB_BLOCKS][4];
    float d_value[NA_TCB_BLOCKS_V][4];

    __device__ __forceinline__ void zero() {
        na_zero<NA_TCB_BLOCKS>(d_key);
        na_zero<NA_TCB_BLOCKS_V>(d_value);
    }
};

#if NA_TCB_WGMMA
// On warpgroup products, software-pipelined as the d_query kernel: the tile's key and value rows
// are both products' A (from shared memory) for the transposed logits S^T = K Q^T and
// dP^T = V dO^T; P^T and dS^T, as A fragments, weigh the slab's output gradient and query rows.
// The slabs go through a ring of NA_TCB_QUERY_STAGES buffers in dynamic shared memory, and the
// barrier of slab j publishes slab j + 1: its logits and dP are issued with slab j's gradient
// products, and (NA_TCB_KEY_OVERLAP) its P and dS computed while those run. Wide rows wait for
// both first: slab j's fragments and slab j + 1's logits at once, beside d_key and d_value,
// spill at head dim 128. The key kernel's slabs of the box come by bulk tensor copies where the
// host asks for them (NA_TCB_TMA), landing chunk-major; the additional tokens' kernel keeps
// cp.async (its boxes, whole dilation groups, take shapes of their own), into the same layout.
#define NA_TCB_QUERY_STAGES 4
#define NA_TCB_KEY_OVERLAP (!NA_TCB_WIDE)
#define NA_TCB_QUERY_CHUNK_ROWS (NA_TCB_TMA ? NA_TCB_QUERIES : 0)
constexpr int na_tcb_key_tile = NA_TC_ROWS * NaStaged<NA_DIM, true>::per_row;
constexpr int na_tcb_value_tile = NA_TC_ROWS * NaStaged<NA_DIM_V, true>::per_row;
constexpr int na_tcb_slab_queries = NA_TCB_QUERIES * NaStaged<NA_DIM, true>::per_row;
constexpr int na_tcb_slab_rows =
    na_tcb_slab_queries + NA_TCB_QUERIES * NaStaged<NA_DIM_V, true>::per_row;

// The key-row kernels' bias table (NaBiasTable), its entries staged where they fit.
using NaKeyBias = NaBiasTable<NA_TCB_QUERIES, 4 * NA_BIAS_SPAN <= NA_TC_BIAS_STAGE_MAX>;

// Where the key-row kernels' rows lie, all in dynamic shared memory: the tile's key rows, its
// value rows, the ring's buffers (a slab's query rows, then its output gradient rows), then the
// ring's statistics; and their bias table (static).
struct NaKeyRowsShared {
    NaKeyBias bias;

    __device__ __forceinline__ elem_t* keys() const {
        return reinterpret_cast<elem_t*>(na_dynamic_shared());
    }
    __device__ __forceinline__ elem_t* values() const { return keys() + na_tcb_key_tile; }
    __device__ __forceinline__ elem_t* queries(int buffer) const {
        return values() + na_tcb_value_tile + buffer * na_tcb_slab_rows;
    }
    __device__ __forceinline__ elem_t* d_outs(int buffer) const {
        return queries(buffer) + na_tcb_slab_queries;
    }
    __device__ __forceinline__ NaRowStats* stats(int buffer) const {
        return reinterpret_cast<NaRowStats*>(queries(NA_TCB_QUERY_STAGES)) +
               buffer * NA_TCB_QUERIES;
    }
};
constexpr int na_tcb_key_rows_bytes =
    (na_tcb_key_tile + na_tcb_value_tile + NA_TCB_QUERY_STAGES * na_tcb_slab_rows) *
        (int)sizeof(elem_t) +
    NA_TCB_QUERY_STAGES * NA_TCB_QUERIES * (int)sizeof(NaRowStats);

// Copy slab `s`'s query and output gradient rows (query head h) into `queries` and `d_outs`, and
// its queries' statistics into `stats`, onto `full` (rather than as a cp.async group), every
// thread arriving on it; with `copies` false, only arrive. The rows by bulk tensor copies
// (na_copy_slab_chunk: the queries' chunks by the first warp, the output gradients' by the
// second, thread 0 announcing their bytes), the statistics by the threads past those two warps
// (cp.async, their arrival once it lands; zeros for columns that do not exist).
__device__ __forceinline__ void na_copy_query_slab_onto(const NaFusedBwdParams& p,
                                                        const NaTcTile& tl, const NaSlab& s,
                                                        bool copies, long long b, long long h,
                                                        elem_t* queries, elem_t* d_outs,
                                                        NaRowStats* stats, NaBarrier* full) {
    constexpr int ROWS = NA_TCB_QUERIES;
    static_assert(NA_TC_THREADS >= 2 * NA_WARP + ROWS, "a thread per statistic past two warps");
    static_assert(NA_DIM / 8 <= NA_WARP && NA_DIM_V / 8 <= NA_WARP, "a chunk per thread");
    const int thread = (int)threadIdx.x, n = thread - 2 * NA_WARP;
    if (!copies) {
        na_barrier_arrive(full);
    } else if (n >= 0) {
        // (A thread whose column does not exist arrives at once, its zeros released by it.)
        const bool copied = n < ROWS && na_stage_query_stats(p, tl, s, n, b, h, stats);
        if (copied) {
            na_barrier_arrive_after_copies(full);
        } else {
            na_barrier_arrive(full);
        }
    } else {
        if (thread == 0) {
            na_barrier_arrive_expect(full, ROWS * (NA_DIM + NA_DIM_V) * (unsigned)sizeof(elem_t));
        } else {
            na_barrier_arrive(full);
        }
        const int warp = thread / NA_WARP, chunk = thread % NA_WARP;
        const int channels = warp == 0 ? NA_DIM : NA_DIM_V;
        if (chunk < channels / 8) {
            na_copy_slab_chunk(p.f, p.tma.maps[warp], channels, chunk, tl, s, b, h,
                               (warp == 0 ? queries : d_outs) + chunk * 8 * ROWS, full);
        }
    }
}

// Add to `grads` the terms of query head h's rows in box `tl` (its columns): d_value += P^T dO,
// d_key += dS^T Q (unscaled). `biased`: whether the logits take the bias (rows are keys of the
// window). BULK: the slabs come onto `barriers` (na_copy_query_slab_onto; the tile's rows
// committed as a cp.async group of their own), else as cp.async groups (the tile's rows not yet
// committed). Every thread of the block calls it, after the tile's rows were staged; it ends
// with a barrier after every read of the tile and the ring.
template <bool BULK>
__device__ __forceinline__ void na_key_rows_over_box(const NaFusedBwdParams& p,
                                                     const NaTcTile& tl, const NaTcRow rows[2],
                                                     bool biased, long long b, long long h,
                                                     NaKeyRowsShared& shared,
                                                     NaBarrierRing<NA_TCB_QUERY_STAGES>& barriers,
                                                     NaKeyTileGrads& grads) {
    constexpr int BLOCKS = NA_TCB_QUERIES / 8, STAGES = NA_TCB_QUERY_STAGES;
    constexpr int CHUNK_ROWS = NA_TCB_QUERY_CHUNK_ROWS;
    static_assert(!BULK || CHUNK_ROWS == NA_TCB_QUERIES, "bulk copies land chunk-major");
    const NaFusedParams& f = p.f;
    // Logits scaled by na_logits whatever the problem, as the mma.sync kernels below.
    const NaExponent exponent = {false, NA_LOG2E, 1.0f};
    const int t = threadIdx.x % 4;
    if (biased) {  // (the last call's reads ended at its closing barrier)
        shared.bias.stage(f, h, tl);
    }
    const long long count = na_slab_count<NA_TCB_QUERIES>(tl, true, 0);
    NaSlab next = na_first_slab<NA_TCB_QUERIES>(tl, true, 0);  // slab j + 1
    // The slabs' copies, one group (or barrier phase) each, an empty one past the last; slab i
    // into buffer i % STAGES: slabs 0 .. STAGES - 3 first (without BULK the tile's rows in the
    // first group), then one after each barrier into the buffer of the slab whose products were
    // waited for before it (so that at slab j's barrier slabs up to j + STAGES - 2 have been
    // issued, and slab j + 1 is waited for).
    NaSlab copied = next;
    long long left = count;
    int copy_buffer = 0;
    auto copy_next = [&] {
        elem_t* const queries = shared.queries(copy_buffer);
        elem_t* const d_outs = shared.d_outs(copy_buffer);
        NaRowStats* const stats = shared.stats(copy_buffer);
        if (BULK) {
            na_copy_query_slab_onto(p, tl, copied, left > 0, b, h, queries, d_outs, stats,
                                    &barriers.full[copy_buffer]);
            barriers.put(copy_buffer);
        } else {
            if (left > 0) {
                na_stage_query_slab<true, CHUNK_ROWS>(p, tl, copied, b, h, queries, d_outs,
                                                      stats);
            }
            na_copies_commit();
        }
        if (left > 0) {
            copied = na_next_slab<NA_TCB_QUERIES>(tl, copied, 0);
            --left;
        }
        copy_buffer = na_ring_next<STAGES>(copy_buffer);
    };
#pragma unroll 1
    for (int i = 0; i < STAGES - 2; ++i) {
        copy_next();
    }

    unsigned probs_a[NA_TCB_QUERIES / 16][4];  // slab j's P^T, as A fragments
    unsigned grads_a[NA_TCB_QUERIES / 16][4];  // and its dS^T
    bool grads_run = false;                    // whether slab j's gradient products run
    int buffer = 0, last = 0;                  // slab j + 1's buffer, and slab j's
    for (long long j = -1; j < count; ++j) {
        const bool has_next = j + 1 < count;
        // The mask built for every slab, as the mma.sync kernels build it.
        const unsigned seen = has_next ? na_slab_mask<BLOCKS>(tl, next, rows, t) : 0u;
        if (BULK) {
            if (j < 0) {
                na_copies_wait_groups<0>();  // the tile's rows
            }
            barriers.wait(buffer);  // slab j + 1
        } else {
            na_copies_wait_groups<STAGES - 3>();
        }
        na_async_proxy_fence();
        // Whether the warpgroup (the block) sees slab j + 1, through a vote so that the compiler
        // knows it is warp-uniform (as na_publish_slab).
        const bool logits_run = __any_sync(0xffffffffu, __syncthreads_count(seen != 0) != 0);
        copy_next();

        // S^T and dP^T of slab j + 1 (one group), then slab j's gradient products.
        float logits[BLOCKS][4], dp[BLOCKS][4];
        na_issue_logits_and_dp<NA_TCB_QUERIES, CHUNK_ROWS>(logits, dp, logits_run, shared.keys(),
                                                           shared.queries(buffer),
                                                           shared.values(), shared.d_outs(buffer));
        if (grads_run) {
            na_wgmma_fence();
#pragma unroll
            for (int k = 0; k < NA_TCB_QUERIES / 16; ++k) {
                na_wgmma<8 * NA_TCB_BLOCKS_V, 1>(
                    &grads.d_value[0][0], probs_a[k],
                    na_row_step<NA_DIM_V, CHUNK_ROWS>(shared.d_outs(last), k), 1);
                na_wgmma<8 * NA_TCB_BLOCKS, 1>(
                    &grads.d_key[0][0], grads_a[k],
                    na_row_step<NA_DIM, CHUNK_ROWS>(shared.queries(last), k), 1);
            }
        }
        na_wgmma_commit();

        na_wait_slab_products<NA_TCB_KEY_OVERLAP>(
            [&] {
                if (!logits_run) {
                    return;
                }
                na_hold_registers<4 * BLOCKS>(&logits[0][0]);
                na_hold_registers<4 * BLOCKS>(&dp[0][0]);
                na_logits<BLOCKS, true>(logits, seen, exponent, f, h, shared.bias, tl, next, rows,
                                        biased, t);
                const NaRowStats* stats = shared.stats(buffer);
                na_logit_grads<BLOCKS>(logits, dp, exponent.factor, [&](int kb, int i) {
                    return stats[8 * kb + 2 * t + i % 2].stat();
                });
            },
            [&] {
                // The gradient products done: their A fragments may be rewritten (held until
                // here, so that the compiler does not reuse their registers earlier).
                na_hold_registers<4 * NA_TCB_BLOCKS>(&grads.d_key[0][0]);
                na_hold_registers<4 * NA_TCB_BLOCKS_V>(&grads.d_value[0][0]);
                na_hold_registers<4 * (NA_TCB_QUERIES / 16)>(&probs_a[0][0]);
                na_hold_registers<4 * (NA_TCB_QUERIES / 16)>(&grads_a[0][0]);
            });
        if (logits_run) {
            na_hold_registers<4 * BLOCKS>(&logits[0][0]);
            na_hold_registers<4 * BLOCKS>(&dp[0][0]);
#pragma unroll
            for (int k = 0; k < NA_TCB_QUERIES / 16; ++k) {
                na_pack_a_fragment(probs_a[k], logits[2 * k], logits[2 * k + 1]);
                na_pack_a_fragment(grads_a[k], dp[2 * k], dp[2 * k + 1]);
            }
        }
        grads_run = logits_run;
        last = buffer;
        buffer = na_ring_next<STAGES>(buffer);
        if (has_next) {
            next = na_next_slab<NA_TCB_QUERIES>(tl, next, 0);
        }
    }
    __syncthreads();  // every read of the tile and the ring done
}
#else
// The shared memory of the mma.sync key-row kernels: the tile's own key and value rows, and
// NA_QUERY_SLABS buffers of a slab's query and output gradient rows with their statistics.
struct NaKeyTile {
    elem_t keys[NA_TC_ROWS][NA_TCB_PITCH];
    elem_t values[NA_TC_ROWS][NA_TCB_PITCH_V];
};
struct NaQuerySlab {
    elem_t queries[NA_TCB_QUERIES][NA_TCB_PITCH];
    elem_t d_outs[NA_TCB_QUERIES][NA_TCB_PITCH_V];
    NaRowStats stats[NA_TCB_QUERIES];
};
// The bias table (NaBiasTable), its entries staged where they fit beside the tile and a slab in
// 48 KiB of static shared memory; query slab buffers: two where they fit beside both (the next
// slab is copied while this one's products run), else one (it is copied after them).
using NaKeyBias =
    NaBiasTable<NA_TCB_QUERIES, sizeof(NaKeyTile) + sizeof(NaQuerySlab) +
                                        sizeof(NaBiasTable<NA_TCB_QUERIES, true>) <=
                                    48 * 1024>;
constexpr int NA_QUERY_SLABS =
    sizeof(NaKeyTile) + 2 * sizeof(NaQuerySlab) + sizeof(NaKeyBias) <= 48 * 1024 ? 2 : 1;
struct NaKeyRowsShared {
    __align__(16) NaKeyTile tile;
    __align__(16) NaQuerySlab slabs[NA_QUERY_SLABS];
    NaKeyBias bias;

    __device__ __forceinline__ elem_t* keys() { return tile.keys[0]; }
    __device__ __forceinline__ elem_t* values() { return tile.values[0]; }
};

// Add to `grads` the terms of query head h's rows in box `tl` (its columns), a slab at a time
// through the NA_QUERY_SLABS buffers of `shared`: d_value += P^T dO, d_key += dS^T Q (unscaled).
// `biased`: whether the logits take the bias (rows are keys of the window). Every thread of the
// block calls it, after the tile's rows were staged; it ends with a barrier after every read of
// the tile and the buffers.
__device__ __forceinline__ void na_key_rows_over_box(const NaFusedBwdParams& p,
                                                     const NaTcTile& tl, const NaTcRow rows[2],
                                                     bool biased, long long b, long long h,
                                                     NaKeyRowsShared& shared,
                                                     NaKeyTileGrads& grads) {
    constexpr int BLOCKS = NA_TCB_QUERIES / 8;
    const NaFusedParams& f = p.f;
    // Logits scaled by na_logits whatever the problem: these kernels build every slab's mask (so
    // a raw product would save only its multiply), and with raw products as an option their
    // gradients' registers spill at head dim 128.
    const NaExponent exponent = {false, NA_LOG2E, 1.0f};
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
    NaQuerySlab* const slabs = shared.slabs;
    auto stage = [&](const NaSlab& s, NaQuerySlab& slab) {
        na_stage_query_slab<false>(p, tl, s, b, h, slab.queries[0], slab.d_outs[0], slab.stats);
    };
    auto after = [&](const NaSlab& s) { return na_next_slab<NA_TCB_QUERIES>(tl, s, 0); };
    const long long count = na_slab_count<NA_TCB_QUERIES>(tl, true, 0);
    NaSlab s = na_first_slab<NA_TCB_QUERIES>(tl, true, 0);
    // (The last call's reads ended at its closing barrier.)
    if (biased) {
        shared.bias.stage(f, h, tl);
    }
    if (count > 0) {
        stage(s, slabs[0]);
    }
    for (long long n = 0; n < count; ++n, s = after(s)) {
        NaQuerySlab& slab = slabs[n % NA_QUERY_SLABS];
        na_copies_wait();
        // The slab's rows (and, the first time, the tile's) staged; the last slab's read.
        __syncthreads();
        if (NA_QUERY_SLABS == 2 && n + 1 < count) {
            stage(after(s), slabs[(n + 1) % NA_QUERY_SLABS]);
        }
        // The mask built for every slab: the shortcut (na_slab_seen) costs this kernel, whose
        // gradients fill its registers, spills at head dim 128.
        const unsigned seen = na_slab_mask<BLOCKS>(tl, s, rows, t);
        const unsigned live = __reduce_or_sync(0xffffffffu, seen);
        if (live != 0) {  // warp-uniform
            const elem_t* own_key = shared.tile.keys[16 * warp + g];
            const elem_t* own_value = shared.tile.values[16 * warp + g];
            // S^T = K Q^T, then the logits.
            float probs[BLOCKS][4];
            {
                unsigned a[NA_TCB_STEPS][4];
                na_staged_fragments<NA_TCB_STEPS>(a, own_key, own_key + 8 * NA_TCB_PITCH, t);
                na_zero<BLOCKS>(probs);
                na_row_products<NA_TCB_STEPS, BLOCKS>(probs, a, slab.queries[0], NA_TCB_PITCH,
                                                      live, g, t);
            }
            na_logits<BLOCKS, true>(probs, seen, exponent, f, h, shared.bias, tl, s, rows,
                                    biased, t);
            // dP^T = V dO^T.
            float dp[BLOCKS][4];
            {
                unsigned a[NA_TCB_STEPS_V][4];
                na_staged_fragments<NA_TCB_STEPS_V>(a, own_value, own_value + 8 * NA_TCB_PITCH_V,
                                                    t);
                na_zero<BLOCKS>(dp);
                na_row_products<NA_TCB_STEPS_V, BLOCKS>(dp, a, slab.d_outs[0], NA_TCB_PITCH_V,
                                                        live, g, t);
            }
            na_logit_grads<BLOCKS>(probs, dp, exponent.factor, [&](int kb, int i) {
                return slab.stats[8 * kb + 2 * t + i % 2].stat();
            });
            // d_value += P^T dO, d_key += dS^T Q.
            na_weighted_rows<NA_TCB_QUERIES / 16, NA_DIM_V / 8>(
                grads.d_value, probs, slab.d_outs[0], NA_TCB_PITCH_V, 0, NA_DIM_V / 8, live, lane);
            na_weighted_rows<NA_TCB_QUERIES / 16, NA_DIM / 8>(
                grads.d_key, dp, slab.queries[0], NA_TCB_PITCH, 0, NA_DIM / 8, live, lane);
        }
        if (NA_QUERY_SLABS == 1) {
            __syncthreads();  // every warp's reads of the slab done
            if (n + 1 < count) {
                stage(after(s), slabs[0]);
            }
        }
    }
    if (NA_QUERY_SLABS == 2) {
        __syncthreads();  // every warp's reads of the last slab done
    }
}
#endif

// Store a key-row tile's gradients: d_key (scaled) at `at_key[r]` of `d_key`, d_value at
// `at_value[r]` of `d_value`, for this lane's rows that exist.
__device__ __forceinline__ void na_store_key_tile(const NaView& d_key, const long long at_key[2],
                                                  const NaView& d_value,
                                                  const long long at_value[2],
                                                  const NaTcRow rows[2],
                                                  const NaKeyTileGrads& grads, float scale,
                                                  int t) {
    na_store_rows<NA_DIM / 8>(d_key, at_key, rows, grads.d_key, scale, t);
    na_store_rows<NA_DIM_V / 8>(d_value, at_value, rows, grads.d_value, 1.0f, t);
}
