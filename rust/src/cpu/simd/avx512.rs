//! The AVX-512 tier of the forward's attend kernels, for staged rows (dense float32; half
//! types are widened when they are staged). Sixteen lanes hold the partial logits of two
//! queries side by side (eight channels of each against the same key row: broadcast to both
//! halves in the general kernels, read sixteen at a time against crossed query halves in the
//! exact ones, `group_dots`), so a query pair's logits take half the multiply-adds of the AVX2
//! kernels; value sums run sixteen channels at a time, tails through lane masks.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::avx2::{self, load_partial, mask_past, max8, padded, Format, Wide};
use crate::cpu::element::{run_weights, AttendPair, PairDots, Rows, Run, WindowRuns};
use crate::cpu::keys::{KeyList, LANES};
use crate::cpu::math::avx512::exp16;

/// Query channels the pair kernel holds in registers, at most (longer rows take AVX2's).
const PAIR_DIM: usize = 256;

/// Lanes `0..n` (at most 16) of a mask.
#[inline(always)]
pub(super) fn lanes_below(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// The sixteen lane sums of `v[j]`, row `j` in lane `j` of the result (eight rows): fold the
/// 128-bit blocks of row pairs, then the pairs of lanes within blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq")]
fn sum8x16(v: [__m512; 8]) -> __m256 {
    // [A0+A2, A1+A3, B0+B2, B1+B3] (blocks of rows a and b).
    let fold = |a, b| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        )
    };
    // One block (four partial sums) per row, rows a, b of `p` then c, d of `q`.
    let blocks = |p, q| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(p, q),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(p, q),
        )
    };
    let low = blocks(fold(v[0], v[1]), fold(v[2], v[3]));
    let high = blocks(fold(v[4], v[5]), fold(v[6], v[7]));
    // Block k: [row k, row k + 4, row k, row k + 4] once the lane pairs are added.
    let y = _mm512_add_ps(_mm512_unpacklo_ps(low, high), _mm512_unpackhi_ps(low, high));
    let z = _mm512_add_ps(y, _mm512_permute_ps::<0b01_00_11_10>(y));
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castps512_ps256(_mm512_permutexvar_ps(order, z))
}

/// `a . row_j` for eight dense float32 rows, in lane `j`.
///
/// # Safety
/// Every address must hold `a.len()` readable floats.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq")]
unsafe fn dot8(a: &[f32], rows: [usize; 8]) -> __m256 {
    let rows = rows.map(|r| r as *const f32);
    let mut acc = [_mm512_setzero_ps(); 8];
    let body = a.len() - a.len() % 16;
    for c in (0..body).step_by(16) {
        // SAFETY: `c + 16 <= a.len()`.
        unsafe {
            let x = _mm512_loadu_ps(a.as_ptr().add(c));
            for j in 0..8 {
                acc[j] = _mm512_fmadd_ps(x, _mm512_loadu_ps(rows[j].add(c)), acc[j]);
            }
        }
    }
    if body < a.len() {
        let m = lanes_below(a.len() - body);
        // SAFETY: lanes past `a.len()` are masked off.
        unsafe {
            let x = _mm512_maskz_loadu_ps(m, a.as_ptr().add(body));
            for j in 0..8 {
                let row = _mm512_maskz_loadu_ps(m, rows[j].add(body));
                acc[j] = _mm512_fmadd_ps(x, row, acc[j]);
            }
        }
    }
    sum8x16(acc)
}

/// Logits `q . row_n (+ bias_n)` of `rows` into groups of eight slots of `out` (padding
/// slots at -inf); returns `max` raised lane by lane to them.
///
/// # Safety
/// Rows must hold `q.len()` readable floats; `out` holds their padded groups.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
unsafe fn logit_groups<R: Rows>(
    q: &[f32],
    rows: R,
    bias: Option<&[f32]>,
    out: &mut [f32],
    mut max: __m256,
) -> __m256 {
    let count = rows.len();
    for (start, group) in (0..count).step_by(LANES).zip(out.chunks_exact_mut(LANES)) {
        // SAFETY: by the caller's contract; `group` holds 8 floats.
        unsafe {
            let mut l = dot8(q, padded(rows, start));
            if let Some(bias) = bias {
                l = _mm256_add_ps(l, load_partial(&bias[start..count]));
            }
            l = mask_past(l, count - start);
            max = _mm256_max_ps(max, l);
            _mm256_storeu_ps(group.as_mut_ptr(), l);
        }
    }
    max
}

/// `xs[i] = e^(xs[i] - max)` over `xs` (whole groups of eight); returns the sum.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_slots(xs: &mut [f32], max: f32) -> f32 {
    let mut sum = _mm512_setzero_ps();
    for start in (0..xs.len()).step_by(16) {
        let m = lanes_below(xs.len() - start);
        // SAFETY: lanes past the slice are masked off.
        unsafe {
            let at = xs.as_mut_ptr().add(start);
            let p = exp16(_mm512_sub_ps(
                _mm512_maskz_loadu_ps(m, at),
                _mm512_set1_ps(max),
            ));
            _mm512_mask_storeu_ps(at, m, p);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, p));
        }
    }
    _mm512_reduce_add_ps(sum)
}

/// `acc[k] = sum_i sum_j w[k][g i + j] row_ij` for `Q` weight sets over the value runs of
/// `keys` (`len` rows each, weights in groups of `g` slots per run, `g` the run length
/// rounded up to whole groups of eight): channels sixteen at a
/// time, `N` blocks of them in registers, rows alternating between two sets of sums so that
/// consecutive multiply-adds do not wait on each other.
///
/// # Safety
/// Value rows must hold `acc[k].len()` readable floats.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq")]
unsafe fn weighted_runs<const Q: usize>(
    keys: &KeyList<f32>,
    len: usize,
    w: [&[f32]; Q],
    mut acc: [&mut [f32]; Q],
) {
    let dim = acc[0].len();
    let mut c = 0;
    // SAFETY (every block): channels `c..` of the rows, the tail masked.
    unsafe {
        while c + 64 <= dim {
            weighted_block::<Q, 4, false>(keys, len, w, &mut acc, c);
            c += 64;
        }
        if c + 32 <= dim {
            weighted_block::<Q, 2, false>(keys, len, w, &mut acc, c);
            c += 32;
        }
        while c + 16 <= dim {
            weighted_block::<Q, 1, false>(keys, len, w, &mut acc, c);
            c += 16;
        }
        if c < dim {
            weighted_block::<Q, 1, true>(keys, len, w, &mut acc, c);
        }
    }
}

