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
#include "fused.cuh"
#include "tensor_core.cuh"

#if NA_DIM % 8 != 0 || NA_DIM_V % 8 != 0
#error "the tensor-core kernels take head dims that are multiples of 8"
#endif

// Warps per block: four (one warpgroup), or as the host asks (NA_TC_WARPS: the forward's
// warpgroup variants of wide rows take two, kernels.rs).
#ifndef NA_TC_WARPS
#define NA_TC_WARPS 4
#endif
#define NA_TC_THREADS (NA_WARP * NA_TC_WARPS)
// Blocks an SM should hold at once, which caps the registers a thread may take: narrow rows
// leave room for more blocks of four warps, whose warps hide each other's waits on memory and
// barriers.
#if NA_DIM <= 32 && NA_DIM_V <= 32 && NA_TC_WARPS == 4
#define NA_TC_MIN_BLOCKS 3
#else
#define NA_TC_MIN_BLOCKS 1
#endif
// The key-tile kernels (d_key and d_value) hold more per row: under that cap they spill, so
// they take what registers they need (two blocks still fit an SM's 64K).
#define NA_TC_KEY_MIN_BLOCKS 1
// Rows per tile: sixteen per warp.
#define NA_TC_ROWS (16 * NA_TC_WARPS)
// Channels padded to whole 16-channel steps of a product (padding staged as zeros).
#define NA_TC_PAD(n) (((n) + 15) / 16 * 16)
// Elements each staged row is padded by: 16 bytes, so that the eight rows a fragment read spans
// start in different banks (with rows a multiple of 128 bytes long they would all share one).
#define NA_TC_SKEW 8
// Whether every row a kernel stages is dense and 16-byte aligned, as the host guarantees where it
// says so (kernels.rs, KernelKey::dense_rows): rows are then staged by 16-byte copies alone, and
// the element-by-element copies of other layouts stay out of the slab loops.
#ifndef NA_DENSE_ROWS
#define NA_DENSE_ROWS 0
#endif

// Tile `i` of one axis: its dilation group and that group's length, and the group indices
// `[first, first + count)` of its rows (the host's cut, NaAxisTiling). In 32 bits, as every
// index of a tensor-core kernel fits them (na_tile_position).
struct NaAxisTile {
    int group;
    int len;
    int first;
    int count;
};

__device__ __forceinline__ NaAxisTile na_axis_tile(unsigned i, const NaAxisTiling& axis) {
    const unsigned in_long = axis.rem * axis.long_tiles.divisor;
    NaQuotient at;
    unsigned group;
    if (i < in_long) {
        at = na_divide(i, axis.long_tiles);
        group = at.quot;
    } else {
        at = na_divide(i - in_long, axis.short_tiles);
        group = axis.rem + at.quot;
    }
    NaAxisTile a;
    a.group = (int)group;
    a.len = (int)(axis.quot + (group < axis.rem ? 1 : 0));
    a.first = (int)(at.rem << axis.tile_shift);
    a.count = min(1 << axis.tile_shift, a.len - a.first);
    return a;
}

// One row of a warp's sixteen: whether it exists, and per axis its group index and the range
// `[start, end)` of the column group indices it pairs with (a query's window, or the queries
// whose windows hold a key). Positions along one axis fit 32 bits; addresses are formed in 64.
struct NaTcRow {
    bool valid;
    int index[3];
    int start[3];
    int end[3];
};

// What a block works on at a time: one tile of one (batch, head), numbered batch-major, then
// head, then tile. Tile kernels walk their tasks grid-stride; control flow depends on the task
// only, so every lane of a block takes every loop and barrier.
struct NaTcTask {
    long long batch;
    long long head;  // a query head, or a kv head for the key tiles
    long long tile;  // tile number within the (batch, head)
};

__device__ __forceinline__ long long na_tc_tasks(long long batch, const NaTcTiling& tiling) {
    return batch * tiling.heads.divisor * tiling.per_head.divisor;
}

__device__ __forceinline__ NaTcTask na_tc_task(long long task, const NaTcTiling& tiling) {
    const NaQuotient bh = na_divide((unsigned)task, tiling.per_head);
    const NaQuotient split = na_divide(bh.quot, tiling.heads);
    return {split.quot, split.rem, bh.rem};
}

// Coordinates of tile number `n` of a (batch, head), row-major over the tiles along each axis.
__device__ __forceinline__ void na_tile_at(unsigned n, const NaTcTiling& tiling, int c[3]) {
    const NaQuotient n2 = na_divide(n, tiling.tiles[2]);
    const NaQuotient n1 = na_divide(n2.quot, tiling.tiles[1]);
    c[2] = (int)n2.rem;
    c[1] = (int)n1.rem;
    c[0] = (int)n1.quot;
}

// The tile of a block: per axis, which part of which dilation group it takes (na_axis_tile's
// fields, in 32 bits); the box of column group indices its rows pair with, and how the box is cut
// into slabs (na_cut_box).
struct NaTcTile {
    int tile_shift[3];  // a tile is 2^tile_shift[a] rows long along axis a
    int group[3];       // the tile's dilation group
    int len[3];         // that group's length
    int first[3];       // the group index of the tile's first row
    int count[3];       // rows of the tile
    int box_first[3];   // first column group index of the box
    int box_len[3];     // columns of the box along each axis
    int slab_shift[3];  // a slab is 2^slab_shift[a] columns long along axis a
};

// Coordinates of row number `n` of a tile, row-major over its sides (powers of two: the host's
// tiles, fused_launch::query_tile).
__device__ __forceinline__ void na_tile_coords(const NaTcTile& tl, int n, int c[3]) {
    c[2] = n & ((1 << tl.tile_shift[2]) - 1);
    c[1] = n >> tl.tile_shift[2] & ((1 << tl.tile_shift[1]) - 1);
    c[0] = n >> (tl.tile_shift[1] + tl.tile_shift[2]);
}

