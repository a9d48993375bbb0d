// Device code shared by the tensor-core fused kernels (na_fused_tc.cu, the forward;
// na_fused_bwd_tc.cu, the backward). A thread block of four warps takes a tile of up to 64
// rows of one (batch, head): a box of positions inside one dilation group per axis, shaped by the
// host (fused_launch::query_tile) so that neighbouring rows share most of their partners. Rows
// are queries (forward, d_query) or keys (d_key, d_value); their partners, the columns, are the
// box of positions every row's range spans (the key box of the queries' windows, or the query
// box of the keys' inverse windows), walked in slabs (sub-boxes of the box, na_cut_box) staged in
// shared memory by cp.async (the copies of one slab run under the products of another). The rows
// form a box too, and a row's range is a product of per-axis runs whose union along each axis is
// the box's side, so every column of the box is some row's partner: a slab is skipped whole only
// by the warps none of whose rows pairs with it. Each warp holds sixteen rows, two per lane (rows
// g and g + 8 of the m16n8k16 layout, tensor_core.cuh):
//   - which of its products count is worked out per slab before any product (one bit per
//     product, from the window math of common.cuh: every neighbourhood rule comes from there),
//     by a few word operations per row, none for a slab inside every row's range;
//   - blocks of eight columns that none of its rows pairs with are skipped;
//   - products run on tensor cores (float accumulators), the C layout of one product feeding the
//     A layout of the next.
#pragma once
#include "tc_logits.cuh"
#include "tma.cuh"

// Two adjacent elements at a 4-byte aligned address (as even offsets of staged rows of an even
// length), `at[0]` in the low half.
__device__ __forceinline__ unsigned na_pair_at(const elem_t* at) {
#ifdef NA_HOST
    // A misaligned word load faults on a GPU; here it reads two NaNs, which a test sees.
    if (reinterpret_cast<unsigned long long>(at) % 4 != 0) {
        return 0x7fff7fffu;
    }
    return na_pack(at[0], at[1]);
#else
    return *reinterpret_cast<const unsigned*>(at);
#endif
}

// Sixteen bytes from `src` to `dst` (both 16-byte aligned; `dst` a shared-window address,
// na_shared), asynchronously (cp.async, sm_80): the copy bypasses registers, and the thread goes
// on at once. It is complete after the thread's next na_copies_wait, and visible to the block
// after the barrier that follows it.
__device__ __forceinline__ void na_copy16_async_at(NaShared dst, const elem_t* src) {
#ifdef NA_HOST
    na_host::copy_async(const_cast<elem_t*>(dst), src);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
#endif
}

// The same to a generic address of shared memory.
__device__ __forceinline__ void na_copy16_async(elem_t* dst, const elem_t* src) {
    na_copy16_async_at(na_shared(dst), src);
}

// Eight bytes from `src` to `dst` (both 8-byte aligned), asynchronously, as na_copy16_async.
__device__ __forceinline__ void na_copy8_async(void* dst, const void* src) {
#ifdef NA_HOST
    na_host::copy_async(dst, src, 8);
#else
    const unsigned address = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(address), "l"(src) : "memory");
#endif
}

