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

// An element of shared memory as ldmatrix takes it: its 32-bit shared-window address (in the
// host build, its pointer). Formed once for a loop, so that each load of the loop adds only a
// constant offset (na_shared_plus) rather than converting a generic address again.
#ifdef NA_HOST
typedef const elem_t* NaShared;
inline NaShared na_shared(const elem_t* at) { return at; }
inline NaShared na_shared_plus(NaShared at, int elements) { return at + elements; }
#else
typedef unsigned NaShared;
__device__ __forceinline__ NaShared na_shared(const elem_t* at) {
    return (unsigned)__cvta_generic_to_shared(at);
}
__device__ __forceinline__ NaShared na_shared_plus(NaShared at, int elements) {
    return at + elements * (unsigned)sizeof(elem_t);
}
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

// ldmatrix's rows, given by the first `lanes` lanes: each 16 bytes, 16-byte aligned.
inline void na_host_check_rows(const elem_t* const rows[32], int lanes) {
    for (int i = 0; i < lanes; ++i) {
        if (reinterpret_cast<uintptr_t>(rows[i]) % 16 != 0) {
            na_host::fault("ldmatrix (thread %u): lane %d's row at %p is not 16-byte aligned",
                           threadIdx.x, i, static_cast<const void*>(rows[i]));
            return;
        }
    }
}

// The B fragment of 16 rows of 8 elements in shared memory read as their transpose (the rows of
// a product's second factor stored row-major, as a slab's value rows are): b[0] = rows 2t, 2t+1
// and b[1] = rows 2t+8, 2t+9, element g of each. Lane i < 16 passes the address of row i
// (16-byte aligned); the other lanes' addresses are not read.
__device__ inline void na_load_b_transposed(unsigned b[2], NaShared row) {
    const elem_t* rows[32];
    na_host::warp_gather(&row, sizeof row, rows);
    na_host_check_rows(rows, 16);
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (int m = 0; m < 2; ++m) {
        b[m] = na_pack(rows[8 * m + 2 * t][g], rows[8 * m + 2 * t + 1][g]);
    }
}

// Four 8x8 blocks of a staged matrix, lane i passing the address of row i % 8 of block i / 8
// (16-byte aligned): b[j] holds elements 2t, 2t+1 of row g of block j. With blocks 0 and 1 the
// two 8-element halves of 8 rows of B's columns (key rows, say), b[0] and b[1] are one product's
// B fragment; blocks 2 and 3 give another's.
__device__ inline void na_load_b_pairs(unsigned b[4], NaShared at) {
    const elem_t* rows[32];
    na_host::warp_gather(&at, sizeof at, rows);
    na_host_check_rows(rows, 32);
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

__device__ __forceinline__ void na_load_b_transposed(unsigned b[2], NaShared row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(row));
}

__device__ __forceinline__ void na_load_b_pairs(unsigned b[4], NaShared at) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(at));
}
#endif

// Warpgroup products (wgmma.mma_async, sm_90a only): the four warps of a warpgroup (warps
// 4 i .. 4 i + 3 of a block) multiply together, D (64 x N, float) += A (64 x 16) B (16 x N), warp
// w holding rows 16 (w % 4) .. 16 (w % 4) + 15 of A and D in the m16n8k16 layouts above (a[4] is
// its A fragment; D's 8-column block i is d[4 i .. 4 i + 3], as c of na_mma), so that the slab
// loops keep their fragments and softmax.
// B is read from shared memory, where it lies in core matrices (NaSmemMatrix). The products run
// asynchronously: na_wgmma_fence before the first (registers written since are published to
// them), na_wgmma_commit after the last, na_wgmma_wait before their results are read; and
// shared memory written by the threads (cp.async included) is published to them by
// na_async_proxy_fence before the barrier that ends the writes.
//
// Taken where NA_WGMMA is set (the host asks for it: kernels.rs) and the target has wgmma (the
// sm_90a features, or the host build, which emulates it).
#if defined(NA_WGMMA) && NA_WGMMA && (defined(NA_HOST) || defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define NA_HAS_WGMMA 1
#else
#define NA_HAS_WGMMA 0
#endif

