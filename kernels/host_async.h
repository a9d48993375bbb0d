// The asynchronous operations for host.h (included there, after host_threads.h): cp.async
// copies, warpgroup products (wgmma), shared-memory barriers with transaction counts (mbarrier)
// and bulk tensor copies, each completing as late as a GPU allows, and the two proxies of shared
// memory whose ordering warpgroup products depend on.
#pragma once

namespace na_host {

// The two proxies of shared memory. Ordinary accesses and cp.async copies go through the generic
// proxy; wgmma's shared-memory factors and bulk tensor copies through the async proxy, which sees
// another thread's generic write only once the writer has fenced (fence.proxy.async) and then
// met the reader at a barrier (its own, right after its fence). Where the kernels take warpgroup
// products, every 16-byte chunk of dynamic shared memory (where they stage their factors)
// records the thread whose cp.async copy last wrote it, and whether that thread has fenced
// since, until the fence is published by the writer's next block barrier; a product that reads
// such a chunk before is reported. Ordinary stores count where the kernels say so (na_stored:
// the rows they stage element by element, and zeros).
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
    make_room(list.chunks, list.count, list.capacity, 256);
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
// cp.async on the host: a copy completes as late as the GPU allows, at the issuing thread's
// next wait, and its destination reads as all ones (a NaN in either half type) until then, so a
// read that comes before its wait (or, from another thread, before the barrier after that wait)
// sees NaNs instead of passing by luck. `src` null brings zeros. Copies take 16 bytes, or `size`,
// both addresses aligned to it.
inline void copy_async(void* dst, const void* src, unsigned size = 16) {
    Fiber& f = block->fibers[block->current];
    const uintptr_t to = reinterpret_cast<uintptr_t>(dst), from = reinterpret_cast<uintptr_t>(src);
    if (to % size != 0 || from % size != 0) {
        fault("a cp.async copy of %u bytes (thread %u) from %p to %p, not both %u-byte aligned",
              size, block->current, src, dst, size);
    }
    make_room(f.copies, f.pending, f.capacity, 64);
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
    make_room(f.products, f.product_count, f.product_capacity, 16);
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

// Mbarrier::initialised once mbarrier_init has run in this block (shared memory starts as all
// ones, mbarriers too).
constexpr unsigned kMbarrierInitialised = 0x6d626172;

struct Mbarrier {
    unsigned initialised;
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

// Drop `m`'s copies and their list.
inline void mbarrier_release(Mbarrier& m) {
    mbarrier_drop_copies(m);
    free(m.copies);
    m.copies = nullptr;
    m.capacity = 0;
}

// mbarrier.init: `count` arrivals expected per phase. The block keeps a list of its barriers, so
// that their copies are dropped at its end (release_mbarriers): what a barrier held before it
// was initialised is undefined.
inline void mbarrier_init(Mbarrier& m, unsigned count) {
    if (m.initialised == kMbarrierInitialised) {
        mbarrier_release(m);  // initialised again
    } else {
        make_room(block->mbarriers, block->mbarrier_count, block->mbarrier_capacity, 8);
        block->mbarriers[block->mbarrier_count++] = &m;
    }
    m = Mbarrier{kMbarrierInitialised, count, 0, 0, 0, nullptr, 0, 0};
}

// Whether `m` has been initialised in this block: if not, the launch broke a rule (a GPU's
// barrier would hold whatever the memory held), and `m` is initialised here for every thread,
// so that the emulation goes on.
inline void mbarrier_check(Mbarrier& m, const char* use) {
    if (m.initialised != kMbarrierInitialised) {
        fault("thread %u: %s an mbarrier at %p not initialised in this block", block->current, use,
              (void*)&m);
        mbarrier_init(m, block->threads);
    }
}

// Drop the copies of every barrier the block initialised, at its end.
inline void release_mbarriers(Block& b) {
    for (unsigned i = 0; i < b.mbarrier_count; ++i) {
        mbarrier_release(*b.mbarriers[i]);
    }
    b.mbarrier_count = 0;
}

// Hold `size` bytes (from `src`, or zeros) for `dst`, landing when `m`'s phase completes: a
// bulk tensor copy's, or (`writer`) a thread's cp.async copy's.
inline void mbarrier_hold(Mbarrier& m, void* dst, const void* src, size_t size, int writer = -1) {
    mbarrier_check(m, "copying onto");
    make_room(m.copies, m.pending, m.capacity, 16);
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
    mbarrier_check(m, "arriving at");
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
    mbarrier_check(m, "waiting on");
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

}  // namespace na_host