// Wait for every copy this thread has issued (na_copy16_async, na_copy8_async).
__device__ __forceinline__ void na_copies_wait() {
#ifdef NA_HOST
    na_host::wait_copies();
#else
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// Close this thread's group of copies issued since the last (cp.async.commit_group), for
// na_copies_wait_groups to wait on.
__device__ __forceinline__ void na_copies_commit() {
#ifdef NA_HOST
    na_host::commit_copies();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Wait for the copies of every group this thread has committed but the NEWEST last ones.
template <int NEWEST>
__device__ __forceinline__ void na_copies_wait_groups() {
#ifdef NA_HOST
    na_host::wait_copy_groups(NEWEST);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(NEWEST) : "memory");
#endif
}

// Sixteen bytes, as one store or load moves them.
struct __align__(16) NaChunk {
    unsigned words[4];
};

// This thread's ordinary store of `bytes` at `at` in shared memory, which warpgroup products may
// read: the host build holds such stores to the proxy rules that copies keep (host_async.h).
__device__ __forceinline__ void na_stored(const void* at, unsigned bytes) {
#ifdef NA_HOST
    na_host::generic_write(at, bytes, na_host::block->current);
#endif
}

// Zeros for eight channels (16 bytes, aligned) of a staged row: one store.
__device__ __forceinline__ void na_zero_chunk(elem_t* chunk) {
    *reinterpret_cast<NaChunk*>(chunk) = NaChunk{};
    na_stored(chunk, sizeof(NaChunk));
}

// This thread's share (`part` of `PARTS`) of staging a row of N channels from `src` (`step`
// apart; none when null: zeros) into `dst`, zeros up to PADDED channels, its 8-channel chunks
// CHUNK elements apart (NaStaged, chunks 16-byte aligned): 16 bytes at a time, asynchronously,
// where the row is dense and aligned (every row, under NA_DENSE_ROWS), else one element at a
// time. The thread must na_copies_wait before the barrier that publishes the row. N is a
// multiple of 8.
template <int N, int PADDED, int PARTS, int CHUNK>
__device__ __forceinline__ void na_stage_row(elem_t* dst, const elem_t* src, long long step,
                                             int part) {
#if NA_DENSE_ROWS
    const bool whole = src != nullptr;
#else
    const bool whole = src != nullptr && step == 1 &&
                       reinterpret_cast<unsigned long long>(src) % 16 == 0;
#endif
    // Two chunks a thread or fewer (narrow rows) unrolled; more rolled, as their unrolled
    // addresses take registers (the d_query kernel of dense rows spilled at head dims 128/96).
    constexpr int chunks = (PADDED / 8 + PARTS - 1) / PARTS;
    constexpr int unrolled = chunks <= 2 ? chunks : 1;
    const NaShared at = na_shared(dst);  // converted once for the row's copies
#pragma unroll(unrolled)
    for (int k = 0; k < chunks; ++k) {
        const int c = 8 * (part + k * PARTS);
        if (c >= PADDED) {
            break;
        }
        elem_t* const chunk = dst + c / 8 * CHUNK;
        if (src == nullptr || c >= N) {
            na_zero_chunk(chunk);
        } else if (whole) {
            na_copy16_async_at(na_shared_plus(at, c / 8 * CHUNK), src + c);
        } else if (!NA_DENSE_ROWS) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                chunk[i] = src[(c + i) * step];
            }
            na_stored(chunk, 8 * sizeof(elem_t));
        }
    }
}

// How staged rows of N channels (padded with zeros to whole 16-channel steps) lie in shared
// memory. Pitched (CORE_MATRICES false): row after row, each padded by NA_TC_SKEW, which
// ldmatrix reads without bank conflicts. In core matrices (wgmma's operand layout without
// swizzling, NaSmemMatrix): the 8x8 blocks of eight rows by eight channels are 128 contiguous
// bytes each, either a row group's blocks in channel order and the row groups one after another,
// or (CHUNK_ROWS, the rows of a buffer) chunk-major: each 8-channel chunk of every row together,
// row after row, the chunks one after another, as bulk tensor copies of 8 channels by a slab
// land (tma.cuh).
template <int N, bool CORE_MATRICES, int CHUNK_ROWS = 0>
struct NaStaged {
    static_assert(CHUNK_ROWS == 0 || (CORE_MATRICES && CHUNK_ROWS % 8 == 0),
                  "chunk-major rows are core matrices of whole row groups");
    static constexpr int padded = NA_TC_PAD(N);
    // Elements from one 8-channel chunk of a row to the next, and from one group of eight rows
    // to the next (core matrices).
    static constexpr int chunk = CHUNK_ROWS ? 8 * CHUNK_ROWS : CORE_MATRICES ? 64 : 8;
    static constexpr int group = CHUNK_ROWS ? 64 : 8 * padded;
    // The same in bytes, as matrix descriptors take them.
    static constexpr unsigned chunk_bytes = chunk * sizeof(elem_t);
    static constexpr unsigned group_bytes = group * sizeof(elem_t);
    // Elements a buffer takes per row.
    static constexpr int per_row = CORE_MATRICES ? padded : padded + NA_TC_SKEW;
    // Where row n starts.
    __device__ __forceinline__ static int row(int n) {
        return CORE_MATRICES ? n / 8 * group + n % 8 * 8 : n * (padded + NA_TC_SKEW);
    }
};

