// Fused neighborhood attention forward on tensor cores (sm_80 and later; float16 and bfloat16):
// the output and logsumexp of na_fused_fwd.cu, computed a block of queries at a time.
//
// A thread block takes a tile of up to NA_TC_ROWS queries of one (batch, head): a box of
// query positions inside one dilation group per axis, shaped by the host so that neighbouring
// queries share most of their windows (a 2-D tile of a 2-D problem). Its keys are the box of
// key positions that holds all of their windows, walked in slabs of NA_TC_KEYS positions
// (sub-boxes of it, such as 8x8 keys of a 2-D box: na_cut_box) and then the additional tokens.
// A slab's key and value rows are staged in shared memory by cp.async (16 bytes per copy where
// rows are dense; rows padded so fragment reads do not collide in banks), keys and values apart
// in a ring of two or three buffers so that copies overlap products. Each warp first works out
// which of its logits count (keys inside each query's own window: every neighbourhood rule,
// stride and causality included, comes from the window math of common.cuh), skips the blocks
// of keys none of its 16 queries sees (a warp's queries see only part of the tile's box),
// multiplies its queries by the rest (mma.sync, float accumulators), and folds them into a
// running softmax (max and sum per query) and output, FlashAttention-style. Nothing is written
// but the output and the logsumexp. On sm_90a, where the host asks for it (NA_WGMMA), the four
// warps of a warpgroup multiply together instead (wgmma: one 64-row product per step, slabs
// staged in core matrices), skipping only the slabs none of them sees; for rows wider than 32
// channels the host makes a block two warpgroups (NA_TC_WARPS 8), so that each staged slab
// serves 128 queries and the keys cross from L2 half as often. Warpgroup products run
// asynchronously, so that variant is software-pipelined: one barrier per slab, a deeper ring in
// dynamic shared memory, and each slab's masks and softmax computed while the previous slab's
// value product runs.
#include "fused_tc.cuh"

// Keys per slab: fewer for wide rows, whose query and output fragments take more registers
// (or as a benchmark sets it: rust/src/cuda/tuning.rs).
#ifndef NA_TC_KEYS
#if NA_DIM > 128 || NA_DIM_V > 128
#define NA_TC_KEYS 32
#else
#define NA_TC_KEYS 64
#endif
#endif
static_assert(NA_TC_KEYS == 16 || NA_TC_KEYS == 32 || NA_TC_KEYS == 64,
              "slabs take 16, 32 or 64 keys");
