// Fused neighborhood attention backward on tensor cores (sm_80 and later; float16 and bfloat16,
// head dims multiples of 8 up to 128): the d_query, d_key, d_value and additional tokens'
// gradients of na_fused_bwd.cu, a tile of 64 rows per block (fused_tc.cuh), in a fixed order (no
// atomics: the same bits on every run), and the bias's where its table is small enough (else
// na_fused_bwd.cu's kernel sums it, from the statistics the query kernel leaves).
//
// With P = softmax(scale Q K^T + bias) per query row (exp(logit - lse), lse the forward's),
// dP = dO V^T, delta = rowsum(dO . O) - d_lse and dS = P (dP - delta):
//   na_fused_backward_query_tc  a tile of queries: its rows' delta, and d_query = scale dS K;
//                               (lse, delta) go to `stats`
//   na_fused_backward_keys_tc   a tile of keys of one kv head: d_value = P^T dO and
//                               d_key = scale dS^T Q over the queries whose windows hold them (the
//                               box of the keys' inverse windows), every query head of the group
//   na_fused_backward_extras_tc the same for a tile of additional tokens, over every query
//   na_fused_backward_bias_slices_tc, na_fused_backward_bias_tc
//                               d_rpb from the query tiles' sums of dS (NA_TCB_BIAS_GRADS)
// Slabs are staged by cp.async, the next one's rows (where the buffers allow) copied while this
// one's products run. On sm_90a, where the host asks for it (NA_WGMMA), the d_query and key-row
// kernels take warpgroup products instead (wgmma), software-pipelined as the warpgroup forward
// (the key-row kernels' slabs go through a ring, with no per-warp skipping), and where it asks
// for those too (NA_TMA), the d_query and key kernels' slabs come by bulk tensor copies (tma.cuh;
// NA_TCB_TMA). Products take half-precision operands and float accumulators; the probabilities
// and logit gradients are rounded to the element type for the products that take them, as in the
// forward.
#include "bwd_tc_bias.cuh"
#include "bwd_tc_keys.cuh"

// This lane's rows' statistics (lse, and delta = d_out . out - d_lse, left in `stats` of the
// scratch too) and their query rows (null for rows outside the tile).
__device__ __forceinline__ void na_query_stats(const NaFusedBwdParams& p, const NaTcTile& tl,
                                               const NaTcRow rows[2], long long b, long long h,
                                               int t, const elem_t* query_rows[2],
                                               NaStat stats[2]) {
    const NaFusedParams& f = p.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // (Positions are formed again for the store: kept through the slabs, they would take
        // registers the products need.)
        long long x[3];
        na_tile_positions(f, tl, rows[r].index, x);
        const bool valid = rows[r].valid;
        query_rows[r] = valid ? na_row_ptr(f.query, b, h, x[0], x[1], x[2]) : nullptr;
        // delta = d_out . out - d_lse, the quad's lanes taking every fourth channel.
        float partial = 0;
        if (valid) {
            const elem_t* out = na_row_ptr(f.out, b, h, x[0], x[1], x[2]);
            const elem_t* d_out = na_row_ptr(p.d_out, b, h, x[0], x[1], x[2]);
            for (int c = t; c < NA_DIM_V; c += 4) {
                partial += to_acc(d_out[c * p.d_out.stride[5]]) * to_acc(out[c * f.out.stride[5]]);
            }
        }
        float lse = 0, delta = na_quad_sum(partial);
        if (valid) {
            lse = na_load_f32(f.lse, b, h, x[0], x[1], x[2]);
        }
        if (valid && p.has_d_lse) {
            delta -= na_load_f32(p.d_lse, b, h, x[0], x[1], x[2]);
        }
        if (valid && t == 0) {
            const long long n = na_query_row(f, b, h, x);
            na_stats(p)[2 * n] = lse;
            na_stats(p)[2 * n + 1] = delta;
        }
        stats[r] = na_stat(lse, delta);
    }
}

