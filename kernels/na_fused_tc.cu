// Fused neighborhood attention forward on tensor cores (sm_80 and later; float16 and bfloat16):
// the output and logsumexp of na_fused_fwd.cu, computed a block of queries at a time.
//
// A thread block takes a tile of up to NA_TC_ROWS queries of one (batch, head): a box of
// query positions inside one dilation group per axis, shaped by the host so that neighbouring
// queries share most of their windows (a 2-D tile of a 2-D problem). Its keys are the box of
// key positions that holds all of their windows, walked in slabs of NA_TC_KEYS positions and
// then the additional tokens. A slab's key and value rows are staged in shared memory by
// cp.async (16 bytes per copy where rows are dense; rows padded so fragment reads do not collide
// in banks), keys and values apart so that copies overlap products. Each warp first works out
// which of its logits count (keys inside each query's own window: every neighbourhood rule,
// stride and causality included, comes from the window math of common.cuh), skips the blocks
// of keys none of its 16 queries sees (a warp's queries see only part of the tile's box),
// multiplies its queries by the rest (mma.sync, float accumulators), and folds them into a
// running softmax (max and sum per query) and output, FlashAttention-style. Nothing is written
// but the output and the logsumexp.
#include "fused_tc.cuh"

// Keys per slab: fewer for wide rows, whose query and output fragments take more registers.
#if NA_DIM > 128 || NA_DIM_V > 128
#define NA_TC_KEYS 32
#else
#define NA_TC_KEYS 64
#endif
// 16-channel steps of a query-key product (key rows padded with zeros to whole steps), 8-key
// column blocks of a slab's logits, 8-channel column blocks of the output.
#define NA_TC_STEPS (NA_TC_PAD(NA_DIM) / 16)
#define NA_TC_DIM_PAD NA_TC_PAD(NA_DIM)
#define NA_TC_KEY_BLOCKS (NA_TC_KEYS / 8)
// Output columns are computed 128 at a time: wider outputs take more passes over the keys (their
// accumulators would not fit in registers beside the rest).
#define NA_TC_OUT_BLOCKS (NA_DIM_V / 8 < 16 ? NA_DIM_V / 8 : 16)
#define NA_TC_PASSES ((NA_DIM_V / 8 + NA_TC_OUT_BLOCKS - 1) / NA_TC_OUT_BLOCKS)
// Whether a warp keeps its query fragments in registers for the whole tile; wider rows read
// them again for every product (registers go to the output instead of spilling).
#define NA_TC_QUERY_REGISTERS (NA_DIM <= 128)

// The forward's parameters and the query tiling (fused_launch::FusedTcParams).
struct NaFusedTcParams {
    NaFusedParams forward;
    long long tile[3];   // queries per tile along each axis (their product at most NA_TC_ROWS)
    long long tiles[3];  // tiles along each axis, every dilation group's together
};

static_assert(sizeof(NaFusedTcParams) == sizeof(NaFusedParams) + 6 * 8,
              "NaFusedTcParams must match fused_launch::FusedTcParams");

