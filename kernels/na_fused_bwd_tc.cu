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
// (the key-row kernels' slabs go through a ring, with no per-warp skipping). Products take
// half-precision operands and float accumulators; the probabilities and logit gradients are
// rounded to the element type for the products that take them, as in the forward.
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
#define NA_TCB_KEYS (NA_TCB_WIDE && !NA_TCB_WGMMA ? 32 : 64)
// 8-channel blocks per lane of a gradient row (of a query or key, and of a value): a
// warpgroup product's width is whole 16 channels.
#define NA_TCB_BLOCKS (NA_TCB_WGMMA ? NA_TC_PAD(NA_DIM) / 8 : NA_DIM / 8)
#define NA_TCB_BLOCKS_V (NA_TCB_WGMMA ? NA_TC_PAD(NA_DIM_V) / 8 : NA_DIM_V / 8)
// Queries per slab of the key-row kernels, whose gradients (d_key and d_value) take the most
// registers: fewer for wide rows on mma.sync, whose products take the tile's rows as fragments
// in registers too (warpgroup products read them from shared memory), and more for rows up to
// 32 channels on warpgroup products, whose registers take them at no cost in blocks per SM (two
// either way) and whose slabs then take fewer instructions per product.
#if NA_TCB_WGMMA && NA_DIM <= 32 && NA_DIM_V <= 32
#define NA_TCB_QUERIES 64
#else
#define NA_TCB_QUERIES (NA_TCB_WIDE && !NA_TCB_WGMMA ? 16 : 32)
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

#if NA_TCB_WGMMA
// ---- warpgroup products of staged rows ----------------------------------------------------------
// Rows staged in core matrices (NaStaged<N, true>) are the factors of the warpgroup kernels' two
// kinds of product: a tile's rows times a slab's (channels along K), and weights times a slab's
// rows (rows along K, channels along N).

// Issue products = A B^T (COLUMNS wide) over the 16-channel steps of rows of N channels: A the
// tile's 64 rows and B a slab's COLUMNS.
template <int N, int COLUMNS>
__device__ __forceinline__ void na_issue_row_products(float products[COLUMNS / 8][4],
                                                      const elem_t* a, const elem_t* b) {
    constexpr unsigned group = 16 * NaStaged<N, true>::padded;  // bytes per 8 rows
#pragma unroll
    for (int s = 0; s < NA_TC_PAD(N) / 16; ++s) {
        const NaSmemMatrix a_step = {a, 256u * s, 128, group};
        const NaSmemMatrix b_step = {b, 256u * s, 128, group};
        na_wgmma_ss<COLUMNS, 0>(&products[0][0], a_step, b_step, s > 0);
    }
}

// The first group of a pipelined slab's products, zeroed first, and committed whether issued or
// not (`run`), so that the waits count the same groups: logits = a b^T (query and key rows) and
// dp = a_v b_v^T (output-gradient and value rows), COLUMNS wide.
template <int COLUMNS>
__device__ __forceinline__ void na_issue_logits_and_dp(float logits[COLUMNS / 8][4],
                                                       float dp[COLUMNS / 8][4], bool run,
                                                       const elem_t* a, const elem_t* b,
                                                       const elem_t* a_v, const elem_t* b_v) {
    na_zero<COLUMNS / 8>(logits);
    na_zero<COLUMNS / 8>(dp);
    if (run) {
        na_wgmma_fence();
        na_issue_row_products<NA_DIM, COLUMNS>(logits, a, b);
        na_issue_row_products<NA_DIM_V, COLUMNS>(dp, a_v, b_v);
    }
    na_wgmma_commit();
}