// log2 of a power of two.
__device__ __forceinline__ constexpr int na_log2(int n) { return n <= 1 ? 0 : 1 + na_log2(n / 2); }

// The fewest doublings of 1 that reach n (0 for n up to 1).
__device__ __forceinline__ int na_ceil_log2(int n) { return n <= 1 ? 0 : 32 - __clz(n - 1); }

// Sides of 2^shift that cover n: ceil(n / 2^shift).
__device__ __forceinline__ int na_sides(int n, int shift) {
    return (n >> shift) + ((n & ((1 << shift) - 1)) != 0 ? 1 : 0);
}

// A bit at every multiple of 2^shift below 64 (shift 0 to 6): the first columns of a slab's
// lines (or planes), 2^shift columns long. A table: the tiles keep no registers for them.
__constant__ const unsigned long long na_every[7] = {
    ~0ull,
    0x5555555555555555ull,
    0x1111111111111111ull,
    0x0101010101010101ull,
    0x0001000100010001ull,
    0x0000000100000001ull,
    1ull,
};

// Which of two shapes of as many slabs na_cut_box takes: the lower preference (the first found of
// equal ones). Shapes that fit inside a window (no side longer than the kernel along its axis)
// come first, the most even of them first: a slab inside every row's range skips its mask
// (na_slab_seen), and even sides fit more slabs inside. Where no shape fits (small windows), the
// longest along the last axis comes first, then along the middle one: a warp's rows are a run of
// the tile's in row-major order, a band across its last axes, and slabs across them too meet
// fewer bands, so fewer warps see each slab (7x7 windows over 56x56 queries, in 8x8 tiles: a
// warp sees 2.6 slabs on average cut 4x16, 3.1 cut 8x8).
template <int TOTAL>
__device__ __forceinline__ int na_slab_preference(const int shift[3]) {
    const int kernel[3] = {NA_K0, NA_K1, NA_K2};
    bool fits = true;
    int longest = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        fits = fits && (1 << shift[a]) <= kernel[a];
        longest = max(longest, shift[a]);
    }
    return fits ? longest : 1 + TOTAL + (TOTAL - shift[2]) * (TOTAL + 1) + (TOTAL - shift[1]);
}

// Slabs counted in a shape's rank (na_shape_rank): 19 bits' worth. Boxes of more slabs of each
// shape than that (a window of tens of millions of keys) rank as many, cut by preference alone:
// still a cut, if not the fewest slabs.
#define NA_RANKED_SLABS ((1 << 19) - 1)

// A shape of slabs as a number, the lower the better: its count of slabs (up to
// NA_RANKED_SLABS), then its preference (na_slab_preference, below 128), then its shifts along
// the first two axes (below 8 each), which the number keeps.
template <int TOTAL>
__device__ __forceinline__ unsigned na_shape_rank(long long count, const int shift[3]) {
    static_assert(TOTAL * TOTAL + 3 * TOTAL + 1 < 128, "preferences take 7 bits");
    const unsigned slabs = (unsigned)min(count, (long long)NA_RANKED_SLABS);
    return slabs << 13 | (unsigned)na_slab_preference<TOTAL>(shift) << 6 |
           (unsigned)(shift[0] << 3 | shift[1]);
}

// Cut the tile's box (its sides set) into slabs of COLUMNS columns (a power of two below 256):
// sub-boxes with power-of-two sides, their columns row-major (lines along the last axis, planes
// of lines), the last along each axis reaching past the box's end where the side does not divide
// it (those columns are staged as zeros and never seen). A whole slab along an axis is never
// longer than the box rounded up to a power of two (a shorter one then covers the same). Of the
// shapes, one with the fewest slabs, na_slab_preference saying which of as few. The lanes of a
// warp weigh the shapes side by side, one each, and agree on the best by a warp minimum (a loop
// over the shapes took a tile of the vision problem some 500 instructions): every lane of the
// warp calls it, with the same box.
template <int COLUMNS>
__device__ __forceinline__ void na_cut_box(NaTcTile& tl) {
    constexpr int total = na_log2(COLUMNS);
    static_assert(1 << total == COLUMNS && total < 8,
                  "slabs take a power of two of columns, below 256");
    const int lane = threadIdx.x % NA_WARP;
    const int most0 = min(na_ceil_log2(tl.box_len[0]), total);
    const int most1 = min(na_ceil_log2(tl.box_len[1]), total);
    unsigned best = ~0u;
    // Lane l weighs the shape of shifts first + l / 8 and l % 8 along the first two axes.
    for (int first = 0; first <= most0; first += NA_WARP / 8) {
        const int shift[3] = {first + lane / 8, lane % 8, total - first - lane / 8 - lane % 8};
        unsigned rank = ~0u;
        if (shift[0] <= most0 && shift[1] <= most1 && shift[2] >= 0) {
            long long count = 1;
#pragma unroll
            for (int a = 0; a < 3; ++a) {
                count *= na_sides(tl.box_len[a], shift[a]);
            }
            rank = na_shape_rank<total>(count, shift);
        }
        best = min(best, __reduce_min_sync(0xffffffffu, rank));
    }
    tl.slab_shift[0] = (int)(best >> 3 & 7u);
    tl.slab_shift[1] = (int)(best & 7u);
    tl.slab_shift[2] = total - tl.slab_shift[0] - tl.slab_shift[1];
}

