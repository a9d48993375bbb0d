// Window weighted sums (attention output, and the query gradient), their transpose over inverse
// windows (key and value gradients), and the reduction onto additional tokens. The CUDA twin of
// rust/src/cpu/av.rs. Every output element is written by one thread, so no atomics are needed
// and results do not depend on scheduling.
#include "common.cuh"

// The loop of na_gather and na_scatter: a thread per run of `W` channels [c, c + W) of an
// output row (p.run: one channel, or sixteen bytes where the rows are dense and aligned;
// launch.rs channel_run), channels fastest, so that a warp's reads along rows are coalesced.
// `add_terms(r, c, sum)` adds the row's terms into `sum` (acc_t[W]), in a fixed order.
template <int W, class AddTerms>
__device__ __forceinline__ void na_runs_of_rows(const NaParams& p, AddTerms& add_terms) {
    const long long runs = p.dim / W;
    const long long total = p.batch * p.heads * na_tokens(p) * runs;
    for (long long i = na_first_index(); i < total; i += na_index_step()) {
        const NaDivMod m = na_divmod(i, runs);
        const NaRow r = na_row(p, m.quot);
        const long long c = m.rem * W;
        acc_t sum[W];
#pragma unroll
        for (int k = 0; k < W; ++k) {
            sum[k] = 0;
        }
        add_terms(r, c, sum);
        na_store_run<W>(p.out, na_offset(p.out, r.b, r.h, r.x[0], r.x[1], r.x[2], c), sum);
    }
}

// na_runs_of_rows with the run the plan chose.
template <class AddTerms>
__device__ __forceinline__ void na_each_run(const NaParams& p, AddTerms& add_terms) {
    if (p.run == NA_RUN) {
        na_runs_of_rows<NA_RUN>(p, add_terms);
    } else {
        na_runs_of_rows<1>(p, add_terms);
    }
}

// out[b, h, x, c] = sum_slot w[b, h, x, slot] b[b, h, key(x, slot), c]
//                 + sum_e w[b, h, x, NA_SLOTS + e] extra[b, h, e, c].
// Addresses are formed once per row and stepped along the window (keys of one axis lie
// dilation * stride apart), so a slot costs a weight load, a row load and the multiply-adds.
// (A struct rather than a generic lambda: NVRTC 13.0 takes a generic lambda's call operator
// for a host function.)
struct NaGatherTerms {
    const NaParams& p;
    long long weight_step;  // between slots' weights
    long long key_step[3];  // between slots' keys along each axis

    template <int W>
    __device__ __forceinline__ void operator()(const NaRow& r, long long c, acc_t (&sum)[W]) const {
        const NaWindow w = na_window(p, r.x);
        const long long count[3] = {w.range[0].end - w.range[0].start,
                                    w.range[1].end - w.range[1].start,
                                    w.range[2].end - w.range[2].start};
        const elem_t* weights =
            na_ptr(p.w) + na_offset(p.w, r.b, r.h, r.x[0], r.x[1], r.x[2], 0);
        const elem_t* first_key = na_ptr(p.b) + na_offset(p.b, r.b, r.h, na_key(p, w, 0, 0),
                                                          na_key(p, w, 1, 0), na_key(p, w, 2, 0),
                                                          c);
        for (long long s0 = 0; s0 < count[0]; ++s0) {
            for (long long s1 = 0; s1 < count[1]; ++s1) {
                const elem_t* weight = weights + (s0 * NA_K1 + s1) * NA_K2 * weight_step;
                const elem_t* key = first_key + s0 * key_step[0] + s1 * key_step[1];
                for (long long s2 = 0; s2 < count[2]; ++s2) {
                    na_add_run<W>(sum, to_acc(*weight), key);
                    weight += weight_step;
                    key += key_step[2];
                }
            }
        }
        if (p.has_extra) {
            const elem_t* weight = weights + NA_SLOTS * weight_step;
            const elem_t* extra = na_ptr(p.extra) + na_offset(p.extra, r.b, r.h, 0, 0, 0, c);
            for (long long e = 0; e < p.extra_count; ++e) {
                const elem_t* row = extra + e * p.extra.stride[2];
                na_add_run<W>(sum, to_acc(weight[e * weight_step]), row);
            }
        }
    }
};

extern "C" __global__ void __launch_bounds__(NA_BLOCK) na_gather(const NaParams p) {
    NaGatherTerms terms{p,
                        p.w.stride[5],
                        {p.dilation[0] * p.b.stride[2], p.dilation[1] * p.b.stride[3],
                         p.dilation[2] * p.b.stride[4]}};
    na_each_run(p, terms);
}

// Queries that see key position `y` along axis `a`, in group coordinates.
struct NaInverse {
    NaGroupPos pos;  // the key's dilation group and index in it
    NaRange run;     // group indices of the queries whose window holds it
};