// Stage slab rows `[0, ROWS)` (as na_stage_row stages them, laid out as NaStaged): row n from
// `row_of(n, ptrs, steps)`, which sets the channel-0 pointers (null for none: zeros) and channel
// steps of the rows of `dst` (N channels) and `dst_v` (N_V channels); a null destination is
// skipped.
template <int ROWS, int N, int N_V, bool CORE_MATRICES = false, int CHUNK_ROWS = 0, class RowOf>
__device__ __forceinline__ void na_stage_pairs(elem_t* dst, elem_t* dst_v, RowOf&& row_of) {
    using Rows = NaStaged<N, CORE_MATRICES, CHUNK_ROWS>;
    using RowsV = NaStaged<N_V, CORE_MATRICES, CHUNK_ROWS>;
    constexpr int parts = NA_TC_THREADS / ROWS;
    const int part = threadIdx.x % parts;
    for (int n = threadIdx.x / parts; n < ROWS; n += NA_TC_THREADS / parts) {
        const elem_t* src[2] = {nullptr, nullptr};
        long long step[2] = {0, 0};
        row_of(n, src, step);
        if (dst != nullptr) {
            na_stage_row<N, Rows::padded, parts, Rows::chunk>(dst + Rows::row(n), src[0], step[0],
                                                              part);
        }
        if (dst_v != nullptr) {
            na_stage_row<N_V, RowsV::padded, parts, RowsV::chunk>(dst_v + RowsV::row(n), src[1],
                                                                  step[1], part);
        }
    }
}

// Start staging slab `s` of a query tile's key box (or of the additional tokens): its key rows
// into `keys` and its value rows into `values` (either may be null: not staged), laid out and
// padded as na_stage_pairs lays them; rows of columns that do not exist (na_column) are zeros (a
// zero weight times a zero row adds nothing). Every thread of the block calls it, after a barrier that ends the
// reads of what it overwrites, and waits for its copies before the barrier that publishes them.
template <int KEYS, bool CORE_MATRICES = false, int CHUNK_ROWS = 0>
__device__ __forceinline__ void na_stage_key_slab(const NaFusedParams& f, const NaTcTile& tl,
                                                  const NaSlab& s, long long b, long long hk,
                                                  elem_t* keys, elem_t* values) {
    na_stage_pairs<KEYS, NA_DIM, NA_DIM_V, CORE_MATRICES, CHUNK_ROWS>(
        keys, values, [&](int n, const elem_t* src[2], long long step[2]) {
            int c[3];
            if (!na_column(tl, s, n, c)) {
                return;
            }
            if (s.extra) {
                src[0] = na_row_ptr(f.extra_key, b, hk, s.first() + n, 0, 0);
                src[1] = na_row_ptr(f.extra_value, b, hk, s.first() + n, 0, 0);
                step[0] = f.extra_key.stride[5];
                step[1] = f.extra_value.stride[5];
                return;
            }
            src[0] = na_tile_row_ptr(f, tl, f.key, b, hk, c);
            src[1] = na_tile_row_ptr(f, tl, f.value, b, hk, c);
            step[0] = f.key.stride[5];
            step[1] = f.value.stride[5];
        });
}

// Stage the rows of tile `tl` (row n as na_tile_rows numbers them) of views `first` and `second`
// (N and N_V channels; batch `batch`, head `head`) into `dst` and `dst_second` (laid out as
// NaStaged; a null destination is skipped).
template <int N, int N_V, bool CORE_MATRICES = false>
__device__ __forceinline__ void na_stage_tile_rows(const NaFusedParams& f, const NaTcTile& tl,
                                                   long long batch, long long head,
                                                   const NaView& first, const NaView& second,
                                                   elem_t* dst, elem_t* dst_second) {
    na_stage_pairs<NA_TC_ROWS, N, N_V, CORE_MATRICES>(
        dst, dst_second, [&](int n, const elem_t* src[2], long long step[2]) {
            long long index[3];
            if (!na_tile_row(tl, n, index)) {
                return;
            }
            src[0] = na_tile_row_ptr(f, tl, first, batch, head, index);
            src[1] = na_tile_row_ptr(f, tl, second, batch, head, index);
            step[0] = first.stride[5];
            step[1] = second.stride[5];
        });
}