// Tile number `index` (of one (batch, head)) of `tiling`, and this lane's rows `rows[0]` (g) and
// `rows[1]` (g + 8) of warp `warp`; the ranges and the box are the caller's to fill.
__device__ __forceinline__ NaTcTile na_tile_rows(const NaTcTiling& tiling, long long index,
                                                 int warp, int g, NaTcRow rows[2]) {
    NaTcTile tl;
    int at[3];
    na_tile_at((unsigned)index, tiling, at);
    int within[2][3];
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        tl.tile_shift[a] = tiling.axis[a].tile_shift;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        na_tile_coords(tl, 16 * warp + g + 8 * r, within[r]);
    }
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        const NaAxisTile axis = na_axis_tile((unsigned)at[a], tiling.axis[a]);
        tl.group[a] = axis.group;
        tl.len[a] = axis.len;
        tl.first[a] = axis.first;
        tl.count[a] = axis.count;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            rows[r].valid = (a == 0 || rows[r].valid) && within[r][a] < tl.count[a];
            rows[r].index[a] = tl.first[a] + within[r][a];
        }
    }
    return tl;
}

// Position along axis `a` of group index `index` of the tile's dilation group. Every index of a
// tensor-core kernel (batch, head, position along an axis) fits 32 bits, as the host checks
// (fused_launch::indices_fit_32_bits); addresses are formed in 64.
__device__ __forceinline__ int na_tile_position(const NaFusedParams& f, const NaTcTile& tl, int a,
                                                long long index) {
    return (int)index * (int)f.dilation[a] + tl.group[a];
}

// Positions `x` of the group indices `index` of the tile's dilation group, every axis.
template <class Index>
__device__ __forceinline__ void na_tile_positions(const NaFusedParams& f, const NaTcTile& tl,
                                                  const Index index[3], long long x[3]) {
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        x[a] = na_tile_position(f, tl, a, index[a]);
    }
}

// Offset in `v` of channel 0 of the row of (b, h) at group indices `index` of the tile's
// dilation group. Its indices fitting 32 bits, each term is a 32 x 64-bit multiply-add (two
// instructions) rather than a 64-bit product.
template <class Index>
__device__ __forceinline__ long long na_tile_offset(const NaFusedParams& f, const NaTcTile& tl,
                                                    const NaView& v, long long b, long long h,
                                                    const Index index[3]) {
    auto term = [](long long i, long long stride) {
        return (unsigned long long)(unsigned)i * (unsigned long long)stride;
    };
    unsigned long long at = term(b, v.stride[0]) + term(h, v.stride[1]);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        at += term(na_tile_position(f, tl, a, index[a]), v.stride[2 + a]);
    }
    return (long long)at;
}

// Channel 0 of that row (na_tile_offset).
template <class Index>
__device__ __forceinline__ const elem_t* na_tile_row_ptr(const NaFusedParams& f,
                                                         const NaTcTile& tl, const NaView& v,
                                                         long long b, long long h,
                                                         const Index index[3]) {
    return na_ptr(v) + na_tile_offset(f, tl, v, b, h, index);
}

// The window of group index `qi` along axis `a` of the tile's group.
__device__ __forceinline__ NaRange na_tile_window(const NaTcTile& tl, int a, int qi) {
    return na_group_window(qi, tl.len[a], na_kernel(a), na_stride(a), na_causal(a));
}

// `x`, computed here once: its uses may not recompute it. (Their inputs loaded from the
// parameters, ptxas rebuilt a tile's row windows inside the forward's slab loop rather than
// keep them in registers: at head dim 128, 42 instructions of a 1222-instruction loop.)
__device__ __forceinline__ int na_kept(int x) {
#ifndef NA_HOST
    asm volatile("" : "+r"(x));
#endif
    return x;
}

// A tile of queries (na_tile_rows): with the box of key group indices their windows span, cut
// into slabs of COLUMNS keys, and each row's window.
template <int COLUMNS>
__device__ __forceinline__ NaTcTile na_query_tile(const NaTcTiling& tiling, long long index,
                                                  int warp, int g, NaTcRow rows[2]) {
    NaTcTile tl = na_tile_rows(tiling, index, warp, g, rows);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        tl.box_first[a] = (int)na_tile_window(tl, a, tl.first[a]).start;
        tl.box_len[a] =
            (int)(na_tile_window(tl, a, tl.first[a] + tl.count[a] - 1).end - tl.box_first[a]);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const NaRange w = na_tile_window(tl, a, rows[r].index[a]);
            rows[r].start[a] = na_kept((int)w.start);
            rows[r].end[a] = na_kept((int)w.end);
        }
    }
    na_cut_box<COLUMNS>(tl);
    return tl;
}

// Row-major number `n` of a tile (as na_tile_rows numbers its rows): its group indices, and
// whether it lies inside the tile.
__device__ __forceinline__ bool na_tile_row(const NaTcTile& tl, int n, long long index[3]) {
    int c[3];
    na_tile_coords(tl, n, c);
    bool inside = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        inside = inside && c[a] < tl.count[a];
        index[a] = tl.first[a] + c[a];
    }
    return inside;
}

// A slab of columns: the sub-box of the tile's box from `origin` (from the box's start; sides as
// na_cut_box cuts them), or (`extra`) count() additional tokens from number first(), which a slab
// keeps in its origin's place (one set of registers for either; additional tokens fit 32 bits:
// fused_launch::indices_fit_32_bits).
struct NaSlab {
    int origin[3];
    bool extra;

    __device__ __forceinline__ int first() const { return origin[0]; }
    __device__ __forceinline__ int count() const { return origin[1]; }
};

// Slabs of COLUMNS columns over the tile's box (`window`: whether there is one) and `extras`
// additional tokens.
__device__ __forceinline__ long long na_box_slabs(const NaTcTile& tl, bool window) {
    long long box = window ? 1 : 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        box *= na_sides(tl.box_len[a], tl.slab_shift[a]);
    }
    return box;
}

template <int COLUMNS>
__device__ __forceinline__ long long na_slab_count(const NaTcTile& tl, bool window,
                                                   long long extras) {
    return na_box_slabs(tl, window) + (extras + COLUMNS - 1) / COLUMNS;
}

