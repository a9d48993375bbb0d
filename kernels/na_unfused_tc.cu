// The window products of the unfused ops on tensor cores (sm_80 and later; float16 and
// bfloat16): the logits of na_pairwise (out[x, slot] = a[x] . b[key(x, slot)] (+ bias), and
// d_attn) and the weighted sums of na_gather (out[x] = sum_slot w[x, slot] b[key(x, slot)], and
// d_query), a tile of queries per block. Problems with additional tokens take the kernels of
// na_qk.cu and na_av.cu (launch.rs decides).
//
// A block takes a tile of queries of one (batch, head) and walks the box of keys their windows
// span in slabs staged in shared memory, as the fused forward does (fused_tc.cuh: the tiling,
// the masks of which products count, the products); two staging buffers, so that a slab's copies
// run under the products of the one before. What the ops read or write per query is a row of
// window slots. Those rows live in shared memory for the whole tile (`slots`): the logits go
// there from the products' registers, element by element, and leave row by row, a warp's lanes
// along a row's slots, so that the stores are coalesced; the weights come in the same way and
// go from there into the products' registers.
//
// Parameters are the unfused ops' (NaParams, its tile and tiles set): `a` the query-side rows,
// `b` the key-side rows (keys, or values), `w` the weights, `out` the result.
#include "fused_tc.cuh"

// Blocks per SM the window products' registers are bounded for: the tensor-core kernels' bound,
// or as a benchmark sets it (rust/src/cuda/tuning.rs).
#ifndef NA_TC_UNFUSED_MIN_BLOCKS
#define NA_TC_UNFUSED_MIN_BLOCKS NA_TC_MIN_BLOCKS
#endif

#if NA_DIM != NA_DIM_V
#error "the unfused tensor-core kernels take one head dim (NA_DIM == NA_DIM_V)"
#endif
#if NA_DIM > 128
#error "the unfused tensor-core kernels take head dims up to 128"
#endif

// Keys per slab, and their 8-key blocks.
#define NA_UT_KEYS 64
#define NA_UT_KEY_BLOCKS (NA_UT_KEYS / 8)
// 16-channel steps of a product.
#define NA_UT_STEPS (NA_TC_PAD(NA_DIM) / 16)
// Elements per staged row: channels padded to whole 16-channel steps, and skewed.
#define NA_UT_PITCH (NA_TC_PAD(NA_DIM) + NA_TC_SKEW)
// Elements per row of the slot tile: odd, so that a warp's rows start in different banks.
#define NA_UT_SLOT_PITCH (NA_SLOTS | 1)

// The shared memory of a tile's walk over its key box: two buffers of staged key-side rows,
// and their columns' key numbers (na_slot_number; formed once per slab by the block rather
// than by every lane for each column it sees).
struct NaUtSlabs {
    elem_t rows[2][NA_UT_KEYS][NA_UT_PITCH];
    __align__(8) int numbers[2][NA_UT_KEYS];
};

// Shared memory of a block: the slabs, the slot tile and (na_pairwise_tc) the bias table, its
// entries staged where they fit beside the rest. launch.rs (`tensor_core_shared_bytes`, the same
// sum with a table whose entries are not staged) takes these kernels only for problems within
// the static limit.
constexpr int na_ut_slot_tile_bytes = NA_TC_ROWS * NA_UT_SLOT_PITCH * (int)sizeof(elem_t);
using NaUtBias = NaBiasTable<NA_UT_KEYS, sizeof(NaUtSlabs) + na_ut_slot_tile_bytes +
                                                 sizeof(NaBiasTable<NA_UT_KEYS, true>) <=
                                             48 * 1024>;
static_assert(sizeof(NaUtSlabs) + na_ut_slot_tile_bytes + sizeof(NaUtBias) <= 48 * 1024,
              "the slot tile, the slab buffers and the bias table fit the 48 KiB of static "
              "shared memory");

