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
// Between two switches the threads run in turn, in
// index order or (`reversed`) the other way: a read of what another thread writes without a
// barrier between them sees the write in one order and not in the other, so a kernel run both
// ways finds such a race wherever it changes a result. Shared memory is `static`: one copy, used by one block
// at a time. So a kernel declares its shared arrays itself (or in a non-inline function): with
// default visibility the host compiler makes the static locals of inline functions one object
// across every library loaded (STB_GNU_UNIQUE symbols), so variants of other sizes would share
// them; host.rs builds with hidden symbols, but a kernel should not rely on it. A barrier that
// some live thread of the block (or warp) never reaches would hang a GPU; here it ends the
// launch with an error.
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
#define __shared__ static
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

namespace na_host {

// A barrier among the live threads of a block or of a warp: a thread that returns from the
// kernel leaves every barrier it belongs to.
struct Barrier {
    unsigned expected = 0;
    unsigned arrived = 0;
    unsigned long long phase = 0;

    void arrive() {
        if (++arrived == expected) {
            arrived = 0;
            ++phase;
        }
    }
    void leave() {
        --expected;
        if (expected > 0 && arrived == expected) {
            arrived = 0;
            ++phase;
        }
    }
};

// A cp.async copy of 16 bytes not yet completed: its destination, the bytes it brings and its
// group (the number of groups its thread had committed when it was issued).
struct PendingCopy {
    void* dst;
    unsigned char bytes[16];
    unsigned size;  // bytes: 16, or 8
    unsigned long long group;
};

// A warpgroup product (wgmma) issued by a thread and not yet waited for: the `count`
// accumulators `d` it writes, its group (as for copies), the accumulators it starts from (`d` at
// issue, or the output of the thread's previous pending product on `d`, filled in when that one
// completes), and what `multiply` needs to compute its output from them when it completes: this
// lane's rows of A (four lanes' fragments, gathered at issue, when the instruction reads them; or,
// where `a_smem` is set, its rows `a_row` and `a_row` + 8 of A in shared memory) and where B lies
// (shared memory is read at completion: it must hold the factors until the wait).
struct PendingProduct {
    float* d;
    int count;
    unsigned long long group;
    bool chained;  // `start` comes from an earlier pending product on `d`
    float start[64];
    unsigned a[16];
    const void* a_smem;
    unsigned a_leading, a_stride;
    int a_row;
    const void* b;
    unsigned leading, stride;
    int accumulate;
    int lane;
    void (*multiply)(const PendingProduct&, float* out);
};

// A thread's own stack and saved context. On x86-64 a switch saves the callee-saved registers
// on the stack and swaps stack pointers (no system call, unlike swapcontext, which also saves the
// signal mask: the shuffles of a warp switch hundreds of thousands of times per launch).
#if defined(__x86_64__)
extern "C" void na_host_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .type na_host_switch, @function
na_host_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size na_host_switch, .-na_host_switch
)");

struct Context {
    void* sp = nullptr;
};

// Resume `to`, saving the running context in `from`.
inline void switch_to(Context& from, Context& to) { na_host_switch(&from.sp, to.sp); }

// A context that enters `entry` (which never returns) on the stack `[stack, stack + size)`:
// six zeroed registers for na_host_switch to pop, then `entry` for its `ret`, then a null
// return address so that `entry` starts with the stack aligned as after a call.
inline void prepare(Context& c, char* stack, size_t size, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(entry);
    for (int r = 0; r < 6; ++r) {
        *--sp = nullptr;
    }
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};

inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