// How the d_query kernel's slabs lie: chunk-major where bulk copies land them (NA_TCB_TMA).
#define NA_TCB_CHUNK_ROWS (NA_TCB_TMA ? NA_TCB_KEYS : 0)

#if NA_TCB_WGMMA
// The d_query kernel on warpgroup products, software-pipelined as the warpgroup forward
// (na_fused_tc.cu): the tile's query and output gradient rows sit in shared memory (both
// factors of the logits' and dP's products come from there), each slab's values then keys are
// items of a ring in dynamic shared memory, and the barrier of slab j publishes slab j + 1's
// (slab j's keys stay for d_query += dS K). Slab j + 1's logits and dP are issued with slab j's
// d_query product, and slab j + 1's dS is computed while that runs.
#define NA_TCB_STAGES (NA_TCB_WIDE ? 5 : 6)
constexpr int na_tcb_buffer =
    NA_TCB_KEYS * (NaStaged<NA_DIM, true>::per_row > NaStaged<NA_DIM_V, true>::per_row
                       ? NaStaged<NA_DIM, true>::per_row
                       : NaStaged<NA_DIM_V, true>::per_row);
constexpr int na_tcb_query_tile = NA_TC_ROWS * NaStaged<NA_DIM, true>::per_row;
constexpr int na_tcb_d_out_tile = NA_TC_ROWS * NaStaged<NA_DIM_V, true>::per_row;
using NaQueryGradCopies =
    NaRingCopies<NA_TCB_KEYS, NA_TCB_STAGES, na_tcb_buffer, true, true, NA_TCB_CHUNK_ROWS>;

// Copy the next item of `copies` into `ring`: as a cp.async group, or onto its buffer's barrier
// (NaRingCopies::next_onto).
__device__ __forceinline__ void na_query_grad_copy(NaQueryGradCopies& copies,
                                                   const NaFusedBwdParams& p,
                                                   NaBarrierRing<NA_TCB_STAGES>& barriers,
                                                   const NaTcTile& tl, long long b, long long hk,
                                                   elem_t* ring) {
#if NA_TCB_TMA
    copies.next_onto(p.f, p.tma, barriers, tl, b, hk, ring);
#else
    copies.next(p.f, tl, b, hk, ring);
#endif
}