// The buffer after `buffer` in a ring of STAGES buffers, and the one before.
template <int STAGES>
__device__ __forceinline__ int na_ring_next(int buffer) {
    return buffer + 1 == STAGES ? 0 : buffer + 1;
}
template <int STAGES>
__device__ __forceinline__ int na_ring_before(int buffer) {
    return buffer == 0 ? STAGES - 1 : buffer - 1;
}

#if NA_HAS_WGMMA
// Copy chunk `chunk` (8 channels) of the rows of slab `s` of tile `tl` (batch b, head `head`, of
// `channels` each) through `map` into `dst`, completing on `full`: one bulk tensor copy of a box
// of 8 channels by the slab (tma.cuh), its corner the slab's first position, whose dilation group
// the map's element strides keep to. The rows land chunk-major (NaStaged's CHUNK_ROWS).
__device__ __forceinline__ void na_copy_slab_chunk(const NaFusedParams& f, const NaTensorMap& map,
                                                   int channels, int chunk, const NaTcTile& tl,
                                                   const NaSlab& s, long long b, long long head,
                                                   elem_t* dst, NaBarrier* full) {
    int c[5] = {(int)head * channels + 8 * chunk, 0, 0, 0, (int)b};
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        c[3 - a] = na_tile_position(f, tl, a, tl.box_first[a] + s.origin[a]);
    }
    na_tensor_copy(dst, map, c, full);
}
#endif

// Copies of a tile's slabs into a ring of STAGES buffers of BUFFER elements (laid out as
// NaStaged<., CORE_MATRICES, CHUNK_ROWS>), item after item: each slab's keys then its values (or,
// with VALUES_FIRST, its values then its keys), each item one cp.async group (an empty one past
// the last slab), item i into buffer i % STAGES.
template <int KEYS, int STAGES, int BUFFER, bool CORE_MATRICES, bool VALUES_FIRST,
          int CHUNK_ROWS = 0>
struct NaRingCopies {
    NaSlab slab;     // the slab of the next item
    bool second;     // whether the next item is the slab's second
    long long left;  // items left to copy
    int buffer;      // where the next goes

    // Copy the next item of tile `tl`'s (batch b, key head hk) into `ring`.
    __device__ __forceinline__ void next(const NaFusedParams& f, const NaTcTile& tl, long long b,
                                         long long hk, elem_t* ring) {
        if (left > 0) {
            stage(f, tl, b, hk, ring);
        }
        na_copies_commit();
        advance(tl, f.extra_count);
    }

    // Whether the next item is a slab's keys (else its values).
    __device__ __forceinline__ bool keys_next() const { return second == VALUES_FIRST; }

    // Start the cp.async copies of the next item (there is one) into its buffer of `ring`.
    __device__ __forceinline__ void stage(const NaFusedParams& f, const NaTcTile& tl, long long b,
                                          long long hk, elem_t* ring) const {
        elem_t* const to = ring + buffer * BUFFER;
        na_stage_key_slab<KEYS, CORE_MATRICES, CHUNK_ROWS>(
            f, tl, slab, b, hk, keys_next() ? to : nullptr, keys_next() ? nullptr : to);
    }

#if NA_HAS_WGMMA
    // Copy the next item onto its buffer's barrier of `barriers` rather than as a cp.async
    // group (the bulk-copy variants, CHUNK_ROWS = KEYS), every thread arriving on it: a slab of
    // the box by bulk tensor copies, one 8-channel chunk per thread of the first warp
    // (na_copy_slab_chunk), thread 0 announcing their bytes as it arrives; the additional tokens
    // by every thread's cp.async.
    __device__ __forceinline__ void next_onto(const NaFusedParams& f, const NaTmaParams& tma,
                                              NaBarrierRing<STAGES>& barriers,
                                              const NaTcTile& tl, long long b, long long hk,
                                              elem_t* ring) {
        static_assert(CORE_MATRICES && CHUNK_ROWS == KEYS, "bulk copies land chunk-major");
        static_assert(NA_DIM / 8 <= NA_WARP && NA_DIM_V / 8 <= NA_WARP,
                      "a chunk per thread of the first warp");
        NaBarrier* const full = &barriers.full[buffer];
        if (left > 0 && !slab.extra) {
            const bool keys = keys_next();
            const int channels = keys ? NA_DIM : NA_DIM_V;
            if (threadIdx.x == 0) {
                na_barrier_arrive_expect(full, KEYS * channels * (unsigned)sizeof(elem_t));
            } else {
                na_barrier_arrive(full);
            }
            const int chunk = (int)threadIdx.x;
            if (chunk < channels / 8) {
                na_copy_slab_chunk(f, tma.maps[keys ? 0 : 1], channels, chunk, tl, slab, b, hk,
                                   ring + buffer * BUFFER + chunk * 8 * CHUNK_ROWS, full);
            }
        } else if (left > 0) {
            stage(f, tl, b, hk, ring);
            na_barrier_arrive_after_copies(full);
        } else {
            na_barrier_arrive(full);
        }
        barriers.put(buffer);
        advance(tl, f.extra_count);
    }
#endif