// Rows 16 k .. 16 k + 15 of staged rows of N channels as the B factor of a product that weighs
// them: the rows along K (two 8-row groups), the channels along N.
template <int N>
__device__ __forceinline__ NaSmemMatrix na_row_step(const elem_t* rows, int k) {
    constexpr unsigned group = 16 * NaStaged<N, true>::padded;  // bytes per 8 rows
    return {rows, 2 * group * k, group, 128};
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
using NaQueryGradCopies = NaRingCopies<NA_TCB_KEYS, NA_TCB_STAGES, na_tcb_buffer, true, true>;

// This lane's share of d_query (unscaled; C layout, `NA_TCB_BLOCKS` blocks) of the query
// tile `tl` of (batch b, head h): every slab's dS K. Every thread of the block calls it.
__device__ __forceinline__ void na_query_tile_grads(
    const NaFusedBwdParams& p, const NaTcTile& tl, const NaTcRow rows[2], long long b, long long h,
    const elem_t* const query_rows[2], const NaStat stats[2], const NaExponent& exponent,
    NaQueryGradShared& shared, NaQueryBias& bias, NaTileBiasGrads& bias_grads,
    bool wants_bias_grads, float d_query[NA_TCB_BLOCKS][4]) {
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
        copies.next(f, tl, b, hk, ring);
    }

    na_zero<NA_TCB_BLOCKS>(d_query);
    unsigned grads_a[NA_TCB_KEYS / 16][4];  // slab j's dS, as A fragments
    bool keys_run = false;                   // whether slab j's d_query product runs
    int values_buffer = 0;                   // item 2 j + 2's: slab j + 1's values
    for (long long j = -1; j < slabs; ++j) {
        const bool has_next = j + 1 < slabs;
        const unsigned seen = has_next ? na_slab_seen<BLOCKS>(tl, next, rows, t) : 0u;
        const unsigned live = __reduce_or_sync(0xffffffffu, seen);
        na_copies_wait_groups<NA_TCB_STAGES - 5>();
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
        copies.next(f, tl, b, hk, ring);
        copies.next(f, tl, b, hk, ring);

        // Logits and dP of slab j + 1 (one group), then d_query += dS K of slab j.
        float logits[BLOCKS][4], grads[BLOCKS][4];
        na_issue_logits_and_dp<NA_TCB_KEYS>(logits, grads, logits_run, query_tile, next_keys,
                                            d_out_tile, next_values);
        if (keys_run) {
            na_wgmma_fence();
#pragma unroll
            for (int k = 0; k < NA_TCB_KEYS / 16; ++k) {
                na_wgmma<8 * NA_TCB_BLOCKS, 1>(&d_query[0][0], grads_a[k],
                                               na_row_step<NA_DIM>(keys, k), 1);
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
    na_fused_backward_query_tc(const NaFusedBwdParams p) {
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
    const long long tasks = na_tc_tasks(f.batch, p.tiling);
    for (long long task = blockIdx.x; task < tasks; task += gridDim.x) {
        const NaTcTask job = na_tc_task(task, p.tiling);
        const long long b = job.batch, h = job.head;
        NaTcRow rows[2];
        const NaTcTile tl = na_query_tile<NA_TCB_KEYS>(p.tiling, job.tile, warp, g, rows);
        const elem_t* query_rows[2];
        NaStat stats[2];
        na_query_stats(p, tl, rows, b, h, t, query_rows, stats);
        float d_query[NA_TCB_BLOCKS][4];
        na_query_tile_grads(p, tl, rows, b, h, query_rows, stats, exponent, shared, bias,
                            bias_grads, wants_bias_grads, d_query);
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


// ---- the key-row kernels ------------------------------------------------------------------------
// A tile of 64 key rows (of one kv head) walks the box of queries whose windows hold its keys, a
// slab of NA_TCB_QUERIES queries at a time, for d_value += P^T dO and d_key += dS^T Q: the
// tile's key and value rows are staged once, each slab's query and output gradient rows (and its
// queries' statistics) in turn.

// Start staging slab `s`'s query and output gradient rows into `queries` and `d_outs` (laid out
// as NaStaged<., CORE_MATRICES>) and its queries' statistics into `stats`, all asynchronously
// (a load of the statistics would hold the thread up until it arrived); columns that do not
// exist as zeros. Every thread of the block calls it, after a barrier that ends the reads of
// what it overwrites, and waits for its copies before the barrier that publishes them.
template <bool CORE_MATRICES>
__device__ __forceinline__ void na_stage_query_slab(const NaFusedBwdParams& p, const NaTcTile& tl,
                                                    const NaSlab& s, long long b, long long h,
                                                    elem_t* queries, elem_t* d_outs,
                                                    NaRowStats* stats) {
    const NaFusedParams& f = p.f;
    na_stage_pairs<NA_TCB_QUERIES, NA_DIM, NA_DIM_V, CORE_MATRICES>(
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
        int c[3];
        if (na_column(tl, s, n, c)) {
            long long x[3];
            na_tile_positions(f, tl, c, x);
            na_copy8_async(&stats[n], na_stats(p) + 2 * na_query_row(f, b, h, x));
        } else {
            stats[n] = {0, 0};
        }
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
// spill at head dim 128.
#define NA_TCB_QUERY_STAGES 4
#define NA_TCB_KEY_OVERLAP (!NA_TCB_WIDE)
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

// Add to `grads` the terms of query head h's rows in box `tl` (its columns): d_value += P^T dO,
// d_key += dS^T Q (unscaled). `biased`: whether the logits take the bias (rows are keys of the
// window). Every thread of the block calls it, after the tile's rows were staged (not yet
// committed, or published); it ends with a barrier after every read of the tile and the ring.
__device__ __forceinline__ void na_key_rows_over_box(const NaFusedBwdParams& p,
                                                     const NaTcTile& tl, const NaTcRow rows[2],
                                                     bool biased, long long b, long long h,
                                                     NaKeyRowsShared& shared,
                                                     NaKeyTileGrads& grads) {
    constexpr int BLOCKS = NA_TCB_QUERIES / 8, STAGES = NA_TCB_QUERY_STAGES;
    const NaFusedParams& f = p.f;
    // Logits scaled by na_logits whatever the problem, as the mma.sync kernels below.
    const NaExponent exponent = {false, NA_LOG2E, 1.0f};
    const int t = threadIdx.x % 4;
    if (biased) {  // (the last call's reads ended at its closing barrier)
        shared.bias.stage(f, h, tl);
    }
    const long long count = na_slab_count<NA_TCB_QUERIES>(tl, true, 0);
    NaSlab next = na_first_slab<NA_TCB_QUERIES>(tl, true, 0);  // slab j + 1
    // The slabs' copies, one group each (an empty one past the last), slab i into buffer
    // i % STAGES: slabs 0 .. STAGES - 3 first (the tile's rows in the first group), then one
    // after each barrier into the buffer of the slab whose products were waited for before it
    // (so that at slab j's barrier slabs up to j + STAGES - 2 have been issued, and slab j + 1
    // is waited for).
    NaSlab copied = next;
    long long left = count;
    int copy_buffer = 0;
    auto copy_next = [&] {
        if (left > 0) {
            na_stage_query_slab<true>(p, tl, copied, b, h, shared.queries(copy_buffer),
                                      shared.d_outs(copy_buffer), shared.stats(copy_buffer));
            copied = na_next_slab<NA_TCB_QUERIES>(tl, copied, 0);
            --left;
        }
        na_copies_commit();
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
        na_copies_wait_groups<STAGES - 3>();
        na_async_proxy_fence();
        // Whether the warpgroup (the block) sees slab j + 1, through a vote so that the compiler
        // knows it is warp-uniform (as na_publish_slab).
        const bool logits_run = __any_sync(0xffffffffu, __syncthreads_count(seen != 0) != 0);
        copy_next();

        // S^T and dP^T of slab j + 1 (one group), then slab j's gradient products.
        float logits[BLOCKS][4], dp[BLOCKS][4];
        na_issue_logits_and_dp<NA_TCB_QUERIES>(logits, dp, logits_run, shared.keys(),
                                               shared.queries(buffer), shared.values(),
                                               shared.d_outs(buffer));
        if (grads_run) {
            na_wgmma_fence();
#pragma unroll
            for (int k = 0; k < NA_TCB_QUERIES / 16; ++k) {
                na_wgmma<8 * NA_TCB_BLOCKS_V, 1>(&grads.d_value[0][0], probs_a[k],
                                                 na_row_step<NA_DIM_V>(shared.d_outs(last), k), 1);
                na_wgmma<8 * NA_TCB_BLOCKS, 1>(&grads.d_key[0][0], grads_a[k],
                                               na_row_step<NA_DIM>(shared.queries(last), k), 1);
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

extern "C" __global__ void __launch_bounds__(NA_TC_THREADS, NA_TC_KEY_MIN_BLOCKS)
    na_fused_backward_keys_tc(const NaFusedBwdParams p) {
    const NaFusedParams& f = p.f;
    // (The kernel's own, not an inline function's: kernels/host.h.)
    __shared__ NaKeyRowsShared shared;
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
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
        na_cut_box<NA_TCB_QUERIES>(tl);
        // The tile's keys and values, row n as na_tile_rows numbers them.
        na_stage_tile_rows<NA_DIM, NA_DIM_V, NA_TCB_WGMMA>(f, tl, b, hk, f.key, f.value,
                                                           shared.keys(), shared.values());
        NaKeyTileGrads grads;
        grads.zero();
        for (long long h = hk * f.group; h < (hk + 1) * f.group; ++h) {
            na_key_rows_over_box(p, tl, rows, f.has_bias != 0, b, h, shared, grads);
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
                na_key_rows_over_box(p, tl, rows, false, b, h, shared, grads);
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