// This lane's share of d_query (unscaled; C layout, `NA_TCB_BLOCKS` blocks) of the query
// tile `tl` of (batch b, head h): every slab's dS K. Every thread of the block calls it.
__device__ __forceinline__ void na_query_tile_grads(
    const NaFusedBwdParams& p, const NaTcTile& tl, const NaTcRow rows[2], long long b, long long h,
    const elem_t* const query_rows[2], const NaStat stats[2], const NaExponent& exponent,
    NaQueryGradShared& shared, NaQueryBias& bias, NaTileBiasGrads& bias_grads,
    bool wants_bias_grads, NaBarrierRing<NA_TCB_STAGES>& barriers,
    float d_query[NA_TCB_BLOCKS][4]) {
    const NaFusedParams& f = p.f;
    constexpr int BLOCKS = NA_TCB_KEYS / 8;
    elem_t* const ring = reinterpret_cast<elem_t*>(na_dynamic_shared());
    elem_t* const query_tile = ring + NA_TCB_STAGES * na_tcb_buffer;
    elem_t* const d_out_tile = query_tile + na_tcb_query_tile;
    const long long hk = h / f.group;
    const int warp = threadIdx.x / NA_WARP, t = threadIdx.x % 4;
    const long long slabs = na_slab_count<NA_TCB_KEYS>(tl, f.has_window, f.extra_count);
    NaSlab next = na_first_slab<NA_TCB_KEYS>(tl, f.has_window, f.extra_count);  // slab j + 1
    NaQueryGradCopies copies = {next, false, 2 * slabs, 0};
    __syncthreads();  // the last tile's reads of the ring, its rows and bias table done
    bias.stage(f, h, tl);
    // The tile's query and output gradient rows (one group), then items 0 .. STAGES - 4;
    // two more after each barrier, into the buffers of the items the slab before read (so
    // that at slab j's barrier items up to 2 j + STAGES - 2 have been issued, and slab
    // j + 1's two, up to 2 j + 3, are waited for).
    na_stage_tile_rows<NA_DIM, NA_DIM_V, true>(f, tl, b, h, f.query, p.d_out, query_tile,
                                               d_out_tile);
    na_copies_commit();
#pragma unroll
    for (int i = 0; i < NA_TCB_STAGES - 3; ++i) {
        na_query_grad_copy(copies, p, barriers, tl, b, hk, ring);
    }

    na_zero<NA_TCB_BLOCKS>(d_query);
    unsigned grads_a[NA_TCB_KEYS / 16][4];  // slab j's dS, as A fragments
    bool keys_run = false;                   // whether slab j's d_query product runs
    int values_buffer = 0;                   // item 2 j + 2's: slab j + 1's values
    for (long long j = -1; j < slabs; ++j) {
        const bool has_next = j + 1 < slabs;
        const unsigned seen = has_next ? na_slab_seen<BLOCKS>(tl, next, rows, t) : 0u;
        const unsigned live = __reduce_or_sync(0xffffffffu, seen);
#if NA_TCB_TMA
        if (j < 0) {
            na_copies_wait_groups<0>();  // the tile's rows
        }
        barriers.wait(values_buffer);
        barriers.wait(na_ring_next<NA_TCB_STAGES>(values_buffer));
#else
        na_copies_wait_groups<NA_TCB_STAGES - 5>();
#endif
        na_async_proxy_fence();
        // Whether the warpgroup (the block) sees slab j + 1, through a vote so that the
        // compiler knows it is warp-uniform (as na_publish_slab).
        const bool logits_run = __any_sync(0xffffffffu, __syncthreads_count(live != 0) != 0);
        const int keys_buffer = na_ring_before<NA_TCB_STAGES>(values_buffer);
        const elem_t* const keys = ring + keys_buffer * na_tcb_buffer;
        const elem_t* const next_values = ring + values_buffer * na_tcb_buffer;
        const int next_keys_buffer = na_ring_next<NA_TCB_STAGES>(values_buffer);
        const elem_t* const next_keys = ring + next_keys_buffer * na_tcb_buffer;
        values_buffer = na_ring_next<NA_TCB_STAGES>(next_keys_buffer);
        na_query_grad_copy(copies, p, barriers, tl, b, hk, ring);
        na_query_grad_copy(copies, p, barriers, tl, b, hk, ring);

        // Logits and dP of slab j + 1 (one group), then d_query += dS K of slab j.
        float logits[BLOCKS][4], grads[BLOCKS][4];
        na_issue_logits_and_dp<NA_TCB_KEYS, NA_TCB_CHUNK_ROWS>(
            logits, grads, logits_run, query_tile, next_keys, d_out_tile, next_values);
        if (keys_run) {
            na_wgmma_fence();
#pragma unroll
            for (int k = 0; k < NA_TCB_KEYS / 16; ++k) {
                na_wgmma<8 * NA_TCB_BLOCKS, 1>(&d_query[0][0], grads_a[k],
                                               na_row_step<NA_DIM, NA_TCB_CHUNK_ROWS>(keys, k),
                                               1);
            }
        }
        na_wgmma_commit();

        na_wait_slab_products<true>(
            [&] {
                if (!logits_run) {
                    return;
                }
                na_hold_registers<4 * BLOCKS>(&logits[0][0]);
                na_hold_registers<4 * BLOCKS>(&grads[0][0]);
                na_logits<BLOCKS, false>(logits, seen, exponent, f, h, bias, tl, next, rows,
                                         f.has_bias != 0, t);
                na_logit_grads<BLOCKS>(logits, grads, exponent.factor,
                                       [&](int, int i) { return stats[i / 2]; });
                if (wants_bias_grads) {
                    bias_grads.add<BLOCKS>(warp, grads, seen, live, bias, tl, next, rows, t);
                }
            },
            [&] {
                // The d_query product done: its A fragments may be rewritten (held until
                // here, so that the compiler does not reuse their registers earlier).
                na_hold_registers<4 * NA_TCB_BLOCKS>(&d_query[0][0]);
                na_hold_registers<4 * (NA_TCB_KEYS / 16)>(&grads_a[0][0]);
            });
        if (logits_run) {
            na_hold_registers<4 * BLOCKS>(&grads[0][0]);
#pragma unroll
            for (int k = 0; k < NA_TCB_KEYS / 16; ++k) {
                na_pack_a_fragment(grads_a[k], grads[2 * k], grads[2 * k + 1]);
            }
        }
        keys_run = logits_run;
        if (has_next) {
            next = na_next_slab<NA_TCB_KEYS>(tl, next, f.extra_count);
        }
    }
}
#else
static_assert(sizeof(NaQueryGradShared) + sizeof(NaQueryBias) + sizeof(NaTileBiasGrads) <=
                  48 * 1024,
              "the d_query kernel's static shared memory fits 48 KiB");

