// Warp-wide matrix multiply-accumulate on tensor cores (mma.sync, sm_80 and later) for the
// half types: D = A B + C with A 16x16 (row-major), B 16x8 (column-major), both elem_t, and C, D
// 16x8 float, spread over the 32 lanes of a warp. Lane `4 g + t` holds:
//   A: a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B: b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C: c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// where each a[i], b[i] packs two elements, the lower column (or row) in the low half. With A a
// block of queries and B the transpose of a block of keys, C is a block of logits; the C layout
// of two adjacent 8-column blocks is the A layout of one 16-column block, so probabilities go
// from the logits' registers straight into the next product.
//
// B fragments are read from shared memory by ldmatrix: straight from the rows of B's columns (a
// slab's keys), transposed from row-major rows of B (a slab's values).
//
// The host build (kernels/host.h) emulates both instructions: the lanes gather each other's
// fragments (or row addresses) and every lane computes its own outputs.
#pragma once
#include "common.cuh"

#if NA_DTYPE != NA_F16 && NA_DTYPE != NA_BF16
#error "tensor-core kernels take float16 or bfloat16"
#endif

// Two elements in one 32-bit fragment register, `lo` in the low half.
__device__ __forceinline__ unsigned na_pack(elem_t lo, elem_t hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

// Two float accumulators rounded to elem_t in one fragment register, `lo` in the low half: one
// paired conversion (sm_80) in place of two roundings done on the bits.
__device__ __forceinline__ unsigned na_pack_acc(float lo, float hi) {
#ifdef NA_HOST
    return na_pack(from_acc(lo), from_acc(hi));
#else
    unsigned packed;
#if NA_DTYPE == NA_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(hi), "f"(lo));
#endif
    return packed;
#endif
}

#ifdef NA_HOST
__device__ inline void na_mma(float c[4], const unsigned a[4], const unsigned b[2]) {
    struct Fragments {
        unsigned a[4];
        unsigned b[2];
    };
    const Fragments mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
    Fragments all[32];
    na_host::warp_gather(&mine, sizeof mine, all);
    // Element k (0..15) of a fragment pair: lane (k % 8) / 2 of the quad, register k / 8, half
    // k % 2.
    auto half = [](unsigned word, int k) {
        return to_acc((elem_t)(k % 2 ? word >> 16 : word & 0xffffu));
    };
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float sum = 0;
        for (int k = 0; k < 16; ++k) {
            const float x = half(all[4 * (row % 8) + (k % 8) / 2].a[row / 8 + 2 * (k / 8)], k);
            const float y = half(all[4 * col + (k % 8) / 2].b[k / 8], k);
            sum += x * y;
        }
        c[i] += sum;
    }
}

// The B fragment of 16 rows of 8 elements in shared memory read as their transpose (the rows of
// a product's second factor stored row-major, as a slab's value rows are): b[0] = rows 2t, 2t+1
// and b[1] = rows 2t+8, 2t+9, element g of each. Lane i < 16 passes the address of row i
// (16-byte aligned); the other lanes' addresses are not read.
__device__ inline void na_load_b_transposed(unsigned b[2], const elem_t* row) {
    const elem_t* rows[32];
    na_host::warp_gather(&row, sizeof row, rows);
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (int m = 0; m < 2; ++m) {
        b[m] = na_pack(rows[8 * m + 2 * t][g], rows[8 * m + 2 * t + 1][g]);
    }
}

// Four 8x8 blocks of a staged matrix, lane i passing the address of row i % 8 of block i / 8
// (16-byte aligned): b[j] holds elements 2t, 2t+1 of row g of block j. With blocks 0 and 1 the
// two 8-element halves of 8 rows of B's columns (key rows, say), b[0] and b[1] are one product's
// B fragment; blocks 2 and 3 give another's.
__device__ inline void na_load_b_pairs(unsigned b[4], const elem_t* at) {
    const elem_t* rows[32];
    na_host::warp_gather(&at, sizeof at, rows);
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; ++j) {
        b[j] = na_pack(rows[8 * j + g][2 * t], rows[8 * j + g][2 * t + 1]);
    }
}
#else
// The element type's name in PTX.
#if NA_DTYPE == NA_F16
#define NA_MMA_TYPE "f16"
#else
#define NA_MMA_TYPE "bf16"
#endif
__device__ __forceinline__ void na_mma(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." NA_MMA_TYPE "." NA_MMA_TYPE
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void na_load_b_transposed(unsigned b[2], const elem_t* row) {
    const unsigned address = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(address));
}

__device__ __forceinline__ void na_load_b_pairs(unsigned b[4], const elem_t* at) {
    const unsigned address = (unsigned)__cvta_generic_to_shared(at);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(address));
}
#endif
