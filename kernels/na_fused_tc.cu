// Fused neighborhood attention forward on tensor cores (sm_80 and later; float16 and bfloat16):
// the output and logsumexp of na_fused_fwd.cu, computed a block of queries at a time.
//
// A thread block takes a tile of up to NA_TC_QUERIES queries of one (batch, head): a box of
// query positions inside one dilation group per axis, shaped by the host so that neighbouring
// queries share most of their windows (a 2-D tile of a 2-D problem). Its keys are the box of
// key positions that holds all of their windows, walked in slabs of NA_TC_KEYS positions and
// then the additional tokens. A slab's key and value rows are staged in shared memory (16 bytes
// per load where rows are dense; rows padded so fragment reads do not collide in banks). Each
// warp first works out which of its logits count (keys inside each query's own window: every
// neighbourhood rule, stride and causality included, comes from the window math of
// common.cuh), skips the blocks of keys none of its 16 queries sees (a warp's queries see only
// part of the tile's box), multiplies its queries by the rest (mma.sync, float accumulators),
// and folds them into a running softmax (max and sum per query) and output,
// FlashAttention-style. Nothing is written but the output and the logsumexp.
#include "fused.cuh"
#include "tensor_core.cuh"

#if NA_DIM % 8 != 0 || NA_DIM_V % 8 != 0
#error "the tensor-core forward takes head dims that are multiples of 8"
#endif

#define NA_TC_WARPS 4
#define NA_TC_THREADS (NA_WARP * NA_TC_WARPS)
#define NA_TC_QUERIES (16 * NA_TC_WARPS)
// Keys per slab: fewer for wide rows, whose query and output fragments take more registers.
#if NA_DIM > 128 || NA_DIM_V > 128
#define NA_TC_KEYS 32
#else
#define NA_TC_KEYS 64
#endif
// 16-channel steps of a query-key product (key rows padded with zeros to whole steps), 8-key
// column blocks of a slab's logits, 8-channel column blocks of the output.
#define NA_TC_STEPS ((NA_DIM + 15) / 16)
#define NA_TC_DIM_PAD (16 * NA_TC_STEPS)
#define NA_TC_KEY_BLOCKS (NA_TC_KEYS / 8)
// Output columns are computed 128 at a time: wider outputs take more passes over the keys (their
// accumulators would not fit in registers beside the rest).
#define NA_TC_OUT_BLOCKS (NA_DIM_V / 8 < 16 ? NA_DIM_V / 8 : 16)
#define NA_TC_PASSES ((NA_DIM_V / 8 + NA_TC_OUT_BLOCKS - 1) / NA_TC_OUT_BLOCKS)
static_assert(4 * NA_TC_KEY_BLOCKS <= 32, "a slab's logit mask takes one 32-bit word per lane");
// Threads that stage one key row.
#define NA_TC_ROW_THREADS (NA_TC_THREADS / NA_TC_KEYS)
// Elements each staged row is padded by: 16 bytes, so that the eight rows a fragment read spans
// start in different banks (with rows a multiple of 128 bytes long they would all share one).
#define NA_TC_SKEW 8
// Whether a warp keeps its query fragments in registers for the whole tile; wider rows read
// them again for every product (registers go to the output instead of spilling).
#define NA_TC_QUERY_REGISTERS (NA_DIM <= 128)

// The forward's parameters and the query tiling (fused_launch::FusedTcParams).
struct NaFusedTcParams {
    NaFusedParams forward;
    long long tile[3];   // queries per tile along each axis (their product at most NA_TC_QUERIES)
    long long tiles[3];  // tiles along each axis, every dilation group's together
};

static_assert(sizeof(NaFusedTcParams) == sizeof(NaFusedParams) + 6 * 8,
              "NaFusedTcParams must match fused_launch::FusedTcParams");

// Tile `i` of one axis: its dilation group and that group's length, and the group indices
// `[first, first + count)` of its queries. Groups below `length % dilation` are one longer; each
// group is cut into tiles of `tile` queries from its start.
struct NaAxisTile {
    long long group;
    long long len;
    long long first;
    long long count;
};

