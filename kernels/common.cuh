// Device code shared by every kernel: element types, the parameter blocks that rust/src/cuda
// fills (NaParams mirrors launch::Params, NaFusedParams mirrors fused_launch::FusedParams, field
// for field), and the neighborhood math of rust/src/window.rs (spec/NEIGHBORHOOD.md).
//
// Compiled by NVRTC with no system headers: nothing here includes anything. Problem constants
// come as -D flags from rust/src/cuda/kernels.rs:
//   NA_DTYPE           element type (NA_F32, NA_F64, NA_F16, NA_BF16 below)
//   NA_K0, NA_K1, NA_K2 kernel size per axis (1 on the unit axes that pad ranks 1 and 2 to 3)
//   NA_C0, NA_C1, NA_C2 causal flag per axis (0 or 1)
//   NA_S0, NA_S1, NA_S2 query stride per axis (1 for the unfused ops)
//   NA_BLOCK           threads per block of the one-thread-per-output kernels
//   NA_REDUCE_THREADS  threads per block of the bias-gradient reduction (a power of two)
//   NA_EXTRA_ROWS      query groups per block of the additional-token gradient
#pragma once

#if !defined(NA_DTYPE) || !defined(NA_K0) || !defined(NA_K1) || !defined(NA_K2) ||             \
    !defined(NA_C0) || !defined(NA_C1) || !defined(NA_C2) || !defined(NA_BLOCK) ||             \
    !defined(NA_REDUCE_THREADS) || !defined(NA_EXTRA_ROWS) || !defined(NA_S0) ||              \
    !defined(NA_S1) || !defined(NA_S2)
#error "natten_rs kernels need the -D constants listed in common.cuh"
#endif

#define NA_F32 0
#define NA_F64 1
#define NA_F16 2
#define NA_BF16 3

// Window slots per query: the product of the kernel sizes.
#define NA_SLOTS (NA_K0 * NA_K1 * NA_K2)

// ---- dynamic shared memory ------------------------------------------------------------------

// A kernel that takes more shared memory than static arrays may (48 KiB) declares it after the
// kernel with NA_DYNAMIC_SHARED(kernel, bytes) and finds it at na_dynamic_shared(). The array
// `<kernel>_dynamic_shared` is never used: its size is what the host reads (runtime.rs), as the
// driver reports a symbol's size without a copy. At most 227 KiB (sm_90's limit per block).
#define NA_MAX_DYNAMIC_SHARED (227 * 1024)
#ifdef NA_HOST
static_assert(NA_MAX_DYNAMIC_SHARED <= sizeof na_host::dynamic_shared, "host.h holds it all");
#define NA_DYNAMIC_SHARED(kernel, bytes)                                                     \
    static_assert((bytes) <= NA_MAX_DYNAMIC_SHARED, "more shared memory than a block takes");
__device__ __forceinline__ unsigned char* na_dynamic_shared() { return na_host::dynamic_shared; }
#else
#define NA_DYNAMIC_SHARED(kernel, bytes)                                                     \
    static_assert((bytes) <= NA_MAX_DYNAMIC_SHARED, "more shared memory than a block takes"); \
    extern "C" {                                                                             \
    __device__ unsigned char kernel##_dynamic_shared[bytes];                                 \
    }
__device__ __forceinline__ unsigned char* na_dynamic_shared() {
    extern __shared__ __align__(128) unsigned char na_dynamic[];
    return na_dynamic;
}
#endif

// ---- element types: storage `elem_t`, arithmetic in `acc_t` (fp32 for the half types) --------