// The fused kernels' view of an unfused launch (what fused_tc.cuh reads): `a` as the queries,
// `b` as both the keys and the values, one head per kv head, no additional tokens, no scale.
__device__ __forceinline__ NaFusedParams na_fused_view(const NaParams& p) {
    NaFusedParams f = {};
    f.out = p.out;
    f.query = p.a;
    f.key = p.b;
    f.value = p.b;
    f.bias = p.bias;
    f.batch = p.batch;
    f.heads = p.heads;
    f.group = 1;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
        f.length[a] = p.length[a];
        f.dilation[a] = p.dilation[a];
    }
    f.scale = 1.0;
    f.has_window = 1;
    f.has_bias = p.has_bias;
    return f;
}

// A number for the key at group indices `c`, row-major over the kernel's extents: a key's slot
// in a window (slots are numbered row-major, as na_pairwise numbers them) is its number less
// that of the window's first key.
__device__ __forceinline__ int na_slot_number(const int c[3]) {
    return (c[0] * NA_K1 + c[1]) * NA_K2 + c[2];
}

// What a lane needs of a tile: its rows, their windows' first slot numbers and the offsets of its
// rows in a view (those of invalid rows unused).
struct NaUtTile {
    NaTcTile tl;
    NaTcRow rows[2];
    int first_slot[2];
    long long at[2];
};

__device__ __forceinline__ NaUtTile na_ut_tile(const NaParams& p, const NaFusedParams& f,
                                               const NaTcTask& job, const NaView& rows_of,
                                               int warp, int g) {
    NaUtTile u;
    u.tl = na_query_tile<NA_UT_KEYS>(p.tiling, job.tile, warp, g, u.rows);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        u.first_slot[r] = na_slot_number(u.rows[r].start);
        u.at[r] = na_tile_offset(f, u.tl, rows_of, job.batch, job.head, u.rows[r].index);
    }
    return u;
}

// Visit the warp's sixteen slot rows (row i of the warp is lane 4 (i % 8)'s row i / 8), a
// lane per slot: `visit(i, offset of row i in the view, slot)` for valid rows. Offsets and
// validity travel by shuffle from the lanes that hold them.
template <class Visit>
__device__ __forceinline__ void na_each_slot_of_rows(const NaUtTile& u, int lane, Visit&& visit) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // Unrolled in part, so that several rows' loads are in flight at once.
#pragma unroll 4
        for (int j = 0; j < 8; ++j) {
            const long long at = __shfl_sync(0xffffffffu, u.at[r], 4 * j);
            const int valid = __shfl_sync(0xffffffffu, u.rows[r].valid ? 1 : 0, 4 * j);
            if (valid) {
                for (int slot = lane; slot < NA_SLOTS; slot += NA_WARP) {
                    visit(8 * r + j, at, slot);
                }
            }
        }
    }
}

// Move the warp's sixteen rows of window slots between the slot tile from `own` and view `v`
// (into the view where TO_VIEW): row by row (na_each_slot_of_rows), or where both lay them out
// alike, as two runs of eight rows, sixteen bytes a lane. That takes a tile pitched as the slot
// count (odd windows), a view whose slots are dense and whose rows follow one another along the
// last axis (stride 1 there), eight tile rows or more along that axis (so that the warp's rows
// 0-7 and 8-15 lie along it), every row valid, and both runs 16-byte aligned in the view.
template <bool TO_VIEW>
__device__ __forceinline__ void na_move_slot_rows(const NaFusedParams& f, const NaUtTile& u,
                                                  const NaView& v, elem_t* own, int lane) {
    if (NA_UT_SLOT_PITCH == NA_SLOTS && v.stride[5] == 1 && v.stride[4] == NA_SLOTS &&
        f.dilation[2] == 1 && u.tl.tile_shift[2] >= 3) {
        elem_t* runs[2];  // where rows 0 and 8 start in the view
        bool aligned = true;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            runs[r] = reinterpret_cast<elem_t*>(v.data) + __shfl_sync(0xffffffffu, u.at[r], 0);
            aligned = aligned && reinterpret_cast<unsigned long long>(runs[r]) % 16 == 0;
        }
        if (__all_sync(0xffffffffu, u.rows[0].valid && u.rows[1].valid) && aligned) {
            // A run: 8 NA_SLOTS elements, NA_SLOTS chunks (at 8r rows of the tile, 16-byte
            // aligned as `own` is).
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                NaChunk* const tile = reinterpret_cast<NaChunk*>(own + 8 * r * NA_UT_SLOT_PITCH);
                NaChunk* const view = reinterpret_cast<NaChunk*>(runs[r]);
                for (int c = lane; c < NA_SLOTS; c += NA_WARP) {
                    if (TO_VIEW) {
                        view[c] = tile[c];
                    } else {
                        tile[c] = view[c];
                    }
                }
            }
            return;
        }
    }
    elem_t* const data = reinterpret_cast<elem_t*>(v.data);
    na_each_slot_of_rows(u, lane, [&](int i, long long at, int slot) {
        elem_t& in_view = data[at + slot * v.stride[5]];
        elem_t& in_tile = own[i * NA_UT_SLOT_PITCH + slot];
        if (TO_VIEW) {
            in_view = in_tile;
        } else {
            in_tile = in_view;
        }
    });
}

