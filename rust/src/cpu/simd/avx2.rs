//! The AVX2/FMA tier: kernels for the two loops that dominate attention on the CPU, dot
//! products of one vector with many rows (logits) and weighted sums of many rows (outputs),
//! for rows of float32, bfloat16 or float16 widened to float32 in registers.

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::cpu::element::{Element, Rows, Run};
use crate::cpu::keys::{KeyList, LANES};
use crate::cpu::math::avx2::exp8;

/// Storage types widened to float32 eight at a time.
pub trait Wide: Element<Acc = f32> {
    /// Which widening `load8` does.
    const FORMAT: Format;
}

/// How eight stored elements become eight float32 lanes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Already float32.
    F32,
    /// bfloat16: the high half of a float32.
    BF16,
    /// IEEE half (F16C converts).
    F16,
}

impl Wide for f32 {
    const FORMAT: Format = Format::F32;
}
impl Wide for bf16 {
    const FORMAT: Format = Format::BF16;
}
impl Wide for f16 {
    const FORMAT: Format = Format::F16;
}

/// Eight elements at `p`, as float32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load8<T: Wide>(p: *const T) -> __m256 {
    // SAFETY: the caller guarantees 8 readable elements at `p`.
    unsafe {
        match T::FORMAT {
            Format::F32 => _mm256_loadu_ps(p as *const f32),
            Format::BF16 => {
                let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
            }
            Format::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        }
    }
}

/// `len` rows of `n` elements, `step` elements apart from `src` on, widened to consecutive
/// float32 rows at `dst`: eight elements a load, the row's tail one at a time.
///
/// # Safety
/// The CPU must pass `available()`; `src` must hold the rows and `dst` `len * n` writable
/// floats.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn widen_rows<T: Wide>(
    src: *const T,
    step: isize,
    dst: *mut f32,
    (n, len): (usize, usize),
) {
    let body = n - n % 8;
    // SAFETY (whole block): inside the rows and `dst` by the caller's contract.
    unsafe {
        for r in 0..len {
            let (from, to) = (src.offset(r as isize * step), dst.add(r * n));
            for c in (0..body).step_by(8) {
                _mm256_storeu_ps(to.add(c), load8(from.add(c)));
            }
            for c in body..n {
                *to.add(c) = (*from.add(c)).to_acc();
            }
        }
    }
}

/// The eight lane sums of eight vectors, as one vector.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn sum8(v: [__m256; 8]) -> __m256 {
    let pairs = [0, 2, 4, 6].map(|i| _mm256_hadd_ps(v[i], v[i + 1]));
    let quads = [
        _mm256_hadd_ps(pairs[0], pairs[1]),
        _mm256_hadd_ps(pairs[2], pairs[3]),
    ];
    let low = _mm256_permute2f128_ps::<0x20>(quads[0], quads[1]);
    let high = _mm256_permute2f128_ps::<0x31>(quads[0], quads[1]);
    _mm256_add_ps(low, high)
}

/// `out[n] = a . row_n` for dense rows of `a.len()` elements at the addresses `rows`.
///
/// # Safety
/// The CPU must pass `available()`; every address must hold `a.len()` readable elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows<T: Wide, R: Rows>(a: &[f32], rows: R, out: &mut [f32]) {
    let n = rows.len();
    for (start, sums) in (0..n).step_by(8).zip(out.chunks_mut(8)) {
        // A short last group is padded with its first row (results dropped), so that the
        // eight accumulators are always the same eight registers.
        let count = (n - start).min(8);
        let mut lanes = [0.0f32; 8];
        // SAFETY: every padded address holds `a.len()` elements; `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), dot8::<T>(a, padded(rows, start))) };
        // `out` may run past the rows, as the portable loop allows.
        let count = count.min(sums.len());
        sums[..count].copy_from_slice(&lanes[..count]);
    }
}