#if NA_DTYPE == NA_F32
typedef float elem_t;
typedef float acc_t;
__device__ __forceinline__ acc_t to_acc(elem_t x) { return x; }
__device__ __forceinline__ elem_t from_acc(acc_t x) { return x; }
__device__ __forceinline__ acc_t neg_inf() { return -__int_as_float(0x7f800000); }
#elif NA_DTYPE == NA_F64
typedef double elem_t;
typedef double acc_t;
__device__ __forceinline__ acc_t to_acc(elem_t x) { return x; }
__device__ __forceinline__ elem_t from_acc(acc_t x) { return x; }
__device__ __forceinline__ acc_t neg_inf() { return -__longlong_as_double(0x7ff0000000000000LL); }
#elif NA_DTYPE == NA_F16
// IEEE half as raw bits: the PTX conversions need no header and run on every architecture
// (kernels/host.h gives host builds the same conversions).
typedef unsigned short elem_t;
typedef float acc_t;
#ifdef NA_HOST
__device__ __forceinline__ acc_t to_acc(elem_t x) { return na_host_f16_to_f32(x); }
__device__ __forceinline__ elem_t from_acc(acc_t x) { return na_host_f32_to_f16(x); }
#else
__device__ __forceinline__ acc_t to_acc(elem_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
__device__ __forceinline__ elem_t from_acc(acc_t x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
#endif
__device__ __forceinline__ acc_t neg_inf() { return -__int_as_float(0x7f800000); }
#elif NA_DTYPE == NA_BF16
// bfloat16 as raw bits: the upper half of a float. Rounding to nearest even takes the cvt
// instruction from sm_80 on, and is done on the bits before (and on the host); either way NaN
// stays NaN, infinities stay infinite.
typedef unsigned short elem_t;
typedef float acc_t;
__device__ __forceinline__ acc_t to_acc(elem_t x) { return __uint_as_float((unsigned)x << 16); }
__device__ __forceinline__ elem_t from_acc(acc_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#else
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x40u);
    }
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}
__device__ __forceinline__ acc_t neg_inf() { return -__int_as_float(0x7f800000); }
#else
#error "NA_DTYPE must be NA_F32, NA_F64, NA_F16 or NA_BF16"
#endif

// ---- the parameter block ------------------------------------------------------------------------

// A borrowed tensor in the kernels' logical axis order. Strides are in elements; axes that a
// tensor lacks (rank padding) have stride 0. Every view has six axes: token tensors are
// [b, h, s0, s1, s2, c]; additional tokens are rows [b, h, e, -, -, c]; the bias and its gradient
// are [h, r0, r1, r2, -, -].
struct NaView {
    unsigned long long data;  // device address of element [0, 0, ...]
    long long stride[6];
};

// Division by a launch constant `divisor` (at least 1; the zero divider stands for a count of
// nothing, which nothing is divided by) of numbers below 2^31: a multiply-high and
// a shift (na_divide) where a 32-bit division takes some twenty instructions. The host finds
// `magic` and `shift` (tiling::Divider: magic = ceil(2^(31 + shift) / divisor), shift =
// ceil(log2 divisor)); the quotient is floor(n magic / 2^(31 + shift)).
struct NaDivider {
    unsigned divisor;
    unsigned magic;
    unsigned shift;
};

// Quotient and remainder of n < 2^31 by d. (2 n) < 2^32, and the high word of 2 n magic is
// floor(n magic / 2^31).
struct NaQuotient {
    unsigned quot;
    unsigned rem;
};

__device__ __forceinline__ NaQuotient na_divide(unsigned n, const NaDivider& d) {
    const unsigned q = __umulhi(n << 1, d.magic) >> d.shift;
    return {q, n - q * d.divisor};
}

// How the tensor-core kernels cut one axis into tiles (tiling::AxisTiling): its `length`
// is `quot * dilation + rem`, so its first `rem` dilation groups are `quot + 1` long and the
// others `quot`; a group is cut into tiles of 2^`tile_shift` rows from its start, `long_tiles`
// of them in a long group and `short_tiles` in a short one (the zero divider where such a group
// has no tiles: nothing is divided by it).
struct NaAxisTiling {
    unsigned quot;
    unsigned rem;
    int tile_shift;
    unsigned reserved;
    NaDivider long_tiles;
    NaDivider short_tiles;
};

// How a launch of a tile kernel numbers its tasks (one tile of one (batch, head) each,
// batch-major, then head, then tile; every task number below 2^31, as the host checks) and cuts
// its rows into tiles; filled by the host per launch (tiling::TcTiling).
struct NaTcTiling {
    NaDivider heads;     // the heads the tasks run over (query heads, or kv heads)
    NaDivider per_head;  // tiles per (batch, head): the product of `tiles`
    NaDivider tiles[3];  // tiles along each axis, every dilation group's together
    NaAxisTiling axis[3];
    unsigned reserved;  // (to a multiple of 8 bytes)
};

static_assert(sizeof(NaTcTiling) == 5 * 12 + 3 * 40 + 4,
              "NaTcTiling must match tiling::TcTiling");