// Blocks per SM the forward's registers are bounded for: the tensor-core kernels' bound, or as a
// benchmark sets it.
#ifndef NA_TC_FORWARD_MIN_BLOCKS
#define NA_TC_FORWARD_MIN_BLOCKS NA_TC_MIN_BLOCKS
#endif
// 16-channel steps of a query-key product (key rows padded with zeros to whole steps), 8-key
// column blocks of a slab's logits, 8-channel column blocks of the output.
#define NA_TC_STEPS (NA_TC_PAD(NA_DIM) / 16)
#define NA_TC_KEY_BLOCKS (NA_TC_KEYS / 8)
// Whether a warp keeps its query fragments in registers for the whole tile; wider rows read
// them again for every product (registers go to the output instead of spilling).
#define NA_TC_QUERY_REGISTERS (NA_DIM <= 128)
// Whether the products are warpgroup products (wgmma, tensor_core.cuh) rather than each warp's
// own (mma.sync): where the target has them, for head dims up to 128 (queries in registers, a
// slab's logits one 64-key product per step, the output one product per 16 keys; the host asks
// for no wider ones: kernels.rs, MAX_WGMMA_DIM).
#if NA_HAS_WGMMA && NA_DIM <= 128 && NA_DIM_V <= 128
#define NA_TC_WGMMA 1
#else
#define NA_TC_WGMMA 0
#endif
// Output columns are computed 128 at a time: wider outputs take more passes over the keys (their
// accumulators would not fit in registers beside the rest). A warpgroup product's width is a
// multiple of 16: its output takes the value channels padded to that (the padding stays zero).
#if NA_TC_WGMMA
#define NA_TC_OUT_BLOCKS (NA_TC_PAD(NA_DIM_V) / 8)
#else
#define NA_TC_OUT_BLOCKS (NA_DIM_V / 8 < 16 ? NA_DIM_V / 8 : 16)
#endif
#define NA_TC_PASSES ((NA_DIM_V / 8 + NA_TC_OUT_BLOCKS - 1) / NA_TC_OUT_BLOCKS)
// Whether a warpgroup variant stages its slabs' key and value rows by bulk tensor copies
// (tma.cuh; sm_90), as the host asks for it (NA_TMA: kernels.rs): one thread copies a slab's
// rows, eight channels at a time, into a buffer laid out chunk-major, completing on that
// buffer's barrier, which every thread then waits on; the additional tokens' rows are copied by
// cp.async, completing on the same barriers. The slabs of every tile then take the shape the
// host chose (a tensor map's box is fixed).
#if NA_TC_WGMMA && defined(NA_TMA) && NA_TMA
#define NA_TC_TMA 1
#else
#define NA_TC_TMA 0
#endif
#if NA_TC_WGMMA
static_assert(NA_TC_PASSES == 1, "warpgroup products take the whole output in one pass");
static_assert(NA_TC_WARPS % 4 == 0, "warpgroup products take whole warpgroups");
#endif
// How a slab's key and value rows lie in shared memory: in core matrices for wgmma (chunk-major
// where bulk tensor copies bring them), pitched for ldmatrix (NaStaged).
#define NA_TC_CHUNK_ROWS (NA_TC_TMA ? NA_TC_KEYS : 0)
using NaKeyRows = NaStaged<NA_DIM, NA_TC_WGMMA, NA_TC_CHUNK_ROWS>;
using NaValueRows = NaStaged<NA_DIM_V, NA_TC_WGMMA, NA_TC_CHUNK_ROWS>;

// The forward's parameters, the query tiling and the bulk copies' tensor maps
// (fused_launch::FusedTcParams; the maps are zeros but in NA_TC_TMA variants).
struct NaFusedTcParams {
    NaFusedParams forward;
    NaTcTiling tiling;  // the query tiles (each at most NA_TC_ROWS queries)
    NaTmaParams tma;    // at the next multiple of 128 bytes
};

static_assert(sizeof(NaFusedTcParams) ==
                  (sizeof(NaFusedParams) + sizeof(NaTcTiling) + 127) / 128 * 128 +
                      sizeof(NaTmaParams),
              "NaFusedTcParams must match fused_launch::FusedTcParams");

// The barrier that publishes staged rows, each thread having waited for its copies. Warpgroup
// products read shared memory through the async proxy, so the threads' writes are fenced for it
// first.
__device__ __forceinline__ void na_publish_staged() {
#if NA_TC_WGMMA
    na_async_proxy_fence();
#endif
    __syncthreads();
}

// Publish a slab's keys (na_publish_staged) and return whether its products run, given whether
// this warp sees any of it: a warp's own (mma.sync) where it sees the slab; a warpgroup's (wgmma,
// which its four warps take part in together) where any of its warps does. The barrier counts
// the votes: every lane of the first warpgroup's warps that see the slab, one lane of the
// second's, so that the first's warps see it where the count is 32 or more and the second's
// where it is not a multiple of 32 (four at most).
__device__ __forceinline__ bool na_publish_slab(bool warp_sees) {
#if NA_TC_WGMMA
    static_assert(NA_TC_WARPS <= 8, "the votes count two warpgroups at most");
    const int warp = threadIdx.x / NA_WARP;
    const bool vote = warp_sees && (warp < 4 || threadIdx.x % NA_WARP == 0);
    na_async_proxy_fence();
    const int count = __syncthreads_count(vote);
    // Through a vote, so that the compiler knows the answer is the same across the warp: ptxas
    // serializes warpgroup products issued or waited for under a branch it takes for divergent.
    return __any_sync(0xffffffffu, warp < 4 ? count >= NA_WARP : count % NA_WARP != 0);
#else
    na_publish_staged();
    return warp_sees;
#endif
}