// The slab of additional tokens from number `first` (of `extras`).
template <int COLUMNS>
__device__ __forceinline__ NaSlab na_extra_slab(int first, long long extras) {
    return {{first, (int)min((long long)COLUMNS, extras - first), 0}, true};
}

// The first slab: the box's first, or without a box (`window` false, or an empty one) the
// additional tokens'.
template <int COLUMNS>
__device__ __forceinline__ NaSlab na_first_slab(const NaTcTile& tl, bool window,
                                                long long extras) {
    return na_box_slabs(tl, window) > 0 ? NaSlab{{0, 0, 0}, false}
                                        : na_extra_slab<COLUMNS>(0, extras);
}

// The slab after `s`: the box's in row-major order (a step along the last axis, carried to the
// axis before at the box's end), then the additional tokens'. Slabs are walked in turn rather
// than numbered, so that a tile keeps no divisors for them.
template <int COLUMNS>
__device__ __forceinline__ NaSlab na_next_slab(const NaTcTile& tl, const NaSlab& s,
                                               long long extras) {
    if (s.extra) {
        return na_extra_slab<COLUMNS>(s.first() + COLUMNS, extras);
    }
    NaSlab next = s;
#pragma unroll
    for (int a = 2; a >= 0; --a) {
        next.origin[a] += 1 << tl.slab_shift[a];
        if (next.origin[a] < tl.box_len[a]) {
            return next;
        }
        next.origin[a] = 0;
    }
    return na_extra_slab<COLUMNS>(0, extras);
}

// Where column `n` (below a slab's columns) lies in a slab of tile `tl`: its position along
// each axis from the slab's origin (row-major over the slab's sides, powers of two).
__device__ __forceinline__ void na_slab_position(const NaTcTile& tl, int n, int within[3]) {
    const int line = tl.slab_shift[2], plane = tl.slab_shift[1] + line;
    within[0] = n >> plane;
    within[1] = (n >> line) & ((1 << tl.slab_shift[1]) - 1);
    within[2] = n & ((1 << line) - 1);
}

// Group indices `c` of column `n` (below the slab's columns) of slab `s`, and whether it exists:
// inside the box, or one of the slab's additional tokens (whose `c` callers must not use).
// Straight-line code, so that the callers' unrolled loops over columns stay so.
__device__ __forceinline__ bool na_column(const NaTcTile& tl, const NaSlab& s, int n, int c[3]) {
    int within[3];
    na_slab_position(tl, n, within);
    bool inside = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        const int x = s.origin[a] + within[a];
        inside = inside && x < tl.box_len[a];
        c[a] = x + tl.box_first[a];
    }
    return s.extra ? n < s.count() : inside;
}

// The bit of a lane's slab mask (na_slab_mask) for its product of row r (g + 8 r) and column
// 8 kb + 2 t + e: a nibble per 8-column block, blocks 0-3 in the low nibbles of the word's four
// bytes and blocks 4-7 in the high ones (the order na_slab_mask assembles them in).
__device__ __forceinline__ constexpr int na_seen_bit(int kb, int r, int e) {
    return 8 * (kb % 4) + 4 * (kb / 4) + 2 * r + e;
}

// Whether a lane's product of row r and column 8 kb + 2 t + e counts (`seen`: its slab mask).
__device__ __forceinline__ bool na_seen(unsigned seen, int kb, int r, int e) {
    return (seen >> na_seen_bit(kb, r, e) & 1u) != 0u;
}

// Whether 8-column block `kb` is seen by some lane of the warp (`live`: the warp's masks or-ed).
__device__ __forceinline__ bool na_block_live(unsigned live, int kb) {
    return (live >> na_seen_bit(kb, 0, 0) & 0xfu) != 0u;
}

// A word with a bit per column of a slab: 32 bits, or 64 for wide slabs.
template <bool WIDE>
struct NaMaskWord {
    using type = unsigned;
};
template <>
struct NaMaskWord<true> {
    using type = unsigned long long;
};

// 2^n in a `Word` (32 or 64 bits) for n in [0, width]; 2^width wraps to 0. Bits [lo, hi) of a
// word, for 0 <= lo <= hi <= width, are na_power<Word>(hi) - na_power<Word>(lo).
template <class Word>
__device__ __forceinline__ Word na_power(int n) {
#ifdef NA_HOST
    return n >= 8 * (int)sizeof(Word) ? Word(0) : Word(1) << n;
#else
    // PTX clamps shift amounts at the register's width (C++ leaves them undefined there).
    Word y;
    if constexpr (sizeof(Word) == 8) {
        asm("shl.b64 %0, %1, %2;" : "=l"(y) : "l"(1ull), "r"(n));
    } else {
        asm("shl.b32 %0, %1, %2;" : "=r"(y) : "r"(1u), "r"(n));
    }
    return y;
#endif
}

// Bits `[lo << scale, hi << scale)` of a word (32 or 64 bits: `Word`), lo and hi clamped to
// `[0, side]` first (side << scale at most the word's width).
template <class Word>
__device__ __forceinline__ Word na_run_bits(int lo, int hi, int side, int scale) {
    // Clamping keeps the ends in order, so a run clamped away gives no bits.
    return na_power<Word>(max(min(hi, side), 0) << scale) -
           na_power<Word>(max(min(lo, side), 0) << scale);
}