__device__ __forceinline__ NaAxisTile na_axis_tile(long long i, long long length,
                                                   long long dilation, long long tile) {
    const NaDivMod l = na_divmod(length, dilation);
    const long long long_tiles = (l.quot + tile) / tile;
    const long long short_tiles = (l.quot + tile - 1) / tile;
    NaAxisTile a;
    long long j;
    if (i < l.rem * long_tiles) {
        a.group = i / long_tiles;
        j = i % long_tiles;
    } else {
        const long long k = i - l.rem * long_tiles;
        a.group = l.rem + k / short_tiles;
        j = k % short_tiles;
    }
    a.len = l.quot + (a.group < l.rem ? 1 : 0);
    a.first = j * tile;
    a.count = min(tile, a.len - a.first);
    return a;
}

// One query row of a warp's sixteen: whether it exists, and per axis its group index and window
// (group indices). Positions along one axis fit 32 bits; addresses are formed in 64.
struct NaTcRow {
    bool valid;
    int qi[3];
    int start[3];
    int end[3];
};

// Coordinates of number `n` in row-major order over `extent` (32-bit).
__device__ __forceinline__ void na_coords(int n, const int extent[3], int c[3]) {
    c[2] = n % extent[2];
    n /= extent[2];
    c[1] = n % extent[1];
    c[0] = n / extent[1];
}

// Two elements of a staged row, `at[0]` in the low half (4-byte aligned: even offsets of rows of
// an even length).
__device__ __forceinline__ unsigned na_pair(const elem_t* at) {
#ifdef NA_HOST
    return na_pack(at[0], at[1]);
#else
    return *reinterpret_cast<const unsigned*>(at);
#endif
}

// Sixteen bytes from `src` to `dst` (both 16-byte aligned).
__device__ __forceinline__ void na_copy16(elem_t* dst, const elem_t* src) {
#ifdef NA_HOST
    memcpy(dst, src, 16);
#else
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// This thread's share (`part` of NA_TC_ROW_THREADS) of staging a row of N channels from `src`
// (`step` apart; none when null) into `dst`, zeros up to `padded` channels: 16 bytes at a time
// where the row is dense and aligned, else one element at a time. N is a multiple of 8.
template <int N>
__device__ __forceinline__ void na_stage_row(elem_t* dst, const elem_t* src, long long step,
                                             int padded, int part) {
    const bool whole = src != nullptr && step == 1 &&
                       reinterpret_cast<unsigned long long>(src) % 16 == 0;
    for (int c = 8 * part; c < padded; c += 8 * NA_TC_ROW_THREADS) {
        if (whole && c < N) {
            na_copy16(dst + c, src + c);
            continue;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            dst[c + i] = src != nullptr && c + i < N ? src[(c + i) * step] : elem_t(0);
        }
    }
}

// Fragment `s` (channels 16 s .. 16 s + 15) of this lane's query rows `query[0]` (row g) and
// `query[1]` (row g + 8), missing rows and channels past NA_DIM as zeros.
__device__ __forceinline__ void na_query_fragment(unsigned frag[4], const elem_t* const query[2],
                                                  long long step, int s, int t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const elem_t* q = query[i % 2];
        const int c = 16 * s + 2 * t + 8 * (i / 2);
        frag[i] = q != nullptr && c < NA_DIM ? na_pack(q[c * step], q[(c + 1) * step]) : 0u;
    }
}