#if NA_TC_WGMMA
// The slabs' keys and values take turns in a ring of NA_TC_STAGES buffers of dynamic shared
// memory: slab j's keys are item 2 j and its values item 2 j + 1, item i lies in buffer
// i % NA_TC_STAGES. One barrier per slab publishes slab j's values and slab j + 1's keys, which
// the warpgroups then read while the next NA_TC_AHEAD slabs' items are on their way (a copy has
// that many slabs' products to arrive under).
#define NA_TC_AHEAD 2
#define NA_TC_STAGES (2 * NA_TC_AHEAD + 2)
#else
// The slabs' keys and values take turns in a ring of NA_TC_STAGES buffers of shared memory:
// slab j's keys are item 2 j and its values item 2 j + 1, item i lies in buffer i % NA_TC_STAGES,
// and while item i is read the next NA_TC_STAGES - 1 are on their way (a copy has the products of
// one item, or of two, to arrive under). Three buffers where they fit beside the bias table
// (NaForwardBias) in the 48 KiB a block's static shared memory may take, else two. A benchmark
// may ask for up to four (NA_TC_FORWARD_STAGES: rust/src/cuda/tuning.rs), as many as fit.
#ifndef NA_TC_FORWARD_STAGES
#define NA_TC_FORWARD_STAGES 3
#endif
#define NA_TC_STAGES_FIT(n) ((n) * sizeof(NaRingBuffer) + sizeof(NaForwardBias) <= 48 * 1024)
#define NA_TC_STAGES                                    \
    (NA_TC_FORWARD_STAGES >= 4 && NA_TC_STAGES_FIT(4) ? 4 \
     : NA_TC_FORWARD_STAGES >= 3 && NA_TC_STAGES_FIT(3) ? 3 : 2)
#endif
constexpr int na_tc_buffer = NA_TC_KEYS * (NaKeyRows::per_row > NaValueRows::per_row
                                               ? NaKeyRows::per_row
                                               : NaValueRows::per_row);
typedef elem_t NaRingBuffer[na_tc_buffer];
// The tile's bias table, its entries staged where they fit: beside two ring buffers in the
// 48 KiB of static shared memory on mma.sync.
constexpr bool na_tc_bias_staged =
    NA_TC_WGMMA ? 4 * NA_BIAS_SPAN <= NA_TC_BIAS_STAGE_MAX
                : 2 * sizeof(NaRingBuffer) + sizeof(NaBiasTable<NA_TC_KEYS, true>) <= 48 * 1024;
using NaForwardBias = NaBiasTable<NA_TC_KEYS, na_tc_bias_staged>;


#if NA_TC_WGMMA
// Issue the products of the logits of this warpgroup's 64 queries (`query`, every step's A
// fragment) against a slab's staged keys: step s is channels 16 s .. 16 s + 15 of every key, two
// core matrices along K (a chunk apart), the key groups of eight a row group apart.
__device__ __forceinline__ void na_issue_logits(float logits[NA_TC_KEY_BLOCKS][4],
                                                const unsigned query[NA_TC_STEPS][4],
                                                const elem_t* keys) {
#pragma unroll
    for (int s = 0; s < NA_TC_STEPS; ++s) {
        const NaSmemMatrix step = {keys, 2 * NaKeyRows::chunk_bytes * s, NaKeyRows::chunk_bytes,
                                   NaKeyRows::group_bytes};
        na_wgmma<NA_TC_KEYS, 0>(&logits[0][0], query[s], step, s > 0);
    }
}

