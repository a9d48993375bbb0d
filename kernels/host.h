// The CUDA built-ins that kernels/*.cu use, for a C++17 host compiler: with this header included
// first, a kernel source compiles into an ordinary shared library whose kernels run on CPU
// memory. rust/src/cuda/host.rs builds and calls such libraries so that the kernels' logic
// (indexing, windows, reductions, warp shuffles, block barriers) is tested against the CPU path
// on machines without a GPU. Timing, the memory model (but for the late completion of cp.async
// copies, bulk tensor copies and wgmma products, and the fences the async proxy needs) and the
// driver are not emulated.
//
// A launch runs its blocks one after another. The threads of a block are fibers on the calling
// thread, switched only at __syncthreads, __syncwarp and warp shuffles, so a block of 256 threads
// costs 256 small stacks and no OS threads (a wait on a copy barrier, mbarrier, switches too).
// Between two switches the threads run in turn, in index order or (`reversed`) the other way: a
// read of what another thread writes without a barrier between them sees the write in one order
// and not in the other, so a kernel run both ways finds such a race wherever it changes a
// result. Shared memory is `static`: one copy, used by one block at a time, and all ones (NaNs in
// the half types) at each block's start, as undefined as a GPU leaves it. So a kernel declares
// its shared arrays itself (or in a non-inline function): with default visibility the host
// compiler makes the static locals of inline functions one object across every library loaded
// (STB_GNU_UNIQUE symbols), so variants of other sizes would share them; host.rs builds with
// hidden symbols, but a kernel should not rely on it. A barrier that some live thread of the
// block (or warp) never reaches would hang a GPU; here it ends the launch with an error.
//
// This header has the prelude (the built-in types and functions), the launch and the warp-wide
// built-ins; host_threads.h the block's threads, barriers and shuffles; host_async.h the
// asynchronous operations (cp.async, wgmma, mbarrier, bulk tensor copies) and the proxy rules.
#pragma once

// C headers only: they parse in a fraction of the time of their C++ counterparts, and every
// kernel variant is compiled separately.
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define NA_HOST 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
// Static shared arrays are `static`, in a section of their own (na_host_shared) so that each block
// can start with them undefined (run_block), as with dynamic shared memory.
#define __shared__ static __attribute__((section("na_host_shared")))
#define __constant__
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;

// Libraries are built with hidden symbols (host.rs), so that the inline functions and
// variables of one bind to its own copies, never to another loaded library's: what the host
// calls or reads is exported by name.
#define NA_HOST_EXPORT extern "C" __attribute__((visibility("default")))

// Bulk tensor copies this library has issued (na_host::tensor_copy): tests read it to tell that
// a variant took them. (Each library is one translation unit.)
NA_HOST_EXPORT unsigned long long na_host_tensor_copies = 0;

// The first rule of the GPU's that a launch broke where the emulation checks it (na_host::fault),
// empty if none: the launch then returns 2, and host.rs reports this.
NA_HOST_EXPORT char na_host_fault[512] = {0};

// Launches are serialised by the caller (host.rs), so the launch geometry is global.
inline uint3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

template <class T>
inline T min(T a, T b) {
    return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
    return a < b ? b : a;
}

template <class To, class From>
inline To na_host_bits(From x) {
    static_assert(sizeof(To) == sizeof(From), "bit casts keep the size");
    To y;
    memcpy(&y, &x, sizeof(To));
    return y;
}
// Leading zero bits of a 32-bit word (32 for zero).
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
// The high 32 bits of the 64-bit product of two words.
inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)((unsigned long long)a * b >> 32);
}
inline float __int_as_float(int x) { return na_host_bits<float>(x); }
inline float __uint_as_float(unsigned x) { return na_host_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return na_host_bits<unsigned>(x); }
inline int __float_as_int(float x) { return na_host_bits<int>(x); }
inline double __longlong_as_double(long long x) { return na_host_bits<double>(x); }
inline long long __double_as_longlong(double x) { return na_host_bits<long long>(x); }

// IEEE half through the compiler's _Float16 (round to nearest even, as cvt.rn.f16.f32).
inline float na_host_f16_to_f32(unsigned short bits) {
    return (float)na_host_bits<_Float16>(bits);
}
inline unsigned short na_host_f32_to_f16(float x) {
    return na_host_bits<unsigned short>((_Float16)x);
}

#include "host_threads.h"
#include "host_async.h"