inline void prepare(Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

// Numbers of 16-byte chunks of dynamic shared memory (see generic_write).
struct ChunkList {
    unsigned* chunks = nullptr;
    unsigned count = 0;
    unsigned capacity = 0;
};

struct Fiber {
    Context context;
    char* stack = nullptr;
    bool done = false;
    PendingCopy* copies = nullptr;  // this thread's cp.async copies not yet waited for
    unsigned pending = 0;
    unsigned capacity = 0;
    unsigned long long committed = 0;  // cp.async groups this thread has committed
    PendingProduct* products = nullptr;  // this thread's wgmma products not yet waited for
    unsigned product_count = 0;
    unsigned product_capacity = 0;
    unsigned long long product_groups = 0;  // wgmma groups this thread has committed
    bool products_fenced = false;  // a wgmma.fence since this thread's last commit
    ChunkList unfenced;  // chunks of shared memory its copies wrote since its last proxy fence
    ChunkList fenced;    // chunks it has fenced since its last block barrier
};

// The threads of a launch's blocks (one block at a time) and their barriers; arrays of
// `threads` fibers, `threads / 32` warps and `threads / 128` warpgroups (rounded up) and
// `2 * threads` shuffle slots.
struct Block {
    Context scheduler;
    unsigned threads = 0;
    Fiber* fibers = nullptr;
    Barrier sync;
    Barrier* warps = nullptr;
    Barrier* warpgroups = nullptr;
    unsigned long long* lanes = nullptr;  // two banks of one shuffle slot per thread
    unsigned char* wide = nullptr;        // two banks of one gather slot per thread
    unsigned current = 0;
    int count[2] = {0, 0};  // two banks (by barrier phase) of __syncthreads_count's predicates
    unsigned long long arrivals = 0;  // at copy barriers (Mbarrier), counted as progress
    bool deadlock = false;
    bool reversed = false;  // threads run last first between switches
    void (*body)(const void*) = nullptr;
    const void* params = nullptr;
};

inline Block* block = nullptr;

// Dynamic shared memory (NA_DYNAMIC_SHARED): as much as a block may take on any GPU, used by one
// block at a time like the static arrays.
alignas(128) inline unsigned char dynamic_shared[227 * 1024];
constexpr unsigned kWarp = 32;
constexpr unsigned kWarpgroup = 128;
constexpr size_t kStack = 256 * 1024;
constexpr size_t kGather = 64;  // bytes a lane contributes to one warp gather, at most

// Record that the launch broke a rule of the GPU's (the first such, in na_host_fault): on a GPU it
// would read stale data or fault. The launch runs on, as the emulation is still well defined.
inline void fault(const char* format, ...) {
    if (na_host_fault[0] != 0) {
        return;
    }
    va_list args;
    va_start(args, format);
    vsnprintf(na_host_fault, sizeof na_host_fault, format, args);
    va_end(args);
}

// The two proxies of shared memory. Ordinary accesses and cp.async copies go through the generic
// proxy; wgmma's shared-memory factors and bulk tensor copies through the async proxy, which sees
// another thread's generic write only once the writer has fenced (fence.proxy.async) and then
// met the reader at a barrier (its own, right after its fence). Where the kernels take warpgroup
// products, every 16-byte chunk of dynamic shared memory (where they stage their factors)
// records the thread whose cp.async copy last wrote it, and whether that thread has fenced
// since, until the fence is published by the writer's next block barrier; a product that reads
// such a chunk before is reported. Ordinary stores are not seen (the kernels stage every factor
// by copies).
#if defined(NA_WGMMA) && NA_WGMMA
constexpr bool kTracksProxies = true;
#else
constexpr bool kTracksProxies = false;
#endif
constexpr unsigned short kFenced = 0x8000;
// Per chunk: 0, or the writing thread + 1, with kFenced once it has fenced.
inline unsigned short unfenced_writer[sizeof dynamic_shared / 16];

// The chunks of dynamic shared memory that bytes [dst, dst + size) cover: false if they lie
// outside it.
inline bool shared_chunks(const void* dst, size_t size, size_t& first, size_t& end) {
    const uintptr_t at =
        reinterpret_cast<uintptr_t>(dst) - reinterpret_cast<uintptr_t>(dynamic_shared);
    if (!kTracksProxies || at >= sizeof dynamic_shared || size == 0) {
        return false;
    }
    first = at / 16;
    end = min<size_t>((at + size + 15) / 16, sizeof dynamic_shared / 16);
    return true;
}

inline void note_chunk(ChunkList& list, unsigned chunk) {
    if (list.count == list.capacity) {
        list.capacity = list.capacity == 0 ? 256 : 2 * list.capacity;
        list.chunks = static_cast<unsigned*>(realloc(list.chunks, list.capacity * sizeof(unsigned)));
    }
    list.chunks[list.count++] = chunk;
}

// `size` bytes at `dst` written through the generic proxy by thread `writer`'s copy.
inline void generic_write(const void* dst, size_t size, unsigned writer) {
    size_t first, end;
    if (!shared_chunks(dst, size, first, end)) {
        return;
    }
    for (size_t c = first; c < end; ++c) {
        if (unfenced_writer[c] != writer + 1) {
            unfenced_writer[c] = (unsigned short)(writer + 1);
            note_chunk(block->fibers[writer].unfenced, (unsigned)c);
        }
    }
}

// `size` bytes at `dst` written through the async proxy (a bulk tensor copy).
inline void async_write(const void* dst, size_t size) {
    size_t first, end;
    if (shared_chunks(dst, size, first, end)) {
        memset(&unfenced_writer[first], 0, (end - first) * sizeof unfenced_writer[0]);
    }
}

// fence.proxy.async by the running thread: its copies' writes so far are the async proxy's to
// read, its own products' at once, others' after its next barrier.
inline void proxy_fence() {
    const unsigned me = block->current;
    Fiber& f = block->fibers[me];
    for (unsigned i = 0; i < f.unfenced.count; ++i) {
        const unsigned c = f.unfenced.chunks[i];
        if (unfenced_writer[c] == me + 1) {
            unfenced_writer[c] |= kFenced;
            note_chunk(f.fenced, c);
        }
    }
    f.unfenced.count = 0;
}

// The running thread arrives at a block barrier: writes it has fenced are published.
inline void publish_fenced() {
    const unsigned me = block->current;
    Fiber& f = block->fibers[me];
    for (unsigned i = 0; i < f.fenced.count; ++i) {
        const unsigned c = f.fenced.chunks[i];
        if (unfenced_writer[c] == ((me + 1) | kFenced)) {
            unfenced_writer[c] = 0;
        }
    }
    f.fenced.count = 0;
}

// The async proxy reads `size` bytes at `src` for the running thread's `reader`.
inline void async_read(const void* src, size_t size, const char* reader) {
    size_t first, end;
    if (!shared_chunks(src, size, first, end)) {
        return;
    }
    const unsigned me = block->current;
    for (size_t c = first; c < end; ++c) {
        const unsigned v = unfenced_writer[c], writer = (v & ~kFenced) - 1u;
        if (v == 0 || v == ((me + 1) | kFenced)) {
            continue;
        }
        fault("%s (thread %u) reads byte %zu of the dynamic shared memory, which thread %u's "
              "cp.async copy wrote, %s",
              reader, me, 16 * c, writer,
              v & kFenced ? "fenced (fence.proxy.async) but with no barrier since"
                          : "with no fence.proxy.async since");
        return;
    }
}

// Back to the scheduler until `barrier` has moved past `phase`.
inline void wait(Barrier& barrier, unsigned long long phase) {
    while (barrier.phase == phase && !block->deadlock) {
        switch_to(block->fibers[block->current].context, block->scheduler);
    }
}

inline void sync_block() {
    publish_fenced();
    const unsigned long long phase = block->sync.phase;
    block->sync.arrive();
    wait(block->sync, phase);
}

inline void sync_warp() {
    Barrier& warp = block->warps[block->current / kWarp];
    const unsigned long long phase = warp.phase;
    warp.arrive();
    wait(warp, phase);
}

// A barrier of the running thread's warpgroup (the warpgroup-wide instructions' .sync.aligned).
inline void sync_warpgroup() {
    Barrier& group = block->warpgroups[block->current / kWarpgroup];
    const unsigned long long phase = group.phase;
    group.arrive();
    wait(group, phase);
}

// cp.async on the host: a copy completes as late as the GPU allows, at the issuing thread's
// next wait, and its destination reads as all ones (a NaN in either half type) until then, so a
// read that comes before its wait (or, from another thread, before the barrier after that wait)
// sees NaNs instead of passing by luck. `src` null brings zeros. Copies take 16 bytes, or `size`,
// both addresses aligned to it.
inline void copy_async(void* dst, const void* src, unsigned size = 16) {
    Fiber& f = block->fibers[block->current];
    if (reinterpret_cast<uintptr_t>(dst) % size != 0 || reinterpret_cast<uintptr_t>(src) % size != 0) {
        fault("a cp.async copy of %u bytes (thread %u) from %p to %p, not both %u-byte aligned",
              size, block->current, src, dst, size);
    }
    if (f.pending == f.capacity) {
        f.capacity = f.capacity == 0 ? 64 : 2 * f.capacity;
        f.copies = static_cast<PendingCopy*>(realloc(f.copies, f.capacity * sizeof(PendingCopy)));
    }
    PendingCopy& c = f.copies[f.pending++];
    c.dst = dst;
    c.size = size;
    c.group = f.committed;
    if (src != nullptr) {
        memcpy(c.bytes, src, size);
    } else {
        memset(c.bytes, 0, size);
    }
    memset(dst, 0xff, size);
}

// Complete copy `c` of the running thread's.
inline void land(const PendingCopy& c) {
    memcpy(c.dst, c.bytes, c.size);
    generic_write(c.dst, c.size, block->current);
}

// Complete every copy this thread has issued.
inline void wait_copies() {
    Fiber& f = block->fibers[block->current];
    for (unsigned i = 0; i < f.pending; ++i) {
        land(f.copies[i]);
    }
    f.pending = 0;
}

// Close this thread's group of copies (cp.async.commit_group).
inline void commit_copies() { block->fibers[block->current].committed++; }

// Complete the copies of every group this thread has committed but the `newest` last ones
// (cp.async.wait_group): those, and copies not yet committed, stay pending.
inline void wait_copy_groups(unsigned long long newest) {
    Fiber& f = block->fibers[block->current];
    unsigned kept = 0;
    for (unsigned i = 0; i < f.pending; ++i) {
        if (f.copies[i].group + newest < f.committed) {
            land(f.copies[i]);
        } else {
            f.copies[kept++] = f.copies[i];
        }
    }
    f.pending = kept;
}

// wgmma on the host: a product completes as late as the GPU allows, at the issuing thread's wait
// for its group. Until then its accumulators hold a signalling NaN: a read before the wait gives
// NaNs, and a write (arithmetic on them quiets the NaN) is found at completion, which then leaves
// NaNs instead of the product. Products on the same accumulators chain in issue order.
constexpr unsigned kPendingBits = 0x7f80dad0u;

inline void issue_product(const PendingProduct& product) {
    Fiber& f = block->fibers[block->current];
    if (!f.products_fenced) {
        fault("thread %u issues a wgmma with no wgmma.fence since its last commit (a product "
              "may not see its registers' latest values)",
              block->current);
    }
    if (f.product_count == f.product_capacity) {
        f.product_capacity = f.product_capacity == 0 ? 16 : 2 * f.product_capacity;
        f.products = static_cast<PendingProduct*>(
            realloc(f.products, f.product_capacity * sizeof(PendingProduct)));
    }
    PendingProduct& p = f.products[f.product_count] = product;
    p.group = f.product_groups;
    p.chained = false;
    for (unsigned i = 0; i < f.product_count; ++i) {
        p.chained = p.chained || f.products[i].d == p.d;
    }
    if (!p.chained) {
        memcpy(p.start, p.d, p.count * sizeof(float));
        for (int i = 0; i < p.count; ++i) {
            memcpy(&p.d[i], &kPendingBits, sizeof(float));
        }
    }
    f.product_count++;
}

// wgmma.fence: the running thread's register writes so far are the next products' to read. The
// PTX ISA asks for it before a product whose accumulators or A fragments other instructions
// touched; the kernels fence before each group they issue, and the emulation holds them to it.
inline void fence_products() { block->fibers[block->current].products_fenced = true; }

// Close this thread's group of products (wgmma.commit_group).
inline void commit_products() {
    Fiber& f = block->fibers[block->current];
    f.product_groups++;
    f.products_fenced = false;
}

// Complete `p`: its output goes to the next pending product on the same accumulators, or, where
// none follows, to the accumulators themselves (NaNs where they were written meanwhile).
inline void complete_product(PendingProduct* p, PendingProduct* end) {
    float out[64];
    p->multiply(*p, out);
    for (PendingProduct* next = p + 1; next < end; ++next) {
        if (next->d == p->d) {
            memcpy(next->start, out, p->count * sizeof(float));
            return;
        }
    }
    bool untouched = true;
    for (int i = 0; i < p->count; ++i) {
        untouched = untouched && memcmp(&p->d[i], &kPendingBits, sizeof(float)) == 0;
    }
    for (int i = 0; i < p->count; ++i) {
        p->d[i] = untouched ? out[i] : __builtin_nanf("");
    }
}

// Complete the products of every group this thread has committed but the `newest` last ones
// (wgmma.wait_group), oldest first.
inline void wait_product_groups(unsigned long long newest) {
    Fiber& f = block->fibers[block->current];
    PendingProduct* const end = f.products + f.product_count;
    unsigned kept = 0;
    for (PendingProduct* p = f.products; p < end; ++p) {
        if (p->group + newest < f.product_groups) {
            complete_product(p, end);
        } else {
            f.products[kept++] = *p;
        }
    }
    f.product_count = kept;
}

// A shared-memory barrier that copies complete on (mbarrier): `expected` arrivals and the bytes
// announced for them (`owed`, less those landed) complete a phase. Copies on it land as late as
// the GPU allows: when a thread waits on the phase, or when the next phase's first arrival
// comes. Until then their destinations read as all ones (NaNs in the half types).
struct BulkCopy {
    void* dst;
    unsigned char* bytes;  // what lands (malloc'd)
    size_t size;
    int writer;  // the thread whose cp.async copy it is, or -1 (a bulk tensor copy)
};

struct Mbarrier {
    unsigned expected;
    unsigned arrived;
    long long owed;
    unsigned long long phase;
    BulkCopy* copies;  // landing at the phase's completion
    unsigned pending;
    unsigned capacity;
};

inline void mbarrier_drop_copies(Mbarrier& m) {
    for (unsigned i = 0; i < m.pending; ++i) {
        free(m.copies[i].bytes);
    }
    m.pending = 0;
}

inline void mbarrier_init(Mbarrier& m, unsigned count) {
    mbarrier_drop_copies(m);
    free(m.copies);
    m = Mbarrier{count, 0, 0, 0, nullptr, 0, 0};
}

// Hold `size` bytes (from `src`, or zeros) for `dst`, landing when `m`'s phase completes: a
// bulk tensor copy's, or (`writer`) a thread's cp.async copy's.
inline void mbarrier_hold(Mbarrier& m, void* dst, const void* src, size_t size, int writer = -1) {
    if (m.pending == m.capacity) {
        m.capacity = m.capacity == 0 ? 16 : 2 * m.capacity;
        m.copies = static_cast<BulkCopy*>(realloc(m.copies, m.capacity * sizeof(BulkCopy)));
    }
    BulkCopy& c = m.copies[m.pending++];
    c.dst = dst;
    c.size = size;
    c.writer = writer;
    c.bytes = static_cast<unsigned char*>(malloc(size));
    if (src != nullptr) {
        memcpy(c.bytes, src, size);
    } else {
        memset(c.bytes, 0, size);
    }
    memset(dst, 0xff, size);
}

// Complete `m`'s phase if every arrival is in: its copies land; the phase completes if their
// bytes are those announced. Returns whether it completed.
inline bool mbarrier_settle(Mbarrier& m) {
    if (m.arrived < m.expected) {
        return false;
    }
    for (unsigned i = 0; i < m.pending; ++i) {
        const BulkCopy& c = m.copies[i];
        memcpy(c.dst, c.bytes, c.size);
        if (c.writer < 0) {
            async_write(c.dst, c.size);
        } else {
            generic_write(c.dst, c.size, (unsigned)c.writer);
        }
        m.owed -= (long long)c.size;
    }
    mbarrier_drop_copies(m);
    if (m.owed != 0) {
        return false;
    }
    m.arrived = 0;
    m.phase++;
    block->arrivals++;
    return true;
}

// Whether `m` takes an arrival: its last phase, if every arrival is in, completes first. An
// arrival past the expected count (a phase whose bytes never added up) would corrupt a GPU's
// barrier: reported as a deadlock.
inline bool mbarrier_takes_arrival(Mbarrier& m) {
    if (m.arrived == m.expected && !mbarrier_settle(m)) {
        block->deadlock = true;
        return false;
    }
    return true;
}

// An arrival at `m`, announcing `bytes` for its phase.
inline void mbarrier_arrive(Mbarrier& m, unsigned bytes) {
    if (!mbarrier_takes_arrival(m)) {
        return;
    }
    m.owed += bytes;
    m.arrived++;
    block->arrivals++;
}

// cp.async.mbarrier.arrive.noinc: the thread's cp.async copies not yet committed to a group
// land with `m`'s phase, and its arrival counts once they have. (On a GPU the arrival waits for
// the thread's committed copies too; here those still land at the wait for their group, never
// sooner: code may not count on the barrier for them.)
inline void mbarrier_arrive_after_copies(Mbarrier& m) {
    Fiber& f = block->fibers[block->current];
    if (!mbarrier_takes_arrival(m)) {
        return;
    }
    unsigned kept = 0;
    for (unsigned i = 0; i < f.pending; ++i) {
        PendingCopy& c = f.copies[i];
        if (c.group == f.committed) {
            mbarrier_hold(m, c.dst, c.bytes, c.size, (int)block->current);
            m.owed += c.size;  // (the copy's own bytes, owed and landed together)
        } else {
            f.copies[kept++] = c;
        }
    }
    f.pending = kept;
    m.arrived++;
    block->arrivals++;
}

// Wait until `m`'s phase of parity `parity` has completed (the phase now running has the other
// parity).
inline void mbarrier_wait(Mbarrier& m, unsigned parity) {
    while (m.phase % 2 == parity && !block->deadlock) {
        if (!mbarrier_settle(m)) {
            switch_to(block->fibers[block->current].context, block->scheduler);
        }
    }
}

// A tensor map as the host build encodes it (rust/src/cuda/tma.rs, HostTensorMap): 128 bytes.
struct HostTensorMap {
    unsigned long long address;
    unsigned long long dims[5];     // innermost first
    unsigned long long strides[4];  // bytes, of dimensions 1 to 4 (dimension 0 is dense)
    unsigned box[5];
    unsigned element_strides[5];
    unsigned element_bytes;
    unsigned rank;
};
static_assert(sizeof(HostTensorMap) == 128, "a tensor map takes 128 bytes");

// cp.async.bulk.tensor (tile mode, no swizzle, no interleave) on the host: the box of `map` at
// coordinates `c`, dense in `dst` with the innermost dimension fastest, every `element
// stride`-th element along each dimension (ceil(box / element stride) of them), zeros where a
// coordinate lies outside the tensor; its bytes land with `m`'s phase.
inline void tensor_copy(void* dst, const void* map_bytes, const int c[5], Mbarrier& m) {
    HostTensorMap map;
    memcpy(&map, map_bytes, sizeof map);
    na_host_tensor_copies++;
    if (reinterpret_cast<uintptr_t>(dst) % 128 != 0) {
        fault("a bulk tensor copy (thread %u) lands at shared address %p, not 128-byte aligned",
              block->current, dst);
    }
    unsigned long long count[5] = {1, 1, 1, 1, 1};
    unsigned long long total = map.element_bytes;
    for (unsigned d = 0; d < map.rank; ++d) {
        count[d] = (map.box[d] + map.element_strides[d] - 1) / map.element_strides[d];
        total *= count[d];
    }
    unsigned char* staged = static_cast<unsigned char*>(calloc(total, 1));
    unsigned long long at = 0;  // element number in the box, innermost fastest
    for (unsigned long long i4 = 0; i4 < count[4]; ++i4)
    for (unsigned long long i3 = 0; i3 < count[3]; ++i3)
    for (unsigned long long i2 = 0; i2 < count[2]; ++i2)
    for (unsigned long long i1 = 0; i1 < count[1]; ++i1)
    for (unsigned long long i0 = 0; i0 < count[0]; ++i0, ++at) {
        const unsigned long long index[5] = {i0, i1, i2, i3, i4};
        bool inside = true;
        unsigned long long offset = 0;
        for (unsigned d = 0; d < map.rank; ++d) {
            const long long x = (long long)c[d] + (long long)(index[d] * map.element_strides[d]);
            inside = inside && x >= 0 && (unsigned long long)x < map.dims[d];
            offset += (d == 0 ? map.element_bytes : map.strides[d - 1]) * (unsigned long long)x;
        }
        if (inside) {
            memcpy(staged + at * map.element_bytes,
                   reinterpret_cast<const unsigned char*>(map.address) + offset,
                   map.element_bytes);
        }
    }
    // (Copies may come after the phase's last arrival: they keep it from completing.)
    mbarrier_hold(m, dst, staged, total);
    free(staged);
}

// One shuffle: publish `bits`, wait for the warp, read the partner's. Slots alternate between
// two banks by barrier phase, so a lane that races ahead to the next shuffle writes the other
// bank while slower lanes still read this one (one barrier per shuffle, not two).
inline unsigned long long exchange(unsigned long long bits, int lane_mask) {
    const unsigned t = block->current;
    Barrier& warp = block->warps[t / kWarp];
    const unsigned long long phase = warp.phase;
    const size_t bank = (phase % 2) * block->threads;
    block->lanes[bank + t] = bits;
    warp.arrive();
    wait(warp, phase);
    const unsigned partner = (t / kWarp) * kWarp + ((t % kWarp) ^ (unsigned)lane_mask);
    return block->lanes[bank + partner];
}

// One gather: publish `bytes` (at most kGather) from `mine`, wait for the warp, read every
// lane's into `all` (lane order). Banks alternate by barrier phase, as for `exchange`. Warp-wide
// instructions that combine all lanes' registers (mma.sync) are emulated on top of this.
inline void warp_gather(const void* mine, size_t bytes, void* all) {
    const unsigned t = block->current;
    Barrier& warp = block->warps[t / kWarp];
    const unsigned long long phase = warp.phase;
    unsigned char* bank = block->wide + (phase % 2) * block->threads * kGather;
    memcpy(bank + t * kGather, mine, bytes);
    warp.arrive();
    wait(warp, phase);
    const unsigned first = (t / kWarp) * kWarp;
    for (unsigned lane = 0; lane < kWarp && first + lane < block->threads; ++lane) {
        memcpy(static_cast<unsigned char*>(all) + lane * bytes, bank + (first + lane) * kGather,
               bytes);
    }
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
    b.lanes = new unsigned long long[2 * b.threads]();
    b.wide = new unsigned char[2 * b.threads * kGather]();
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