/// Channels `c .. c + 16 N` of `weighted_runs`, those past the rows' length masked off when
/// `TAIL`.
///
/// # Safety
/// As `weighted_runs`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq")]
unsafe fn weighted_block<const Q: usize, const N: usize, const TAIL: bool>(
    keys: &KeyList<f32>,
    len: usize,
    w: [&[f32]; Q],
    acc: &mut [&mut [f32]; Q],
    c: usize,
) {
    let dim = acc[0].len();
    let group = keys.run_len.next_multiple_of(LANES);
    let masks: [__mmask16; N] = std::array::from_fn(|b| lanes_below(dim - (c + 16 * b)));
    let (mut even, mut odd) = ([[_mm512_setzero_ps(); N]; Q], [[_mm512_setzero_ps(); N]; Q]);
    // Row `j` of run `i` into `sums`, each weight set's blocks.
    let add = |sums: &mut [[__m512; N]; Q], i: usize, j: usize, row: *const f32| {
        for (k, sums) in sums.iter_mut().enumerate() {
            let weight = _mm512_set1_ps(w[k][group * i + j]);
            for (b, s) in sums.iter_mut().enumerate() {
                // SAFETY: by the caller's contract, lanes past the row masked off.
                let v = unsafe {
                    match TAIL {
                        true => _mm512_maskz_loadu_ps(masks[b], row.add(c + 16 * b)),
                        false => _mm512_loadu_ps(row.add(c + 16 * b)),
                    }
                };
                *s = _mm512_fmadd_ps(weight, v, *s);
            }
        }
    };
    for (i, (_, run)) in keys.runs(true).enumerate() {
        let mut j = 0;
        while j + 2 <= len {
            add(&mut even, i, j, run.at(j) as *const f32);
            add(&mut odd, i, j + 1, run.at(j + 1) as *const f32);
            j += 2;
        }
        if j < len {
            add(&mut even, i, j, run.at(j) as *const f32);
        }
    }
    for (k, out) in acc.iter_mut().enumerate() {
        for b in 0..N {
            let v = _mm512_add_ps(even[k][b], odd[k][b]);
            // SAFETY: lanes past the row masked off.
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(c + 16 * b), masks[b], v) };
        }
    }
}

/// An `element::Attend` kernel for dense float32 rows (see `avx2::attend`).
///
/// # Safety
/// The CPU must have the AVX-512 tier; the rest is `element::Attend`'s contract.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
pub unsafe fn attend_f32(
    q: &[f32],
    keys: &KeyList<f32>,
    with_bias: bool,
    logits: &mut [f32],
    acc: &mut [f32],
) -> (f32, f32) {
    let logits = &mut logits[..keys.padded_len()];
    let mut slot = 0;
    let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
    // SAFETY (whole block): by the caller's contract; the runs' groups, then the extras',
    // fill `padded_len` slots.
    unsafe {
        for (n, run) in keys.runs(false) {
            let bias = with_bias.then(|| &keys.bias[n..n + run.len]);
            max = logit_groups(q, run, bias, &mut logits[slot..], max);
            slot += run.len.next_multiple_of(LANES);
        }
        max = logit_groups(q, keys.extra_rows(false), None, &mut logits[slot..], max);
    }
    let max = max8(max);
    let sum = exp_slots(logits, max);
    // SAFETY: value rows hold `acc.len()` floats.
    unsafe {
        weighted_runs::<1>(keys, keys.run_len, [logits], [&mut *acc]);
        sum_extras(keys, logits, acc);
    }
    (max, sum)
}

/// `acc += sum_e w_e value_e` over the additional tokens, whose weights follow the runs'.
///
/// # Safety
/// Value rows hold `acc.len()` floats.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
unsafe fn sum_extras(keys: &KeyList<f32>, w: &[f32], acc: &mut [f32]) {
    let extra = keys.extra_rows(true);
    if extra.is_empty() {
        return;
    }
    let slot = w.len() - extra.len().next_multiple_of(LANES);
    // SAFETY: by the caller's contract.
    unsafe { avx2::sum_rows::<f32, _>(&w[slot..slot + extra.len()], extra, acc) };
}

/// An `element::AttendPair` kernel for dense float32 rows (see `avx2::attend_pair`); rows of
/// more than `PAIR_DIM` channels go to the AVX2 one.
///
/// # Safety
/// The CPU must have the AVX-512 tier; the rest is `element::AttendPair`'s contract.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
pub unsafe fn attend_pair_f32(
    q: [&[f32]; 2],
    keys: [&KeyList<f32>; 2],
    offset: usize,
    with_bias: bool,
    logits: [&mut [f32]; 2],
    acc: [&mut [f32]; 2],
) -> [(f32, f32); 2] {
    if q[0].len() > PAIR_DIM {
        // SAFETY: forwarded contract; the tier includes AVX2.
        return unsafe { avx2::attend_pair::<f32>(q, keys, offset, with_bias, logits, acc) };
    }
    let [ka, kb] = keys;
    if ka.len == ka.window {
        if let Some(kernel) = exact_pair_kernel(q[0].len(), acc[0].len()) {
            // SAFETY: forwarded contract; the kernel's widths are the rows'.
            return unsafe { kernel(q, keys, offset, with_bias, logits, acc) };
        }
    }
    let union = offset + kb.run_len;
    let dim = q[0].len();
    // Eight channels of each query side by side, per group of eight channels.
    let mut both = [MaybeUninit::<__m512>::uninit(); PAIR_DIM / 8];
    for (g, c) in (0..dim).step_by(8).enumerate() {
        let m = lanes_below(dim - c) as __mmask8;
        // SAFETY: lanes past the query masked off.
        both[g].write(unsafe {
            _mm512_insertf32x8::<1>(
                _mm512_castps256_ps512(_mm256_maskz_loadu_ps(m, q[0].as_ptr().add(c))),
                _mm256_maskz_loadu_ps(m, q[1].as_ptr().add(c)),
            )
        });
    }
    let groups = dim.div_ceil(8);
    // Lanes outside each query's own window (first query in lanes 0..8, second in 8..16).
    let inside_a = (1u16 << ka.run_len) - 1;
    let inside_b = ((1u16 << union) - 1) & !((1u16 << offset) - 1);
    let outside = !(inside_a | inside_b << 8);
    let [la, lb] = logits;
    let (la, lb) = (&mut la[..ka.padded_len()], &mut lb[..kb.padded_len()]);
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut max = neg_inf;
    for (i, ((na, run), (nb, _))) in ka.runs(false).zip(kb.runs(false)).enumerate() {
        let rows = padded(Run { len: union, ..run }, 0).map(|r| r as *const f32);
        let mut sums = [_mm512_setzero_ps(); 8];
        for (g, x) in both[..groups].iter().enumerate() {
            // SAFETY: the first `groups` were written above.
            let x = unsafe { x.assume_init() };
            let c = 8 * g;
            let m = lanes_below(dim - c) as __mmask8;
            for j in 0..8 {
                // SAFETY: union rows are keys of one of the queries (rows of `dim` floats);
                // lanes past the row masked off.
                let row = unsafe {
                    match c + 8 <= dim {
                        true => _mm256_loadu_ps(rows[j].add(c)),
                        false => _mm256_maskz_loadu_ps(m, rows[j].add(c)),
                    }
                };
                sums[j] = _mm512_fmadd_ps(x, _mm512_broadcast_f32x8(row), sums[j]);
            }
        }
        let mut l = sum_pairs(sums);
        if with_bias {
            let mut shifted = [0.0f32; 16];
            shifted[..ka.run_len].copy_from_slice(&ka.bias[na..na + ka.run_len]);
            shifted[8 + offset..8 + union].copy_from_slice(&kb.bias[nb..nb + kb.run_len]);
            // SAFETY: `shifted` holds 16 floats.
            l = _mm512_add_ps(l, unsafe { _mm512_loadu_ps(shifted.as_ptr()) });
        }
        l = _mm512_mask_blend_ps(outside, l, neg_inf);
        max = _mm512_max_ps(max, l);
        // SAFETY: slots `8 i .. 8 i + 8` lie within both padded lists.
        unsafe {
            _mm256_storeu_ps(la.as_mut_ptr().add(LANES * i), _mm512_castps512_ps256(l));
            _mm256_storeu_ps(
                lb.as_mut_ptr().add(LANES * i),
                _mm512_extractf32x8_ps::<1>(l),
            );
        }
    }
    let slot = ka.run_count * LANES;
    let halves = [
        _mm512_castps512_ps256(max),
        _mm512_extractf32x8_ps::<1>(max),
    ];
    // SAFETY: the extras are the same rows for both queries; their groups follow the runs'.
    let max = unsafe {
        [
            logit_groups(q[0], ka.extra_rows(false), None, &mut la[slot..], halves[0]),
            logit_groups(q[1], kb.extra_rows(false), None, &mut lb[slot..], halves[1]),
        ]
    }
    .map(|m| max8(m));
    let sums = [exp_slots(la, max[0]), exp_slots(lb, max[1])];
    let [acc_a, acc_b] = acc;
    // SAFETY: value rows hold `acc.len()` floats.
    unsafe {
        weighted_runs::<2>(ka, union, [la, lb], [&mut *acc_a, &mut *acc_b]);
        sum_extras(ka, la, acc_a);
        sum_extras(kb, lb, acc_b);
    }
    [(max[0], sums[0]), (max[1], sums[1])]
}