extern "C" __global__ void __launch_bounds__(NA_TC_THREADS, 1)
    na_fused_forward_tc(const NaFusedTcParams p) {
    const NaFusedParams& f = p.forward;
    __shared__ __align__(16) elem_t keys[NA_TC_KEYS][NA_TC_DIM_PAD + NA_TC_SKEW];
    __shared__ __align__(16) elem_t values[NA_TC_KEYS][NA_DIM_V + NA_TC_SKEW];
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
    const long long tiles = p.tiles[0] * p.tiles[1] * p.tiles[2];
    const long long tasks = f.batch * f.heads * tiles;
    const int tile[3] = {(int)p.tile[0], (int)p.tile[1], (int)p.tile[2]};
    // Control flow depends on the task only: every lane of a block takes every loop and barrier.
    for (long long task = blockIdx.x; task < tasks; task += gridDim.x) {
        const NaDivMod bh = na_divmod(task, tiles);
        const NaDivMod split = na_divmod(bh.quot, f.heads);
        const long long b = split.quot, h = split.rem, hk = h / f.group;
        long long index[3];
        na_token_of(p.tiles, bh.rem, index);
        // Per axis: the tile's dilation group and the box of key group indices its windows span.
        int group[3], box_first[3], box_len[3];
        NaTcRow rows[2];  // this lane's: rows g and g + 8 of its warp's sixteen
        const int local[2] = {16 * warp + g, 16 * warp + g + 8};
        int within[2][3];
        na_coords(local[0], tile, within[0]);
        na_coords(local[1], tile, within[1]);
#pragma unroll
        for (int a = 0; a < 3; ++a) {
            const NaAxisTile at = na_axis_tile(index[a], f.length[a], f.dilation[a], tile[a]);
            auto window = [&](long long qi) {
                return na_group_window(qi, at.len, na_kernel(a), na_stride(a), na_causal(a));
            };
            group[a] = (int)at.group;
            box_first[a] = (int)window(at.first).start;
            box_len[a] = (int)(window(at.first + at.count - 1).end - box_first[a]);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const NaRange w = window(at.first + within[r][a]);
                rows[r].valid = (a == 0 || rows[r].valid) && within[r][a] < at.count;
                rows[r].qi[a] = (int)at.first + within[r][a];
                rows[r].start[a] = (int)w.start;
                rows[r].end[a] = (int)w.end;
            }
        }
        auto position = [&](const NaTcRow& row, int a) {
            return (long long)row.qi[a] * f.dilation[a] + group[a];
        };
        const elem_t* query_rows[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            query_rows[r] = rows[r].valid ? na_row_ptr(f.query, b, h, position(rows[r], 0),
                                               position(rows[r], 1), position(rows[r], 2))
                                  : nullptr;
        }
#if NA_TC_QUERY_REGISTERS
        unsigned query[NA_TC_STEPS][4];
#pragma unroll
        for (int s = 0; s < NA_TC_STEPS; ++s) {
            na_query_fragment(query[s], query_rows, f.query.stride[5], s, t);
        }
#endif

#pragma unroll 1
        for (int pass = 0; pass < NA_TC_PASSES; ++pass) {
        // This pass's output columns: blocks `o` below `blocks`, channels from `first_channel`.
        const int first_channel = 8 * NA_TC_OUT_BLOCKS * pass;
        const int blocks = min(NA_TC_OUT_BLOCKS, NA_DIM_V / 8 - NA_TC_OUT_BLOCKS * pass);
        float out[NA_TC_OUT_BLOCKS][4];
#pragma unroll
        for (int o = 0; o < NA_TC_OUT_BLOCKS; ++o) {
            out[o][0] = out[o][1] = out[o][2] = out[o][3] = 0;
        }
        float row_max[2] = {neg_inf(), neg_inf()};
        float row_sum[2] = {0, 0};  // this lane's share; the quad's four add up at the end

        const long long volume =
            f.has_window ? (long long)box_len[0] * box_len[1] * box_len[2] : 0;
        const long long window_slabs = (volume + NA_TC_KEYS - 1) / NA_TC_KEYS;
        const long long slabs = window_slabs + (f.extra_count + NA_TC_KEYS - 1) / NA_TC_KEYS;
        for (long long slab = 0; slab < slabs; ++slab) {
            const bool extra = slab >= window_slabs;
            const long long first = (extra ? slab - window_slabs : slab) * NA_TC_KEYS;
            const int count =
                (int)min((long long)NA_TC_KEYS, (extra ? f.extra_count : volume) - first);

            // Stage the slab's key and value rows; rows past `count` are zeros (a zero weight
            // times a zero row adds nothing).
            __syncthreads();
            for (int n = threadIdx.x / NA_TC_ROW_THREADS; n < NA_TC_KEYS;
                 n += NA_TC_THREADS / NA_TC_ROW_THREADS) {
                const int part = threadIdx.x % NA_TC_ROW_THREADS;
                const elem_t* k = nullptr;
                const elem_t* v = nullptr;
                long long k_step = 0, v_step = 0;
                if (n < count && extra) {
                    k = na_row_ptr(f.extra_key, b, hk, first + n, 0, 0);
                    v = na_row_ptr(f.extra_value, b, hk, first + n, 0, 0);
                    k_step = f.extra_key.stride[5];
                    v_step = f.extra_value.stride[5];
                } else if (n < count) {
                    int c[3];
                    na_coords((int)first + n, box_len, c);
                    long long y[3];
#pragma unroll
                    for (int a = 0; a < 3; ++a) {
                        y[a] = (long long)(box_first[a] + c[a]) * f.dilation[a] + group[a];
                    }
                    k = na_row_ptr(f.key, b, hk, y[0], y[1], y[2]);
                    v = na_row_ptr(f.value, b, hk, y[0], y[1], y[2]);
                    k_step = f.key.stride[5];
                    v_step = f.value.stride[5];
                }
                na_stage_row<NA_DIM>(keys[n], k, k_step, NA_TC_DIM_PAD, part);
                na_stage_row<NA_DIM_V>(values[n], v, v_step, NA_DIM_V, part);
            }
            __syncthreads();

            // Which of this lane's logits count, known before any product: bit 4 kb + 2 r + e
            // when the key of logit (kb, 2 r + e) is in its query's window (or is an additional
            // token).
            auto key_position = [&](int n, int k[3]) {
                k[0] = k[1] = k[2] = 0;
                if (!extra && n < count) {
                    na_coords((int)first + n, box_len, k);
#pragma unroll
                    for (int a = 0; a < 3; ++a) {
                        k[a] += box_first[a];
                    }
                }
            };
            unsigned seen = 0;
#pragma unroll
            for (int kb = 0; kb < NA_TC_KEY_BLOCKS; ++kb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int n = 8 * kb + 2 * t + e;
                    int k[3];
                    key_position(n, k);
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const NaTcRow& row = rows[r];
                        bool in = row.valid && n < count;
#pragma unroll
                        for (int a = 0; a < 3; ++a) {
                            in = in && (extra || (row.start[a] <= k[a] && k[a] < row.end[a]));
                        }
                        seen |= (in ? 1u : 0u) << (4 * kb + 2 * r + e);
                    }
                }
            }
            // Blocks of eight keys that no query of the warp sees are skipped: their products
            // (and, for sixteen such keys, the value product) are never issued. Warp-uniform, as
            // mma.sync needs.
            const unsigned live = __reduce_or_sync(0xffffffffu, seen);
            auto block_live = [&](int kb) { return (live >> (4 * kb) & 0xfu) != 0u; };

            // Logits of this warp's sixteen queries against the slab's keys.
            float logits[NA_TC_KEY_BLOCKS][4];
#pragma unroll
            for (int kb = 0; kb < NA_TC_KEY_BLOCKS; ++kb) {
                logits[kb][0] = logits[kb][1] = logits[kb][2] = logits[kb][3] = 0;
            }
            // Without query registers, one step at a time: unrolled, the fragments' loads would
            // all be issued up front and take the registers they are meant to spare.
#if NA_TC_QUERY_REGISTERS
#pragma unroll
#else
#pragma unroll 1
#endif
            for (int s = 0; s < NA_TC_STEPS; ++s) {
#if NA_TC_QUERY_REGISTERS
                const unsigned* frag_q = query[s];
#else
                unsigned frag_q[4];
                na_query_fragment(frag_q, query_rows, f.query.stride[5], s, t);
#endif
#pragma unroll
                for (int kb = 0; kb < NA_TC_KEY_BLOCKS; ++kb) {
                    if (!block_live(kb)) {
                        continue;
                    }
                    const elem_t* key = &keys[8 * kb + g][16 * s + 2 * t];
                    const unsigned frag_k[2] = {na_pair(key), na_pair(key + 8)};
                    na_mma(logits[kb], frag_q, frag_k);
                }
            }

            // Scale, bias and mask: logits that do not count are -inf.
            float slab_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
            for (int kb = 0; kb < NA_TC_KEY_BLOCKS; ++kb) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    int k[3] = {0, 0, 0};
                    if (!extra && f.has_bias) {
                        key_position(8 * kb + 2 * t + e, k);
                    }
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const NaTcRow& row = rows[r];
                        float logit = neg_inf();
                        if (seen >> (4 * kb + 2 * r + e) & 1u) {
                            logit = logits[kb][2 * r + e] * (float)f.scale;
                            if (!extra && f.has_bias) {
                                logit += na_load(f.bias, h, k[0] - row.qi[0] + NA_K0 - 1,
                                                 k[1] - row.qi[1] + NA_K1 - 1,
                                                 k[2] - row.qi[2] + NA_K2 - 1, 0, 0);
                            }
                        }
                        logits[kb][2 * r + e] = logit;
                        slab_max[r] = fmaxf(slab_max[r], logit);
                    }
                }
            }

            // Fold the slab into the running softmax of each row (the quad of lanes that share
            // a row agree on its max).
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                slab_max[r] = fmaxf(slab_max[r], __shfl_xor_sync(0xffffffffu, slab_max[r], 1));
                slab_max[r] = fmaxf(slab_max[r], __shfl_xor_sync(0xffffffffu, slab_max[r], 2));
                const float top = fmaxf(row_max[r], slab_max[r]);
                const float rescale = row_max[r] == neg_inf() ? 0.0f : na_exp(row_max[r] - top);
                row_max[r] = top;
                float sum = 0;
