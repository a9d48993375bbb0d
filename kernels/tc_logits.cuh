// From a slab's products to what the softmax takes (fused_tc.cuh): masked, scaled and biased
// logits, the relative positional bias read from a table in shared memory.
#pragma once
#include "tc_mask.cuh"

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

// The bias of a pair is entry key - query + K - 1 (group steps, per axis) of its head's table
// (NA_BIAS_SPAN entries), and the entry's number (na_bias_number) is linear: the pair's is
// na_bias_number(key) - na_bias_number(query) + NA_TC_BIAS_CENTRE.
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
    int x[3];
    na_bias_indices(n, x);
    const unsigned at = (unsigned)h * (unsigned)f.bias.stride[0] +
                        (unsigned)x[0] * (unsigned)f.bias.stride[1] +
                        (unsigned)x[1] * (unsigned)f.bias.stride[2] +
                        (unsigned)x[2] * (unsigned)f.bias.stride[3];
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
    float entries[NA_TC_MAY_HAVE_BIAS && STAGED ? NA_BIAS_SPAN : 1];
    int columns[NA_TC_MAY_HAVE_BIAS ? COLUMNS : 1];

    // Fill it for head h and tile `tl` (nothing without a bias). Every thread of the block calls
    // it, after a barrier that ends the reads of what it held; a barrier after publishes it.
    __device__ __forceinline__ void stage(const NaFusedParams& f, long long h,
                                          const NaTcTile& tl) {
        if (!NA_TC_MAY_HAVE_BIAS || f.has_bias == 0) {
            return;
        }
        if (STAGED) {
            for (int n = threadIdx.x; n < NA_BIAS_SPAN; n += NA_TC_THREADS) {
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