// Which of this lane's products with a slab count: bit na_seen_bit(kb, r, e) when column
// 8 kb + 2 t + e exists and lies in the range of row r (every additional token counts for every
// valid row). Built per row over the whole slab first, without a loop: a row's range along each
// axis is a run, so its columns of a slab are the columns whose line position lies in the run
// along the last axis (that run's bits, repeated at every line), whose plane position lies in
// the run along the middle axis (that run, scaled to whole lines, repeated at every plane) and
// whose plane lies in the run along the first (scaled to whole planes). Ranges are clamped to the
// box, whose columns past its end a slab may hold.
template <int BLOCKS>
__device__ __forceinline__ unsigned na_slab_mask(const NaTcTile& tl, const NaSlab& s,
                                                 const NaTcRow rows[2], int t) {
    static_assert(BLOCKS <= 8, "a slab's mask takes one 32-bit word per lane");
    // Narrow slabs take 32-bit words (registers are short in the kernels that take them).
    using Word = typename NaMaskWord<(BLOCKS > 4)>::type;
    // This lane's columns 8 kb + 2 t + e are bits 2 t and 2 t + 1 of byte kb of a row's word;
    // the lane's two rows go side by side.
    constexpr Word pairs = Word(0x0303030303030303ull);
    const int line = tl.slab_shift[2], plane = tl.slab_shift[1] + line;
    const int scale[3] = {plane, line, 0};
    const Word lines = (Word)na_every[line], planes = (Word)na_every[plane];
    Word mine = 0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const NaTcRow& row = rows[r];
        Word in = 0;
        if (s.extra) {
            in = row.valid ? na_run_bits<Word>(0, s.count(), s.count(), 0) : Word(0);
        } else if (row.valid) {
            Word run[3];
#pragma unroll
            for (int a = 0; a < 3; ++a) {
                // The row's range from the slab's origin (a range may reach past the box, such
                // as the additional tokens' ranges, which span every query).
                const int lo = row.start[a] - tl.box_first[a] - s.origin[a];
                const int hi = min(row.end[a] - tl.box_first[a], tl.box_len[a]) - s.origin[a];
                run[a] = na_run_bits<Word>(lo, hi, 1 << tl.slab_shift[a], scale[a]);
            }
            in = run[2] * lines & run[1] * planes & run[0];
        }
        mine |= (in >> (2 * t) & pairs) << (2 * r);
    }
    return (unsigned)mine | (unsigned)((unsigned long long)mine >> 32) << 4;
}

// Every bit of a lane's mask of a slab of BLOCKS 8-column blocks (na_seen_bit).
template <int BLOCKS>
__device__ __forceinline__ constexpr unsigned na_all_seen() {
    unsigned bits = 0;
    for (int kb = 0; kb < BLOCKS; ++kb) {
        bits |= 0xfu << na_seen_bit(kb, 0, 0);
    }
    return bits;
}

// Whether every column of slab `s` exists and lies in the range of both of this lane's rows
// (which exist).
__device__ __forceinline__ bool na_slab_within(const NaTcTile& tl, const NaSlab& s,
                                               const NaTcRow rows[2]) {
    bool within = !s.extra;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        const int lo = s.origin[a] + tl.box_first[a], hi = lo + (1 << tl.slab_shift[a]);
        within = within && hi <= tl.box_len[a] + tl.box_first[a];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            within = within && rows[r].valid && lo >= rows[r].start[a] && hi <= rows[r].end[a];
        }
    }
    return within;
}

// Whether a row can pair with every column of a slab of BLOCKS 8-column blocks: only where its
// window holds that many keys (the kernel's sizes). Small windows (7x7 against 64-column slabs)
// take no test for it.
template <int BLOCKS>
__device__ __forceinline__ constexpr bool na_slabs_may_be_whole() {
    return NA_K0 * NA_K1 * NA_K2 >= 8 * BLOCKS;
}

// This lane's mask of slab `s` (na_slab_mask), without building it where every row of the warp
// pairs with every column of the slab (a warp-uniform test, a few comparisons per row): the
// slabs inside the rows' common range, most of a large window's.
template <int BLOCKS>
__device__ __forceinline__ unsigned na_slab_seen(const NaTcTile& tl, const NaSlab& s,
                                                 const NaTcRow rows[2], int t) {
    if (!na_slabs_may_be_whole<BLOCKS>()) {
        return na_slab_mask<BLOCKS>(tl, s, rows, t);
    }
    return __all_sync(0xffffffffu, na_slab_within(tl, s, rows)) ? na_all_seen<BLOCKS>()
                                                                 : na_slab_mask<BLOCKS>(tl, s, rows, t);
}

// -inf for this lane's products with a slab that do not count (`seen`: its mask).
template <int BLOCKS>
__device__ __forceinline__ void na_mask_products(float products[BLOCKS][4], unsigned seen) {
#pragma unroll
    for (int kb = 0; kb < BLOCKS; ++kb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (!na_seen(seen, kb, i / 2, i % 2)) {
                products[kb][i] = neg_inf();
            }
        }
    }
}

// ---- the relative positional bias ---------------------------------------------------------------
// Whether a kernel variant can be given a bias: the host compiles variants for problems with one
// apart (NA_BIASED, kernels.rs: KernelKey::biased), and takes one only with odd kernel sizes and
// stride 1 on every axis (FusedProblem::check_rpb; the unfused ops take only those), so other
// variants compile no bias path (registers are tight, and it would be cold code in their slab
// loops).
#ifndef NA_BIASED
#define NA_BIASED 1
#endif
#define NA_TC_MAY_HAVE_BIAS                                                                     \
    (NA_BIASED && NA_K0 % 2 == 1 && NA_K1 % 2 == 1 && NA_K2 % 2 == 1 && NA_S0 == 1 &&          \
     NA_S1 == 1 && NA_S2 == 1)

// Entries of a head's bias table: 2 K - 1 per axis.
#define NA_TC_BIAS_SPAN ((2 * NA_K0 - 1) * (2 * NA_K1 - 1) * (2 * NA_K2 - 1))

// Row-major number of `x` in a table of 2 K - 1 entries per axis. The bias of a pair is entry
// key - query + K - 1 (group steps, per axis), and the number is linear: the pair's is
// na_bias_number(key) - na_bias_number(query) + NA_TC_BIAS_CENTRE.
__device__ __forceinline__ constexpr int na_bias_number(int x0, int x1, int x2) {
    return (x0 * (2 * NA_K1 - 1) + x1) * (2 * NA_K2 - 1) + x2;
}
#define NA_TC_BIAS_CENTRE na_bias_number(NA_K0 - 1, NA_K1 - 1, NA_K2 - 1)