// Everything a launch needs; passed by value. Views a kernel does not use are zero.
struct NaParams {
    NaView out;    // written: [b, h, s0, s1, s2, c|slot], or [b, h, e, -, -, c], or [h, r0, r1, r2]
    NaView a;      // query-side rows [b, h, s0, s1, s2, c]
    NaView b;      // key-side rows [b, h, s0, s1, s2, c]
    NaView w;      // window weights (attention or its gradient) [b, h, s0, s1, s2, slot]
    NaView extra;  // additional tokens [b, h, e, -, -, c]
    NaView bias;   // relative positional bias [h, r0, r1, r2, -, -]
    long long batch;
    long long heads;
    long long length[3];    // tokens per axis
    long long dilation[3];  // dilation per axis
    long long dim;          // channels of the rows that are dotted or summed
    long long extra_count;  // additional tokens after the window slots
    int has_extra;          // whether `extra` is given
    int has_bias;           // whether `bias` is given
    int neg_inf_fill;       // whether empty (causal) slots hold -inf (logits) rather than 0
    int run;                // channels a thread of na_gather / na_scatter takes (1 or NA_RUN)
    NaTcTiling tiling;      // the tensor-core kernels' tasks and tiles (else zeros)
};

static_assert(sizeof(NaView) == 56, "NaView must match launch::View");
static_assert(sizeof(NaParams) == 6 * 56 + 10 * 8 + 4 * 4 + sizeof(NaTcTiling),
              "NaParams must match launch::Params");

// The fused ops' parameter block. Heads-last tensors are viewed in the same logical order as
// above: token tensors [b, h, s0, s1, s2, c] (key-side ones indexed by the kv head), `lse`
// [b, h, s0, s1, s2, -] (float32 whatever the element type), additional tokens [b, h, e, -, -, c].
struct NaFusedParams {
    NaView out;          // written: [b, h, s0, s1, s2, c]
    NaView lse;          // written: [b, h, s0, s1, s2, -], float32
    NaView query;        // [b, h, s0, s1, s2, c]
    NaView key;          // [b, kv head, s0, s1, s2, c]
    NaView value;        // [b, kv head, s0, s1, s2, c]
    NaView extra_key;    // [b, kv head, e, -, -, c]
    NaView extra_value;  // [b, kv head, e, -, -, c]
    NaView bias;         // [h, r0, r1, r2, -, -]
    long long batch;
    long long heads;
    long long group;        // query heads per kv head
    long long length[3];    // tokens per axis
    long long dilation[3];  // dilation per axis
    long long extra_count;  // additional tokens every query attends
    double scale;           // logit scale
    int has_window;         // whether queries attend their neighborhood (0: extras only)
    int has_bias;           // whether `bias` is given
};

static_assert(sizeof(NaFusedParams) == 8 * 56 + 10 * 8 + 8 + 2 * 4,
              "NaFusedParams must match fused_launch::FusedParams");

// A tensor map: the driver's 128 opaque bytes on a GPU (aligned as CUDA 13's CUtensorMap),
// passed in the kernel's parameter block (which must then be __grid_constant__), or on the host
// build the plain record host_async.h reads.
struct __align__(128) NaTensorMap {
    unsigned long long words[16];
};

// The bulk copies' part of the tensor-core forward's and backward's parameter blocks
// (tma::TmaParams; kernels/tma.cuh): the maps of the two tensors a slab stages (its keys and
// values in the forward and the d_query kernel, its queries and output gradients in the key-row
// kernel) and the slab shape every tile takes (one box per map). Each map's dimensions,
// innermost first: the channels of every head (the heads dense after one another), the three
// axes from the last, and the batch; its box is 8 channels by a slab (sides times the dilation,
// at that element stride).
struct NaTmaParams {
    NaTensorMap maps[2];
    int slab_shift[3];  // log2 of a slab's sides (as na_cut_box's cut, but fixed by the host)
    int reserved;
};

static_assert(sizeof(NaTmaParams) == 3 * 128, "NaTmaParams must match tma::TmaParams");

__device__ __forceinline__ const elem_t* na_ptr(const NaView& v) {
    return reinterpret_cast<const elem_t*>(v.data);
}

