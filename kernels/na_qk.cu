// Window dot products (attention logits, and the gradient of attention weights) and the
// reduction of logit gradients onto the relative positional bias. The CUDA twin of
// rust/src/cpu/qk.rs.
#include "common.cuh"

// Dot product of `dim` channels of rows `u` and `v` (channels `su` and `sv` elements apart).
// Where both rows are dense and 16-byte aligned, the channels are read sixteen bytes at a load;
// the products are added in channel order either way, so the result is the same.
__device__ __forceinline__ acc_t na_dot(const elem_t* u, long long su, const elem_t* v,
                                       long long sv, long long dim) {
    acc_t sum = 0;
    long long c = 0;
    const unsigned long long addresses =
        reinterpret_cast<unsigned long long>(u) | reinterpret_cast<unsigned long long>(v);
    if (su == 1 && sv == 1 && addresses % 16 == 0) {
        // Not unrolled: the loads of an unrolled loop would all be in flight at once, in more
        // registers than the launch bounds leave.
#pragma unroll 1
        for (; c + NA_RUN <= dim; c += NA_RUN) {
            const NaVec16 x = *reinterpret_cast<const NaVec16*>(u + c);
            const NaVec16 y = *reinterpret_cast<const NaVec16*>(v + c);
#pragma unroll
            for (int k = 0; k < NA_RUN; ++k) {
                sum += to_acc(x.e[k]) * to_acc(y.e[k]);
            }
        }
    }
    for (; c < dim; ++c) {
        sum += to_acc(u[c * su]) * to_acc(v[c * sv]);
    }
    return sum;
}