/// The addresses of rows `start..start + 8`, a short last group padded with its first row.
#[inline(always)]
pub(super) fn padded<R: Rows>(rows: R, start: usize) -> [usize; 8] {
    let count = (rows.len() - start).min(8);
    std::array::from_fn(|j| rows.at(start + if j < count { j } else { 0 }))
}

/// `a . row_j` for eight rows, in lane `j`.
///
/// # Safety
/// Every address must hold `a.len()` readable elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot8<T: Wide>(a: &[f32], rows: [usize; 8]) -> __m256 {
    let body = a.len() - a.len() % 8;
    let rows = rows.map(|r| r as *const T);
    let mut acc = [_mm256_setzero_ps(); 8];
    for c in (0..body).step_by(8) {
        // SAFETY: `c + 8 <= a.len()`; rows hold `a.len()` elements.
        unsafe {
            let x = _mm256_loadu_ps(a.as_ptr().add(c));
            for j in 0..8 {
                acc[j] = _mm256_fmadd_ps(x, load8(rows[j].add(c)), acc[j]);
            }
        }
    }
    let sums = sum8(acc);
    if body == a.len() {
        return sums;
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sums) };
    for (c, &x) in a.iter().enumerate().skip(body) {
        for (lane, row) in lanes.iter_mut().zip(rows) {
            // SAFETY: `c < a.len()`.
            *lane += x * unsafe { *row.add(c) }.to_acc();
        }
    }
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
}

/// An `element::Attend` kernel: logits computed eight at a time into whole groups of eight
/// slots (padding slots at -inf), so that the max, the exponentials and their sum are
/// vector operations with no scalar tails.
///
/// # Safety
/// The CPU must pass `available()`; the rest is `element::Attend`'s contract.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend<T: Wide>(
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
            max = logit_groups::<T, _>(q, run, bias, &mut logits[slot..], max);
            slot += run.len.next_multiple_of(LANES);
        }
        max = logit_groups::<T, _>(q, keys.extra_rows(false), None, &mut logits[slot..], max);
    }
    let max = max8(max);
    let mut sum = _mm256_setzero_ps();
    for group in logits.chunks_exact_mut(LANES) {
        // SAFETY: `group` holds 8 floats.
        unsafe {
            let p = exp8(_mm256_sub_ps(
                _mm256_loadu_ps(group.as_ptr()),
                _mm256_set1_ps(max),
            ));
            _mm256_storeu_ps(group.as_mut_ptr(), p);
            sum = _mm256_add_ps(sum, p);
        }
    }
    // SAFETY: value rows hold `acc.len()` elements.
    unsafe { weighted_runs::<T>(keys, logits, acc) };
    let extra = keys.extra_rows(true);
    let slot = logits.len() - extra.len().next_multiple_of(LANES);
    // SAFETY: as above.
    unsafe { sum_rows::<T, _>(&logits[slot..slot + extra.len()], extra, acc) };
    (max, sum_lanes(sum))
}