#if NA_HAS_WGMMA
// A 16 x N factor in shared memory as wgmma reads it, without swizzling: 8 x 8 core matrices of
// 128 contiguous bytes (eight 16-byte rows), `leading` bytes from one to the next along K and
// `stride` bytes along N (both multiples of 16), from `offset` bytes (a multiple of 16) past
// `base`. Element (k, n) is at byte
//   K-major (TRANSPOSE_B 0, rows of 8 k):  (n % 8) 16 + (n / 8) stride + (k % 8) 2 + (k / 8) leading
//   N-major (TRANSPOSE_B 1, rows of 8 n):  (k % 8) 16 + (k / 8) leading + (n % 8) 2 + (n / 8) stride
// (the PTX ISA's canonical layouts without swizzling). The base and the offset are kept apart so
// that the products of one staged buffer share the base's part of their descriptors, and each
// adds a constant.
struct NaSmemMatrix {
    const elem_t* base;
    unsigned offset;
    unsigned leading;
    unsigned stride;
};

// The 64-bit matrix descriptor of a factor at shared-memory address `address` + `offset`: bits
// 0-13 the address, 16-29 the leading byte offset, 32-45 the stride byte offset, each in 16-byte
// units (bits 4-17 of the byte value); base offset and swizzle mode (bits 49-51, 62-63) 0. Shared
// memory addresses stay below 2^18, so the offset adds to the address field without a carry.
__device__ __forceinline__ unsigned long long na_matrix_descriptor(unsigned address,
                                                                   unsigned offset,
                                                                   unsigned leading,
                                                                   unsigned stride) {
    auto field = [](unsigned bytes) { return (unsigned long long)((bytes & 0x3ffffu) >> 4); };
    return (field(address) | field(leading) << 16 | field(stride) << 32) + (offset >> 4);
}

#ifdef NA_HOST
// Byte offset of element (k, n) of a factor (NaSmemMatrix's formulas).
template <int TRANSPOSE_B>
inline unsigned na_host_matrix_offset(const NaSmemMatrix& m, int k, int n) {
    const int along_k = TRANSPOSE_B ? (k % 8) * 16 : (k % 8) * 2;
    const int along_n = TRANSPOSE_B ? (n % 8) * 2 : (n % 8) * 16;
    return along_k + (k / 8) * m.leading + along_n + (n / 8) * m.stride;
}

// What a product computes when it completes (na_host::PendingProduct): this lane's outputs,
// from its rows of A (fragments, or K-major in shared memory) and B as the descriptors read them.
template <int N, int TRANSPOSE_B>
inline void na_host_wgmma_multiply(const na_host::PendingProduct& p, float* out) {
    auto half = [](unsigned word, int k) {
        return to_acc((elem_t)(k % 2 ? word >> 16 : word & 0xffffu));
    };
    auto element = [](const void* base, unsigned offset) {
        elem_t y;
        memcpy(&y, static_cast<const unsigned char*>(base) + offset, sizeof y);
        return to_acc(y);
    };
    const NaSmemMatrix a = {static_cast<const elem_t*>(p.a_smem), 0, p.a_leading, p.a_stride};
    const NaSmemMatrix b = {static_cast<const elem_t*>(p.b), 0, p.leading, p.stride};
    const int t = p.lane % 4;
    for (int i = 0; i < N / 2; ++i) {
        // Row g (i % 4 < 2) or g + 8 of the warp's sixteen: fragment word 0 or 1 (k < 8) and
        // 2 or 3 (k >= 8) of the lanes 4 g .. 4 g + 3, which hold its k in pairs.
        const int upper = i % 4 / 2, col = 8 * (i / 4) + 2 * t + i % 2;
        float sum = 0;
        for (int k = 0; k < 16; ++k) {
            const float x =
                p.a_smem != nullptr
                    ? element(a.base, na_host_matrix_offset<0>(a, k, p.a_row + 8 * upper))
                    : half(p.a[4 * ((k % 8) / 2) + upper + 2 * (k / 8)], k);
            sum += x * element(b.base, na_host_matrix_offset<TRANSPOSE_B>(b, k, col));
        }
        out[i] = (p.accumulate ? p.start[i] : 0.0f) + sum;
    }
}