// This lane's share of d_query (unscaled; C layout, `NA_TCB_BLOCKS` blocks) of the query
// tile `tl` of (batch b, head h): every slab's dS K. Every thread of the block calls it.
__device__ __forceinline__ void na_query_tile_grads(
    const NaFusedBwdParams& p, const NaTcTile& tl, const NaTcRow rows[2], long long b, long long h,
    const elem_t* const query_rows[2], const NaStat stats[2], const NaExponent& exponent,
    NaQueryGradShared& shared, NaQueryBias& bias, NaTileBiasGrads& bias_grads,
    bool wants_bias_grads, float d_query[NA_TCB_BLOCKS][4]) {
    const NaFusedParams& f = p.f;
    constexpr int BLOCKS = NA_TCB_KEYS / 8;
    auto& keys = shared.keys;
    auto& values = shared.values;
    auto& d_outs = shared.d_outs;
    const long long hk = h / f.group;
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
    unsigned query[NA_TCB_STEPS][4];
#pragma unroll
    for (int s = 0; s < NA_TCB_STEPS; ++s) {
        na_a_fragment<NA_DIM>(query[s], query_rows, f.query.stride[5], s, t);
    }
    // The tile's output gradient rows, row n as na_tile_rows numbers them (the last task's
    // reads of them ended at a barrier in its second pass; the first slab's barrier
    // publishes them).
    na_stage_tile_rows<NA_DIM_V, NA_DIM_V>(f, tl, b, h, p.d_out, p.d_out, d_outs[0], nullptr);
    const elem_t* own_d_out = d_outs[16 * warp + g];

    const long long slabs = na_slab_count<NA_TCB_KEYS>(tl, f.has_window, f.extra_count);
    auto after = [&](const NaSlab& s) {
        return na_next_slab<NA_TCB_KEYS>(tl, s, f.extra_count);
    };
    NaSlab s = na_first_slab<NA_TCB_KEYS>(tl, f.has_window, f.extra_count);

    // d_query += dS . K, slab by slab. Key slabs alternate between the two buffers: the next
    // slab's keys are copied under the whole of this slab's products, its values under dS
    // and d_query's.
    na_zero<NA_TCB_BLOCKS>(d_query);
    __syncthreads();  // the last task's reads of the keys and the bias table done
    bias.stage(f, h, tl);
    if (slabs > 0) {
        na_stage_key_slab<NA_TCB_KEYS>(f, tl, s, b, hk, keys[0][0], values[0]);
    }
    for (long long slab = 0; slab < slabs; ++slab, s = after(s)) {
        const int buffer = slab % 2;
        // The slab's rows staged (and d_outs, the first time); the last slab's keys read.
        na_copies_wait();
        __syncthreads();
        if (slab + 1 < slabs) {
            na_stage_key_slab<NA_TCB_KEYS>(f, tl, after(s), b, hk, keys[buffer ^ 1][0],
                                           nullptr);
        }
        // The slab's logits (scaled, biased, -inf where they do not count). A slab no query
        // of the warp sees adds nothing: skipped whole (warp-uniform), as the keys kernel
        // skips query slabs.
        const unsigned seen = na_slab_seen<BLOCKS>(tl, s, rows, t);
        const unsigned live = __reduce_or_sync(0xffffffffu, seen);
        float probs[BLOCKS][4], grads[BLOCKS][4];
        if (live != 0) {
            na_zero<BLOCKS>(probs);
            na_row_products<NA_TCB_STEPS, BLOCKS>(probs, query, keys[buffer][0],
                                                  NA_TCB_PITCH, live, g, t);
            na_logits<BLOCKS, false>(probs, seen, exponent, f, h, bias, tl, s, rows,
                                     f.has_bias != 0, t);
            // dP = dO V^T.
            na_zero<BLOCKS>(grads);
            unsigned d_out[NA_TCB_STEPS_V][4];
            na_staged_fragments<NA_TCB_STEPS_V>(d_out, own_d_out,
                                                own_d_out + 8 * NA_TCB_PITCH_V, t);
            na_row_products<NA_TCB_STEPS_V, BLOCKS>(grads, d_out, values[0], NA_TCB_PITCH_V,
                                                    live, g, t);
        }
        __syncthreads();  // every warp's reads of the values (and of d_outs) done
        if (slab + 1 < slabs) {
            na_stage_key_slab<NA_TCB_KEYS>(f, tl, after(s), b, hk, nullptr,
                                           values[0]);
        }
        if (live != 0) {
            na_logit_grads<BLOCKS>(probs, grads, exponent.factor,
                                   [&](int, int i) { return stats[i / 2]; });
            if (wants_bias_grads) {
                bias_grads.add<BLOCKS>(warp, grads, seen, live, bias, tl, s, rows, t);
            }
            na_weighted_rows<NA_TCB_KEYS / 16, NA_DIM / 8>(d_query, grads, keys[buffer][0],
                                                           NA_TCB_PITCH, 0, NA_DIM / 8, live,
                                                           lane);
        }
    }
    na_copies_wait();  // copies a task without slabs issued must not land in the next's
}
#endif