/// An `element::AttendPair` kernel: `attend` for two queries whose window runs lie in one
/// union of at most eight rows (the second query's runs start `offset` rows into the
/// first's), so that each group of key addresses and each value row is loaded once for
/// both.
///
/// # Safety
/// The CPU must pass `available()`; the rest is `element::AttendPair`'s contract.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend_pair<T: Wide>(
    q: [&[f32]; 2],
    keys: [&KeyList<f32>; 2],
    offset: usize,
    with_bias: bool,
    logits: [&mut [f32]; 2],
    acc: [&mut [f32]; 2],
) -> [(f32, f32); 2] {
    let [ka, kb] = keys;
    let union = offset + kb.run_len;
    let lane = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
    let splat = |x: usize| _mm256_set1_ps(x as f32);
    // Lanes outside each query's own window weigh nothing.
    let outside = [
        _mm256_cmp_ps::<_CMP_GE_OQ>(lane, splat(ka.run_len)),
        _mm256_or_ps(
            _mm256_cmp_ps::<_CMP_LT_OQ>(lane, splat(offset)),
            _mm256_cmp_ps::<_CMP_GE_OQ>(lane, splat(union)),
        ),
    ];
    let [la, lb] = logits;
    let (la, lb) = (&mut la[..ka.padded_len()], &mut lb[..kb.padded_len()]);
    let mut max = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    for (i, ((na, run), (nb, _))) in ka.runs(false).zip(kb.runs(false)).enumerate() {
        let rows = padded(Run { len: union, ..run }, 0);
        // SAFETY (whole block): union rows are keys of one of the two queries; slots
        // `8 i .. 8 i + 8` lie within both padded lists.
        unsafe {
            let mut l = [dot8::<T>(q[0], rows), dot8::<T>(q[1], rows)];
            if with_bias {
                let mut shifted = [0.0f32; LANES];
                shifted[offset..union].copy_from_slice(&kb.bias[nb..nb + kb.run_len]);
                l[0] = _mm256_add_ps(l[0], load_partial(&ka.bias[na..na + ka.run_len]));
                l[1] = _mm256_add_ps(l[1], _mm256_loadu_ps(shifted.as_ptr()));
            }
            for k in 0..2 {
                l[k] = _mm256_blendv_ps(l[k], neg_inf, outside[k]);
                max[k] = _mm256_max_ps(max[k], l[k]);
            }
            _mm256_storeu_ps(la.as_mut_ptr().add(LANES * i), l[0]);
            _mm256_storeu_ps(lb.as_mut_ptr().add(LANES * i), l[1]);
        }
    }
    let slot = ka.run_count * LANES;
    // SAFETY: the extras are the same rows for both queries; their groups follow the runs'.
    unsafe {
        max[0] = logit_groups::<T, _>(q[0], ka.extra_rows(false), None, &mut la[slot..], max[0]);
        max[1] = logit_groups::<T, _>(q[1], kb.extra_rows(false), None, &mut lb[slot..], max[1]);
    }
    let max = [max8(max[0]), max8(max[1])];
    let sums = [exp_groups(la, max[0]), exp_groups(lb, max[1])];
    let [acc_a, acc_b] = acc;
    // SAFETY: value rows hold `acc.len()` elements.
    unsafe { weighted_run_pair::<T>(ka, union, [la, lb], [acc_a, acc_b]) };
    let extra = ka.extra_rows(true);
    // SAFETY: as above.
    unsafe {
        sum_rows::<T, _>(&la[slot..slot + extra.len()], extra, acc_a);
        sum_rows::<T, _>(&lb[slot..slot + extra.len()], extra, acc_b);
    }
    [(max[0], sums[0]), (max[1], sums[1])]
}

/// `xs[i] = e^(xs[i] - max)` over whole groups of eight; returns the sum.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_groups(xs: &mut [f32], max: f32) -> f32 {
    let mut sum = _mm256_setzero_ps();
    for group in xs.chunks_exact_mut(LANES) {
        // SAFETY: `group` holds 8 floats.
        unsafe {
            let x = _mm256_sub_ps(_mm256_loadu_ps(group.as_ptr()), _mm256_set1_ps(max));
            let p = exp8(x);
            _mm256_storeu_ps(group.as_mut_ptr(), p);
            sum = _mm256_add_ps(sum, p);
        }
    }
    sum_lanes(sum)
}