// Check what a GPU demands of a factor of 16 x N in shared memory (`what`: which) as its
// descriptor gives it: a start address and offsets in whole 16-byte units (the descriptor keeps
// bits 4-17: it would drop the rest), and rows written by copies that the async proxy may read
// (na_host::async_read).
template <int N, int TRANSPOSE_B>
inline void na_host_check_factor(const NaSmemMatrix& m, const char* what) {
    const unsigned char* const start = reinterpret_cast<const unsigned char*>(m.base) + m.offset;
    if (reinterpret_cast<uintptr_t>(start) % 16 != 0 || m.leading % 16 != 0 ||
        m.stride % 16 != 0) {
        na_host::fault("%s (thread %u): descriptor start %p, leading %u, stride %u bytes, "
                       "not all multiples of 16",
                       what, threadIdx.x, static_cast<const void*>(start), m.leading, m.stride);
        return;
    }
    // Its 16-byte rows: 8 k (K-major) or 8 n (N-major) each.
    for (int k = 0; k < 16; k += TRANSPOSE_B ? 1 : 8) {
        for (int n = 0; n < N; n += TRANSPOSE_B ? 8 : 1) {
            na_host::async_read(start + na_host_matrix_offset<TRANSPOSE_B>(m, k, n), 16, what);
        }
    }
}

// A pending product of this lane's: accumulators `d`, B `b` (read at completion).
template <int N, int TRANSPOSE_B>
inline na_host::PendingProduct na_host_product(float* d, const NaSmemMatrix& b, int accumulate) {
    static_assert(N / 2 <= 64, "a pending product holds 64 accumulators");
    na_host_check_factor<N, TRANSPOSE_B>(b, "wgmma's B");
    na_host::PendingProduct p;
    p.d = d;
    p.count = N / 2;
    p.a_smem = nullptr;
    p.b = reinterpret_cast<const unsigned char*>(b.base) + b.offset;
    p.leading = b.leading;
    p.stride = b.stride;
    p.accumulate = accumulate;
    p.lane = threadIdx.x % 32;
    p.multiply = na_host_wgmma_multiply<N, TRANSPOSE_B>;
    return p;
}

// The warpgroup meets for a product, as the instruction's .sync.aligned asks: a warp that skips a
// product its warpgroup takes leaves the others waiting, which the emulation reports as a
// deadlock. One instruction, it takes one shape, descriptors (A's, where `a` is given, and B's)
// and accumulate flag: every thread must give those of the warpgroup's first.
template <int N, int TRANSPOSE_B>
inline void na_host_meet(const NaSmemMatrix* a, const NaSmemMatrix& b, int accumulate) {
    struct Operands {
        const void* a_start;
        const void* b_start;
        unsigned a_leading, a_stride, b_leading, b_stride;
        int n, transpose, accumulate;
    } mine;
    memset(&mine, 0, sizeof mine);  // (padding compared too)
    if (a != nullptr) {
        mine.a_start = reinterpret_cast<const unsigned char*>(a->base) + a->offset;
        mine.a_leading = a->leading;
        mine.a_stride = a->stride;
    }
    mine.b_start = reinterpret_cast<const unsigned char*>(b.base) + b.offset;
    mine.b_leading = b.leading;
    mine.b_stride = b.stride;
    mine.n = N;
    mine.transpose = TRANSPOSE_B;
    mine.accumulate = accumulate != 0;
    if (!na_host::sync_warpgroup_agreeing(&mine, sizeof mine)) {
        na_host::fault("wgmma (thread %u): its shape, descriptors or accumulate flag differ from "
                       "those of its warpgroup's first thread",
                       threadIdx.x);
    }
}

// d = A B (+ d where `accumulate`), completing at na_wgmma_wait (na_host::issue_product), once
// the warpgroup has met (na_host_meet). A is read now, every lane's fragment gathered.
template <int N, int TRANSPOSE_B>
inline void na_wgmma(float d[N / 2], const unsigned a[4], const NaSmemMatrix& b, int accumulate) {
    na_host_meet<N, TRANSPOSE_B>(nullptr, b, accumulate);
    struct Fragment {
        unsigned a[4];
    };
    const Fragment mine = {{a[0], a[1], a[2], a[3]}};
    Fragment all[32];
    na_host::warp_gather(&mine, sizeof mine, all);
    na_host::PendingProduct p = na_host_product<N, TRANSPOSE_B>(d, b, accumulate);
    const int g = p.lane / 4;
    for (int j = 0; j < 4; ++j) {
        memcpy(&p.a[4 * j], all[4 * g + j].a, sizeof all[0].a);
    }
    na_host::issue_product(p);
}