// The element `bytes` bytes into `table`. Entries of the bias tables in shared memory are
// addressed by byte offsets (4 na_bias_number), so that forming an entry's address takes one add.
template <class T>
__device__ __forceinline__ T& na_at_bytes(T* table, int bytes) {
    return *reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(table) + bytes);
}
template <class T>
__device__ __forceinline__ const T& na_at_bytes(const T* table, int bytes) {
    return *reinterpret_cast<const T*>(reinterpret_cast<const unsigned char*>(table) + bytes);
}

// Entry number `n` of head h's table, read from the tensor whatever its strides (the divisions
// are by constants). Offsets are taken modulo 2^32: the host takes these kernels only where every
// offset into the table is below 2^32 (TensorRef::offsets_fit_32_bits).
__device__ __forceinline__ float na_bias_entry(const NaFusedParams& f, long long h, int n) {
    const int x2 = n % (2 * NA_K2 - 1), x1 = n / (2 * NA_K2 - 1) % (2 * NA_K1 - 1),
              x0 = n / ((2 * NA_K2 - 1) * (2 * NA_K1 - 1));
    const unsigned at = (unsigned)h * (unsigned)f.bias.stride[0] +
                        (unsigned)x0 * (unsigned)f.bias.stride[1] +
                        (unsigned)x1 * (unsigned)f.bias.stride[2] +
                        (unsigned)x2 * (unsigned)f.bias.stride[3];
    return to_acc(na_ptr(f.bias)[at]);
}

// The most bytes of bias entries the kernels whose rows take dynamic shared memory stage beside
// them (in static shared memory): tables of 4096 entries, such as 2-D kernels up to 31 and
// 3-D ones up to 7x7x7.
#define NA_TC_BIAS_STAGE_MAX (16 * 1024)

// What a tile's logits take of its head's bias table, in shared memory: the table's entries as
// floats where the kernel has room for them (`STAGED`; else each logit reads its entry from the
// tensor), and the na_bias_number of each of the COLUMNS columns of a slab from the slab's
// origin (they depend on the tile's slab shape alone), so that a column's number is its slab's
// and one load. Numbers are held as the byte offsets of their entries (4 na_bias_number:
// na_at_bytes). A word apiece in variants without a bias.
template <int COLUMNS, bool STAGED>
struct NaBiasTable {
    float entries[NA_TC_MAY_HAVE_BIAS && STAGED ? NA_TC_BIAS_SPAN : 1];
    int columns[NA_TC_MAY_HAVE_BIAS ? COLUMNS : 1];

    // Fill it for head h and tile `tl` (nothing without a bias). Every thread of the block calls
    // it, after a barrier that ends the reads of what it held; a barrier after publishes it.
    __device__ __forceinline__ void stage(const NaFusedParams& f, long long h,
                                          const NaTcTile& tl) {
        if (!NA_TC_MAY_HAVE_BIAS || f.has_bias == 0) {
            return;
        }
        if (STAGED) {
            for (int n = threadIdx.x; n < NA_TC_BIAS_SPAN; n += NA_TC_THREADS) {
                entries[n] = na_bias_entry(f, h, n);
            }
        }
        for (int n = threadIdx.x; n < COLUMNS; n += NA_TC_THREADS) {
            int within[3];
            na_slab_position(tl, n, within);
            columns[n] = 4 * na_bias_number(within[0], within[1], within[2]);
        }
    }

    // The offset of slab `s`'s origin (a slab of the box), and of column n from its slab's.
    __device__ __forceinline__ int slab_offset(const NaTcTile& tl, const NaSlab& s) const {
        return 4 * na_bias_number(s.origin[0] + tl.box_first[0], s.origin[1] + tl.box_first[1],
                                  s.origin[2] + tl.box_first[2]);
    }
    __device__ __forceinline__ int column(int n) const { return columns[n]; }

    // The entry of head h's table at offset `bytes`.
    __device__ __forceinline__ float at(const NaFusedParams& f, long long h, int bytes) const {
        return STAGED ? na_at_bytes(entries, bytes) : na_bias_entry(f, h, bytes / 4);
    }
};

// na_logits for a slab whose logits take the bias (`BIASED`: from `bias`, NaBiasTable) or not:
// the choice is made once per slab, so that a problem without a bias runs no test of it per
// logit. With a bias, the offset of a pair's entry is its row's for the slab plus or minus its
// column's: one add.
template <int BLOCKS, bool KEY_ROWS, bool BIASED, class Bias>
__device__ __forceinline__ void na_logits_of(float logits[BLOCKS][4], unsigned seen,
                                             const NaFusedParams& f, long long h,
                                             const Bias& bias, const NaTcTile& tl,
                                             const NaSlab& s, const NaTcRow rows[2], int t) {
    const float scale = (float)f.scale;
    // The offset of row r's entry with the slab's column offset 0: key - query + centre, where
    // rows are queries and columns keys, or the other way round (KEY_ROWS: a column's offset is
    // then subtracted).
    int row_offsets[2] = {0, 0};
    if (BIASED) {
        const int slab = bias.slab_offset(tl, s);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int* x = rows[r].index;
            const int row = 4 * na_bias_number(x[0], x[1], x[2]), centre = 4 * NA_TC_BIAS_CENTRE;
            row_offsets[r] = KEY_ROWS ? centre + row - slab : centre + slab - row;
        }
    }