/// `acc[k] = sum_n w[k]_n value_n` over the union value runs of a query pair (weights in
/// groups of eight slots per run, zero outside each query's window): each value row is
/// loaded once for both sums.
///
/// # Safety
/// Value rows must hold `acc[k].len()` readable elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_run_pair<T: Wide>(
    keys: &KeyList<f32>,
    union: usize,
    w: [&[f32]; 2],
    acc: [&mut [f32]; 2],
) {
    let dim = acc[0].len();
    let [acc_a, acc_b] = acc;
    let mut c = 0;
    // SAFETY (both loops): `c + 8 N <= dim` for the block written.
    while c + 32 <= dim {
        unsafe { pair_block::<T, 4>(keys, union, w, [acc_a, acc_b], c) };
        c += 32;
    }
    while c + 8 <= dim {
        unsafe { pair_block::<T, 1>(keys, union, w, [acc_a, acc_b], c) };
        c += 8;
    }
    for (ch, (a, b)) in acc_a.iter_mut().zip(acc_b.iter_mut()).enumerate().skip(c) {
        (*a, *b) = (0.0, 0.0);
        for (i, (_, run)) in keys.runs(true).enumerate() {
            for j in 0..union {
                // SAFETY: `ch < dim`.
                let v = unsafe { *(run.at(j) as *const T).add(ch) }.to_acc();
                *a += w[0][LANES * i + j] * v;
                *b += w[1][LANES * i + j] * v;
            }
        }
    }
}

/// Channels `c .. c + 8 N` of `weighted_run_pair`, both sums in registers.
///
/// # Safety
/// Value rows and `acc[k]` must hold at least `c + 8 N` elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair_block<T: Wide, const N: usize>(
    keys: &KeyList<f32>,
    union: usize,
    w: [&[f32]; 2],
    acc: [&mut [f32]; 2],
    c: usize,
) {
    let (mut sums_a, mut sums_b) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
    for (i, (_, run)) in keys.runs(true).enumerate() {
        for j in 0..union {
            let row = run.at(j) as *const T;
            let weight = [0, 1].map(|k| _mm256_set1_ps(w[k][LANES * i + j]));
            for (b, (sa, sb)) in sums_a.iter_mut().zip(sums_b.iter_mut()).enumerate() {
                // SAFETY: by the caller's contract.
                let v = unsafe { load8(row.add(c + 8 * b)) };
                *sa = _mm256_fmadd_ps(weight[0], v, *sa);
                *sb = _mm256_fmadd_ps(weight[1], v, *sb);
            }
        }
    }
    for (sums, acc) in [sums_a, sums_b].iter().zip(acc) {
        for (b, &v) in sums.iter().enumerate() {
            // SAFETY: by the caller's contract.
            unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(c + 8 * b), v) };
        }
    }
}

/// `acc = sum_n w_n value_n` over the window runs of `keys`, whose weights lie in groups
/// of eight slots of `w`; each block of channels is summed over every run in registers.
///
/// # Safety
/// Value rows must hold `acc.len()` readable elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_runs<T: Wide>(keys: &KeyList<f32>, w: &[f32], acc: &mut [f32]) {
    let group = keys.run_len.next_multiple_of(LANES);
    let runs = || {
        keys.runs(true)
            .enumerate()
            .map(move |(i, (_, run))| (&w[i * group..], run))
    };
    let dim = acc.len();
    let mut c = 0;
    while c + 32 <= dim {
        let mut sums = [[_mm256_setzero_ps(); 4]; 2];
        for (w, run) in runs() {
            // SAFETY: `c + 32 <= dim`.
            unsafe { add_rows::<T, _, 4>(&mut sums, w, run, c) };
        }
        // SAFETY: `c + 32 <= dim`.
        unsafe { finish(acc.as_mut_ptr().add(c), &sums, false) };
        c += 32;
    }
    while c + 8 <= dim {
        let mut sums = [[_mm256_setzero_ps(); 1]; 2];
        for (w, run) in runs() {
            // SAFETY: `c + 8 <= dim`.
            unsafe { add_rows::<T, _, 1>(&mut sums, w, run, c) };
        }
        // SAFETY: `c + 8 <= dim`.
        unsafe { finish(acc.as_mut_ptr().add(c), &sums, false) };
        c += 8;
    }
    for (j, a) in acc.iter_mut().enumerate().skip(c) {
        *a = 0.0;
        for (w, run) in runs() {
            for (k, &weight) in w.iter().enumerate().take(run.len) {
                // SAFETY: `j < dim`.
                *a += weight * unsafe { *(run.at(k) as *const T).add(j) }.to_acc();
            }
        }
    }
}