// d = A B (+ d where `accumulate`) with A (64 x 16) K-major in shared memory too: the
// warpgroup's rows, warp w % 4 taking rows 16 (w % 4) .. 16 (w % 4) + 15 of D.
template <int N, int TRANSPOSE_B>
inline void na_wgmma_ss(float d[N / 2], const NaSmemMatrix& a, const NaSmemMatrix& b,
                        int accumulate) {
    na_host_meet<N, TRANSPOSE_B>(&a, b, accumulate);
    na_host_check_factor<64, 0>(a, "wgmma's A");
    na_host::PendingProduct p = na_host_product<N, TRANSPOSE_B>(d, b, accumulate);
    p.a_smem = reinterpret_cast<const unsigned char*>(a.base) + a.offset;
    p.a_leading = a.leading;
    p.a_stride = a.stride;
    p.a_row = 16 * (threadIdx.x / 32 % 4) + p.lane / 4;
    na_host::issue_product(p);
}

inline void na_wgmma_fence() { na_host::fence_products(); }
inline void na_wgmma_commit() { na_host::commit_products(); }
template <int PENDING>
inline void na_wgmma_wait() {
    na_host::wait_product_groups(PENDING);
}
inline void na_async_proxy_fence() { na_host::proxy_fence(); }
#else
#define NA_WGMMA_D8(i)                                                                      \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
        "+f"(d[i + 6]), "+f"(d[i + 7])

// d = A B (+ d where `accumulate`), for N a multiple of 16 up to 128.
template <int N, int TRANSPOSE_B>
__device__ __forceinline__ void na_wgmma(float d[N / 2], const unsigned a[4],
                                         const NaSmemMatrix& m, int accumulate) {
    static_assert(N % 16 == 0 && N <= 128, "wgmma widths here: multiples of 16 up to 128");
    const unsigned long long b = na_matrix_descriptor(
        (unsigned)__cvta_generic_to_shared(m.base), m.offset, m.leading, m.stride);
    if constexpr (N == 16) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n16k16.f32." NA_MMA_TYPE "." NA_MMA_TYPE " {"
            "%0, %1, %2, %3, %4, %5, %6, %7"
            "}, {%8, %9, %10, %11}, %12, p, 1, 1, %14;\n}\n"
            : NA_WGMMA_D8(0)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate),
              "n"(TRANSPOSE_B)
            : "memory");
    } else if constexpr (N == 32) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32." NA_MMA_TYPE "." NA_MMA_TYPE " {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
            "}, {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"
            : NA_WGMMA_D8(0), NA_WGMMA_D8(8)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate),
              "n"(TRANSPOSE_B)
            : "memory");
    } else if constexpr (N == 48) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %29, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n48k16.f32." NA_MMA_TYPE "." NA_MMA_TYPE " {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23"
            "}, {%24, %25, %26, %27}, %28, p, 1, 1, %30;\n}\n"
            : NA_WGMMA_D8(0), NA_WGMMA_D8(8), NA_WGMMA_D8(16)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate),
              "n"(TRANSPOSE_B)
            : "memory");
    } else if constexpr (N == 64) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32." NA_MMA_TYPE "." NA_MMA_TYPE " {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
            "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
            : NA_WGMMA_D8(0), NA_WGMMA_D8(8), NA_WGMMA_D8(16), NA_WGMMA_D8(24)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate),
              "n"(TRANSPOSE_B)
            : "memory");
    } else if constexpr (N == 80) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n80k16.f32." NA_MMA_TYPE "." NA_MMA_TYPE " {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39"
            "}, {%40, %41, %42, %43}, %44, p, 1, 1, %46;\n}\n"
            : NA_WGMMA_D8(0), NA_WGMMA_D8(8), NA_WGMMA_D8(16), NA_WGMMA_D8(24), NA_WGMMA_D8(32)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate),
              "n"(TRANSPOSE_B)
            : "memory");
    } else if constexpr (N == 96) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n96k16.f32." NA_MMA_TYPE "." NA_MMA_TYPE " {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
            "}, {%48, %49, %50, %51}, %52, p, 1, 1, %54;\n}\n"
            : NA_WGMMA_D8(0), NA_WGMMA_D8(8), NA_WGMMA_D8(16), NA_WGMMA_D8(24), NA_WGMMA_D8(32), NA_WGMMA_D8(40)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate),
              "n"(TRANSPOSE_B)
            : "memory");
    } else if constexpr (N == 112) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %61, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n112k16.f32." NA_MMA_TYPE "." NA_MMA_TYPE " {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55"
            "}, {%56, %57, %58, %59}, %60, p, 1, 1, %62;\n}\n"
            : NA_WGMMA_D8(0), NA_WGMMA_D8(8), NA_WGMMA_D8(16), NA_WGMMA_D8(24), NA_WGMMA_D8(32), NA_WGMMA_D8(40), NA_WGMMA_D8(48)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate),
              "n"(TRANSPOSE_B)
            : "memory");
    } else if constexpr (N == 128) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32." NA_MMA_TYPE "." NA_MMA_TYPE " {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
            "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
            : NA_WGMMA_D8(0), NA_WGMMA_D8(8), NA_WGMMA_D8(16), NA_WGMMA_D8(24), NA_WGMMA_D8(32), NA_WGMMA_D8(40), NA_WGMMA_D8(48), NA_WGMMA_D8(56)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate),
              "n"(TRANSPOSE_B)
            : "memory");
    }
}