#pragma unroll
    for (int kb = 0; kb < BLOCKS; ++kb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int column = BIASED ? bias.column(8 * kb + 2 * t + e) : 0;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float product = logits[kb][2 * r + e];
                float logit = neg_inf();
                if (na_seen(seen, kb, r, e)) {
                    const int offset =
                        KEY_ROWS ? row_offsets[r] - column : row_offsets[r] + column;
                    logit = BIASED ? fmaf(product, scale, bias.at(f, h, offset)) : product * scale;
                }
                logits[kb][2 * r + e] = logit;
            }
        }
    }
}

// na_logits_of for a slab of a problem with a bias or not (`biased`).
template <int BLOCKS, bool KEY_ROWS, class Bias>
__device__ __forceinline__ void na_logits_with(float logits[BLOCKS][4], unsigned seen,
                                               const NaFusedParams& f, long long h,
                                               const Bias& bias, const NaTcTile& tl,
                                               const NaSlab& s, const NaTcRow rows[2],
                                               bool biased, int t) {
    if (NA_TC_MAY_HAVE_BIAS && biased) {
        na_logits_of<BLOCKS, KEY_ROWS, true>(logits, seen, f, h, bias, tl, s, rows, t);
    } else {
        na_logits_of<BLOCKS, KEY_ROWS, false>(logits, seen, f, h, bias, tl, s, rows, t);
    }
}

// How the kernels turn a slab's products into softmax exponents. A logit is scale * product
// (+ bias); its exponential is taken in base 2 (na_exp2), as 2^(l factor - offset) of what
// na_logits leaves in `l`. Without a bias and with a positive scale, that is the product itself
// (`raw`; factor = scale log2 e): na_logits then only masks, and not at all for a slab every row
// sees whole, so the scale costs no instruction per logit (it rides on the exponential's
// multiply-add). Otherwise it is the logit (factor = log2 e): with a bias, and with scales whose
// products would not do (a negative scale makes the greatest product the least logit; a factor
// below the normal floats, from a scale of 0, would make a masked product's -inf times it NaN).
struct NaExponent {
    bool raw;      // na_logits leaves the products unscaled
    float factor;  // exponent (base 2) per unit of what it leaves
    float scale;   // logit per unit of it: the max of a softmax in those units, times this, is
                   // the max logit
};

__device__ __forceinline__ NaExponent na_exponent(const NaFusedParams& f) {
    const float scale = (float)f.scale, factor = scale * NA_LOG2E;
    const bool raw = (!NA_TC_MAY_HAVE_BIAS || f.has_bias == 0) && factor >= NA_FLOAT_MIN &&
                     factor <= NA_FLOAT_MAX;
    return raw ? NaExponent{true, factor, scale} : NaExponent{false, NA_LOG2E, 1.0f};
}

// Turn a slab's products into what the softmax takes (NaExponent): products that do not count
// become -inf; the others stay (`exponent.raw`) or are scaled and biased into logits. Rows are
// queries and columns keys (the forward, d_query), or the other way round (`KEY_ROWS`: d_key,
// d_value); with `biased` (rows and columns in the window), the bias is indexed by key - query
// in group steps (stride 1).
template <int BLOCKS, bool KEY_ROWS, class Bias>
__device__ __forceinline__ void na_logits(float logits[BLOCKS][4], unsigned seen,
                                          const NaExponent& exponent, const NaFusedParams& f,
                                          long long h, const Bias& bias, const NaTcTile& tl,
                                          const NaSlab& s, const NaTcRow rows[2], bool biased,
                                          int t) {
    if (exponent.raw) {
        // A lane that sees the whole slab (every lane, for most slabs of a large window) skips it.
        if (!na_slabs_may_be_whole<BLOCKS>() || seen != na_all_seen<BLOCKS>()) {
            na_mask_products<BLOCKS>(logits, seen);
        }
    } else {
        na_logits_with<BLOCKS, KEY_ROWS>(logits, seen, f, h, bias, tl, s, rows,
                                         biased && !s.extra, t);
    }
}

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

// Sixteen bytes from `src` to `dst` (both 16-byte aligned), asynchronously (cp.async, sm_80):
// the copy bypasses registers, and the thread goes on at once. It is complete after the
// thread's next na_copies_wait, and visible to the block after the barrier that follows it.
__device__ __forceinline__ void na_copy16_async(elem_t* dst, const elem_t* src) {
#ifdef NA_HOST
    na_host::copy_async(dst, src);
#else
    const unsigned address = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(address), "l"(src) : "memory");
#endif
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

// Zeros for eight channels (16 bytes, aligned) of a staged row: one store.
__device__ __forceinline__ void na_zero_chunk(elem_t* chunk) {
    *reinterpret_cast<NaChunk*>(chunk) = NaChunk{};
}

// This thread's share (`part` of `PARTS`) of staging a row of N channels from `src` (`step`
// apart; none when null: zeros) into `dst`, zeros up to `padded` channels, its 8-channel chunks
// CHUNK elements apart (NaStaged, chunks 16-byte aligned): 16 bytes at a time, asynchronously,
// where the row is dense and aligned (every row, under NA_DENSE_ROWS), else one element at a
// time. The thread must na_copies_wait before the barrier that publishes the row. N is a
// multiple of 8.
template <int N, int PARTS, int CHUNK>
__device__ __forceinline__ void na_stage_row(elem_t* dst, const elem_t* src, long long step,
                                             int padded, int part) {
#if NA_DENSE_ROWS
    const bool whole = src != nullptr;
#else
    const bool whole = src != nullptr && step == 1 &&
                       reinterpret_cast<unsigned long long>(src) % 16 == 0;
#endif
    // Rolled: a thread copies a few chunks of a row, and unrolled their addresses take registers
    // (the d_query kernel of dense rows spilled at head dims 128/96).
#pragma unroll 1
    for (int c = 8 * part; c < padded; c += 8 * PARTS) {
        elem_t* const chunk = dst + c / 8 * CHUNK;
        if (src == nullptr || c >= N) {
            na_zero_chunk(chunk);
        } else if (whole) {
            na_copy16_async(chunk, src + c);
        } else if (!NA_DENSE_ROWS) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                chunk[i] = src[(c + i) * step];
            }
        }
    }
}

