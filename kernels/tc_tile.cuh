// The tensor-core kernels' tiles (fused_tc.cuh): their configuration, their tasks, the tiles
// of rows and the boxes of columns their ranges span, and the slabs those boxes are walked in.
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

// Cut the tile's box (its sides set) into slabs of COLUMNS columns: by na_cut_box, or where
// `slab_shift` is given, in slabs of that shape (the launch's one, fixed by the host for the bulk
// tensor copies, whose tensor maps' boxes take it). Every lane of the warp calls it.
template <int COLUMNS>
__device__ __forceinline__ void na_cut_box_as(NaTcTile& tl, const int* slab_shift) {
    if (slab_shift == nullptr) {
        na_cut_box<COLUMNS>(tl);
        return;
    }
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        tl.slab_shift[a] = slab_shift[a];
    }
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
        // A unit axis's one tile: its group 0 of length 1, one row (whose coordinate is 0).
        const NaAxisTile axis = na_unit_axis(a) ? NaAxisTile{0, 1, 0, 1}
                                                : na_axis_tile((unsigned)at[a], tiling.axis[a]);
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
    return na_unit_axis(a) ? 0 : (int)index * (int)f.dilation[a] + tl.group[a];
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
// into slabs of COLUMNS keys (na_cut_box_as), and each row's window.
template <int COLUMNS>
__device__ __forceinline__ NaTcTile na_query_tile(const NaTcTiling& tiling, long long index,
                                                  int warp, int g, NaTcRow rows[2],
                                                  const int* slab_shift = nullptr) {
    NaTcTile tl = na_tile_rows(tiling, index, warp, g, rows);
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        if (na_unit_axis(a)) {
            // Every window holds the whole axis: constants, which the slab loops fold away.
            tl.box_first[a] = 0;
            tl.box_len[a] = 1;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                rows[r].start[a] = 0;
                rows[r].end[a] = 1;
            }
            continue;
        }
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
    na_cut_box_as<COLUMNS>(tl, slab_shift);
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
        if (na_unit_axis(a)) {
            continue;  // one slab long, its origin 0
        }
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
    within[0] = na_unit_axis(0) ? 0 : n >> plane;
    within[1] = na_unit_axis(1) ? 0 : (n >> line) & ((1 << tl.slab_shift[1]) - 1);
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
        if (na_unit_axis(a)) {
            c[a] = 0;  // (a box slab's origin is 0 there; an additional token's `c` is unused)
            continue;
        }
        const int x = s.origin[a] + within[a];
        inside = inside && x < tl.box_len[a];
        c[a] = x + tl.box_first[a];
    }
    return s.extra ? n < s.count() : inside;
}