// d = A B (+ d where `accumulate`) with A (64 x 16) K-major in shared memory too (its
// descriptor's rows the warpgroup's: warp w % 4 takes rows 16 (w % 4) .. 16 (w % 4) + 15 of D),
// for N 32 or 64.
template <int N, int TRANSPOSE_B>
__device__ __forceinline__ void na_wgmma_ss(float d[N / 2], const NaSmemMatrix& a,
                                            const NaSmemMatrix& m, int accumulate) {
    static_assert(N == 32 || N == 64, "shared-memory A products here: 32 or 64 wide");
    const unsigned long long a_desc = na_matrix_descriptor(
        (unsigned)__cvta_generic_to_shared(a.base), a.offset, a.leading, a.stride);
    const unsigned long long b = na_matrix_descriptor(
        (unsigned)__cvta_generic_to_shared(m.base), m.offset, m.leading, m.stride);
    if constexpr (N == 32) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n32k16.f32." NA_MMA_TYPE "." NA_MMA_TYPE " {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
            "}, %16, %17, p, 1, 1, 0, %19;\n}\n"
            : NA_WGMMA_D8(0), NA_WGMMA_D8(8)
            : "l"(a_desc), "l"(b), "r"(accumulate), "n"(TRANSPOSE_B)
            : "memory");
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32." NA_MMA_TYPE "." NA_MMA_TYPE " {"
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
            "}, %32, %33, p, 1, 1, 0, %35;\n}\n"
            : NA_WGMMA_D8(0), NA_WGMMA_D8(8), NA_WGMMA_D8(16), NA_WGMMA_D8(24)
            : "l"(a_desc), "l"(b), "r"(accumulate), "n"(TRANSPOSE_B)
            : "memory");
    }
}
#undef NA_WGMMA_D8

__device__ __forceinline__ void na_wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void na_wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
// Wait until at most PENDING committed groups of this warpgroup's products are still running.
template <int PENDING>
__device__ __forceinline__ void na_wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(PENDING) : "memory");
}
__device__ __forceinline__ void na_async_proxy_fence() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
#endif

// Keep the compiler from moving reads or writes of `COUNT` product registers across this point:
// it cannot see that an asynchronous product writes its accumulators (and reads its A fragments)
// until its na_wgmma_wait.
template <int COUNT>
__device__ __forceinline__ void na_hold_registers(float* d) {
#ifndef NA_HOST
#pragma unroll
    for (int i = 0; i < COUNT; ++i) {
        asm volatile("" : "+f"(d[i])::"memory");
    }
#endif
}
template <int COUNT>
__device__ __forceinline__ void na_hold_registers(unsigned* a) {
#ifndef NA_HOST
#pragma unroll
    for (int i = 0; i < COUNT; ++i) {
        asm volatile("" : "+r"(a[i])::"memory");
    }
#endif
}
#endif