// out[b, h, x, slot] = a[b, h, x] . b[b, h, key(x, slot)] (+ bias) for the window slots (the
// fill value for slots past a causal window's end), and a[b, h, x] . extra[b, h, e] for the
// slots after them. One thread per query row: its window is worked out once for all of its
// slots, the key addresses are stepped along the window (keys of one axis lie dilation * stride
// apart), and at each slot a warp's threads, neighbouring queries, read neighbouring keys.
extern "C" __global__ void __launch_bounds__(NA_BLOCK) na_pairwise(const NaParams p) {
    const long long rows = p.batch * p.heads * na_tokens(p);
    const long long key_step[3] = {p.dilation[0] * p.b.stride[2], p.dilation[1] * p.b.stride[3],
                                   p.dilation[2] * p.b.stride[4]};
    const long long out_step = p.out.stride[5];
    for (long long row = na_first_index(); row < rows; row += na_index_step()) {
        const NaRow r = na_row(p, row);
        const NaWindow w = na_window(p, r.x);
        const elem_t* query = na_ptr(p.a) + na_offset(p.a, r.b, r.h, r.x[0], r.x[1], r.x[2], 0);
        const elem_t* first_key = na_ptr(p.b) + na_offset(p.b, r.b, r.h, na_key(p, w, 0, 0),
                                                          na_key(p, w, 1, 0), na_key(p, w, 2, 0),
                                                          0);
        const long long at_out = na_offset(p.out, r.b, r.h, r.x[0], r.x[1], r.x[2], 0);
#pragma unroll 1
        for (int slot = 0; slot < NA_SLOTS; ++slot) {
            const int s[3] = {slot / (NA_K1 * NA_K2), (slot / NA_K2) % NA_K1, slot % NA_K2};
            bool valid = true;
#pragma unroll
            for (int a = 0; a < 3; ++a) {
                valid = valid && w.range[a].start + s[a] < w.range[a].end;
            }
            acc_t value = p.neg_inf_fill ? neg_inf() : acc_t(0);
            if (valid) {
                const elem_t* key =
                    first_key + s[0] * key_step[0] + s[1] * key_step[1] + s[2] * key_step[2];
                value = na_dot(query, p.a.stride[5], key, p.b.stride[5], p.dim);
                if (p.has_bias) {
                    value += na_load(p.bias, r.h, na_bias_index(w, 0, s[0]),
                                     na_bias_index(w, 1, s[1]), na_bias_index(w, 2, s[2]), 0, 0);
                }
            }
            na_store(p.out, at_out + slot * out_step, value);
        }
        const elem_t* extra = na_ptr(p.extra) + na_offset(p.extra, r.b, r.h, 0, 0, 0, 0);
        for (long long e = 0; e < p.extra_count; ++e) {
            const acc_t value = na_dot(query, p.a.stride[5], extra + e * p.extra.stride[2],
                                       p.extra.stride[5], p.dim);
            na_store(p.out, at_out + (NA_SLOTS + e) * out_step, value);
        }
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
    const long long entries = p.heads * NA_BIAS_SPAN;
    for (long long o = blockIdx.x; o < entries; o += gridDim.x) {
        const long long h = o / NA_BIAS_SPAN;
        int at[3];
        na_bias_indices((int)(o % NA_BIAS_SPAN), at);
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

// ---- the bias's gradient, a tile of queries at a time --------------------------------------------
// Where the host gives a scratch (p.bias.data: acc_t, a row of NA_BIAS_SPAN per tile of
// NA_BIAS_TILE_ROWS query rows of every (batch, head), batch-major then head then tile) and the
// table fits (NA_BIAS_TILES_FIT),
// d_bias takes two passes that read each logit gradient once, where na_bias_grad reads each
// row once per entry: na_bias_grad_tiles sums each tile of NA_BIAS_TILE_ROWS query rows into its
// scratch row, na_bias_grad_sum adds up each head's rows in a fixed order (the same bits on every
// run, as na_bias_grad's).
#ifndef NA_BIAS_TILE_ROWS
#error "the host gives NA_BIAS_TILE_ROWS (kernels.rs, BIAS_TILE_ROWS)"
#endif
#define NA_BIAS_WARPS (NA_REDUCE_THREADS / 32)
// Whether a copy of the table per warp fits 48 KiB of static shared memory (launch.rs,
// bias_grad_takes_tiles, asks the same).
#define NA_BIAS_TILES_FIT (NA_BIAS_WARPS * NA_BIAS_SPAN * (int)sizeof(acc_t) <= 48 * 1024)

// Tiles of query rows per (batch, head).
__device__ __forceinline__ long long na_bias_tiles(const NaParams& p) {
    return (na_tokens(p) + NA_BIAS_TILE_ROWS - 1) / NA_BIAS_TILE_ROWS;
}

// A block per tile (grid-stride): its warps take the tile's rows in turn, a lane per window slot,
// each warp adding into its own copy of the table in shared memory (the slots of one row hold
// different offsets, so a warp's lanes never meet in an entry); then the copies are added up in
// order into the tile's scratch row.
extern "C" __global__ void __launch_bounds__(NA_REDUCE_THREADS)
    na_bias_grad_tiles(const NaParams p) {
    __shared__ acc_t copies[NA_BIAS_WARPS][NA_BIAS_TILES_FIT ? NA_BIAS_SPAN : 1];
    if (!NA_BIAS_TILES_FIT) {
        return;  // (the host takes na_bias_grad then)
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long tokens = na_tokens(p), tiles = na_bias_tiles(p);
    const long long tasks = p.batch * p.heads * tiles;
    acc_t* const sums = reinterpret_cast<acc_t*>(p.bias.data);
    for (int n = threadIdx.x; n < NA_BIAS_WARPS * NA_BIAS_SPAN; n += NA_REDUCE_THREADS) {
        copies[n / NA_BIAS_SPAN][n % NA_BIAS_SPAN] = 0;
    }
    for (long long task = blockIdx.x; task < tasks; task += gridDim.x) {
        const NaDivMod bt = na_divmod(task, tiles);
        const NaDivMod bh = na_divmod(bt.quot, p.heads);
        const long long end = min((bt.rem + 1) * NA_BIAS_TILE_ROWS, tokens);
        __syncthreads();  // the copies zeroed
        for (long long t = bt.rem * NA_BIAS_TILE_ROWS + warp; t < end; t += NA_BIAS_WARPS) {
            long long x[3];
            na_token(p, t, x);
            const NaWindow w = na_window(p, x);
            const long long at = na_offset(p.w, bh.quot, bh.rem, x[0], x[1], x[2], 0);
            for (int slot = lane; slot < NA_SLOTS; slot += 32) {
                const int s[3] = {slot / (NA_K1 * NA_K2), (slot / NA_K2) % NA_K1, slot % NA_K2};
                int entry[3];
                bool valid = true;
#pragma unroll
                for (int a = 0; a < 3; ++a) {
                    valid = valid && w.range[a].start + s[a] < w.range[a].end;
                    entry[a] = (int)na_bias_index(w, a, s[a]);
                }
                if (valid) {
                    copies[warp][na_bias_number(entry[0], entry[1], entry[2])] +=
                        to_acc(na_ptr(p.w)[at + slot * p.w.stride[5]]);
                }
            }
            __syncwarp();  // the row's additions done before the next row's
        }
        __syncthreads();  // every warp's additions done
        acc_t* const row = sums + task * NA_BIAS_SPAN;
        for (int n = threadIdx.x; n < NA_BIAS_SPAN; n += NA_REDUCE_THREADS) {
            acc_t sum = 0;
#pragma unroll
            for (int c = 0; c < NA_BIAS_WARPS; ++c) {
                sum += copies[c][n];
                copies[c][n] = 0;
            }
            row[n] = sum;
        }
    }
}

// d_bias[h, entry]: a block per 32 entries of a head (a lane each), its warps taking the head's
// tile rows in turn (row r, batch-major then tile, to warp r % NA_BIAS_WARPS) and their sums
// added in warp order.
extern "C" __global__ void __launch_bounds__(NA_REDUCE_THREADS) na_bias_grad_sum(const NaParams p) {
    __shared__ acc_t partial[NA_BIAS_WARPS][32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long chunks = (NA_BIAS_SPAN + 31) / 32, tiles = na_bias_tiles(p);
    const long long rows = p.batch * tiles;
    const acc_t* const sums = reinterpret_cast<const acc_t*>(p.bias.data);
    for (long long job = blockIdx.x; job < p.heads * chunks; job += gridDim.x) {
        const long long h = job / chunks, n = job % chunks * 32 + lane;
        acc_t sum = 0;
        if (n < NA_BIAS_SPAN) {
#pragma unroll 4
            for (long long r = warp; r < rows; r += NA_BIAS_WARPS) {
                const NaDivMod bt = na_divmod(r, tiles);
                sum += sums[((bt.quot * p.heads + h) * tiles + bt.rem) * NA_BIAS_SPAN + n];
            }
        }
        const acc_t total = na_warp_order_sum(sum, partial);
        if (warp == 0 && n < NA_BIAS_SPAN) {
            int at[3];
            na_bias_indices((int)n, at);
            na_store(p.out, na_offset(p.out, h, at[0], at[1], at[2], 0, 0), total);
        }
    }
}