__device__ __forceinline__ long long na_offset(const NaView& v, long long i0, long long i1,
                                               long long i2, long long i3, long long i4,
                                               long long i5) {
    return i0 * v.stride[0] + i1 * v.stride[1] + i2 * v.stride[2] + i3 * v.stride[3] +
           i4 * v.stride[4] + i5 * v.stride[5];
}

// Element `[i0, i1, i2, i3, i4, i5]` of a view, widened to acc_t.
__device__ __forceinline__ acc_t na_load(const NaView& v, long long i0, long long i1, long long i2,
                                         long long i3, long long i4, long long i5) {
    return to_acc(na_ptr(v)[na_offset(v, i0, i1, i2, i3, i4, i5)]);
}

__device__ __forceinline__ void na_store(const NaView& v, long long offset, acc_t x) {
    reinterpret_cast<elem_t*>(v.data)[offset] = from_acc(x);
}

// Sixteen bytes of elements, loaded or stored at once where rows are dense and aligned.
struct __align__(16) NaVec16 {
    elem_t e[16 / sizeof(elem_t)];
};

// Channels in sixteen bytes: the run a thread takes where its rows allow (launch.rs channel_run).
#define NA_RUN ((int)(16 / sizeof(elem_t)))

// `W` channels of a row from `at`, widened: W == 1 reads one element (whatever the channel
// stride); a whole run (W == NA_RUN) is one 16-byte load, for dense rows aligned to 16 bytes.
template <int W>
__device__ __forceinline__ void na_load_run(const elem_t* at, acc_t x[W]) {
    if constexpr (W == 1) {
        x[0] = to_acc(*at);
    } else {
        static_assert(W == NA_RUN, "a run is sixteen bytes");
        const NaVec16 v = *reinterpret_cast<const NaVec16*>(at);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            x[k] = to_acc(v.e[k]);
        }
    }
}

// sum[k] += factor * (channel k of the run of `W` at `at`), for the run's channels.
template <int W>
__device__ __forceinline__ void na_add_run(acc_t sum[W], acc_t factor, const elem_t* at) {
    acc_t x[W];
    na_load_run<W>(at, x);
#pragma unroll
    for (int k = 0; k < W; ++k) {
        sum[k] += factor * x[k];
    }
}

// Store `W` channels at element `offset` of `v` (a run: one 16-byte store).
template <int W>
__device__ __forceinline__ void na_store_run(const NaView& v, long long offset, const acc_t x[W]) {
    if constexpr (W == 1) {
        na_store(v, offset, x[0]);
    } else {
        NaVec16 out;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            out.e[k] = from_acc(x[k]);
        }
        *reinterpret_cast<NaVec16*>(reinterpret_cast<elem_t*>(v.data) + offset) = out;
    }
}

// Sum `partial[0..NA_REDUCE_THREADS)` into `partial[0]` by a tree of fixed shape (the same bits
// on every run, no atomics). Every thread of the block calls it after writing its own slot.
__device__ __forceinline__ void na_tree_sum(acc_t* partial) {
    __syncthreads();
    for (int half = NA_REDUCE_THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            partial[threadIdx.x] += partial[threadIdx.x + half];
        }
        __syncthreads();
    }
}

// The sum over the block's WARPS warps, in warp order, of the `value` of each lane: for warp 0
// (the others get 0), through `sums`. Every thread of the block calls it; it ends with a barrier,
// after which `sums` may be written again.
template <int WARPS, class T>
__device__ __forceinline__ T na_warp_order_sum(T value, T (&sums)[WARPS][32]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    sums[warp][lane] = value;
    __syncthreads();
    T total = 0;
    if (warp == 0) {
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            total += sums[w][lane];
        }
    }
    __syncthreads();
    return total;
}

// ---- indexing -----------------------------------------------------------------------------------

// Quotient and remainder of non-negative n by positive d. All index arithmetic is 64-bit (tensors
// over 2^31 elements work); operands that fit 32 bits take the much cheaper 32-bit division.
struct NaDivMod {
    long long quot;
    long long rem;
};

__device__ __forceinline__ NaDivMod na_divmod(long long n, long long d) {
    if ((((unsigned long long)n | (unsigned long long)d) >> 32) == 0) {
        unsigned q = (unsigned)n / (unsigned)d;
        return {(long long)q, (long long)((unsigned)n - q * (unsigned)d)};
    }
    long long q = n / d;
    return {q, n - q * d};
}