// d_query keeps the full register budget (no cap for more blocks per SM, unlike the other tile
// kernels): it holds the most per row (dO, the query, its gradient), and a cap spills it.
extern "C" __global__ void __launch_bounds__(NA_TC_THREADS, 1)
    na_fused_backward_query_tc(const __grid_constant__ NaFusedBwdParams p) {
    const NaFusedParams& f = p.f;
    // Shared arrays are the kernel's own, not an inline function's: on the host those would be
    // one object across every variant loaded (kernels/host.h).
    __shared__ NaQueryGradShared shared;
    __shared__ NaQueryBias bias;
    __shared__ NaTileBiasGrads bias_grads;
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
    const bool wants_bias_grads = NA_TCB_BIAS_GRADS && p.d_bias.data != 0;
    if (wants_bias_grads) {
        bias_grads.zero();  // (first added to after a barrier)
    }
    const NaExponent exponent = na_exponent(f);
#if NA_TCB_TMA
    __shared__ NaBarrier full[NA_TCB_STAGES];
    NaBarrierRing<NA_TCB_STAGES> barriers = {full, 0u};
    na_start_barrier_ring<NA_TCB_STAGES>(reinterpret_cast<elem_t*>(na_dynamic_shared()),
                                         NA_TCB_STAGES * na_tcb_buffer, full);
#elif NA_TCB_WGMMA
    NaBarrierRing<NA_TCB_STAGES> barriers = {nullptr, 0u};  // (cp.async groups instead)
#endif
    const long long tasks = na_tc_tasks(f.batch, p.tiling);
    for (long long task = blockIdx.x; task < tasks; task += gridDim.x) {
        const NaTcTask job = na_tc_task(task, p.tiling);
        const long long b = job.batch, h = job.head;
        NaTcRow rows[2];
        const NaTcTile tl = na_query_tile<NA_TCB_KEYS>(p.tiling, job.tile, warp, g, rows,
                                                       NA_TCB_TMA ? p.tma.slab_shift : nullptr);
        const elem_t* query_rows[2];
        NaStat stats[2];
        na_query_stats(p, tl, rows, b, h, t, query_rows, stats);
        float d_query[NA_TCB_BLOCKS][4];
#if NA_TCB_WGMMA
        na_query_tile_grads(p, tl, rows, b, h, query_rows, stats, exponent, shared, bias,
                            bias_grads, wants_bias_grads, barriers, d_query);
#else
        na_query_tile_grads(p, tl, rows, b, h, query_rows, stats, exponent, shared, bias,
                            bias_grads, wants_bias_grads, d_query);
#endif
        if (wants_bias_grads) {
            __syncthreads();  // every warp's additions done
            bias_grads.flush(na_bias_tile_sums(p) + na_bias_row(p, job) * NA_BIAS_SPAN);
        }

        long long at[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            at[r] = na_tile_offset(f, tl, p.d_query, b, h, rows[r].index);
        }
        na_store_rows<NA_DIM / 8>(p.d_query, at, rows, d_query, (float)f.scale, t);
    }
}
#if NA_TCB_WGMMA
NA_DYNAMIC_SHARED(na_fused_backward_query_tc,
                  (NA_TCB_STAGES * na_tcb_buffer + na_tcb_query_tile + na_tcb_d_out_tile) *
                      sizeof(elem_t))