/// The dots of two vectors (`crossed`, `8 G` channels) with the eight rows at `$rows`
/// (`group_rows`), rows of element type `T` (widened to float32 as they are loaded): row `j`'s
/// in lanes `j` (first vector) and `8 + j` (second). Each row is read sixteen channels a load
/// and multiplied with both crossed halves of a block: lanes 0..8 then hold the first vector's
/// partial sums of the block's low channels and the second's of its high ones, or the reverse,
/// and one swap of halves per row lines them up for `sum_pairs`. (Broadcasting eight channels
/// into both halves instead cost a shuffle per load on Zen 4: P1's forward 1.06x the time. On
/// an Intel Xeon with AMX, where such a broadcast is a plain load, it took these dot products
/// 0.77x the time alone, on P1's rows in cache, yet the forward the same time.) Bfloat16 rows
/// dotted in pairs of channels by AVX512_BF16 (`vdpbf16ps`, half the multiply-adds) took that
/// Xeon 1.25x the time of these float32 ones, and were not built into a kernel. A macro
/// rather than a function: as an inlined function it cost the forward's pair kernel about a
/// fifth (its registers were allocated worse).
///
/// Unsafe to expand: the CPU must have the AVX-512 tier and the rows hold `8 G` elements.
macro_rules! group_dots {
    ($T:ty, $crossed:expr, $rows:expr) => {{
        let rows: [*const $T; 8] = $rows;
        let crossed: &[__m512] = &$crossed;
        let mut straight = [_mm512_setzero_ps(); 8];
        let mut swapped = [_mm512_setzero_ps(); 8];
        for (b, pair) in crossed.chunks_exact(2).enumerate() {
            for j in 0..8 {
                let row = load16::<$T>(rows[j].add(16 * b));
                straight[j] = _mm512_fmadd_ps(pair[0], row, straight[j]);
                swapped[j] = _mm512_fmadd_ps(pair[1], row, swapped[j]);
            }
        }
        let sums: [__m512; 8] = std::array::from_fn(|j| {
            let back = _mm512_shuffle_f32x4::<0b01_00_11_10>(swapped[j], swapped[j]);
            _mm512_add_ps(straight[j], back)
        });
        sum_pairs(sums)
    }};
}

/// Byte offsets from a run's first row to its union rows `first..first + 8` (those past
/// `union` repeat row `first`), rows `step` bytes apart: the same for every run of a list, so
/// found once per group rather than once per run.
#[inline(always)]
fn group_offsets(first: usize, union: usize, step: isize) -> [isize; 8] {
    let count = (union - first).min(LANES);
    std::array::from_fn(|j| (first + if j < count { j } else { 0 }) as isize * step)
}

/// The rows of `run` at `offsets` (`group_offsets`).
#[inline(always)]
fn group_rows<T>(run: Run, offsets: &[isize; 8]) -> [*const T; 8] {
    offsets.map(|o| run.first.wrapping_add_signed(o) as *const T)
}

/// The pair kernel unrolled for rows of `dim` channels, keys and values alike, where there is
/// one (16, 32 or 64 channels). It takes unions of any length (see `attend_pair_exact`).
pub fn exact_pair_kernel(dim: usize, dim_v: usize) -> Option<AttendPair<f32>> {
    match (dim, dim_v) {
        (16, 16) => Some(attend_pair_exact::<2>),
        (32, 32) => Some(attend_pair_exact::<4>),
        (64, 64) => Some(attend_pair_exact::<8>),
        _ => None,
    }
}