    // Move on to the item after the next (of a tile with `extras` additional tokens).
    __device__ __forceinline__ void advance(const NaTcTile& tl, long long extras) {
        if (left > 0) {
            if (second) {
                slab = na_next_slab<KEYS>(tl, slab, extras);
            }
            --left;
        }
        second = !second;
        buffer = na_ring_next<STAGES>(buffer);
    }
};

#if NA_HAS_WGMMA
// Set up a ring of STAGES buffers (`elements` in all, a multiple of 8) for bulk tensor copies:
// every buffer zeroed (the padding channels of rows narrower than whole 16-channel steps, which
// no copy writes, stay zero) and one barrier per buffer in `full` expecting every thread,
// published to the copy engine and the block. Every thread of the block calls it, once.
template <int STAGES>
__device__ __forceinline__ void na_start_barrier_ring(elem_t* ring, int elements,
                                                      NaBarrier* full) {
    for (int i = 8 * threadIdx.x; i < elements; i += 8 * NA_TC_THREADS) {
        na_zero_chunk(ring + i);
    }
    if (threadIdx.x == 0) {
        for (int i = 0; i < STAGES; ++i) {
            na_barrier_init(&full[i], NA_TC_THREADS);
        }
        na_barrier_init_fence();
    }
    na_async_proxy_fence();
    __syncthreads();
}
#endif

// Fragment `s` (channels 16 s .. 16 s + 15) of the A operand whose rows g and g + 8 are
// `row[0]` and `row[1]` (rows of N channels, `step` apart; missing rows and channels past N as
// zeros).
template <int N>
__device__ __forceinline__ void na_a_fragment(unsigned frag[4], const elem_t* const row[2],
                                              long long step, int s, int t) {
    // Each register holds channels c and c + 1 (c even, N a multiple of 8): one 4-byte load where
    // they are adjacent and the rows 4-byte aligned, as in dense tensors.
    const unsigned long long starts = reinterpret_cast<unsigned long long>(row[0]) |
                                      reinterpret_cast<unsigned long long>(row[1]);
    const bool pairs = step == 1 && starts % 4 == 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const elem_t* q = row[i % 2];
        const int c = 16 * s + 2 * t + 8 * (i / 2);
        if (q == nullptr || c >= N) {
            frag[i] = 0u;
        } else if (pairs) {
            frag[i] = na_pair_at(q + c);
        } else {
            frag[i] = na_pack(q[c * step], q[(c + 1) * step]);
        }
    }
}

// The A fragments of `STEPS` 16-channel steps of two staged rows (padded with zeros to whole
// steps).
template <int STEPS>
__device__ __forceinline__ void na_staged_fragments(unsigned frag[STEPS][4], const elem_t* row_g,
                                                    const elem_t* row_g8, int t) {
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const elem_t* row = i % 2 ? row_g8 : row_g;
            frag[s][i] = na_pair_at(row + 16 * s + 2 * t + 8 * (i / 2));
        }
    }
}