// Issue out += probabilities . values (`probabilities`: A fragments of sixteen keys each): keys
// 16 j .. 16 j + 15 are two row groups of the values (along K, a row group apart), their
// channels eight at a time one core matrix (a chunk) apart: N-major.
__device__ __forceinline__ void na_issue_values(float out[NA_TC_OUT_BLOCKS][4],
                                                const unsigned probabilities[NA_TC_KEYS / 16][4],
                                                const elem_t* values) {
#pragma unroll
    for (int j = 0; j < NA_TC_KEYS / 16; ++j) {
        const NaSmemMatrix rows = {values, 2 * NaValueRows::group_bytes * j,
                                   NaValueRows::group_bytes, NaValueRows::chunk_bytes};
        na_wgmma<8 * NA_TC_OUT_BLOCKS, 1>(&out[0][0], probabilities[j], rows, 1);
    }
}
#else
// The logits of this warp's sixteen queries (`query`, every step's A fragment) against the
// slab's staged keys: the 8-key blocks the warp sees (`live`).
__device__ __forceinline__ void na_slab_logits(float logits[NA_TC_KEY_BLOCKS][4],
                                               const unsigned query[NA_TC_STEPS][4],
                                               const elem_t* keys, unsigned live, int g, int t) {
    na_zero<NA_TC_KEY_BLOCKS>(logits);
    na_row_products<NA_TC_STEPS, NA_TC_KEY_BLOCKS>(logits, query, keys,
                                                   NaKeyRows::padded + NA_TC_SKEW, live, g, t);
}
#endif

// Normalise this lane's rows of the output (blocks below `blocks` from channel `first_channel`)
// and store them, and on the first pass their logsumexp; a row that saw no key gives zeros and
// lse -inf.
__device__ __forceinline__ void na_store_rows(const NaFusedParams& f, const NaTcTile& tl,
                                              long long b, long long h, const NaTcRow rows[2],
                                              const NaTcSoftmax<NA_TC_KEY_BLOCKS>& softmax,
                                              const float out[NA_TC_OUT_BLOCKS][4],
                                              int first_channel, int blocks, bool first_pass,
                                              int t) {
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
        if (t == 0 && first_pass) {
            float* lse = reinterpret_cast<float*>(f.lse.data);
            lse[na_tile_offset(f, tl, f.lse, b, h, row.index)] = softmax.lse(r, total);
        }
    }
}

// The forward's copies into its ring: each slab's keys, then its values.
using NaForwardCopies =
    NaRingCopies<NA_TC_KEYS, NA_TC_STAGES, na_tc_buffer, NA_TC_WGMMA, false, NA_TC_CHUNK_ROWS>;

#if NA_TC_WGMMA
// Copy the next item of `copies` (tile `tl`'s, batch b, key head hk) into `ring`: by cp.async
// (its own group), or in NA_TC_TMA variants onto the item's buffer's barrier (next_onto).
__device__ __forceinline__ void na_forward_copy(NaForwardCopies& copies, const NaFusedParams& f,
                                                const NaTmaParams& tma,
                                                NaBarrierRing<NA_TC_STAGES>& barriers,
                                                const NaTcTile& tl, long long b, long long hk,
                                                elem_t* ring) {
#if NA_TC_TMA
    copies.next_onto(f, tma, barriers, tl, b, hk, ring);
#else
    copies.next(f, tl, b, hk, ring);
#endif
}