/// `attend_pair_f32` for rows of exactly `8 G` channels and no additional tokens, loops
/// unrolled over the channels, for unions of any length (taken eight rows at a time; its
/// union rows must all be keys of one of the queries): each group's sixteen logits (eight
/// union rows against both queries) stay side by side in one vector from the dot products
/// through the softmax, so both queries' exponentials take one call per group, and the value
/// sums weight each row for both queries from one load.
///
/// Three phases, each over every run: dot products, exponentials, value sums. Timed alone on
/// P1's rows (one thread, rows in cache) they take about 50, 22 and 33 ns per query; the dot
/// products run at about two thirds of the multiply-add pipes' rate, held back by their lane
/// sums. Taking the exponentials against the first run's maximum, so that no phase waits for
/// all the logits, was slower every way it was tried (P1's forward, one thread, against 160
/// to 166 ns per query): the exponentials in the dot products' loop 177, all three in one
/// loop 231, the value sums one group behind 198, each stage an iteration behind the last
/// 192. Long dependency chains issued among independent work fill the out-of-order window;
/// phase by phase, each phase's work is independent and the window holds enough of it.
///
/// # Safety
/// As `attend_pair_f32` but for the union's length, with queries and outputs of `8 G`
/// channels, no extras, and logit scratch (the first slice) of at least sixteen slots per
/// group of eight union rows per run.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
unsafe fn attend_pair_exact<const G: usize>(
    q: [&[f32]; 2],
    keys: [&KeyList<f32>; 2],
    offset: usize,
    with_bias: bool,
    logits: [&mut [f32]; 2],
    acc: [&mut [f32]; 2],
) -> [(f32, f32); 2] {
    let [ka, kb] = keys;
    let [logits, _] = logits;
    let union = offset + kb.run_len;
    let groups = union.div_ceil(LANES);
    // SAFETY (whole block): queries hold 8 G floats; union rows are keys of one of the
    // queries (rows of 8 G floats); the scratch holds sixteen slots per group.
    unsafe {
        let halves = crossed::<G>(q);
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut max = neg_inf;
        // Groups outside, runs inside: a group's masks and row offsets hold for every run.
        for (group, first) in (0..union).step_by(LANES).enumerate() {
            // Lanes of the group's rows in each query's window: the first query's in lanes
            // 0..8, the second's in 8..16.
            let below = |n: usize| lanes_below(n.saturating_sub(first).min(LANES));
            let inside_a = below(ka.run_len);
            let inside_b = (below(union) & !below(offset)) << 8;
            let offsets = group_offsets(first, union, ka.steps.0);
            for (i, ((na, run), (nb, _))) in ka.runs(false).zip(kb.runs(false)).enumerate() {
                let mut l = group_dots!(f32, halves, group_rows(run, &offsets));
                if with_bias {
                    let a =
                        _mm512_maskz_loadu_ps(inside_a, ka.bias.as_ptr().wrapping_add(na + first));
                    // Lane 8 + j holds union row `first + j`, the second query's key
                    // `first + j - offset`.
                    let from = kb
                        .bias
                        .as_ptr()
                        .wrapping_add(nb + first)
                        .wrapping_sub(8 + offset);
                    l = _mm512_add_ps(l, _mm512_mask_loadu_ps(a, inside_b, from));
                }
                l = _mm512_mask_blend_ps(inside_a | inside_b, neg_inf, l);
                max = _mm512_max_ps(max, l);
                _mm512_storeu_ps(logits.as_mut_ptr().add(2 * LANES * (i * groups + group)), l);
            }
        }
        let max = half_reduce(max, |a, b| _mm512_max_ps(a, b));
        let mut total = _mm512_setzero_ps();
        for i in 0..ka.run_count * groups {
            let at = logits.as_mut_ptr().add(2 * LANES * i);
            let p = exp16(_mm512_sub_ps(_mm512_loadu_ps(at), max));
            _mm512_storeu_ps(at, p);
            total = _mm512_add_ps(total, p);
        }
        let total = half_reduce(total, |a, b| _mm512_add_ps(a, b));
        weighted_pair::<G>(ka, union, logits, acc);
        let lane = |v: __m512, k: usize| {
            let mut out = [0.0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), v);
            out[8 * k]
        };
        [
            (lane(max, 0), lane(total, 0)),
            (lane(max, 1), lane(total, 1)),
        ]
    }
}

/// The dots kernel unrolled for vectors of `dim` channels and rows of `dim` elements of `T`,
/// where there is one (16, 32 or 64 channels; see `pair_dots_exact`).
pub fn exact_pair_dots<T: Wide>(dim: usize) -> Option<PairDots<f32>> {
    match dim {
        16 => Some(pair_dots_exact::<2, T>),
        32 => Some(pair_dots_exact::<4, T>),
        64 => Some(pair_dots_exact::<8, T>),
        _ => None,
    }
}

/// A `PairDots` kernel for dense rows of exactly `8 G` elements of `T`: each group of eight
/// union rows is read once for both vectors (first vector in lanes 0..8, second in 8..16, as
/// in `attend_pair_exact`), and each side's lanes are stored straight to its window positions.
///
/// # Safety
/// The CPU must have the AVX-512 tier; the rest is `PairDots`' contract, with vectors and rows
/// of `8 G` floats.
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
unsafe fn pair_dots_exact<const G: usize, T: Wide>(
    v: [&[f32]; 2],
    keys: [&KeyList<f32>; 2],
    offset: usize,
    values: bool,
    out: [&mut [f32]; 2],
) {
    let [ka, kb] = keys;
    let union = offset + kb.run_len;
    let [out_a, out_b] = out;
    let (out_a, out_b) = (out_a.as_mut_ptr(), out_b.as_mut_ptr());
    // SAFETY (whole block): vectors hold 8 G floats; union rows are rows of one of the lists
    // (8 G elements of T each); every store lane left on is a window position of its side's
    // output.
    unsafe {
        let halves = crossed::<G>(v);
        let step = if values { ka.steps.1 } else { ka.steps.0 };
        for first in (0..union).step_by(LANES) {
            let below = |n: usize| lanes_below(n.saturating_sub(first).min(LANES));
            let inside_a = below(ka.run_len) as __mmask8;
            let inside_b = (below(union) & !below(offset)) as __mmask8;
            let offsets = group_offsets(first, union, step);
            for (i, (_, run)) in ka.runs(values).enumerate() {
                let l = group_dots!(T, halves, group_rows(run, &offsets));
                // Lane j holds union row `first + j`: the first side's position `first + j` of
                // run i, the second side's `first + j - offset`.
                let a = out_a.wrapping_add(i * ka.run_len + first);
                let b = out_b
                    .wrapping_add(i * kb.run_len + first)
                    .wrapping_sub(offset);
                _mm256_mask_storeu_ps(a, inside_a, _mm512_castps512_ps256(l));
                _mm256_mask_storeu_ps(b, inside_b, _mm512_extractf32x8_ps::<1>(l));
            }
        }
    }
}