#endif

extern "C" __global__ void __launch_bounds__(NA_TC_THREADS, NA_TC_KEY_MIN_BLOCKS)
    na_fused_backward_keys_tc(const __grid_constant__ NaFusedBwdParams p) {
    const NaFusedParams& f = p.f;
    // (The kernel's own, not an inline function's: kernels/host.h.)
    __shared__ NaKeyRowsShared shared;
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
#if NA_TCB_TMA
    __shared__ NaBarrier full[NA_TCB_QUERY_STAGES];
    NaBarrierRing<NA_TCB_QUERY_STAGES> barriers = {full, 0u};
    na_start_barrier_ring<NA_TCB_QUERY_STAGES>(
        shared.queries(0), NA_TCB_QUERY_STAGES * na_tcb_slab_rows, full);
#elif NA_TCB_WGMMA
    NaBarrierRing<NA_TCB_QUERY_STAGES> barriers = {nullptr, 0u};  // (cp.async groups instead)
#endif
    // Tasks over the kv heads, tiles of keys (the host's tiling for this launch).
    const long long tasks = na_tc_tasks(f.batch, p.tiling);
    for (long long task = blockIdx.x; task < tasks; task += gridDim.x) {
        const NaTcTask job = na_tc_task(task, p.tiling);
        const long long b = job.batch, hk = job.head;
        NaTcRow rows[2];  // keys
        NaTcTile tl = na_tile_rows(p.tiling, job.tile, warp, g, rows);
        // Per axis: the box of queries whose windows hold some key of the tile, and each key's.
#pragma unroll
        for (int a = 0; a < 3; ++a) {
            const NaRange box = na_fused_inverse_run(
                tl.first[a], tl.first[a] + tl.count[a] - 1, tl.len[a], a);
            tl.box_first[a] = (int)box.start;
            tl.box_len[a] = (int)(box.end - box.start);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int kj = rows[r].index[a];
                const NaRange run = rows[r].valid
                                        ? na_fused_inverse_run(kj, kj, tl.len[a], a)
                                        : NaRange{0, 0};
                rows[r].start[a] = (int)run.start;
                rows[r].end[a] = (int)run.end;
            }
        }
        na_cut_box_as<NA_TCB_QUERIES>(tl, NA_TCB_TMA ? p.tma.slab_shift : nullptr);
        // The tile's keys and values, row n as na_tile_rows numbers them (a group of their own
        // where bulk copies bring the slabs: na_key_rows_over_box).
        na_stage_tile_rows<NA_DIM, NA_DIM_V, NA_TCB_WGMMA>(f, tl, b, hk, f.key, f.value,
                                                           shared.keys(), shared.values());
        if (NA_TCB_TMA) {
            na_copies_commit();
        }
        NaKeyTileGrads grads;
        grads.zero();
        for (long long h = hk * f.group; h < (hk + 1) * f.group; ++h) {
#if NA_TCB_WGMMA
            na_key_rows_over_box<NA_TCB_TMA>(p, tl, rows, f.has_bias != 0, b, h, shared,
                                             barriers, grads);
#else
            na_key_rows_over_box(p, tl, rows, f.has_bias != 0, b, h, shared, grads);
#endif
        }
        long long at_key[2], at_value[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            at_key[r] = na_tile_offset(f, tl, p.d_key, b, hk, rows[r].index);
            at_value[r] = na_tile_offset(f, tl, p.d_value, b, hk, rows[r].index);
        }
        na_store_key_tile(p.d_key, at_key, p.d_value, at_value, rows, grads, (float)f.scale, t);
        na_copies_wait();  // copies a task without slabs issued must not land in the next's
    }
}