// Grid-stride loops: any grid covers any number of outputs.
__device__ __forceinline__ long long na_first_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long na_index_step() { return (long long)gridDim.x * blockDim.x; }

__device__ __forceinline__ long long na_tokens(const NaParams& p) {
    return p.length[0] * p.length[1] * p.length[2];
}

// A `(batch, head, token)` row of the problem.
struct NaRow {
    long long b;
    long long h;
    long long x[3];
};

// Coordinates `x` of token number `t` (row-major over the three axes of `length`).
__device__ __forceinline__ void na_token_of(const long long length[3], long long t,
                                            long long x[3]) {
    const NaDivMod m2 = na_divmod(t, length[2]);
    const NaDivMod m1 = na_divmod(m2.quot, length[1]);
    x[0] = m1.quot;
    x[1] = m1.rem;
    x[2] = m2.rem;
}

__device__ __forceinline__ void na_token(const NaParams& p, long long t, long long x[3]) {
    na_token_of(p.length, t, x);
}

// Row number `row` of the flattened `(batch, head, token)` space, token row-major.
__device__ __forceinline__ NaRow na_row_of(long long heads, const long long length[3],
                                           long long row) {
    NaRow r;
    const NaDivMod bt = na_divmod(row, length[0] * length[1] * length[2]);
    na_token_of(length, bt.rem, r.x);
    const NaDivMod bh = na_divmod(bt.quot, heads);
    r.b = bh.quot;
    r.h = bh.rem;
    return r;
}

__device__ __forceinline__ NaRow na_row(const NaParams& p, long long row) {
    return na_row_of(p.heads, p.length, row);
}

// ---- neighborhood math (rust/src/window.rs) -----------------------------------------------------

__device__ __forceinline__ constexpr int na_kernel(int axis) {
    return axis == 0 ? NA_K0 : (axis == 1 ? NA_K1 : NA_K2);
}
// Whether axis `axis` only pads the rank to three: a kernel of 1 there, where another axis takes
// more (real axes take kernels of 2 or more, rust/src/problem.rs; kernels of 1 on every axis are
// dense attention's, whose axes have no window and any length). Its length is then 1, so every
// index and offset along it is 0 and every window holds the whole axis. Known at compile time, so
// that code may drop the axis's work.
__device__ __forceinline__ constexpr bool na_unit_axis(int axis) {
    return na_kernel(axis) == 1 && NA_SLOTS > 1;
}
__device__ __forceinline__ bool na_causal(int axis) {
    return axis == 0 ? NA_C0 != 0 : (axis == 1 ? NA_C1 != 0 : NA_C2 != 0);
}
__device__ __forceinline__ int na_stride(int axis) {
    return axis == 0 ? NA_S0 : (axis == 1 ? NA_S1 : NA_S2);
}

// A position along one axis, split into its dilation group and its index inside the group.
struct NaGroupPos {
    long long group;  // g = i % d
    long long index;  // qi = i / d
    long long len;    // Lg: length of group g (groups below L % d are one longer)
};

__device__ __forceinline__ NaGroupPos na_group_pos(long long i, long long length,
                                                   long long dilation) {
    NaDivMod q = na_divmod(i, dilation);
    NaDivMod l = na_divmod(length, dilation);
    return {q.rem, q.quot, l.quot + (q.rem < l.rem ? 1 : 0)};
}

// Window `[start, end)` of group index `qi` in a group of length `lg` (window.rs group_window).
struct NaRange {
    long long start;
    long long end;
};

// In the type of its indices (`Index`: long long, or int where they fit 32 bits, as in the
// tensor-core kernels).
template <class Index>
__device__ __forceinline__ NaRange na_group_window(Index qi, Index lg, int kernel, int stride,
                                                   bool causal) {
    if (causal) {
        const Index leader = min((qi / stride) * stride + stride - 1, lg - 1);
        const Index start = max(leader + 1 - kernel, Index(0));
        return {start, min(qi + 1, lg)};
    }
    const Index leader = min((qi / stride) * stride + stride / 2, lg - 1);
    const Index start = min(max(leader - kernel / 2, Index(0)), lg - kernel);
    return {start, start + kernel};
}