// Zero `BLOCKS` accumulator blocks (C layout).
template <int BLOCKS>
__device__ __forceinline__ void na_zero(float acc[BLOCKS][4]) {
#pragma unroll
    for (int i = 0; i < BLOCKS; ++i) {
        acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0;
    }
}

// acc[kb] += A . columns^T over `STEPS` 16-channel steps, for the 8-column blocks `kb` of a
// staged slab (rows `pitch` elements apart, 16-byte aligned, padded to whole steps) that the
// warp sees, taken in pairs (16 columns, as na_weighted_rows takes them): one ldmatrix brings a
// step's B fragments of both blocks, whose two products do not wait on each other.
template <int STEPS, int BLOCKS>
__device__ __forceinline__ void na_row_products(float acc[BLOCKS][4], const unsigned a[STEPS][4],
                                                const elem_t* columns, int pitch, unsigned live,
                                                int g, int t) {
    static_assert(BLOCKS % 2 == 0, "column blocks are taken in pairs");
    // Lane i reads row i % 8 of block i / 16 of a pair, channels 8 (i / 8 % 2) of a step.
    const int lane = 4 * g + t;
    const NaShared at =
        na_shared(columns + (lane % 8 + 8 * (lane / 16)) * pitch + 8 * (lane / 8 % 2));
#pragma unroll
    for (int kb = 0; kb < BLOCKS; kb += 2) {
        if (!na_block_live(live, kb) && !na_block_live(live, kb + 1)) {
            continue;
        }
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            unsigned b[4];
            na_load_b_pairs(b, na_shared_plus(at, 8 * kb * pitch + 16 * s));
            na_mma(acc[kb], a[s], b);
            na_mma(acc[kb + 1], a[s], b + 2);
        }
    }
}

// acc[o] += A . rows[:, first_channel + 8 o ...] for the `blocks` 8-channel blocks `o`, 16 slab
// columns at a time: `fragment(kc, a)` sets the A fragment of chunk kc (this warp's rows' factors
// of its 16 columns), `rows` are the slab's staged rows (`pitch` elements apart, 16-byte
// aligned). Chunks of 16 columns the warp does not see are skipped.
template <int CHUNKS, int OUT_BLOCKS, class Fragment>
__device__ __forceinline__ void na_weighted_fragments(float acc[OUT_BLOCKS][4], Fragment&& fragment,
                                                      const elem_t* rows, int pitch,
                                                      int first_channel, int blocks, unsigned live,
                                                      int lane) {
    // Lane i passes the address of row i % 16 of a chunk (na_load_b_transposed).
    const NaShared row = na_shared(rows + lane % 16 * pitch + first_channel);
#pragma unroll
    for (int kc = 0; kc < CHUNKS; ++kc) {
        if (!na_block_live(live, 2 * kc) && !na_block_live(live, 2 * kc + 1)) {
            continue;
        }
        unsigned a[4];
        fragment(kc, a);
#pragma unroll
        for (int o = 0; o < OUT_BLOCKS; ++o) {
            if (o >= blocks) {
                break;
            }
            unsigned b[2];
            na_load_b_transposed(b, na_shared_plus(row, 16 * kc * pitch + 8 * o));
            na_mma(acc[o], a, b);
        }
    }
}

// The A fragment of sixteen columns of factors in the C layout of a product: 8-column blocks
// `lo` and `hi`, rounded to elem_t.
__device__ __forceinline__ void na_pack_a_fragment(unsigned a[4], const float lo[4],
                                                   const float hi[4]) {
    a[0] = na_pack_acc(lo[0], lo[1]);
    a[1] = na_pack_acc(lo[2], lo[3]);
    a[2] = na_pack_acc(hi[0], hi[1]);
    a[3] = na_pack_acc(hi[2], hi[3]);
}

// na_weighted_fragments of factors in the C layout of a product (`weights`: two 8-column blocks
// of which are one A fragment), rounded to elem_t.
template <int CHUNKS, int OUT_BLOCKS>
__device__ __forceinline__ void na_weighted_rows(float acc[OUT_BLOCKS][4],
                                                 const float weights[2 * CHUNKS][4],
                                                 const elem_t* rows, int pitch, int first_channel,
                                                 int blocks, unsigned live, int lane) {
    na_weighted_fragments<CHUNKS, OUT_BLOCKS>(
        acc,
        [&](int kc, unsigned a[4]) { na_pack_a_fragment(a, weights[2 * kc], weights[2 * kc + 1]); },
        rows, pitch, first_channel, blocks, live, lane);
}

