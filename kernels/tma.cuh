// Hopper's bulk tensor copies (TMA) and the shared-memory barriers (mbarrier) they complete on,
// for the forward's warpgroup variant (na_fused_tc.cu, NA_TC_TMA). A tensor map, encoded by the
// host (rust/src/cuda/tma.rs), describes a tensor of up to five dimensions (innermost first) and
// the box one copy moves: the copy fetches the box at given coordinates into shared memory,
// dense, innermost dimension fastest, with zeros where a coordinate falls outside the tensor;
// along a dimension of element stride e it takes every e-th element (a box of n e elements
// brings n of them). A barrier counts arrivals and the bytes copies still owe it: its phase
// completes once every expected thread has arrived and every byte announced by
// na_barrier_arrive_expect has landed, and a thread waits on a phase by its parity.
#pragma once
#include "tensor_core.cuh"

// (The tensor maps and their parameter block, NaTensorMap and NaTmaParams, are common.cuh's:
// the backward's parameter block carries them too.)

// The barriers and copies exist where warpgroup products do (sm_90a, and the host build).
#if NA_HAS_WGMMA
#ifdef NA_HOST
typedef na_host::Mbarrier NaBarrier;

__device__ __forceinline__ void na_barrier_init(NaBarrier* barrier, unsigned count) {
    na_host::mbarrier_init(*barrier, count);
}
// Make initialised barriers visible to the copy engine (before the block barrier that publishes
// them).
__device__ __forceinline__ void na_barrier_init_fence() {}
__device__ __forceinline__ void na_barrier_arrive(NaBarrier* barrier) {
    na_host::mbarrier_arrive(*barrier, 0);
}
// Arrive, announcing `bytes` that copies will bring to this phase.
__device__ __forceinline__ void na_barrier_arrive_expect(NaBarrier* barrier, unsigned bytes) {
    na_host::mbarrier_arrive(*barrier, bytes);
}
// Arrive once every cp.async copy this thread has issued so far has landed (counting as one of
// the expected arrivals).
__device__ __forceinline__ void na_barrier_arrive_after_copies(NaBarrier* barrier) {
    na_host::mbarrier_arrive_after_copies(*barrier);
}
// Wait until the phase of parity `parity` has completed.
__device__ __forceinline__ void na_barrier_wait(NaBarrier* barrier, unsigned parity) {
    na_host::mbarrier_wait(*barrier, parity);
}
// Copy the box of `map` at coordinates `c` (innermost first; five of them) into `dst`,
// completing on `barrier`.
__device__ __forceinline__ void na_tensor_copy(void* dst, const NaTensorMap& map, const int c[5],
                                               NaBarrier* barrier) {
    na_host::tensor_copy(dst, &map, c, *barrier);
}
#else
typedef unsigned long long NaBarrier;

__device__ __forceinline__ unsigned na_shared_address(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void na_barrier_init(NaBarrier* barrier, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(na_shared_address(barrier)),
                 "r"(count)
                 : "memory");
}
__device__ __forceinline__ void na_barrier_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void na_barrier_arrive(NaBarrier* barrier) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(na_shared_address(barrier))
                 : "memory");
}
__device__ __forceinline__ void na_barrier_arrive_expect(NaBarrier* barrier, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                     na_shared_address(barrier)),
                 "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void na_barrier_arrive_after_copies(NaBarrier* barrier) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(
                     na_shared_address(barrier))
                 : "memory");
}
__device__ __forceinline__ void na_barrier_wait(NaBarrier* barrier, unsigned parity) {
    const unsigned address = na_shared_address(barrier);
    unsigned done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(address), "r"(parity)
            : "memory");
    }
}
__device__ __forceinline__ void na_tensor_copy(void* dst, const NaTensorMap& map, const int c[5],
                                               NaBarrier* barrier) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5, %6}], [%7];" ::"r"(na_shared_address(dst)),
        "l"(reinterpret_cast<unsigned long long>(&map)), "r"(c[0]), "r"(c[1]), "r"(c[2]),
        "r"(c[3]), "r"(c[4]), "r"(na_shared_address(barrier))
        : "memory");
}
#endif

// A ring of STAGES buffers whose items complete on one barrier each (`full`), and the parity of
// the phase each buffer's latest item completes: bit i flips as an item goes into buffer i. Every
// thread of the block keeps its own copy of the bits, in step with the others, across tiles.
template <int STAGES>
struct NaBarrierRing {
    NaBarrier* full;
    unsigned issued;  // bit i: items put into buffer i, modulo 2

    // Note an item put into buffer `buffer`.
    __device__ __forceinline__ void put(int buffer) { issued ^= 1u << buffer; }

    // Wait for the latest item of buffer `buffer`: the phase of parity one less than its count.
    __device__ __forceinline__ void wait(int buffer) const {
        na_barrier_wait(&full[buffer], ((issued >> buffer) & 1u) ^ 1u);
    }
};
#endif