// The first group index whose window (na_group_window) starts after `x`, or `lg` if none does:
// windows never move back as the query moves on, so that is where the window's leader first
// passes a bound. A non-causal window starts at min(max(leader - K / 2, 0), lg - K), past x
// (0 <= x < lg - K) once the leader passes x + K / 2; a causal one at max(leader + 1 - K, 0),
// past x once the leader passes x + K - 1 (itself below lg - 1). The leader min(floor(qi / S) S
// + o, lg - 1) (o = S / 2, or S - 1 causal) then passes a bound `need` below lg - 1 once
// floor(qi / S) S passes need - o. tests/kernels/window_runs.cpp checks this against the windows.
template <class Index>
__device__ __forceinline__ Index na_first_window_after(Index x, Index lg, int kernel, int stride,
                                                       bool causal) {
    if (x < 0) {
        return 0;
    }
    const Index need = causal ? x + kernel - 1 : x + kernel / 2;
    if (causal ? need >= lg - 1 : x >= lg - kernel) {
        return lg;
    }
    const Index past = need - (causal ? stride - 1 : stride / 2);
    return past < 0 ? Index(0) : min((past / stride + 1) * stride, lg);
}

// Queries (group indices) whose windows hold some key of group indices `[first, last]`: one run
// `[start, end)`, or {0, 0} for none. Windows move monotonically with the query, so those that
// start at or before `last` are a prefix, and those that end after `first` a suffix: a causal
// window ends just after its query, a non-causal one K after its start.
template <class Index>
__device__ __forceinline__ NaRange na_window_run(Index first, Index last, Index lg, int kernel,
                                                 int stride, bool causal) {
    const Index start = causal ? first : na_first_window_after(first - kernel, lg, kernel, stride,
                                                               false);
    const Index end = na_first_window_after(last, lg, kernel, stride, causal);
    return start < end ? NaRange{start, end} : NaRange{0, 0};
}

// Queries (group indices) whose window holds key group index `kj` (the unfused ops have stride
// 1).
__device__ __forceinline__ NaRange na_inverse_run(long long kj, long long lg, int kernel,
                                                  bool causal) {
    return na_window_run(kj, kj, lg, kernel, 1, causal);
}

// The window of one query along every axis: group coordinates and group range.
struct NaWindow {
    NaGroupPos pos[3];
    NaRange range[3];
};

__device__ __forceinline__ NaWindow na_window_of(const long long length[3],
                                                 const long long dilation[3],
                                                 const long long x[3]) {
    NaWindow w;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        w.pos[a] = na_group_pos(x[a], length[a], dilation[a]);
        w.range[a] = na_group_window(w.pos[a].index, w.pos[a].len, na_kernel(a), na_stride(a),
                                     na_causal(a));
    }
    return w;
}

__device__ __forceinline__ NaWindow na_window(const NaParams& p, const long long x[3]) {
    return na_window_of(p.length, p.dilation, x);
}

// Position of the key in slot `s` (along axis `a`) of window `w`.
__device__ __forceinline__ long long na_key_of(const long long dilation[3], const NaWindow& w,
                                               int a, long long s) {
    return (w.range[a].start + s) * dilation[a] + w.pos[a].group;
}

__device__ __forceinline__ long long na_key(const NaParams& p, const NaWindow& w, int a,
                                            long long s) {
    return na_key_of(p.dilation, w, a, s);
}

// Index along axis `a` of the relative positional bias for slot `s` of window `w`: the offset
// (key - query) / d shifted by K - 1 (spec: relative positional bias; stride 1 only).
__device__ __forceinline__ long long na_bias_index(const NaWindow& w, int a, long long s) {
    return w.range[a].start + s - w.pos[a].index + na_kernel(a) - 1;
}

// Entries of a head's bias table: 2 K - 1 per axis.
#define NA_BIAS_SPAN ((2 * NA_K0 - 1) * (2 * NA_K1 - 1) * (2 * NA_K2 - 1))

// Row-major number of the entry at indices `x` of a bias table, and the indices of number `n`.
__device__ __forceinline__ constexpr int na_bias_number(int x0, int x1, int x2) {
    return (x0 * (2 * NA_K1 - 1) + x1) * (2 * NA_K2 - 1) + x2;
}
__device__ __forceinline__ void na_bias_indices(int n, int x[3]) {
    x[0] = n / ((2 * NA_K1 - 1) * (2 * NA_K2 - 1));
    x[1] = n / (2 * NA_K2 - 1) % (2 * NA_K1 - 1);
    x[2] = n % (2 * NA_K2 - 1);
}