// Every slot of a warp's sixteen rows of the slot tile from `own` (16-byte aligned, as the rows
// take whole 16-byte chunks) as `value`, a chunk per store.
__device__ __forceinline__ void na_fill_rows(elem_t* own, elem_t value, int lane) {
    static_assert(16 * NA_UT_SLOT_PITCH * sizeof(elem_t) % sizeof(NaChunk) == 0,
                  "a warp's rows are whole chunks");
    constexpr int chunks = 16 * NA_UT_SLOT_PITCH * sizeof(elem_t) / sizeof(NaChunk);
    const unsigned pair = na_pack(value, value);
    const NaChunk filled = {{pair, pair, pair, pair}};
#pragma unroll
    for (int k = 0; k < (chunks + NA_WARP - 1) / NA_WARP; ++k) {
        if (lane + k * NA_WARP < chunks) {
            reinterpret_cast<NaChunk*>(own)[lane + k * NA_WARP] = filled;
        }
    }
}

// Where this lane's two rows start in a slot tile whose rows it numbers from `row` (`row` and
// `row` + 8), each moved back by its window's first slot number, so that row r's slot of the key
// numbered n (na_slot_number) is element rows[r] + n of the tile. Only the slots of keys a row
// sees (its window's) are accessed.
__device__ __forceinline__ void na_slot_rows(const NaUtTile& u, int row, int rows[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        rows[r] = (row + 8 * r) * NA_UT_SLOT_PITCH - u.first_slot[r];
    }
}

// The key numbers (na_slot_number) of this lane's columns 8 kb + 2 t and 8 kb + 2 t + 1 of a
// slab, from the slab's `numbers`, in one load.
struct __align__(8) NaColumnNumbers {
    int lo, hi;
};
__device__ __forceinline__ NaColumnNumbers na_column_numbers(const int* numbers, int kb, int t) {
    return *reinterpret_cast<const NaColumnNumbers*>(numbers + 8 * kb + 2 * t);
}

// Walk the slabs of COLUMNS keys of a tile's box with two staging buffers: `begin()` writes what
// the tile's slabs share (after the barrier that ends the last task's reads), `stage(s, buffer)`
// starts the copies of slab s, `work(s, buffer)` uses it; the next slab is staged while one is
// worked. Every thread of the block calls it (it holds the barriers).
template <int COLUMNS, class Begin, class Stage, class Work>
__device__ __forceinline__ void na_double_buffered(const NaTcTile& tl, Begin&& begin,
                                                   Stage&& stage, Work&& work) {
    const long long slabs = na_slab_count<COLUMNS>(tl, true, 0);
    NaSlab s = na_first_slab<COLUMNS>(tl, true, 0);
    __syncthreads();  // the last task's reads of both buffers (and what begin writes) done
    begin();
    if (slabs > 0) {
        stage(s, 0);
    }
    for (long long n = 0; n < slabs; ++n, s = na_next_slab<COLUMNS>(tl, s, 0)) {
        na_copies_wait();
        __syncthreads();  // slab n staged; slab n - 1 worked, so its buffer is free
        if (n + 1 < slabs) {
            stage(na_next_slab<COLUMNS>(tl, s, 0), (int)((n + 1) % 2));
        }
        work(s, (int)(n % 2));
    }
}