namespace na_host {

// A block barrier (__syncthreads): writes the thread has fenced for the async proxy are
// published with it.
inline void sync_block() {
    publish_fenced();
    const unsigned long long phase = block->sync.phase;
    block->sync.arrive();
    wait(block->sync, phase);
}

// The body of every fiber: the kernel, then leaving the barriers and handing back for good.
inline void run_thread() {
    Block& b = *block;
    b.body(b.params);
    b.fibers[b.current].done = true;
    b.sync.leave();
    b.warps[b.current / kWarp].leave();
    b.warpgroups[b.current / kWarpgroup].leave();
    switch_to(b.fibers[b.current].context, b.scheduler);
    __builtin_unreachable();
}

// Phases every barrier of block `b` has gone through, summed: it grows while any moves.
inline unsigned long long progress(const Block& b) {
    unsigned long long phases = b.sync.phase + b.arrivals;
    for (unsigned t = 0; t < b.threads; t += kWarp) {
        phases += b.warps[t / kWarp].phase;
    }
    for (unsigned t = 0; t < b.threads; t += kWarpgroup) {
        phases += b.warpgroups[t / kWarpgroup].phase;
    }
    return phases;
}

// Run every thread of the current block to its end. Returns false on a deadlock: every live
// thread waits at a barrier that cannot complete.
inline bool run_threads(Block& b) {
    const unsigned threads = b.threads;
    unsigned live = threads;
    while (live > 0) {
        const unsigned long long before = progress(b);
        unsigned finished = 0;
        for (unsigned turn = 0; turn < threads; ++turn) {
            const unsigned t = b.reversed ? threads - 1 - turn : turn;
            if (b.fibers[t].done) {
                continue;
            }
            b.current = t;
            threadIdx = {t % blockDim.x, t / blockDim.x, 0};
            switch_to(b.scheduler, b.fibers[t].context);
            finished += b.fibers[t].done ? 1 : 0;
        }
        live -= finished;
        if (live > 0 && finished == 0 && progress(b) == before) {
            // Nobody finished and no barrier moved in a whole round: stuck. Let every waiting
            // thread run to its end (the barriers now fall through) so no stack stays in use.
            b.deadlock = true;
            for (unsigned t = 0; t < threads; ++t) {
                while (!b.fibers[t].done) {
                    b.current = t;
                    threadIdx = {t % blockDim.x, t / blockDim.x, 0};
                    switch_to(b.scheduler, b.fibers[t].context);
                }
            }
            return false;
        }
    }
    return true;
}

// Run the current block: its threads (run_threads) from a fresh start, its shared memory
// undefined. Returns false on a deadlock.
inline bool run_block(Block& b) {
    const unsigned threads = b.threads;
    b.sync = Barrier{threads, 0, 0};
    for (unsigned t = 0; t < threads; ++t) {
        b.warps[t / kWarp] = Barrier{};
        b.warpgroups[t / kWarpgroup] = Barrier{};
    }
    for (unsigned t = 0; t < threads; ++t) {
        b.warps[t / kWarp].expected++;
        b.warpgroups[t / kWarpgroup].expected++;
        Fiber& f = b.fibers[t];
        f.done = false;
        f.pending = 0;  // copies a thread never waited for do not complete
        f.committed = 0;
        f.product_count = 0;  // nor do products
        f.product_groups = 0;
        f.products_fenced = false;
        f.unfenced.count = 0;
        f.fenced.count = 0;
        prepare(f.context, f.stack, kStack, run_thread);
    }
    memset(unfenced_writer, 0, sizeof unfenced_writer);
    // A block's shared memory starts undefined on a GPU: here all ones (NaNs in the half types),
    // so that a read of what the block never wrote shows; its barriers too (mbarrier_check).
    memset(dynamic_shared, 0xff, sizeof dynamic_shared);
    if (__start_na_host_shared != nullptr) {
        memset(__start_na_host_shared, 0xff, __stop_na_host_shared - __start_na_host_shared);
    }
    const bool finished = run_threads(b);
    release_mbarriers(b);
    return finished;
}

// Run kernel `body` over a grid of `grid` blocks of `bx` x `by` threads, in reversed turns where
// `reversed` (Block::reversed). Returns 0; 1 when a block deadlocked; 2 when the launch broke a
// rule the emulation checks (na_host_fault says which).
inline int launch(void (*body)(const void*), const void* params, unsigned grid, unsigned bx,
                  unsigned by, unsigned reversed) {
    Block b;
    b.body = body;
    b.reversed = reversed != 0;
    b.params = params;
    b.threads = bx * by;
    b.fibers = new Fiber[b.threads];
    b.warps = new Barrier[(b.threads + kWarp - 1) / kWarp];
    b.warpgroups = new Barrier[(b.threads + kWarpgroup - 1) / kWarpgroup];
    b.lanes = new unsigned char[2 * b.threads * sizeof(unsigned long long)]();
    b.wide = new unsigned char[2 * b.threads * kGather]();
    b.agree = new unsigned char[2 * b.threads * kAgree]();
    for (unsigned t = 0; t < b.threads; ++t) {
        b.fibers[t].stack = static_cast<char*>(malloc(kStack));
    }
    gridDim = {grid, 1, 1};
    blockDim = {bx, by, 1};
    block = &b;
    na_host_fault[0] = 0;
    int status = 0;
    for (unsigned g = 0; g < grid && status == 0; ++g) {
        blockIdx = {g, 0, 0};
        status = run_block(b) ? 0 : 1;
    }
    if (status == 0 && na_host_fault[0] != 0) {
        status = 2;
    }
    block = nullptr;
    for (unsigned t = 0; t < b.threads; ++t) {
        free(b.fibers[t].stack);
        free(b.fibers[t].copies);
        free(b.fibers[t].products);
        free(b.fibers[t].unfenced.chunks);
        free(b.fibers[t].fenced.chunks);
    }
    delete[] b.fibers;
    delete[] b.warps;
    delete[] b.warpgroups;
    delete[] b.lanes;
    delete[] b.wide;
    delete[] b.agree;
    free(b.mbarriers);
    return status;
}

}  // namespace na_host