// One tile's output on warpgroup products, software-pipelined: the barrier of slab j publishes
// slab j's values and slab j + 1's keys; then slab j + 1's logits and slab j's value product are
// issued together, and slab j + 1's masks and softmax run while the value product does (its
// output is rescaled once it is done). A warpgroup skips the products of a slab none of its warps
// sees; the rest of the block's work on it, barriers and copies, goes on.
__device__ __forceinline__ void na_forward_tile(const NaFusedParams& f, const NaTcTile& tl,
                                                long long b, long long h,
                                                const NaTcRow rows[2],
                                                const elem_t* const query_rows[2],
                                                const NaExponent& exponent, NaRingBuffer* ring,
                                                NaForwardBias& bias, const NaTmaParams& tma,
                                                NaBarrierRing<NA_TC_STAGES>& barriers, int t) {
    unsigned query[NA_TC_STEPS][4];
#pragma unroll
    for (int s = 0; s < NA_TC_STEPS; ++s) {
        na_a_fragment<NA_DIM>(query[s], query_rows, f.query.stride[5], s, t);
    }
    float out[NA_TC_OUT_BLOCKS][4];
    na_zero<NA_TC_OUT_BLOCKS>(out);
    NaTcSoftmax<NA_TC_KEY_BLOCKS> softmax(exponent);

    const long long slabs = na_slab_count<NA_TC_KEYS>(tl, f.has_window, f.extra_count);
    const NaSlab first = na_first_slab<NA_TC_KEYS>(tl, f.has_window, f.extra_count);
    NaForwardCopies copies = {first, false, 2 * slabs, 0};
    __syncthreads();  // the last tile's reads of the ring and the bias table done
    bias.stage(f, h, tl);
    // Items 0 .. 2 NA_TC_AHEAD now; two more after each barrier from slab 0's on, into the
    // buffers of the items the slab before read (so that at slab j's barrier items up to
    // 2 j + 2 NA_TC_AHEAD have been issued, and the two it publishes are waited for).
#pragma unroll
    for (int i = 0; i <= 2 * NA_TC_AHEAD; ++i) {
        na_forward_copy(copies, f, tma, barriers, tl, b, h / f.group, ring[0]);
    }
    NaSlab next = first;         // slab j + 1
    int values_buffer = NA_TC_STAGES - 1;  // item 2 j + 1's (none read for j = -1)
    unsigned probabilities[NA_TC_KEYS / 16][4];  // slab j's, as A fragments
    bool values_run = false;  // whether slab j's value product runs
    for (long long j = -1; j < slabs; ++j) {
        const bool has_next = j + 1 < slabs;
        // Which of this lane's logits of slab j + 1 count, known before any product.
        const unsigned seen = has_next ? na_slab_seen<NA_TC_KEY_BLOCKS>(tl, next, rows, t) : 0u;
        const unsigned live = __reduce_or_sync(0xffffffffu, seen);
        const int keys_buffer = na_ring_next<NA_TC_STAGES>(values_buffer);
#if NA_TC_TMA
        if (j >= 0) {
            barriers.wait(values_buffer);
        }
        barriers.wait(keys_buffer);
#else
        if (j < 0) {
            na_copies_wait_groups<2 * NA_TC_AHEAD>();
        } else {
            na_copies_wait_groups<2 * NA_TC_AHEAD - 2>();
        }
#endif
        const bool logits_run = na_publish_slab(live != 0);
        const elem_t* const values = ring[values_buffer];
        const elem_t* const keys = ring[keys_buffer];
        values_buffer = na_ring_next<NA_TC_STAGES>(keys_buffer);
        if (j >= 0) {
            na_forward_copy(copies, f, tma, barriers, tl, b, h / f.group, ring[0]);
            na_forward_copy(copies, f, tma, barriers, tl, b, h / f.group, ring[0]);
        }

        // Both products in flight, the logits' group first, so that waiting for all but the
        // newest group is waiting for the logits. The logits start defined (zeros) before any
        // product: ptxas serializes products whose accumulators other instructions define while
        // they are in flight, as it does those under a branch it takes for divergent.
        float logits[NA_TC_KEY_BLOCKS][4];
        na_zero<NA_TC_KEY_BLOCKS>(logits);
        if (logits_run) {
            na_wgmma_fence();
            na_issue_logits(logits, query, keys);
        }
        na_wgmma_commit();
        if (values_run) {
            na_wgmma_fence();
            na_issue_values(out, probabilities, values);
        }
        na_wgmma_commit();

        na_wgmma_wait<1>();
        float rescale[2];
        if (logits_run) {
            na_hold_registers<4 * NA_TC_KEY_BLOCKS>(&logits[0][0]);
            na_logits<NA_TC_KEY_BLOCKS, false>(logits, seen, exponent, f, h, bias, tl, next,
                                               rows, f.has_bias != 0, t);
            softmax.fold(logits, rescale);
        }
        na_wgmma_wait<0>();
        // The value product done: its output may be rescaled and its A fragments rewritten
        // (held until here, so that the compiler does not reuse their registers earlier).
        na_hold_registers<4 * NA_TC_OUT_BLOCKS>(&out[0][0]);
        na_hold_registers<4 * (NA_TC_KEYS / 16)>(&probabilities[0][0]);
        if (logits_run) {
            na_hold_registers<4 * NA_TC_KEY_BLOCKS>(&logits[0][0]);
#pragma unroll
            for (int o = 0; o < NA_TC_OUT_BLOCKS; ++o) {
                out[o][0] *= rescale[0];
                out[o][1] *= rescale[0];
                out[o][2] *= rescale[1];
                out[o][3] *= rescale[1];
            }
#pragma unroll
            for (int k = 0; k < NA_TC_KEYS / 16; ++k) {
                na_pack_a_fragment(probabilities[k], logits[2 * k], logits[2 * k + 1]);
            }
        }
        values_run = logits_run;
        if (has_next) {
            next = na_next_slab<NA_TC_KEYS>(tl, next, f.extra_count);
        }
    }
    na_store_rows(f, tl, b, h, rows, softmax, out, 0, NA_DIM_V / 8, true, t);
}
#else
// One tile's output on each warp's own products (mma.sync), NA_TC_PASSES passes of output
// columns. Each slab takes two barriers: one publishes its keys, one its values (and ends the
// reads of its keys).
__device__ __forceinline__ void na_forward_tile(const NaFusedParams& f, const NaTcTile& tl,
                                                long long b, long long h,
                                                const NaTcRow rows[2],
                                                const elem_t* const query_rows[2],
                                                const NaExponent& exponent, NaRingBuffer* ring,
                                                NaForwardBias& bias, int t) {
    const int lane = threadIdx.x % NA_WARP, g = lane / 4;
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
        NaTcSoftmax<NA_TC_KEY_BLOCKS> softmax(exponent);

        // Slabs are staged by cp.async, keys and values apart (items of the ring above), so that
        // loads overlap products. Each item's copies are one group, past the last slab an empty
        // one, so that waiting for all but the newest NA_TC_STAGES - 2 groups is waiting for the
        // item about to be read. Each wait-and-barrier publishes one item and ends the reads of
        // the buffer the next copies overwrite.
        const long long slabs = na_slab_count<NA_TC_KEYS>(tl, f.has_window, f.extra_count);
        NaSlab s = na_first_slab<NA_TC_KEYS>(tl, f.has_window, f.extra_count);
        NaForwardCopies copies = {s, false, 2 * slabs, 0};
        __syncthreads();  // the last pass's (or tile's) reads of the ring and bias table done
        bias.stage(f, h, tl);
#pragma unroll
        for (int item = 0; item < NA_TC_STAGES - 1; ++item) {
            copies.next(f, tl, b, h / f.group, ring[0]);  // slab 0's keys (and values)
        }
        int buffer = 0;  // the buffer of the item read next
        for (long long slab = 0; slab < slabs; ++slab) {
            // Which of this lane's logits count, known before any product. Blocks of eight keys
            // that no query of the warp sees are skipped: their products (and, for sixteen such
            // keys, the value product) are never issued. Warp-uniform, as mma.sync needs.
            const unsigned seen = na_slab_seen<NA_TC_KEY_BLOCKS>(tl, s, rows, t);
            const unsigned live = __reduce_or_sync(0xffffffffu, seen);

            na_copies_wait_groups<NA_TC_STAGES - 2>();
            // The slab's keys staged; the item before read. A slab whose products do not run
            // (na_publish_slab) changes nothing: its logits, softmax, output rescaling and value
            // products are skipped whole, as its products are block by block.
            const bool products = na_publish_slab(live != 0);
            // Item 2 slab + NA_TC_STAGES - 1: this slab's values, or (three buffers) the next
            // slab's keys.
            copies.next(f, tl, b, h / f.group, ring[0]);
            const elem_t* const keys = ring[buffer];
            buffer = na_ring_next<NA_TC_STAGES>(buffer);

            float logits[NA_TC_KEY_BLOCKS][4];
            if (products) {
                // Logits of this warp's sixteen queries against the slab's keys.
#if NA_TC_QUERY_REGISTERS
                na_slab_logits(logits, query, keys, live, g, t);
#else
                // One step at a time: unrolled, the fragments' loads would all be issued up
                // front and take the registers they are meant to spare.
                na_zero<NA_TC_KEY_BLOCKS>(logits);
#pragma unroll 1
                for (int step = 0; step < NA_TC_STEPS; ++step) {
                    unsigned frag_q[1][4];
                    na_a_fragment<NA_DIM>(frag_q[0], query_rows, f.query.stride[5], step, t);
                    na_row_products<1, NA_TC_KEY_BLOCKS>(logits, frag_q, keys + 16 * step,
                                                         NaKeyRows::padded + NA_TC_SKEW, live,
                                                         g, t);
                }
#endif
                na_logits<NA_TC_KEY_BLOCKS, false>(logits, seen, exponent, f, h, bias, tl, s,
                                                   rows, f.has_bias != 0, t);

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

            na_copies_wait_groups<NA_TC_STAGES - 2>();
            na_publish_staged();  // the slab's values staged; its keys read
            s = na_next_slab<NA_TC_KEYS>(tl, s, f.extra_count);
            // Item 2 slab + NA_TC_STAGES: the next slab's keys, or (three buffers) its values.
            copies.next(f, tl, b, h / f.group, ring[0]);
            const elem_t* const values = ring[buffer];
            buffer = na_ring_next<NA_TC_STAGES>(buffer);

            // out += probabilities . values.
            if (products) {
                na_weighted_rows<NA_TC_KEYS / 16, NA_TC_OUT_BLOCKS>(
                    out, logits, values, NaValueRows::padded + NA_TC_SKEW, first_channel, blocks,
                    live, lane);
            }
        }
        na_store_rows(f, tl, b, h, rows, softmax, out, first_channel, blocks, pass == 0, t);
    }
}
#endif