// Walk a tile's key box slab by slab (na_double_buffered), staged into `slabs`, calling
// `work(s, seen, live, rows, numbers)` for each slab `s` some lane of the warp sees: `seen` this
// lane's mask of it (na_slab_mask), `live` the warp's, `rows` the staged rows and `numbers`
// their key numbers; `begin()` first, as na_double_buffered's.
template <class Begin, class Work>
__device__ __forceinline__ void na_each_seen_slab(const NaFusedParams& f, const NaUtTile& u,
                                                  const NaTcTask& job, NaUtSlabs& slabs, int t,
                                                  Begin&& begin, Work&& work) {
    na_double_buffered<NA_UT_KEYS>(
        u.tl, begin,
        [&](const NaSlab& s, int buffer) {
            // f.key and f.value are the same rows (na_fused_view).
            na_stage_key_slab<NA_UT_KEYS>(f, u.tl, s, job.batch, job.head, slabs.rows[buffer][0],
                                          nullptr);
            for (int c = threadIdx.x; c < NA_UT_KEYS; c += NA_TC_THREADS) {
                int at[3];
                na_column(u.tl, s, c, at);
                slabs.numbers[buffer][c] = na_slot_number(at);
            }
        },
        [&](const NaSlab& s, int buffer) {
            const unsigned seen = na_slab_seen<NA_UT_KEY_BLOCKS>(u.tl, s, u.rows, t);
            const unsigned live = __reduce_or_sync(0xffffffffu, seen);
            if (live != 0) {
                work(s, seen, live, slabs.rows[buffer][0], slabs.numbers[buffer]);
            }
        });
}

// out[b, h, x, slot] = a[b, h, x] . b[b, h, key(x, slot)] (+ bias[h, key - x]); slots a causal
// window lacks hold -inf (neg_inf_fill) or 0.
extern "C" __global__ void __launch_bounds__(NA_TC_THREADS, NA_TC_UNFUSED_MIN_BLOCKS)
    na_pairwise_tc(const NaParams p) {
    __shared__ __align__(16) NaUtSlabs keys;
    __shared__ __align__(16) elem_t slots[NA_TC_ROWS][NA_UT_SLOT_PITCH];
    __shared__ NaUtBias bias;
    const NaFusedParams f = na_fused_view(p);
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
    elem_t* const own = slots[16 * warp];  // the warp's sixteen rows (16-byte aligned)
    const elem_t fill = from_acc(p.neg_inf_fill ? neg_inf() : acc_t(0));
    const long long tasks = na_tc_tasks(f.batch, p.tiling);
    for (long long task = blockIdx.x; task < tasks; task += gridDim.x) {
        const NaTcTask job = na_tc_task(task, p.tiling);
        const NaUtTile u = na_ut_tile(p, f, job, p.out, warp, g);
        const elem_t* query_rows[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            query_rows[r] =
                u.rows[r].valid
                    ? na_tile_row_ptr(f, u.tl, f.query, job.batch, job.head, u.rows[r].index)
                    : nullptr;
        }
        unsigned query[NA_UT_STEPS][4];
#pragma unroll
        for (int s = 0; s < NA_UT_STEPS; ++s) {
            na_a_fragment<NA_DIM>(query[s], query_rows, f.query.stride[5], s, t);
        }

        __syncwarp();  // the last task's rows stored
        na_fill_rows(own, fill, lane);
        __syncwarp();
        int slot_rows[2];
        na_slot_rows(u, g, slot_rows);

        na_each_seen_slab(
            f, u, job, keys, t, [&] { bias.stage(f, job.head, u.tl); },
            [&](const NaSlab& s, unsigned seen, unsigned live, const elem_t* rows,
                const int* numbers) {
                float logits[NA_UT_KEY_BLOCKS][4];
                na_zero<NA_UT_KEY_BLOCKS>(logits);
                na_row_products<NA_UT_STEPS, NA_UT_KEY_BLOCKS>(logits, query, rows, NA_UT_PITCH,
                                                               live, g, t);
                // Unscaled, the products are the logits but for the bias; those no row sees
                // are never stored, so only the bias needs the logits' pass.
                if (NA_TC_MAY_HAVE_BIAS && f.has_bias != 0) {
                    na_logits_with<NA_UT_KEY_BLOCKS, false>(logits, seen, f, job.head, bias,
                                                            u.tl, s, u.rows, true, t);
                }
                // (Predicated stores; a row's two columns rounded in one conversion.)
#pragma unroll
                for (int kb = 0; kb < NA_UT_KEY_BLOCKS; ++kb) {
                    const NaColumnNumbers n = na_column_numbers(numbers, kb, t);
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const unsigned pair = na_pack_acc(logits[kb][2 * r], logits[kb][2 * r + 1]);
                        if (na_seen(seen, kb, r, 0)) {
                            own[slot_rows[r] + n.lo] = (elem_t)pair;
                        }
                        if (na_seen(seen, kb, r, 1)) {
                            own[slot_rows[r] + n.hi] = (elem_t)(pair >> 16);
                        }
                    }
                }
            });

        __syncwarp();  // the warp's rows complete
        na_move_slot_rows<true>(f, u, p.out, own, lane);
    }
}