// How staged rows of N channels (padded with zeros to whole 16-channel steps) lie in shared
// memory. Pitched (CORE_MATRICES false): row after row, each padded by NA_TC_SKEW, which
// ldmatrix reads without bank conflicts. In core matrices (wgmma's operand layout without
// swizzling, NaSmemMatrix): the 8x8 blocks of eight rows by eight channels are 128 contiguous
// bytes each, a row group's blocks in channel order and the row groups one after another.
template <int N, bool CORE_MATRICES>
struct NaStaged {
    static constexpr int padded = NA_TC_PAD(N);
    // Elements from one 8-channel chunk of a row to the next.
    static constexpr int chunk = CORE_MATRICES ? 64 : 8;
    // Elements a buffer takes per row.
    static constexpr int per_row = CORE_MATRICES ? padded : padded + NA_TC_SKEW;
    // Where row n starts.
    __device__ __forceinline__ static int row(int n) {
        return CORE_MATRICES ? n / 8 * (8 * padded) + n % 8 * 8 : n * (padded + NA_TC_SKEW);
    }
};

// Stage slab rows `[0, ROWS)` (as na_stage_row stages them, laid out as NaStaged): row n from
// `row_of(n, ptrs, steps)`, which sets the channel-0 pointers (null for none: zeros) and channel
// steps of the rows of `dst` (N channels) and `dst_v` (N_V channels); a null destination is
// skipped.
template <int ROWS, int N, int N_V, bool CORE_MATRICES = false, class RowOf>
__device__ __forceinline__ void na_stage_pairs(elem_t* dst, elem_t* dst_v, RowOf&& row_of) {
    using Rows = NaStaged<N, CORE_MATRICES>;
    using RowsV = NaStaged<N_V, CORE_MATRICES>;
    constexpr int parts = NA_TC_THREADS / ROWS;
    const int part = threadIdx.x % parts;
    for (int n = threadIdx.x / parts; n < ROWS; n += NA_TC_THREADS / parts) {
        const elem_t* src[2] = {nullptr, nullptr};
        long long step[2] = {0, 0};
        row_of(n, src, step);
        if (dst != nullptr) {
            na_stage_row<N, parts, Rows::chunk>(dst + Rows::row(n), src[0], step[0], Rows::padded,
                                                part);
        }
        if (dst_v != nullptr) {
            na_stage_row<N_V, parts, RowsV::chunk>(dst_v + RowsV::row(n), src[1], step[1],
                                                   RowsV::padded, part);
        }
    }
}

// Start staging slab `s` of a query tile's key box (or of the additional tokens): its key rows
// into `keys` and its value rows into `values` (either may be null: not staged), laid out and
// padded as na_stage_pairs lays them; rows of columns that do not exist (na_column) are zeros (a
// zero weight times a zero row adds nothing). Every thread of the block calls it, after a barrier that ends the
// reads of what it overwrites, and waits for its copies before the barrier that publishes them.
template <int KEYS, bool CORE_MATRICES = false>
__device__ __forceinline__ void na_stage_key_slab(const NaFusedParams& f, const NaTcTile& tl,
                                                  const NaSlab& s, long long b, long long hk,
                                                  elem_t* keys, elem_t* values) {
    na_stage_pairs<KEYS, NA_DIM, NA_DIM_V, CORE_MATRICES>(
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

// Copies of a tile's slabs into a ring of STAGES buffers of BUFFER elements (laid out as
// NaStaged<., CORE_MATRICES>), item after item: each slab's keys then its values (or, with
// VALUES_FIRST, its values then its keys), each item one cp.async group (an empty one past the
// last slab), item i into buffer i % STAGES.
template <int KEYS, int STAGES, int BUFFER, bool CORE_MATRICES, bool VALUES_FIRST>
struct NaRingCopies {
    NaSlab slab;     // the slab of the next item
    bool second;     // whether the next item is the slab's second
    long long left;  // items left to copy
    int buffer;      // where the next goes

    // Copy the next item of tile `tl`'s (batch b, key head hk) into `ring`.
    __device__ __forceinline__ void next(const NaFusedParams& f, const NaTcTile& tl, long long b,
                                         long long hk, elem_t* ring) {
        if (left > 0) {
            elem_t* const to = ring + buffer * BUFFER;
            const bool keys = second == VALUES_FIRST;
            na_stage_key_slab<KEYS, CORE_MATRICES>(f, tl, slab, b, hk, keys ? to : nullptr,
                                                   keys ? nullptr : to);
            if (second) {
                slab = na_next_slab<KEYS>(tl, slab, f.extra_count);
            }
            --left;
        }
        na_copies_commit();
        second = !second;
        buffer = na_ring_next<STAGES>(buffer);
    }
};

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
            float slab_max = neg_inf();
#pragma unroll
            for (int kb = 0; kb < BLOCKS; ++kb) {
                slab_max = fmaxf(slab_max, fmaxf(logits[kb][2 * r], logits[kb][2 * r + 1]));
            }
            const float top = fmaxf(max[r], na_quad_max(slab_max));
            // exp(logit - max logit) as 2^(l factor - top factor): one fused multiply-add and
            // one ex2 per logit. Until a row has a finite logit (top -inf) the offset is 0, so
            // that its -inf logits (and the -inf running max) give 0 rather than NaN.
            const float offset = top == neg_inf() ? 0.0f : top * factor;
            rescale[r] = na_exp2(fmaf(max[r], factor, -offset));
            max[r] = top;
            float slab_sum = 0;
#pragma unroll
            for (int kb = 0; kb < BLOCKS; ++kb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& l = logits[kb][2 * r + e];
                    l = na_exp2(fmaf(l, factor, -offset));
                    slab_sum += l;
                }
            }
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