__device__ __forceinline__ NaInverse na_inverse(const NaParams& p, int a, long long y) {
    const NaGroupPos pos = na_group_pos(y, p.length[a], p.dilation[a]);
    return {pos, na_inverse_run(pos.index, pos.len, na_kernel(a), na_causal(a))};
}

// Slot (along axis `a`) of the key of `inv` in the window of query group index `qi`.
__device__ __forceinline__ long long na_inverse_slot(const NaInverse& inv, int a, long long qi) {
    return inv.pos.index - na_group_window(qi, inv.pos.len, na_kernel(a), 1, na_causal(a)).start;
}

// out[b, h, y, c] = sum over queries x whose window holds y of w[b, h, x, slot(x, y)] a[b, h, x, c]:
// the transpose of na_gather, as a gather over inverse windows; addresses are formed per axis
// as the loops go.
struct NaScatterTerms {
    const NaParams& p;

    template <int W>
    __device__ __forceinline__ void operator()(const NaRow& r, long long c, acc_t (&sum)[W]) const {
        const NaInverse inv[3] = {na_inverse(p, 0, r.x[0]), na_inverse(p, 1, r.x[1]),
                                  na_inverse(p, 2, r.x[2])};
        const elem_t* weights = na_ptr(p.w) + na_offset(p.w, r.b, r.h, 0, 0, 0, 0);
        const elem_t* rows = na_ptr(p.a) + na_offset(p.a, r.b, r.h, 0, 0, 0, c);
        for (long long q0 = inv[0].run.start; q0 < inv[0].run.end; ++q0) {
            const long long x0 = q0 * p.dilation[0] + inv[0].pos.group;
            const long long s0 = na_inverse_slot(inv[0], 0, q0);
            for (long long q1 = inv[1].run.start; q1 < inv[1].run.end; ++q1) {
                const long long x1 = q1 * p.dilation[1] + inv[1].pos.group;
                const long long slot01 = (s0 * NA_K1 + na_inverse_slot(inv[1], 1, q1)) * NA_K2;
                const elem_t* weight01 =
                    weights + x0 * p.w.stride[2] + x1 * p.w.stride[3] + slot01 * p.w.stride[5];
                const elem_t* row01 = rows + x0 * p.a.stride[2] + x1 * p.a.stride[3];
                for (long long q2 = inv[2].run.start; q2 < inv[2].run.end; ++q2) {
                    const long long x2 = q2 * p.dilation[2] + inv[2].pos.group;
                    const long long s2 = na_inverse_slot(inv[2], 2, q2);
                    const elem_t* weight = weight01 + x2 * p.w.stride[4] + s2 * p.w.stride[5];
                    na_add_run<W>(sum, to_acc(*weight), row01 + x2 * p.a.stride[4]);
                }
            }
        }
    }
};

extern "C" __global__ void __launch_bounds__(NA_BLOCK) na_scatter(const NaParams p) {
    NaScatterTerms terms{p};
    na_each_run(p, terms);
}

// out[b, h, e, c] = sum over queries x of w[b, h, x, NA_SLOTS + e] a[b, h, x, c].
// One block per (b, h, e, 32-channel chunk): threadIdx.x picks the channel (coalesced reads),
// threadIdx.y a fixed subset of the queries; the NA_EXTRA_ROWS partial sums are then added in
// a fixed order, so the result does not depend on scheduling.
extern "C" __global__ void __launch_bounds__(32 * NA_EXTRA_ROWS) na_extra_grad(const NaParams p) {
    __shared__ acc_t partial[NA_EXTRA_ROWS][32];
    const long long chunks = (p.dim + 31) / 32;
    const long long outputs = p.batch * p.heads * p.extra_count * chunks;
    const long long tokens = na_tokens(p);
    for (long long o = blockIdx.x; o < outputs; o += gridDim.x) {
        const long long c = (o % chunks) * 32 + threadIdx.x;
        const long long e = (o / chunks) % p.extra_count;
        const long long bh = o / (chunks * p.extra_count);
        const long long b = bh / p.heads, h = bh % p.heads;
        acc_t sum = 0;
        if (c < p.dim) {
            for (long long n = threadIdx.y; n < tokens; n += NA_EXTRA_ROWS) {
                long long x[3];
                na_token(p, n, x);
                const acc_t weight = na_load(p.w, b, h, x[0], x[1], x[2], NA_SLOTS + e);
                sum += weight * na_load(p.a, b, h, x[0], x[1], x[2], c);
            }
        }
        partial[threadIdx.y][threadIdx.x] = sum;
        __syncthreads();
        if (threadIdx.y == 0 && c < p.dim) {
            acc_t total = 0;
            for (int row = 0; row < NA_EXTRA_ROWS; ++row) {
                total += partial[row][threadIdx.x];
            }
            na_store(p.out, na_offset(p.out, b, h, e, 0, 0, c), total);
        }
        __syncthreads();
    }
}