/// Two vectors of `8 G` floats (`G` even) crossed, sixteen channels at a time, for
/// `group_dots`: `out[2 b]` holds the first vector's channels `16 b..16 b + 8` in lanes 0..8
/// and the second's `16 b + 8..16 b + 16` in lanes 8..16; `out[2 b + 1]` the other halves
/// (the second's low channels, the first's high ones).
///
/// # Safety
/// The CPU must have the AVX-512 tier; both vectors hold `8 G` floats.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
unsafe fn crossed<const G: usize>(v: [&[f32]; 2]) -> [__m512; G] {
    // SAFETY: by the caller's contract.
    std::array::from_fn(|i| unsafe {
        let (a, b) = (v[i % 2].as_ptr(), v[1 - i % 2].as_ptr());
        let at = 16 * (i / 2);
        _mm512_mask_blend_ps(
            0xff00,
            _mm512_loadu_ps(a.add(at)),
            _mm512_loadu_ps(b.add(at)),
        )
    })
}

/// Sixteen elements at `p`, as float32.
///
/// # Safety
/// The CPU must have the AVX-512 tier; 16 readable elements at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
unsafe fn load16<T: Wide>(p: *const T) -> __m512 {
    // SAFETY: by the caller's contract.
    unsafe {
        match T::FORMAT {
            Format::F32 => _mm512_loadu_ps(p as *const f32),
            Format::BF16 => {
                let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves))
            }
            Format::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        }
    }
}

/// `len` rows of `n` elements, `step` elements apart from `src` on, widened to consecutive
/// float32 rows at `dst`: sixteen elements a load, the row's tail through a lane mask.
///
/// # Safety
/// The CPU must have the AVX-512 tier; `src` must hold the rows and `dst` `len * n` writable
/// floats.
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
pub unsafe fn widen_rows<T: Wide>(
    src: *const T,
    step: isize,
    dst: *mut f32,
    (n, len): (usize, usize),
) {
    let body = n - n % 16;
    let tail = lanes_below(n - body);
    // SAFETY (whole block): inside the rows and `dst` by the caller's contract, lanes past a
    // row masked off.
    unsafe {
        for r in 0..len {
            let (from, to) = (src.offset(r as isize * step), dst.add(r * n));
            for c in (0..body).step_by(16) {
                _mm512_storeu_ps(to.add(c), load16(from.add(c)));
            }
            if body < n {
                _mm512_mask_storeu_ps(to.add(body), tail, load16_masked(from.add(body), tail));
            }
        }
    }
}

/// The elements of `p` in the lanes of `mask` (at most sixteen), as float32; zero elsewhere.
///
/// # Safety
/// The CPU must have the AVX-512 tier; the masked lanes' elements at `p` readable.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
unsafe fn load16_masked<T: Wide>(p: *const T, mask: __mmask16) -> __m512 {
    // SAFETY: by the caller's contract.
    unsafe {
        match T::FORMAT {
            Format::F32 => _mm512_maskz_loadu_ps(mask, p as *const f32),
            Format::BF16 => {
                let halves = _mm256_maskz_loadu_epi16(mask, p as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
            }
            Format::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
        }
    }
}

/// `op` over the lanes of each half of `v` (lanes 0..8, then 8..16), in every lane of it.
#[inline]
#[target_feature(enable = "avx512f")]
fn half_reduce(v: __m512, op: impl Fn(__m512, __m512) -> __m512) -> __m512 {
    let v = op(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
    let v = op(v, _mm512_permute_ps::<0b01_00_11_10>(v));
    op(v, _mm512_permute_ps::<0b10_11_00_01>(v))
}

/// The value sums of `attend_pair_exact`: `acc[k] = sum_i sum_j w[16 (i groups + j / 8) +
/// 8 k + j % 8] row_ij` over the first `len` rows of each value run (`groups` groups of eight
/// slots per run), `8 G` channels (`G` even, at most 8), in registers sixteen at a time.
///
/// # Safety
/// As `attend_pair_exact`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
unsafe fn weighted_pair<const G: usize>(
    keys: &KeyList<f32>,
    len: usize,
    w: &[f32],
    acc: [&mut [f32]; 2],
) {
    const {
        assert!(
            G.is_multiple_of(2) && G <= 8,
            "whole blocks of sixteen channels, four at most"
        )
    };
    // Rows alternate between two sets of sums, so consecutive multiply-adds are independent.
    let mut even = [[_mm512_setzero_ps(); 2]; 4];
    let mut odd = [[_mm512_setzero_ps(); 2]; 4];
    let add = |sums: &mut [[__m512; 2]; 4], row: *const f32, wa: f32, wb: f32| {
        let (wa, wb) = (_mm512_set1_ps(wa), _mm512_set1_ps(wb));
        for (b, s) in sums.iter_mut().enumerate().take(G / 2) {
            // SAFETY: value rows hold 8 G floats.
            let v = unsafe { _mm512_loadu_ps(row.add(16 * b)) };
            s[0] = _mm512_fmadd_ps(wa, v, s[0]);
            s[1] = _mm512_fmadd_ps(wb, v, s[1]);
        }
    };
    // SAFETY (whole block): by the caller's contract.
    unsafe {
        let mut slot = w.as_ptr();
        for (_, run) in keys.runs(true) {
            for first in (0..len).step_by(LANES) {
                let count = (len - first).min(LANES);
                let row = |j: usize| run.at(first + j) as *const f32;
                let mut j = 0;
                while j + 2 <= count {
                    add(&mut even, row(j), *slot.add(j), *slot.add(8 + j));
                    add(&mut odd, row(j + 1), *slot.add(j + 1), *slot.add(9 + j));
                    j += 2;
                }
                if j < count {
                    add(&mut even, row(j), *slot.add(j), *slot.add(8 + j));
                }
                slot = slot.add(2 * LANES);
            }
        }
        for (k, out) in acc.into_iter().enumerate() {
            for b in 0..G / 2 {
                let v = _mm512_add_ps(even[b][k], odd[b][k]);
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * b), v);
            }
        }
    }
}

/// Call `$block::<.., N, TAIL>(args)` for the channels of rows of `$dim`, `c` (bound in the
/// args) stepping 64 at a time: `N` blocks of sixteen channels in registers (four, or fewer for
/// the last), `TAIL` when the last block is partial (its lanes past the rows masked off).
macro_rules! by_channel_blocks {
    ($dim:expr, |$c:ident| $block:ident $(::<$($g:ty),*>)? ($($arg:expr),* $(,)?)) => {
        for $c in (0..$dim).step_by(64) {
            let left = $dim - $c;
            match (left.div_ceil(16).min(4), !left.is_multiple_of(16) && left < 64) {
                (4, false) => $block::<$($($g,)*)? 4, false>($($arg),*),
                (4, true) => $block::<$($($g,)*)? 4, true>($($arg),*),
                (3, false) => $block::<$($($g,)*)? 3, false>($($arg),*),
                (3, true) => $block::<$($($g,)*)? 3, true>($($arg),*),
                (2, false) => $block::<$($($g,)*)? 2, false>($($arg),*),
                (2, true) => $block::<$($($g,)*)? 2, true>($($arg),*),
                (_, false) => $block::<$($($g,)*)? 1, false>($($arg),*),
                (_, true) => $block::<$($($g,)*)? 1, true>($($arg),*),
            }
        }
    };
}