// The sum and the max of `x` over the quad of lanes that share a row (lanes 4 g .. 4 g + 3).
__device__ __forceinline__ float na_quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float na_quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// Whether the running softmax below reduces a slab's maxima and sums pairwise, as trees (a few
// levels of independent operations), rather than in one chain: the same instructions, a
// shorter wait. As a benchmark sets it (rust/src/cuda/tuning.rs); off by default.
#ifndef NA_TC_TREE_SOFTMAX
#define NA_TC_TREE_SOFTMAX 0
#endif

// `op` over this lane's 2 BLOCKS values of row r of a slab's logits: in order from `first`, or
// under NA_TC_TREE_SOFTMAX pairwise, level by level, each value folding in the one `width` after
// it (2 BLOCKS is a power of two).
template <int BLOCKS, class Op>
__device__ __forceinline__ float na_row_reduce(const float logits[BLOCKS][4], int r, float first,
                                               Op op) {
    constexpr int n = 2 * BLOCKS;
    static_assert((n & (n - 1)) == 0, "a tree takes a power of two of values");
    float v[n];
#pragma unroll
    for (int i = 0; i < n; ++i) {
        v[i] = logits[i / 2][2 * r + i % 2];
    }
    float x = first;
    if (NA_TC_TREE_SOFTMAX) {
#pragma unroll
        for (int width = 1; width < n; width *= 2) {
#pragma unroll
            for (int i = 0; i + width < n; i += 2 * width) {
                v[i] = op(v[i], v[i + width]);
            }
        }
        x = op(x, v[0]);
    } else {
#pragma unroll
        for (int i = 0; i < n; ++i) {
            x = op(x, v[i]);
        }
    }
    return x;
}

// Running softmax of this lane's two rows over slabs of `BLOCKS` 8-column blocks: the max and
// this lane's share of the sum of exp(logit - max) (the quad's four shares add up to the row's),
// over logits in the units of `exponent` (NaExponent: the products themselves, or the logits).
template <int BLOCKS>
struct NaTcSoftmax {
    NaExponent exponent;
    float max[2] = {neg_inf(), neg_inf()};
    float sum[2] = {0, 0};

    __device__ __forceinline__ explicit NaTcSoftmax(const NaExponent& e) : exponent(e) {}

    // Fold a slab's logits in, turning them into exp(logit - max) (0 for -inf); returns each
    // row's factor for what was accumulated before (0 before the first finite logit).
    __device__ __forceinline__ void fold(float logits[BLOCKS][4], float rescale[2]) {
        const float factor = exponent.factor;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float slab_max = na_row_reduce<BLOCKS>(
                logits, r, neg_inf(), [](float a, float b) { return fmaxf(a, b); });
            const float top = fmaxf(max[r], na_quad_max(slab_max));
            // exp(logit - max logit) as 2^(l factor - top factor): one fused multiply-add and
            // one ex2 per logit. Until a row has a finite logit (top -inf) the offset is 0, so
            // that its -inf logits (and the -inf running max) give 0 rather than NaN.
            const float offset = top == neg_inf() ? 0.0f : top * factor;
            rescale[r] = na_exp2(fmaf(max[r], factor, -offset));
            max[r] = top;
#pragma unroll
            for (int kb = 0; kb < BLOCKS; ++kb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& l = logits[kb][2 * r + e];
                    l = na_exp2(fmaf(l, factor, -offset));
                }
            }
            const float slab_sum =
                na_row_reduce<BLOCKS>(logits, r, 0.0f, [](float a, float b) { return a + b; });
            sum[r] = sum[r] * rescale[r] + slab_sum;
        }
    }

    // The row's sum over its quad (every lane of the quad calls it).
    __device__ __forceinline__ float total(int r) const { return na_quad_sum(sum[r]); }

    // The row's logsumexp from its quad total; -inf for a row that saw no key.
    __device__ __forceinline__ float lse(int r, float total) const {
        return max[r] * exponent.scale + na_log(total);
    }
};
