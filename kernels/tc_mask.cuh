// Which of a warp's products with a slab count (fused_tc.cuh): a bit per product of each lane,
// built per slab from the rows' ranges before any product.
#pragma once
#include "tc_tile.cuh"

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
// box, whose columns past its end a slab may hold. A unit axis (na_unit_axis) takes no run: every
// column lies in it, and a run after unit axes alone spans the slab, so it is not repeated.
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
    const Word every[3] = {Word(1), (Word)na_every[plane], (Word)na_every[line]};
    Word mine = 0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const NaTcRow& row = rows[r];
        Word in = 0;
        if (s.extra) {
            in = row.valid ? na_run_bits<Word>(0, s.count(), s.count(), 0) : Word(0);
        } else if (row.valid) {
            in = ~Word(0);
#pragma unroll
            for (int a = 0; a < 3; ++a) {
                if (na_unit_axis(a)) {
                    continue;
                }
                // The row's range from the slab's origin (a range may reach past the box, such
                // as the additional tokens' ranges, which span every query).
                const int lo = row.start[a] - tl.box_first[a] - s.origin[a];
                const int hi = min(row.end[a] - tl.box_first[a], tl.box_len[a]) - s.origin[a];
                const Word run = na_run_bits<Word>(lo, hi, 1 << tl.slab_shift[a], scale[a]);
                in &= a > 0 && !na_unit_axis(a - 1) ? run * every[a] : run;
            }
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
        if (na_unit_axis(a)) {
            continue;
        }
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