extern "C" __global__ void __launch_bounds__(NA_TC_THREADS, NA_TC_MIN_BLOCKS)
    na_fused_forward_tc(const NaFusedTcParams p) {
    const NaFusedParams& f = p.forward;
    __shared__ __align__(16) elem_t keys[NA_TC_KEYS][NA_TC_DIM_PAD + NA_TC_SKEW];
    __shared__ __align__(16) elem_t values[NA_TC_KEYS][NA_TC_PAD(NA_DIM_V) + NA_TC_SKEW];
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
    const long long tasks = na_tc_tasks(f.batch, f.heads, p.tiles);
    for (long long task = blockIdx.x; task < tasks; task += gridDim.x) {
        const NaTcTask job = na_tc_task(task, f.heads, p.tiles);
        const long long b = job.batch, h = job.head, hk = h / f.group;
        NaTcRow rows[2];  // this lane's: rows g and g + 8 of its warp's sixteen
        const NaTcTile tl = na_query_tile(f, p.tile, p.tiles, job.tile, warp, g, rows);
        const elem_t* query_rows[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            query_rows[r] =
                rows[r].valid ? na_tile_row_ptr(f, tl, f.query, b, h, rows[r].index) : nullptr;
        }
#if NA_TC_QUERY_REGISTERS
        unsigned query[NA_TC_STEPS][4];
#pragma unroll
        for (int s = 0; s < NA_TC_STEPS; ++s) {
            na_a_fragment<NA_DIM>(query[s], query_rows, f.query.stride[5], s, t);
        }
#endif

#pragma unroll 1
        for (int pass = 0; pass < NA_TC_PASSES; ++pass) {
        // This pass's output columns: blocks `o` below `blocks`, channels from `first_channel`.
        const int first_channel = 8 * NA_TC_OUT_BLOCKS * pass;
        const int blocks = min(NA_TC_OUT_BLOCKS, NA_DIM_V / 8 - NA_TC_OUT_BLOCKS * pass);
        float out[NA_TC_OUT_BLOCKS][4];
        na_zero<NA_TC_OUT_BLOCKS>(out);
        NaTcSoftmax<NA_TC_KEY_BLOCKS> softmax;

        // Slabs are staged by cp.async, keys and values apart, so that loads overlap products:
        // a slab's values arrive while its logits are formed, the next slab's keys while its
        // values are weighed. Each wait-and-barrier publishes one and ends the reads of the
        // buffer the next copies overwrite.
        const long long volume =
            f.has_window ? (long long)tl.box_len[0] * tl.box_len[1] * tl.box_len[2] : 0;
        const long long slabs = na_slab_count<NA_TC_KEYS>(volume, f.extra_count);
        auto slab_at = [&](long long n) { return na_slab<NA_TC_KEYS>(n, volume, f.extra_count); };
        __syncthreads();  // the last pass's (or task's) reads of the keys done
        if (slabs > 0) {
            na_stage_key_slab<NA_TC_KEYS>(f, tl, slab_at(0), b, hk, keys[0], nullptr);
        }
        for (long long slab = 0; slab < slabs; ++slab) {
            const NaSlab s = slab_at(slab);
            na_copies_wait();
            __syncthreads();  // the slab's keys staged; the last slab's values read
            na_stage_key_slab<NA_TC_KEYS>(f, tl, s, b, hk, nullptr, values[0]);

            // Which of this lane's logits count, known before any product. Blocks of eight keys
            // that no query of the warp sees are skipped: their products (and, for sixteen such
            // keys, the value product) are never issued. Warp-uniform, as mma.sync needs.
            const unsigned seen = na_slab_mask<NA_TC_KEY_BLOCKS>(tl, s, rows, t);
            const unsigned live = __reduce_or_sync(0xffffffffu, seen);

            // A slab no query of the warp sees changes nothing: its logits, softmax, output
            // rescaling and value products are skipped whole (warp-uniform), as its products
            // are block by block.
            float logits[NA_TC_KEY_BLOCKS][4];
            if (live != 0) {
                // Logits of this warp's sixteen queries against the slab's keys.
                na_zero<NA_TC_KEY_BLOCKS>(logits);
#if NA_TC_QUERY_REGISTERS
                na_row_products<NA_TC_STEPS, NA_TC_KEY_BLOCKS>(
                    logits, query, keys[0], NA_TC_DIM_PAD + NA_TC_SKEW, live, g, t);
#else
                // One step at a time: unrolled, the fragments' loads would all be issued up
                // front and take the registers they are meant to spare.
#pragma unroll 1
                for (int step = 0; step < NA_TC_STEPS; ++step) {
                    unsigned frag_q[1][4];
                    na_a_fragment<NA_DIM>(frag_q[0], query_rows, f.query.stride[5], step, t);
                    na_row_products<1, NA_TC_KEY_BLOCKS>(logits, frag_q, keys[0] + 16 * step,
                                                         NA_TC_DIM_PAD + NA_TC_SKEW, live, g, t);
                }
#endif
                na_logits<NA_TC_KEY_BLOCKS, false>(logits, seen, f, h, tl, s, rows,
                                                   f.has_bias != 0, t);

                // Fold the slab into the running softmax of each row and rescale the output.
                float rescale[2];
                softmax.fold(logits, rescale);
#pragma unroll
                for (int o = 0; o < NA_TC_OUT_BLOCKS; ++o) {
                    out[o][0] *= rescale[0];
                    out[o][1] *= rescale[0];
                    out[o][2] *= rescale[1];
                    out[o][3] *= rescale[1];
                }
            }

            na_copies_wait();
            __syncthreads();  // the slab's values staged; its keys read
            if (slab + 1 < slabs) {
                na_stage_key_slab<NA_TC_KEYS>(f, tl, slab_at(slab + 1), b, hk, keys[0], nullptr);
            }

            // out += probabilities . values.
            if (live != 0) {
                na_weighted_rows<NA_TC_KEYS / 16, NA_TC_OUT_BLOCKS>(
                    out, logits, values[0], NA_TC_PAD(NA_DIM_V) + NA_TC_SKEW, first_channel,
                    blocks, live, lane);
            }
        }

        // Normalise and store; a row that saw no key gives zeros and lse -inf.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float total = softmax.total(r);
            const NaTcRow& row = rows[r];
            if (!row.valid) {
                continue;
            }
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            const long long at_out = na_tile_offset(f, tl, f.out, b, h, row.index);
#pragma unroll
            for (int o = 0; o < NA_TC_OUT_BLOCKS; ++o) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = first_channel + 8 * o + 2 * t + e;
                    if (o >= blocks) {
                        break;
                    }
                    na_store(f.out, at_out + c * f.out.stride[5], out[o][2 * r + e] * inv);
                }
            }
            if (t == 0 && pass == 0) {
                float* lse = reinterpret_cast<float*>(f.lse.data);
                lse[na_tile_offset(f, tl, f.lse, b, h, row.index)] = softmax.lse(r, total);
            }
        }
        }
    }
}