/// `Accum::spread_pair` for float32: both vectors' channels in registers (64 at a time, the
/// last block's lanes past the rows masked off) while every run of the window is updated, each
/// row loaded and stored once for both (one call per window: per run, the call and the
/// vectors' loads cost about what a run's rows did).
///
/// # Safety
/// The CPU must have the AVX-512 tier; the rest is `Accum::spread_pair`'s contract.
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
pub unsafe fn spread_pair<R: WindowRuns>(w: [&[f32]; 2], offset: usize, x: [&[f32]; 2], runs: R) {
    let dim = x[0].len();
    // SAFETY (whole block): channels `c..` of both vectors and of every row, the tail masked.
    unsafe {
        by_channel_blocks!(dim, |c| spread_pair_block::<R>(w, offset, x, runs, c));
    }
}

/// Channels `c..c + 16 N` of `spread_pair` (those past the rows masked off when `TAIL`). Each
/// run's rows come in three stretches, so that no row asks which windows hold it: the first
/// query's alone (`0..offset`), both queries' (`offset..` the first's end), the second's
/// alone (to the run's end).
///
/// # Safety
/// As `spread_pair`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
unsafe fn spread_pair_block<R: WindowRuns, const N: usize, const TAIL: bool>(
    w: [&[f32]; 2],
    offset: usize,
    x: [&[f32]; 2],
    runs: R,
    c: usize,
) {
    let dim = x[0].len();
    let masks: [__mmask16; N] = std::array::from_fn(|i| lanes_below(dim - (c + 16 * i)));
    let lens = run_weights(w, runs);
    let (first_end, union) = (lens[0], offset + lens[1]);
    // SAFETY (whole block): by the caller's contract, lanes past the rows masked off.
    unsafe {
        let load = |p: *const f32, i: usize| match TAIL {
            true => _mm512_maskz_loadu_ps(masks[i], p),
            false => _mm512_loadu_ps(p),
        };
        let xs = x.map(|x| -> [__m512; N] {
            std::array::from_fn(|i| load(x.as_ptr().add(c + 16 * i), i))
        });
        // `row += sum_k weight_k xs[k]` over the vectors `k` of `which`.
        let add = |row: usize, weights: [f32; 2], which: [bool; 2]| {
            let row = (row as *mut f32).add(c);
            let weights = weights.map(|w| _mm512_set1_ps(w));
            for i in 0..N {
                let r = row.add(16 * i);
                let mut sum = load(r, i);
                for k in 0..2 {
                    if which[k] {
                        sum = _mm512_fmadd_ps(weights[k], xs[k][i], sum);
                    }
                }
                match TAIL {
                    true => _mm512_mask_storeu_ps(r, masks[i], sum),
                    false => _mm512_storeu_ps(r, sum),
                }
            }
        };
        let (mut wa, mut wb) = (w[0].as_ptr(), w[1].as_ptr());
        for run in runs.runs() {
            for j in 0..offset {
                add(run.at(j), [*wa.add(j), 0.0], [true, false]);
            }
            for j in offset..first_end {
                add(run.at(j), [*wa.add(j), *wb.add(j - offset)], [true, true]);
            }
            for j in first_end..union {
                add(run.at(j), [0.0, *wb.add(j - offset)], [false, true]);
            }
            (wa, wb) = (wa.add(lens[0]), wb.add(lens[1]));
        }
    }
}

/// `Element::sum_pair` for rows of `T` (widened as they are loaded): up to 64 channels of both
/// queries' sums in registers over every run of the window, each union row loaded once for
/// both (a query whose window misses a row weighs it 0); rows alternate between two sets of
/// sums, so that consecutive multiply-adds do not wait on each other.
///
/// # Safety
/// The CPU must have the AVX-512 tier; the rest is `Element::sum_pair`'s contract.
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
pub unsafe fn sum_pair<T: Wide, R: WindowRuns>(
    w: [&[f32]; 2],
    offset: usize,
    runs: R,
    acc: [&mut [f32]; 2],
) {
    let dim = acc[0].len();
    let [acc_a, acc_b] = acc;
    // SAFETY (whole block): channels `c..` of both sums and of every row, the tail masked.
    unsafe {
        by_channel_blocks!(dim, |c| sum_pair_block::<T, R>(
            w,
            offset,
            runs,
            ([&mut *acc_a, &mut *acc_b], c)
        ));
    }
}

/// Channels `c..c + 16 N` of `sum_pair` (those past the rows masked off when `TAIL`).
///
/// # Safety
/// As `sum_pair`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
unsafe fn sum_pair_block<T: Wide, R: WindowRuns, const N: usize, const TAIL: bool>(
    w: [&[f32]; 2],
    offset: usize,
    runs: R,
    (acc, c): ([&mut [f32]; 2], usize),
) {
    let dim = acc[0].len();
    let masks: [__mmask16; N] = std::array::from_fn(|i| lanes_below(dim - (c + 16 * i)));
    let lens = run_weights(w, runs);
    // Per set: the first query's sums, then the second's.
    let mut even = [[_mm512_setzero_ps(); N]; 2];
    let mut odd = [[_mm512_setzero_ps(); N]; 2];
    // SAFETY (whole block): by the caller's contract, lanes past the rows masked off.
    unsafe {
        for (n, run) in runs.runs().enumerate() {
            let wa = &w[0][n * lens[0]..][..lens[0]];
            let wb = &w[1][n * lens[1]..][..lens[1]];
            let weight = |j: usize| {
                let a = wa.get(j).copied().unwrap_or(0.0);
                let b = j.checked_sub(offset).map_or(0.0, |i| wb[i]);
                (a, b)
            };
            let union = offset + lens[1];
            let mut j = 0;
            while j + 2 <= union {
                pair_row_sums::<T, N, TAIL>(&mut even, run.at(j), weight(j), (c, masks));
                pair_row_sums::<T, N, TAIL>(&mut odd, run.at(j + 1), weight(j + 1), (c, masks));
                j += 2;
            }
            if j < union {
                pair_row_sums::<T, N, TAIL>(&mut even, run.at(j), weight(j), (c, masks));
            }
        }
        for (k, out) in acc.into_iter().enumerate() {
            for i in 0..N {
                let at = out.as_mut_ptr().add(c + 16 * i);
                let sum = _mm512_add_ps(even[k][i], odd[k][i]);
                if TAIL {
                    let old = _mm512_maskz_loadu_ps(masks[i], at);
                    _mm512_mask_storeu_ps(at, masks[i], _mm512_add_ps(old, sum));
                } else {
                    _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), sum));
                }
            }
        }
    }
}