#pragma unroll
                for (int kb = 0; kb < NA_TC_KEY_BLOCKS; ++kb) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float& l = logits[kb][2 * r + e];
                        l = l == neg_inf() ? 0.0f : na_exp(l - top);
                        sum += l;
                    }
                }
                row_sum[r] = row_sum[r] * rescale + sum;
#pragma unroll
                for (int o = 0; o < NA_TC_OUT_BLOCKS; ++o) {
                    out[o][2 * r] *= rescale;
                    out[o][2 * r + 1] *= rescale;
                }
            }

            // out += probabilities . values, 16 keys at a time: the probabilities of two 8-key
            // blocks are one A fragment.
#pragma unroll
            for (int kc = 0; kc < NA_TC_KEYS / 16; ++kc) {
                if (!block_live(2 * kc) && !block_live(2 * kc + 1)) {
                    continue;
                }
                const float* lo = logits[2 * kc];
                const float* hi = logits[2 * kc + 1];
                const unsigned weights[4] = {na_pack(from_acc(lo[0]), from_acc(lo[1])),
                                             na_pack(from_acc(lo[2]), from_acc(lo[3])),
                                             na_pack(from_acc(hi[0]), from_acc(hi[1])),
                                             na_pack(from_acc(hi[2]), from_acc(hi[3]))};
#pragma unroll
                for (int o = 0; o < NA_TC_OUT_BLOCKS; ++o) {
                    if (o >= blocks) {
                        break;
                    }
                    unsigned frag_v[2];
                    na_load_b_transposed(frag_v,
                                         &values[16 * kc + lane % 16][first_channel + 8 * o]);
                    na_mma(out[o], weights, frag_v);
                }
            }
        }

        // Normalise and store; a row that saw no key gives zeros and lse -inf.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float total = row_sum[r];
            total += __shfl_xor_sync(0xffffffffu, total, 1);
            total += __shfl_xor_sync(0xffffffffu, total, 2);
            const NaTcRow& row = rows[r];
            if (!row.valid) {
                continue;
            }
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            const long long x0 = position(row, 0), x1 = position(row, 1), x2 = position(row, 2);
            const long long at_out = na_offset(f.out, b, h, x0, x1, x2, 0);
#pragma unroll
            for (int o = 0; o < NA_TC_OUT_BLOCKS; ++o) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = first_channel + 8 * o + 2 * t + e;
                    if (o >= blocks) {
                        break;
                    }
                    na_store(f.out, at_out + c * f.out.stride[5], out[o][2 * r + e] * inv);
                }
            }
            if (t == 0 && pass == 0) {
                float* lse = reinterpret_cast<float*>(f.lse.data);
                lse[na_offset(f.lse, b, h, x0, x1, x2, 0)] = row_max[r] + na_log(total);
            }
        }
        }
    }
}