/// Logits `q . row_n (+ bias_n)` of `rows` into groups of eight slots of `out` (padding
/// slots at -inf); returns `max` raised lane by lane to them.
///
/// # Safety
/// Rows must hold `q.len()` readable elements; `out` holds their padded groups.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn logit_groups<T: Wide, R: Rows>(
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
            let mut l = dot8::<T>(q, padded(rows, start));
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

/// Up to eight floats of `xs` in the low lanes, zeros above.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn load_partial(xs: &[f32]) -> __m256 {
    let mut lanes = [0.0f32; 8];
    let n = xs.len().min(8);
    lanes[..n].copy_from_slice(&xs[..n]);
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
}

/// `v` with lanes `count..8` set to -inf.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn mask_past(v: __m256, count: usize) -> __m256 {
    if count >= 8 {
        return v;
    }
    let lane = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
    let past = _mm256_cmp_ps::<_CMP_GE_OQ>(lane, _mm256_set1_ps(count as f32));
    _mm256_blendv_ps(v, _mm256_set1_ps(f32::NEG_INFINITY), past)
}

/// The largest lane.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn max8(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
}

/// The sum of the lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn sum_lanes(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// `acc[c] += sum_n w[n] row_n[c]` for dense rows of `acc.len()` elements at `rows`.
///
/// # Safety
/// The CPU must pass `available()`; every address must hold `acc.len()` readable elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn sum_rows<T: Wide, R: Rows>(w: &[f32], rows: R, acc: &mut [f32]) {
    let dim = acc.len();
    let n = w.len().min(rows.len());
    let mut c = 0;
    // Blocks of 32 channels; rows two at a time into two sets of four accumulators, so
    // that consecutive FMAs do not wait on each other.
    while c + 32 <= dim {
        let mut sums = [[_mm256_setzero_ps(); 4]; 2];
        // SAFETY: `c + 32 <= dim`; rows hold `dim` elements.
        unsafe { add_rows::<T, R, 4>(&mut sums, &w[..n], rows, c) };
        // SAFETY: `c + 32 <= dim`.
        unsafe { finish(acc.as_mut_ptr().add(c), &sums, true) };
        c += 32;
    }
    while c + 8 <= dim {
        let mut sums = [[_mm256_setzero_ps(); 1]; 2];
        // SAFETY: `c + 8 <= dim`.
        unsafe { add_rows::<T, R, 1>(&mut sums, &w[..n], rows, c) };
        // SAFETY: `c + 8 <= dim`.
        unsafe { finish(acc.as_mut_ptr().add(c), &sums, true) };
        c += 8;
    }
    for (j, a) in acc.iter_mut().enumerate().skip(c) {
        for (k, &weight) in w.iter().enumerate().take(n) {
            // SAFETY: `j < dim`.
            *a += weight * unsafe { *(rows.at(k) as *const T).add(j) }.to_acc();
        }
    }
}

/// `row_n[c] += w[n] x[c]` for dense float32 rows of `x.len()` elements at `rows` (the
/// transpose of `sum_rows`: one vector spread over many rows).
///
/// # Safety
/// The CPU must pass `available()`; every address must hold `x.len()` writable floats that
/// no other thread touches meanwhile.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn spread_rows<R: Rows>(w: &[f32], x: &[f32], rows: R) {
    let dim = x.len();
    let n = w.len().min(rows.len());
    let mut c = 0;
    // Up to 64 channels of `x` in registers per sweep over the rows (one sweep up to D = 64).
    // SAFETY (whole block): channels `c..c + 8 N` of `x` and of every row exist.
    unsafe {
        while c + 64 <= dim {
            spread_block::<R, 8>(&w[..n], x.as_ptr().add(c), rows, c);
            c += 64;
        }
        if c + 32 <= dim {
            spread_block::<R, 4>(&w[..n], x.as_ptr().add(c), rows, c);
            c += 32;
        }
        while c + 8 <= dim {
            spread_block::<R, 1>(&w[..n], x.as_ptr().add(c), rows, c);
            c += 8;
        }
        for (k, &weight) in w[..n].iter().enumerate() {
            let row = rows.at(k) as *mut f32;
            for (j, &v) in x.iter().enumerate().skip(c) {
                *row.add(j) += weight * v;
            }
        }
    }
}