/// `sums[k][i] += weights.k row[c + 16 i..]` for both queries `k` (`sum_pair_block`).
///
/// # Safety
/// As `sum_pair`, for a row of the run.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")]
unsafe fn pair_row_sums<T: Wide, const N: usize, const TAIL: bool>(
    sums: &mut [[__m512; N]; 2],
    row: usize,
    (wa, wb): (f32, f32),
    (c, masks): (usize, [__mmask16; N]),
) {
    let row = (row as *const T).wrapping_add(c);
    let (wa, wb) = (_mm512_set1_ps(wa), _mm512_set1_ps(wb));
    for i in 0..N {
        // SAFETY: by the caller's contract, lanes past the row masked off.
        let x = unsafe {
            match TAIL {
                true => load16_masked(row.add(16 * i), masks[i]),
                false => load16(row.add(16 * i)),
            }
        };
        sums[0][i] = _mm512_fmadd_ps(wa, x, sums[0][i]);
        sums[1][i] = _mm512_fmadd_ps(wb, x, sums[1][i]);
    }
}

/// For eight rows whose vectors hold two queries' partial dot products (lanes 0..8 the
/// first's, 8..16 the second's): row `j`'s full dot products in lanes `j` and `8 + j`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512dq")]
fn sum_pairs(v: [__m512; 8]) -> __m512 {
    // Each step adds two vectors' lanes in pairs: one operand is a blend of the two (lanes
    // that already line up), the other the rest brought into line by one permute, so a step
    // costs one shuffle instead of two (shuffles, not the adds, bound this reduction).
    // Blocks of four lanes: [a_j, a_k, b_j, b_k], each the sum of row j's (or k's) two blocks.
    let pair_blocks = |j: __m512, k: __m512| {
        let other = _mm512_setr_epi32(4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14, 15, 24, 25, 26, 27);
        _mm512_add_ps(
            _mm512_mask_blend_ps(0xf0f0, j, k),
            _mm512_permutex2var_ps(j, other, k),
        )
    };
    // Within blocks: lanes (0, 1) + (2, 3) of `p`, then of `q`.
    let pair_halves = |p: __m512, q: __m512| {
        let swapped = _mm512_permute_ps::<0b01_00_11_10>(_mm512_mask_blend_ps(0xcccc, q, p));
        _mm512_add_ps(_mm512_mask_blend_ps(0xcccc, p, q), swapped)
    };
    // Within blocks: lanes 0 + 1 of `p`, of `q`, then 2 + 3 of `p`, of `q`.
    let pair_lanes = |p: __m512, q: __m512| {
        let swapped = _mm512_permute_ps::<0b10_11_00_01>(_mm512_mask_blend_ps(0xaaaa, q, p));
        _mm512_add_ps(_mm512_mask_blend_ps(0xaaaa, p, q), swapped)
    };
    let low = pair_halves(pair_blocks(v[0], v[1]), pair_blocks(v[2], v[3]));
    let high = pair_halves(pair_blocks(v[4], v[5]), pair_blocks(v[6], v[7]));
    // Lanes: a0 a4 a2 a6 a1 a5 a3 a7, then the same of b.
    let z = pair_lanes(low, high);
    let order = _mm512_setr_epi32(0, 4, 2, 6, 1, 5, 3, 7, 8, 12, 10, 14, 9, 13, 11, 15);
    _mm512_permutexvar_ps(order, z)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::element::RunGrid;

    fn tier() -> bool {
        super::super::detected() >= super::super::Isa::Avx512
    }

    /// Lane `j` gets the sum of row `j`'s first eight lanes, lane `8 + j` of its last eight.
    #[test]
    fn sum_pairs_adds_each_half_of_each_row() {
        if !tier() {
            return;
        }
        let value = |j: usize, i: usize| ((j * 16 + i) * 37 % 101) as f32 - 50.0;
        // SAFETY: the CPU has the AVX-512 tier (checked above).
        let got = unsafe {
            let rows: [__m512; 8] = std::array::from_fn(|j| {
                let lanes: [f32; 16] = std::array::from_fn(|i| value(j, i));
                _mm512_loadu_ps(lanes.as_ptr())
            });
            let mut out = [0.0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), sum_pairs(rows));
            out
        };
        for j in 0..8 {
            for half in 0..2 {
                let want: f32 = (0..8).map(|i| value(j, 8 * half + i)).sum();
                assert_eq!(got[8 * half + j], want, "row {j}, half {half}");
            }
        }
    }

    /// Every row of every run gets each query's weighted vector exactly where that query's
    /// window holds it, with that run's weights: rows below `offset` the first's only, rows
    /// past the first's window the second's only, channel tails included; rows between runs
    /// and channels between rows stay untouched.
    #[test]
    fn spread_pair_adds_each_query_to_its_own_rows() {
        if !tier() {
            return;
        }
        let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 16.0;
        let counts = [2, 3];
        let runs = counts[0] * counts[1];
        for dim in [8, 16, 24, 32, 40, 64, 72, 136] {
            for (len_a, offset, len_b) in [(7, 1, 7), (7, 0, 7), (5, 2, 6), (3, 3, 4), (9, 1, 8)] {
                let union = offset + len_b;
                // Rows two row-lengths apart (a strided run), runs a row apart.
                let pitch = 2 * dim;
                let run_rows = union + 1;
                let mut rows: Vec<f32> =
                    (0..runs * run_rows * pitch).map(|i| value(i + 7)).collect();
                let mut expected = rows.clone();
                let x: [Vec<f32>; 2] = [0, 1].map(|k| (0..dim).map(|c| value(c * 3 + k)).collect());
                let w: [Vec<f32>; 2] =
                    [len_a, len_b].map(|n| (0..runs * n).map(|j| value(j + n)).collect());
                for r in 0..runs {
                    for j in 0..union {
                        for c in 0..dim {
                            let row = &mut expected[(r * run_rows + j) * pitch + c];
                            if j < len_a {
                                *row += w[0][r * len_a + j] * x[0][c];
                            }
                            if j >= offset {
                                *row += w[1][r * len_b + j - offset] * x[1][c];
                            }
                        }
                    }
                }
                let run_bytes = (run_rows * pitch * 4) as isize;
                let grid = RunGrid {
                    first: rows.as_mut_ptr() as usize,
                    steps: [counts[1] as isize * run_bytes, run_bytes],
                    counts,
                    row_step: (pitch * 4) as isize,
                    len: union,
                };
                // SAFETY: the CPU has the tier; the runs' rows hold `dim` floats.
                unsafe { spread_pair([&w[0], &w[1]], offset, [&x[0], &x[1]], grid) };
                for (i, (got, want)) in rows.iter().zip(&expected).enumerate() {
                    let case = (dim, len_a, offset, len_b, i / pitch, i % pitch);
                    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{case:?}");
                }
            }
        }
    }

    /// Each query's weighted sum takes exactly the rows its window holds (rows below `offset`
    /// the first's only, rows past the first's window the second's only), added to what the
    /// sums held, for channel tails and rows of each element type.
    #[test]
    fn sum_pair_weighs_each_query_over_its_own_rows() {
        if !tier() {
            return;
        }
        fn check<T: Wide>(from: fn(f32) -> T) {
            let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 16.0;
            let counts = [3, 2];
            let runs = counts[0] * counts[1];
            for dim in [8, 16, 24, 32, 40, 64, 72, 136] {
                for (len_a, offset, len_b) in
                    [(7, 1, 7), (7, 0, 7), (5, 2, 6), (3, 3, 4), (9, 1, 8)]
                {
                    let union = offset + len_b;
                    // Rows two row-lengths apart, runs a row apart (gaps of other values).
                    let pitch = 2 * dim;
                    let run_rows = union + 1;
                    let rows: Vec<T> = (0..runs * run_rows * pitch)
                        .map(|i| from(value(i + 7)))
                        .collect();
                    let w: [Vec<f32>; 2] =
                        [len_a, len_b].map(|n| (0..runs * n).map(|j| value(j + n)).collect());
                    let start: [Vec<f32>; 2] =
                        [0, 1].map(|k| (0..dim).map(|c| value(c * 3 + k)).collect());
                    let [mut acc_a, mut acc_b] = start.clone();
                    let size = std::mem::size_of::<T>();
                    let run_bytes = (run_rows * pitch * size) as isize;
                    let grid = RunGrid {
                        first: rows.as_ptr() as usize,
                        steps: [counts[1] as isize * run_bytes, run_bytes],
                        counts,
                        row_step: (pitch * size) as isize,
                        len: union,
                    };
                    let acc = [&mut acc_a[..], &mut acc_b[..]];
                    // SAFETY: the CPU has the tier; the runs' rows hold `dim` elements.
                    unsafe { sum_pair::<T, RunGrid>([&w[0], &w[1]], offset, grid, acc) };
                    for c in 0..dim {
                        let row = |r: usize, j: usize| {
                            rows[(r * run_rows + j) * pitch + c].to_acc() as f64
                        };
                        let sum = |k: usize, len: usize, from: usize| {
                            let terms = (0..runs).flat_map(|r| (0..len).map(move |j| (r, j)));
                            terms
                                .map(|(r, j)| w[k][r * len + j] as f64 * row(r, from + j))
                                .sum::<f64>()
                        };
                        let want_a = start[0][c] as f64 + sum(0, len_a, 0);
                        let want_b = start[1][c] as f64 + sum(1, len_b, offset);
                        let case = (dim, len_a, offset, len_b, c);
                        for (got, want) in [(acc_a[c], want_a), (acc_b[c], want_b)] {
                            assert!(
                                (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                                "{case:?}"
                            );
                        }
                    }
                }
            }
        }
        check::<f32>(|x| x);
        check::<half::bf16>(half::bf16::from_f32);
        check::<half::f16>(half::f16::from_f32);
    }

    /// The pair dots kernels give the same dots whether rows are float32 or half types holding
    /// the same values.
    #[test]
    fn pair_dots_widen_half_rows() {
        if !tier() {
            return;
        }
        let (dim, len, offset) = (32, 7, 1);
        let union = offset + len;
        let value = |i: usize| ((i * 37 % 29) as f32 - 14.0) / 8.0;
        // Rows two row-lengths apart, as heads-last tensors of two kv heads hold them.
        let rows32: Vec<f32> = (0..2 * union * dim).map(value).collect();
        let rows16: Vec<half::f16> = rows32.iter().map(|&x| half::f16::from_f32(x)).collect();
        let rowsb: Vec<half::bf16> = rows32.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let v: [Vec<f32>; 2] = [0, 1].map(|k| (0..dim).map(|c| value(c * 5 + k)).collect());
        let dots = |first: usize, size: usize, kernel: PairDots<f32>| {
            let list = |start: usize| {
                let pitch = 2 * dim * size;
                let mut keys = KeyList::<f32>::new(1, len, 0);
                // Value rows are the other kv head's.
                let at = first + start * pitch;
                keys.runs[0] = (at, at + dim * size);
                keys.run_count = 1;
                keys.run_len = len;
                keys.steps = (pitch as isize, pitch as isize);
                keys.window = len;
                keys.len = len;
                keys
            };
            let (a, b) = (list(0), list(offset));
            let mut out = [[0.0f32; 7]; 4];
            for values in [false, true] {
                let [oa, ob] = &mut out[2 * usize::from(values)..][..2] else {
                    unreachable!()
                };
                // SAFETY: the CPU has the tier; both windows' rows hold `dim` elements.
                unsafe { kernel([&v[0], &v[1]], [&a, &b], offset, values, [oa, ob]) };
            }
            out
        };
        let want = dots(
            rows32.as_ptr() as usize,
            4,
            exact_pair_dots::<f32>(dim).unwrap(),
        );
        let f16s = dots(
            rows16.as_ptr() as usize,
            2,
            exact_pair_dots::<half::f16>(dim).unwrap(),
        );
        let bf16s = dots(
            rowsb.as_ptr() as usize,
            2,
            exact_pair_dots::<half::bf16>(dim).unwrap(),
        );
        assert_eq!(f16s, want, "float16");
        assert_eq!(bf16s, want, "bfloat16");
    }

    #[test]
    fn lane_sums_put_each_row_in_its_lane() {
        if !tier() {
            return;
        }
        let rows: [[f32; 16]; 8] =
            std::array::from_fn(|j| std::array::from_fn(|l| (j * 100 + l * l) as f32));
        // SAFETY: the CPU has the tier; the arrays hold 16 floats.
        let (singles, pairs) = unsafe {
            let v = rows.map(|r| _mm512_loadu_ps(r.as_ptr()));
            let mut singles = [0.0f32; 8];
            let mut pairs = [0.0f32; 16];
            _mm256_storeu_ps(singles.as_mut_ptr(), sum8x16(v));
            _mm512_storeu_ps(pairs.as_mut_ptr(), sum_pairs(v));
            (singles, pairs)
        };
        for (j, row) in rows.iter().enumerate() {
            assert_eq!(singles[j], row.iter().sum::<f32>(), "row {j}");
            assert_eq!(
                pairs[j],
                row[..8].iter().sum::<f32>(),
                "row {j}, first half"
            );
            assert_eq!(
                pairs[8 + j],
                row[8..].iter().sum::<f32>(),
                "row {j}, second half"
            );
        }
    }
}