inline void __syncthreads() { na_host::sync_block(); }

// A block barrier that also returns how many threads' `predicate` is nonzero. The first thread
// to arrive clears this phase's bank: the last reads of it (two barriers back) are over.
inline int __syncthreads_count(int predicate) {
    na_host::Block& b = *na_host::block;
    const unsigned long long phase = b.sync.phase;
    int& count = b.count[phase % 2];
    if (b.sync.arrived == 0) {
        count = 0;
    }
    count += predicate != 0;
    na_host::publish_fenced();
    b.sync.arrive();
    na_host::wait(b.sync, phase);
    return count;
}
inline void __syncwarp(unsigned = 0xffffffffu) { na_host::sync_warp(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T x, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    unsigned long long bits = 0;
    memcpy(&bits, &x, sizeof(T));
    const unsigned long long other = na_host::exchange(bits, lane_mask);
    T y;
    memcpy(&y, &other, sizeof(T));
    return y;
}

// Lane `src_lane`'s `x`.
template <class T>
inline T __shfl_sync(unsigned, T x, int src_lane) {
    static_assert(sizeof(T) <= na_host::kGather, "a shuffle moves at most kGather bytes");
    T all[na_host::kWarp];
    na_host::warp_gather(&x, sizeof x, all);
    return all[src_lane % na_host::kWarp];
}

// Every lane's `x` folded by `fold`, in lane order.
template <class T, class Fold>
inline T na_host_reduce(T x, Fold fold) {
    T all[na_host::kWarp] = {};
    na_host::warp_gather(&x, sizeof x, all);
    T folded = all[0];
    for (unsigned lane = 1; lane < na_host::kWarp; ++lane) {
        folded = fold(folded, all[lane]);
    }
    return folded;
}

// The bitwise or of every lane's `bits`.
inline unsigned __reduce_or_sync(unsigned, unsigned bits) {
    return na_host_reduce(bits, [](unsigned a, unsigned b) { return a | b; });
}
// The least of every lane's `x`.
inline unsigned __reduce_min_sync(unsigned, unsigned x) {
    return na_host_reduce(x, [](unsigned a, unsigned b) { return a < b ? a : b; });
}
// Whether every lane's `predicate` is nonzero.
inline int __all_sync(unsigned, int predicate) {
    return na_host_reduce(predicate != 0 ? 1 : 0, min<int>);
}
// Whether any lane's `predicate` is nonzero.
inline int __any_sync(unsigned, int predicate) {
    return na_host_reduce(predicate != 0 ? 1 : 0, max<int>);
}

// `extern "C" int na_host_<kernel>(params, grid, bx, by, reversed)`: the entry point host.rs calls for
// kernel `kernel` taking one `Params` by value.
#define NA_HOST_ENTRY(kernel, Params)                                                          \
    static void na_host_body_##kernel(const void* p) {                                         \
        Params params;                                                                         \
        memcpy(&params, p, sizeof(Params));                                               \
        kernel(params);                                                                        \
    }                                                                                          \
    NA_HOST_EXPORT int na_host_##kernel(const void* p, unsigned grid, unsigned bx, unsigned by, \
                                        unsigned reversed) {                                   \
        return na_host::launch(na_host_body_##kernel, p, grid, bx, by, reversed);              \
    }