extern "C" __global__ void __launch_bounds__(NA_TC_THREADS, NA_TC_FORWARD_MIN_BLOCKS)
    na_fused_forward_tc(const __grid_constant__ NaFusedTcParams p) {
    const NaFusedParams& f = p.forward;
#if NA_TC_WGMMA
    NaRingBuffer* const ring = reinterpret_cast<NaRingBuffer*>(na_dynamic_shared());
#if NA_TC_TMA
    __shared__ NaBarrier full[NA_TC_STAGES];
    NaBarrierRing<NA_TC_STAGES> barriers = {full, 0u};
    na_start_barrier_ring<NA_TC_STAGES>(ring[0], NA_TC_STAGES * na_tc_buffer, full);
#else
    NaBarrierRing<NA_TC_STAGES> barriers = {nullptr, 0u};  // (cp.async groups instead)
#endif
#else
    __shared__ __align__(128) NaRingBuffer ring[NA_TC_STAGES];
#endif
    __shared__ NaForwardBias bias;
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
    const long long tasks = na_tc_tasks(f.batch, p.tiling);
    const NaExponent exponent = na_exponent(f);
    for (long long task = blockIdx.x; task < tasks; task += gridDim.x) {
        const NaTcTask job = na_tc_task(task, p.tiling);
        const long long b = job.batch, h = job.head;
        NaTcRow rows[2];  // this lane's: rows g and g + 8 of its warp's sixteen
        const NaTcTile tl =
            na_query_tile<NA_TC_KEYS>(p.tiling, job.tile, warp, g, rows,
                                      NA_TC_TMA ? p.tma.slab_shift : nullptr);
        const elem_t* query_rows[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            query_rows[r] =
                rows[r].valid ? na_tile_row_ptr(f, tl, f.query, b, h, rows[r].index) : nullptr;
        }
#if NA_TC_WGMMA
        na_forward_tile(f, tl, b, h, rows, query_rows, exponent, ring, bias, p.tma, barriers, t);
#else
        na_forward_tile(f, tl, b, h, rows, query_rows, exponent, ring, bias, t);
#endif
    }
}
#if NA_TC_WGMMA
NA_DYNAMIC_SHARED(na_fused_forward_tc, NA_TC_STAGES * sizeof(NaRingBuffer))
#endif
