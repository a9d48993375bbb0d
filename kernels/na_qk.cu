// Window dot products (attention logits, and the gradient of attention weights) and the
// reduction of logit gradients onto the relative positional bias. The CUDA twin of
// rust/src/cpu/qk.rs.
#include "common.cuh"

// Sixteen bytes of elements: rows that are dense and aligned are read this many at a time.
struct __align__(16) NaVec16 {
    elem_t e[16 / sizeof(elem_t)];
};

// Dot product of `dim` channels of two rows. Where both rows are dense and 16-byte aligned, the
// channels are read sixteen bytes at a load (a warp's threads each read a different row, so
// a load of two bytes each would cost a whole memory transaction per thread); the products are
// added in channel order either way, so the result is the same.
__device__ __forceinline__ acc_t na_dot(const NaView& u, const long long iu[5], const NaView& v,
                                       const long long iv[5], long long dim) {
    const elem_t* pu = na_ptr(u) + na_offset(u, iu[0], iu[1], iu[2], iu[3], iu[4], 0);
    const elem_t* pv = na_ptr(v) + na_offset(v, iv[0], iv[1], iv[2], iv[3], iv[4], 0);
    const long long su = u.stride[5], sv = v.stride[5];
    constexpr int per_load = 16 / sizeof(elem_t);
    acc_t sum = 0;
    long long c = 0;
    const unsigned long long addresses =
        reinterpret_cast<unsigned long long>(pu) | reinterpret_cast<unsigned long long>(pv);
    if (su == 1 && sv == 1 && addresses % 16 == 0) {
        // Not unrolled: the loads of an unrolled loop would all be in flight at once, in more
        // registers than the launch bounds leave.
#pragma unroll 1
        for (; c + per_load <= dim; c += per_load) {
            const NaVec16 x = *reinterpret_cast<const NaVec16*>(pu + c);
            const NaVec16 y = *reinterpret_cast<const NaVec16*>(pv + c);
#pragma unroll
            for (int k = 0; k < per_load; ++k) {
                sum += to_acc(x.e[k]) * to_acc(y.e[k]);
            }
        }
    }
    for (; c < dim; ++c) {
        sum += to_acc(pu[c * su]) * to_acc(pv[c * sv]);
    }
    return sum;
}

// Window slot `slot` (< NA_SLOTS) of the query in row `r`: `a[x] . b[key] (+ bias)`, or the fill
// value when the slot lies past a causal window's end.
__device__ __forceinline__ acc_t na_window_logit(const NaParams& p, const NaRow& r, long long slot) {
    const long long s[3] = {slot / (NA_K1 * NA_K2), (slot / NA_K2) % NA_K1, slot % NA_K2};
    const NaWindow w = na_window(p, r.x);
    bool valid = true;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        valid = valid && w.range[a].start + s[a] < w.range[a].end;
    }
    if (!valid) {
        return p.neg_inf_fill ? neg_inf() : acc_t(0);
    }
    const long long query[5] = {r.b, r.h, r.x[0], r.x[1], r.x[2]};
    const long long key[5] = {r.b, r.h, na_key(p, w, 0, s[0]), na_key(p, w, 1, s[1]),
                              na_key(p, w, 2, s[2])};
    acc_t logit = na_dot(p.a, query, p.b, key, p.dim);
    if (p.has_bias) {
        logit += na_load(p.bias, r.h, na_bias_index(w, 0, s[0]), na_bias_index(w, 1, s[1]),
                         na_bias_index(w, 2, s[2]), 0, 0);
    }
    return logit;
}

// out[b, h, x, slot] = a[b, h, x] . b[b, h, key(x, slot)] (+ bias) for the window slots, and
// a[b, h, x] . extra[b, h, e] for the slots after them. One thread per output element.
extern "C" __global__ void __launch_bounds__(NA_BLOCK) na_pairwise(const NaParams p) {
    const long long slots = NA_SLOTS + p.extra_count;
    const long long total = p.batch * p.heads * na_tokens(p) * slots;
    for (long long i = na_first_index(); i < total; i += na_index_step()) {
        const NaDivMod m = na_divmod(i, slots);
        const NaRow r = na_row(p, m.quot);
        const long long slot = m.rem;
        acc_t value;
        if (slot < NA_SLOTS) {
            value = na_window_logit(p, r, slot);
        } else {
            const long long query[5] = {r.b, r.h, r.x[0], r.x[1], r.x[2]};
            const long long extra[5] = {r.b, r.h, slot - NA_SLOTS, 0, 0};
            value = na_dot(p.a, query, p.extra, extra, p.dim);
        }
        na_store(p.out, na_offset(p.out, r.b, r.h, r.x[0], r.x[1], r.x[2], slot), value);
    }
}

// The window slot (row-major over the axes) that holds the key at relative offset `rel` (per
// axis, in dilation steps) from the query at `x`, or -1 when that key is not in the window.
__device__ __forceinline__ long long na_slot_of_offset(const NaParams& p, const long long x[3],
                                                       const long long rel[3]) {
    long long slot = 0;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        const NaGroupPos pos = na_group_pos(x[a], p.length[a], p.dilation[a]);
        const NaRange w = na_group_window(pos.index, pos.len, na_kernel(a), 1, na_causal(a));
        const long long key = pos.index + rel[a];
        if (key < w.start || key >= w.end) {
            return -1;
        }
        slot = slot * na_kernel(a) + (key - w.start);
    }
    return slot;
}

// This thread's share of the sum of `w[b, h, x, slot]` over batch and queries, `slot` holding
// relative offset `rel`: a fixed subset of (batch, query) pairs, summed in a fixed order.
__device__ __forceinline__ acc_t na_offset_partial(const NaParams& p, long long h,
                                                   const long long rel[3]) {
    const long long tokens = na_tokens(p);
    acc_t sum = 0;
    for (long long n = threadIdx.x; n < p.batch * tokens; n += blockDim.x) {
        const NaDivMod bt = na_divmod(n, tokens);
        long long x[3];
        na_token(p, bt.rem, x);
        const long long slot = na_slot_of_offset(p, x, rel);
        if (slot >= 0) {
            sum += na_load(p.w, bt.quot, h, x[0], x[1], x[2], slot);
        }
    }
    return sum;
}

// d_bias[h, r0, r1, r2] = sum over batch and queries of the logit gradient of the slot at
// relative offset r - (K - 1). One block per bias entry and a fixed-shape tree reduction: the
// result is the same bits on every run (no atomics).
extern "C" __global__ void __launch_bounds__(NA_REDUCE_THREADS) na_bias_grad(const NaParams p) {
    __shared__ acc_t partial[NA_REDUCE_THREADS];
    const long long span[3] = {2 * NA_K0 - 1, 2 * NA_K1 - 1, 2 * NA_K2 - 1};
    const long long entries = p.heads * span[0] * span[1] * span[2];
    for (long long o = blockIdx.x; o < entries; o += gridDim.x) {
        const long long h = o / (span[0] * span[1] * span[2]);
        const long long r = o % (span[0] * span[1] * span[2]);
        const long long at[3] = {r / (span[1] * span[2]), (r / span[2]) % span[1], r % span[2]};
        long long rel[3];
#pragma unroll
        for (int a = 0; a < 3; ++a) {
            rel[a] = at[a] - (na_kernel(a) - 1);
        }
        partial[threadIdx.x] = na_offset_partial(p, h, rel);
        na_tree_sum(partial);
        if (threadIdx.x == 0) {
            na_store(p.out, na_offset(p.out, h, at[0], at[1], at[2], 0, 0), partial[0]);
        }
        __syncthreads();
    }
}