/// Channels `c..c + 8 N` of `spread_rows`, with those of `x` (at `x`) held in registers.
///
/// # Safety
/// `x` must hold `8 N` floats and every row `c + 8 N` writable ones.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn spread_block<R: Rows, const N: usize>(w: &[f32], x: *const f32, rows: R, c: usize) {
    // SAFETY (whole block): by the caller's contract.
    unsafe {
        let xs: [__m256; N] = std::array::from_fn(|i| _mm256_loadu_ps(x.add(8 * i)));
        for (k, &weight) in w.iter().enumerate() {
            let weight = _mm256_set1_ps(weight);
            let row = (rows.at(k) as *mut f32).add(c);
            for (i, &xv) in xs.iter().enumerate() {
                let r = row.add(8 * i);
                _mm256_storeu_ps(r, _mm256_fmadd_ps(weight, xv, _mm256_loadu_ps(r)));
            }
        }
    }
}

/// `sums += sum_k w[k] row_k[c .. c + 8N]` over the rows `w` weighs, rows two at a time
/// into the two register sets, so that consecutive FMAs do not wait on each other.
///
/// # Safety
/// Rows must hold at least `c + 8 N` elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_rows<T: Wide, R: Rows, const N: usize>(
    sums: &mut [[__m256; N]; 2],
    w: &[f32],
    rows: R,
    c: usize,
) {
    let n = w.len().min(rows.len());
    let [even, odd] = sums;
    let mut k = 0;
    // SAFETY (whole block): by the caller's contract.
    unsafe {
        while k + 2 <= n {
            add_row::<T, N>(even, w[k], rows.at(k), c);
            add_row::<T, N>(odd, w[k + 1], rows.at(k + 1), c);
            k += 2;
        }
        if k < n {
            add_row::<T, N>(even, w[k], rows.at(k), c);
        }
    }
}

/// `sums[i] += weight * row[c + 8i .. c + 8i + 8]` for `i < N`.
///
/// # Safety
/// `row` must hold at least `c + 8 N` elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_row<T: Wide, const N: usize>(
    sums: &mut [__m256; N],
    weight: f32,
    row: usize,
    c: usize,
) {
    let weight = _mm256_set1_ps(weight);
    for (i, s) in sums.iter_mut().enumerate() {
        // SAFETY: by the caller's contract.
        *s = _mm256_fmadd_ps(
            weight,
            unsafe { load8((row as *const T).add(c + 8 * i)) },
            *s,
        );
    }
}

/// `dst[8i .. 8i + 8] = sums[0][i] + sums[1][i]` for `i < N`, or `+=` when `accumulate`.
///
/// # Safety
/// `dst` must hold `8 N` writable floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn finish<const N: usize>(dst: *mut f32, sums: &[[__m256; N]; 2], accumulate: bool) {
    for (i, (&even, &odd)) in sums[0].iter().zip(&sums[1]).enumerate() {
        // SAFETY: by the caller's contract.
        unsafe {
            let d = dst.add(8 * i);
            let v = _mm256_add_ps(even, odd);
            let v = if accumulate {
                _mm256_add_ps(_mm256_loadu_ps(d), v)
            } else {
                v
            };
            _mm256_storeu_ps(d, v);
        }
    }
}