// d_key and d_value of the additional tokens: a tile of NA_TC_ROWS of them (of one kv head)
// per block, over every query of every query head of the group (each sees every additional
// token), walked one dilation group at a time as the box of the whole group.
extern "C" __global__ void __launch_bounds__(NA_TC_THREADS, NA_TC_KEY_MIN_BLOCKS)
    na_fused_backward_extras_tc(const NaFusedBwdParams p) {
    const NaFusedParams& f = p.f;
    __shared__ NaKeyRowsShared shared;
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
    // Tasks over the kv heads, tiles of NA_TC_ROWS additional tokens along the last axis (the
    // host's tiling for this launch).
    const long long tasks = na_tc_tasks(f.batch, p.tiling);
    const long long groups = f.dilation[0] * f.dilation[1] * f.dilation[2];
#if NA_TCB_WGMMA
    NaBarrierRing<NA_TCB_QUERY_STAGES> barriers = {nullptr, 0u};  // (cp.async groups)
#endif
    for (long long task = blockIdx.x; task < tasks; task += gridDim.x) {
        const NaTcTask job = na_tc_task(task, p.tiling);
        const long long b = job.batch, hk = job.head, first = job.tile * NA_TC_ROWS;
        NaTcRow rows[2];  // additional tokens, paired with every query
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            rows[r].valid = first + 16 * warp + g + 8 * r < f.extra_count;
#pragma unroll
            for (int a = 0; a < 3; ++a) {
                rows[r].index[a] = rows[r].start[a] = 0;
                rows[r].end[a] = 0x7fffffff;
            }
        }
        // The tile's additional keys and values (the last task's reads of them ended at its
        // last slab's closing barrier).
        na_stage_pairs<NA_TC_ROWS, NA_DIM, NA_DIM_V, NA_TCB_WGMMA>(
            shared.keys(), shared.values(), [&](int n, const elem_t* src[2], long long step[2]) {
                if (first + n >= f.extra_count) {
                    return;
                }
                src[0] = na_row_ptr(f.extra_key, b, hk, first + n, 0, 0);
                src[1] = na_row_ptr(f.extra_value, b, hk, first + n, 0, 0);
                step[0] = f.extra_key.stride[5];
                step[1] = f.extra_value.stride[5];
            });
        NaKeyTileGrads grads;
        grads.zero();
        for (long long h = hk * f.group; h < (hk + 1) * f.group; ++h) {
            for (long long group = 0; group < groups; ++group) {
                NaTcTile tl;
                long long at[3];
                na_token_of(f.dilation, group, at);
#pragma unroll
                for (int a = 0; a < 3; ++a) {
                    const NaDivMod l = na_divmod(f.length[a], f.dilation[a]);
                    tl.group[a] = (int)at[a];
                    tl.box_first[a] = 0;
                    tl.box_len[a] = (int)(l.quot + (at[a] < l.rem ? 1 : 0));
                }
                na_cut_box<NA_TCB_QUERIES>(tl);
#if NA_TCB_WGMMA
                na_key_rows_over_box<false>(p, tl, rows, false, b, h, shared, barriers, grads);
#else
                na_key_rows_over_box(p, tl, rows, false, b, h, shared, grads);
#endif
            }
        }
        long long at_key[2], at_value[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const long long e = first + 16 * warp + g + 8 * r;
            at_key[r] = na_offset(p.d_extra_key, b, hk, e, 0, 0, 0);
            at_value[r] = na_offset(p.d_extra_value, b, hk, e, 0, 0, 0);
        }
        na_store_key_tile(p.d_extra_key, at_key, p.d_extra_value, at_value, rows, grads,
                          (float)f.scale, t);
        na_copies_wait();  // copies a task without slabs issued must not land in the next's
    }
}
#if NA_TCB_WGMMA
NA_DYNAMIC_SHARED(na_fused_backward_keys_tc, na_tcb_key_rows_bytes)
NA_DYNAMIC_SHARED(na_fused_backward_extras_tc, na_tcb_key_rows_bytes)
#endif

