// The threads of a block for host.h (included there, after its prelude): the block barriers,
// the fibers that run its threads and their switching, what each thread has in flight, warp
// shuffles and gathers, and how a launch reports a rule of the GPU's that it broke.
#pragma once

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
struct Mbarrier;

struct Block {
    Context scheduler;
    unsigned threads = 0;
    Fiber* fibers = nullptr;
    Barrier sync;
    Barrier* warps = nullptr;
    Barrier* warpgroups = nullptr;
    unsigned char* lanes = nullptr;       // two banks of one shuffle slot (8 bytes) per thread
    unsigned char* wide = nullptr;        // two banks of one gather slot per thread
    unsigned char* agree = nullptr;       // two banks of one warpgroup slot per thread
    unsigned current = 0;
    int count[2] = {0, 0};  // two banks (by barrier phase) of __syncthreads_count's predicates
    unsigned long long arrivals = 0;  // at copy barriers (Mbarrier), counted as progress
    Mbarrier** mbarriers = nullptr;   // the copy barriers initialised in this block
    unsigned mbarrier_count = 0;
    unsigned mbarrier_capacity = 0;
    bool deadlock = false;
    bool reversed = false;  // threads run last first between switches
    void (*body)(const void*) = nullptr;
    const void* params = nullptr;
};

inline Block* block = nullptr;

// Dynamic shared memory (NA_DYNAMIC_SHARED): as much as a block may take on any GPU, used by one
// block at a time like the static arrays.
alignas(128) inline unsigned char dynamic_shared[227 * 1024];
// The bounds of the static arrays' section (`__shared__`), which the linker defines; weak, for a
// library with none.
extern "C" unsigned char __start_na_host_shared[] __attribute__((weak, visibility("hidden")));
extern "C" unsigned char __stop_na_host_shared[] __attribute__((weak, visibility("hidden")));
constexpr unsigned kWarp = 32;
constexpr unsigned kWarpgroup = 128;
constexpr size_t kStack = 256 * 1024;
constexpr size_t kGather = 64;  // bytes a lane contributes to one warp gather, at most
constexpr size_t kAgree = 64;   // bytes a thread offers sync_warpgroup_agreeing, at most

// Make room for one more item in `items` (`count` of `capacity` in use; plain data, malloc'd),
// doubling it, from `first` items.
template <class T>
inline void make_room(T*& items, unsigned count, unsigned& capacity, unsigned first) {
    if (count == capacity) {
        capacity = capacity == 0 ? first : 2 * capacity;
        items = static_cast<T*>(realloc(items, capacity * sizeof(T)));
    }
}

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

// Back to the scheduler until `barrier` has moved past `phase`.
inline void wait(Barrier& barrier, unsigned long long phase) {
    while (barrier.phase == phase && !block->deadlock) {
        switch_to(block->fibers[block->current].context, block->scheduler);
    }
}

inline void sync_warp() {
    Barrier& warp = block->warps[block->current / kWarp];
    const unsigned long long phase = warp.phase;
    warp.arrive();
    wait(warp, phase);
}

// Put `bytes` from `mine` in the running thread's slot (`slot` bytes each) of one of two banks of
// slots, by `barrier`'s phase, and meet the others at `barrier`; the bank, which holds every
// thread's offer. A thread that races ahead to the next meeting writes the other bank while
// slower ones still read this one: one barrier per meeting, not two.
inline const unsigned char* publish_and_meet(Barrier& barrier, unsigned char* banks, size_t slot,
                                             const void* mine, size_t bytes) {
    const unsigned long long phase = barrier.phase;
    unsigned char* bank = banks + (phase % 2) * block->threads * slot;
    memcpy(bank + block->current * slot, mine, bytes);
    barrier.arrive();
    wait(barrier, phase);
    return bank;
}

// A barrier of the running thread's warpgroup (the warpgroup-wide instructions' .sync.aligned),
// at which each thread offers `bytes` (at most kAgree) of its operands (publish_and_meet): whether
// they are those of the warpgroup's first thread.
inline bool sync_warpgroup_agreeing(const void* mine, size_t bytes) {
    const unsigned t = block->current;
    Barrier& group = block->warpgroups[t / kWarpgroup];
    const unsigned char* bank = publish_and_meet(group, block->agree, kAgree, mine, bytes);
    const unsigned first = t / kWarpgroup * kWarpgroup;
    return memcmp(bank + t * kAgree, bank + first * kAgree, bytes) == 0;
}

// One shuffle: publish `bits`, meet the warp (publish_and_meet), read the partner's.
inline unsigned long long exchange(unsigned long long bits, int lane_mask) {
    const unsigned t = block->current;
    Barrier& warp = block->warps[t / kWarp];
    const unsigned char* bank =
        publish_and_meet(warp, block->lanes, sizeof bits, &bits, sizeof bits);
    const unsigned partner = (t / kWarp) * kWarp + ((t % kWarp) ^ (unsigned)lane_mask);
    unsigned long long theirs;
    memcpy(&theirs, bank + partner * sizeof bits, sizeof bits);
    return theirs;
}

// One gather: publish `bytes` (at most kGather) from `mine`, meet the warp (publish_and_meet),
// read every lane's into `all` (lane order). Warp-wide instructions that combine all lanes'
// registers (mma.sync) are emulated on top of this.
inline void warp_gather(const void* mine, size_t bytes, void* all) {
    const unsigned t = block->current;
    Barrier& warp = block->warps[t / kWarp];
    const unsigned char* bank = publish_and_meet(warp, block->wide, kGather, mine, bytes);
    const unsigned first = (t / kWarp) * kWarp;
    for (unsigned lane = 0; lane < kWarp && first + lane < block->threads; ++lane) {
        memcpy(static_cast<unsigned char*>(all) + lane * bytes, bank + (first + lane) * kGather,
               bytes);
    }
}

}  // namespace na_host