// out[b, h, x, c] = sum_slot w[b, h, x, slot] b[b, h, key(x, slot), c].
extern "C" __global__ void __launch_bounds__(NA_TC_THREADS, NA_TC_UNFUSED_MIN_BLOCKS)
    na_gather_tc(const NaParams p) {
    __shared__ __align__(16) NaUtSlabs values;
    __shared__ __align__(16) elem_t slots[NA_TC_ROWS][NA_UT_SLOT_PITCH];
    const NaFusedParams f = na_fused_view(p);
    const int lane = threadIdx.x % NA_WARP, warp = threadIdx.x / NA_WARP;
    const int g = lane / 4, t = lane % 4;
    elem_t* const own = slots[16 * warp];  // the warp's sixteen rows (16-byte aligned)
    const long long tasks = na_tc_tasks(f.batch, p.tiling);
    for (long long task = blockIdx.x; task < tasks; task += gridDim.x) {
        const NaTcTask job = na_tc_task(task, p.tiling);
        const NaUtTile u = na_ut_tile(p, f, job, p.w, warp, g);

        __syncwarp();  // the last task's rows read
        na_move_slot_rows<false>(f, u, p.w, own, lane);
        __syncwarp();
        // (Numbered across the block's tile and read from it: addressed from the tile itself,
        // the reads below take fewer instructions than from `own`.)
        const elem_t* const tile = reinterpret_cast<const elem_t*>(slots);
        int slot_rows[2];
        na_slot_rows(u, 16 * warp + g, slot_rows);

        float acc[NA_DIM / 8][4];
        na_zero<NA_DIM / 8>(acc);
        na_each_seen_slab(
            f, u, job, values, t, [] {},
            [&](const NaSlab& s, unsigned seen, unsigned live, const elem_t* rows,
                const int* numbers) {
                // The weights of the slab's columns as the products' A fragments, packed as
                // loaded (zero where a row does not see the column): word r of block kb holds
                // row g + 8 r's columns 8 kb + 2 t (low half) and 8 kb + 2 t + 1.
                unsigned w[NA_UT_KEY_BLOCKS][2];
#pragma unroll
                for (int kb = 0; kb < NA_UT_KEY_BLOCKS; ++kb) {
                    const NaColumnNumbers n = na_column_numbers(numbers, kb, t);
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const bool lo = na_seen(seen, kb, r, 0), hi = na_seen(seen, kb, r, 1);
                        w[kb][r] = na_pack(lo ? tile[slot_rows[r] + n.lo] : elem_t(0),
                                           hi ? tile[slot_rows[r] + n.hi] : elem_t(0));
                    }
                }
                na_weighted_fragments<NA_UT_KEYS / 16, NA_DIM / 8>(
                    acc,
                    [&](int kc, unsigned a[4]) {
                        a[0] = w[2 * kc][0];
                        a[1] = w[2 * kc][1];
                        a[2] = w[2 * kc + 1][0];
                        a[3] = w[2 * kc + 1][1];
                    },
                    rows, NA_UT_PITCH, 0, NA_DIM / 8, live, lane);
            });

#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (!u.rows[r].valid) {
                continue;
            }
            const long long at = na_tile_offset(f, u.tl, p.out, job.batch, job.head, u.rows[r].index);
#pragma unroll
            for (int o = 0; o < NA_DIM / 8; ++o) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    na_store(p.out, at + (8 * o + 2 * t + e) * p.out.stride[5], acc[o][2 * r + e]);
                }
            }
        }
    }
}