// First pass of d_rpb from the tile sums: per block, 32 entries (a warp's lanes, coalesced) of
// one slice of one head, the block's warps taking every WARPS-th row of the slice, then the
// warps' sums added in order.
extern "C" __global__ void __launch_bounds__(NA_REDUCE_THREADS)
    na_fused_backward_bias_slices_tc(const NaFusedBwdParams p) {
    constexpr int WARPS = NA_REDUCE_THREADS / NA_WARP;
    constexpr int CHUNKS = (NA_BIAS_SPAN + NA_WARP - 1) / NA_WARP;
    __shared__ float sums[WARPS][NA_WARP];
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const long long rows = na_bias_rows(p), slices = na_bias_slice_count(p);
    for (long long item = blockIdx.x; item < p.f.heads * slices * CHUNKS; item += gridDim.x) {
        const long long h = item / (slices * CHUNKS), slice = item / CHUNKS % slices;
        const int n = (int)(item % CHUNKS) * NA_WARP + lane;
        const float* tile_sums = na_bias_tile_sums(p) + h * rows * NA_BIAS_SPAN;
        const long long end = min((slice + 1) * NA_BIAS_SLICE, rows);
        float sum = 0;
        for (long long r = slice * NA_BIAS_SLICE + warp; n < NA_BIAS_SPAN && r < end; r += WARPS) {
            sum += tile_sums[r * NA_BIAS_SPAN + n];
        }
        const float total = na_warp_order_sum(sum, sums);
        if (warp == 0 && n < NA_BIAS_SPAN) {
            na_bias_slice_sums(p)[(h * slices + slice) * NA_BIAS_SPAN + n] = total;
        }
    }
}

// Second pass: d_rpb[h, r0, r1, r2], one thread per entry, as its slices' sum in order.
extern "C" __global__ void __launch_bounds__(NA_REDUCE_THREADS)
    na_fused_backward_bias_tc(const NaFusedBwdParams p) {
    const long long slices = na_bias_slice_count(p);
    const long long entries = p.f.heads * NA_BIAS_SPAN;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < entries;
         i += (long long)gridDim.x * blockDim.x) {
        const long long h = i / NA_BIAS_SPAN, n = i % NA_BIAS_SPAN;
        float sum = 0;
        for (long long slice = 0; slice < slices; ++slice) {
            sum += na_bias_slice_sums(p)[(h * slices + slice) * NA_BIAS_SPAN + n];
        }
        int at[3];
        na_bias_indices((int)n, at);
        na_store(p.d_bias, na_offset(p.d_bias, h, at[0], at[1], at[2], 0, 0), sum);
    }
}
