//! Element types and the row operations every CPU kernel is built from. Half types are widened
//! to `f32` as they are read; every sum runs in the accumulator type.

use std::ops::{Add, AddAssign, Div, Mul, Sub};

use half::{bf16, f16};

use super::keys::KeyList;

/// The type sums are carried in: `f32`, or `f64` for `f64` tensors.
pub trait Accum:
    Copy
    + Default
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + 'static
{
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// Logit of a masked slot.
    const NEG_INF: Self;
    /// Nearest value to `x`.
    fn from_f64(x: f64) -> Self;
    /// Nearest `f32` (the dtype of lse).
    fn to_f32(self) -> f32;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// `xs[i] = exp(xs[i] - shift)`; returns the sum of the results.
    fn exp_shifted(xs: &mut [Self], shift: Self) -> Self;

    /// `row_n[c] += w[n] x[c]` for dense rows of `x.len()` accumulators at the addresses
    /// `rows`.
    ///
    /// # Safety
    /// Every address must hold `x.len()` writable accumulators no other thread touches.
    #[inline(always)]
    unsafe fn spread_rows<R: Rows>(w: &[Self], x: &[Self], rows: R) {
        // SAFETY: forwarded contract.
        unsafe { spread_rows_portable(w, x, rows) }
    }

    /// `spread_rows` for two queries whose windows share their runs, over every run of
    /// `runs`: per run, the first's weights for rows `0..` of the run, the second's for rows
    /// `offset..` (to the run's end), so that rows both weigh are read and written once. The
    /// weights `w[k]` go run after run, `w[k].len() / runs.count()` per run.
    ///
    /// # Safety
    /// As `spread_rows`, for the rows of every run.
    #[inline(always)]
    unsafe fn spread_pair<R: WindowRuns>(w: [&[Self]; 2], offset: usize, x: [&[Self]; 2], runs: R) {
        // SAFETY: forwarded contract.
        unsafe { spread_pair_by_rows(w, offset, x, runs) }
    }
}

/// `Accum::spread_pair` as two `spread_rows` calls per run, one per query.
///
/// # Safety
/// As `Accum::spread_pair`.
#[inline(always)]
unsafe fn spread_pair_by_rows<A: Accum, R: WindowRuns>(
    w: [&[A]; 2],
    offset: usize,
    x: [&[A]; 2],
    runs: R,
) {
    let lens = run_weights(w, runs);
    for (n, run) in runs.runs().enumerate() {
        let second = Run {
            first: run.at(offset),
            len: lens[1],
            ..run
        };
        // SAFETY: forwarded contract; both runs are rows of `run`.
        unsafe {
            A::spread_rows(&w[0][n * lens[0]..][..lens[0]], x[0], run);
            A::spread_rows(&w[1][n * lens[1]..][..lens[1]], x[1], second);
        }
    }
}

/// Weights per run of each query of a pair kernel (none for no runs).
#[inline(always)]
pub fn run_weights<A>(w: [&[A]; 2], runs: impl WindowRuns) -> [usize; 2] {
    match runs.count() {
        0 => [0, 0],
        n => [w[0].len() / n, w[1].len() / n],
    }
}

/// The portable loop of `Accum::spread_rows`.
///
/// # Safety
/// As `Accum::spread_rows`.
#[inline(always)]
unsafe fn spread_rows_portable<A: Accum, R: Rows>(w: &[A], x: &[A], rows: R) {
    for (k, &weight) in w.iter().enumerate().take(rows.len()) {
        // SAFETY: by the caller's contract.
        let row = unsafe { std::slice::from_raw_parts_mut(rows.at(k) as *mut A, x.len()) };
        for (r, &v) in row.iter_mut().zip(x) {
            *r += weight * v;
        }
    }
}

impl Accum for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn exp_shifted(xs: &mut [Self], shift: Self) -> Self {
        super::math::exp_shifted_f32(xs, shift)
    }
    #[inline(always)]
    unsafe fn spread_rows<R: Rows>(w: &[f32], x: &[f32], rows: R) {
        #[cfg(target_arch = "x86_64")]
        if super::simd::available() {
            // SAFETY: the CPU has the kernel's features; the rest is the caller's.
            return unsafe { super::simd::spread_rows(w, x, rows) };
        }
        // SAFETY: forwarded contract.
        unsafe { spread_rows_portable(w, x, rows) }
    }
    #[inline(always)]
    unsafe fn spread_pair<R: WindowRuns>(w: [&[f32]; 2], offset: usize, x: [&[f32]; 2], runs: R) {
        // Only the AVX-512 tier has a kernel: pairs come from its pair kernels alone.
        #[cfg(target_arch = "x86_64")]
        if super::simd::isa() >= super::simd::Isa::Avx512 {
            // SAFETY: the CPU has the kernel's features; the rest is the caller's.
            return unsafe { super::simd::spread_pair(w, offset, x, runs) };
        }
        // SAFETY: forwarded contract.
        unsafe { spread_pair_by_rows(w, offset, x, runs) }
    }
}

impl Accum for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn exp_shifted(xs: &mut [Self], shift: Self) -> Self {
        xs.iter_mut().fold(0.0, |sum, x| {
            *x = (*x - shift).exp();
            sum + *x
        })
    }
}

/// The addresses of a sequence of dense rows.
pub trait Rows: Copy {
    /// Number of rows.
    fn len(&self) -> usize;
    /// Address of row `i < len()`.
    fn at(&self, i: usize) -> usize;
}

impl Rows for &[usize] {
    #[inline(always)]
    fn len(&self) -> usize {
        <[usize]>::len(self)
    }
    #[inline(always)]
    fn at(&self, i: usize) -> usize {
        self[i]
    }
}

/// `len` rows `step` bytes apart from `first`: the keys of a window along its last axis.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// Address of the first row.
    pub first: usize,
    /// Bytes from one row to the next.
    pub step: isize,
    /// Number of rows.
    pub len: usize,
}

impl Rows for Run {
    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }
    #[inline(always)]
    fn at(&self, i: usize) -> usize {
        self.first.wrapping_add_signed(i as isize * self.step)
    }
}

/// The runs of a window in one tensor: `counts[0] x counts[1]` runs of `len` rows, run
/// `(s0, s1)` starting `s0 * steps[0] + s1 * steps[1]` bytes past `first`, each run's rows
/// `row_step` bytes apart.
#[derive(Clone, Copy, Debug)]
pub struct RunGrid {
    pub first: usize,
    pub steps: [isize; 2],
    pub counts: [usize; 2],
    pub row_step: isize,
    pub len: usize,
}

/// The runs of one window, in window order (the pair kernels take a whole window per call).
pub trait WindowRuns: Copy {
    /// Runs in the window.
    fn count(&self) -> usize;
    /// Every run, in window order.
    fn runs(self) -> impl Iterator<Item = Run> + Clone;
}

impl WindowRuns for RunGrid {
    #[inline(always)]
    fn count(&self) -> usize {
        self.counts[0] * self.counts[1]
    }

    #[inline(always)]
    fn runs(self) -> impl Iterator<Item = Run> + Clone {
        let [c0, c1] = self.counts;
        (0..c0).flat_map(move |s0| (0..c1).map(move |s1| self.run(s0, s1)))
    }
}

impl RunGrid {
    /// Run `(s0, s1)`.
    #[inline(always)]
    pub fn run(&self, s0: usize, s1: usize) -> Run {
        let offset = s0 as isize * self.steps[0] + s1 as isize * self.steps[1];
        Run {
            first: self.first.wrapping_add_signed(offset),
            step: self.row_step,
            len: self.len,
        }
    }
}

/// A tensor element type the kernels compute with.
pub trait Element: Copy + Send + Sync + 'static {
    /// Accumulator type.
    type Acc: Accum;
    /// Widen to the accumulator.
    fn to_acc(self) -> Self::Acc;
    /// Round from the accumulator.
    fn from_acc(a: Self::Acc) -> Self;

    /// Whether this type is its own accumulator (widening is a copy).
    #[inline(always)]
    fn is_acc() -> bool {
        std::any::TypeId::of::<Self>() == std::any::TypeId::of::<Self::Acc>()
    }

    /// `out[n] = a . row_n` for dense rows of `a.len()` elements at the addresses `rows`.
    ///
    /// # Safety
    /// Every address must hold `a.len()` readable elements; `out` is as long as `rows`.
    #[inline(always)]
    unsafe fn dot_rows<R: Rows>(a: &[Self::Acc], rows: R, out: &mut [Self::Acc]) {
        for (i, o) in out.iter_mut().enumerate().take(rows.len()) {
            // SAFETY: by the caller's contract.
            *o = unsafe { dot(a, rows.at(i) as *const Self, 1) };
        }
    }

    /// `acc[c] += sum_n w[n] row_n[c]` for dense rows of `acc.len()` elements at `rows`.
    ///
    /// # Safety
    /// Every address must hold `acc.len()` readable elements.
    #[inline(always)]
    unsafe fn sum_rows<R: Rows>(w: &[Self::Acc], rows: R, acc: &mut [Self::Acc]) {
        for (i, &weight) in w.iter().enumerate().take(rows.len()) {
            // SAFETY: by the caller's contract.
            unsafe { axpy(acc, weight, rows.at(i) as *const Self, 1) };
        }
    }

    /// `sum_rows` for two queries whose windows share their runs (as `Accum::spread_pair`):
    /// per run, the first's weights for rows `0..` of the run, the second's for rows
    /// `offset..`, into `acc[0]` and `acc[1]`, so that rows both weigh are read once.
    ///
    /// # Safety
    /// As `sum_rows`, for the rows of every run.
    #[inline(always)]
    unsafe fn sum_pair<R: WindowRuns>(
        w: [&[Self::Acc]; 2],
        offset: usize,
        runs: R,
        acc: [&mut [Self::Acc]; 2],
    ) {
        // SAFETY: forwarded contract.
        unsafe { sum_pair_by_rows::<Self, R>(w, offset, runs, acc) }
    }

    /// `len` rows of `n` elements, `step` elements apart from `src` on, widened to consecutive
    /// rows at `dst`.
    ///
    /// # Safety
    /// `src` must hold the rows and `dst` `len * n` writable accumulators.
    #[inline(always)]
    unsafe fn widen_rows(src: *const Self, step: isize, dst: *mut Self::Acc, rows: (usize, usize)) {
        // SAFETY: forwarded contract.
        unsafe { widen_rows_portable(src, step, dst, rows) }
    }

    /// The kernel that attends from one query over the dense key and value rows of a key list
    /// in one call, where this type has one on this CPU (see `Attend`).
    fn attend_kernel() -> Option<Attend<Self::Acc>> {
        None
    }

    /// The kernel that attends from two queries sharing their window runs in one call, where
    /// this type has one on this CPU (see `AttendPair`).
    fn attend_pair_kernel() -> Option<AttendPair<Self::Acc>> {
        None
    }

    /// A pair kernel for staged rows that takes unions longer than `LANES` rows (windows
    /// wider than eight keys), for rows of `dim` key and `dim_v` value channels and no
    /// additional tokens, where this type has one on this CPU.
    fn wide_pair_kernel(_dim: usize, _dim_v: usize) -> Option<AttendPair<Self::Acc>> {
        None
    }

    /// The dots kernel for two queries sharing their window runs (see `PairDots`), for rows of
    /// `dim` channels of this type, where there is one on this CPU.
    fn pair_dots_kernel(_dim: usize) -> Option<PairDots<Self::Acc>> {
        None
    }

    /// `attend_kernel` and `attend_pair_kernel` for rows already widened to the accumulator
    /// type (the forward's staged rows), where this type has them on this CPU.
    fn staged_kernels() -> Option<AttendKernels<Self::Acc>> {
        None
    }

    /// Whether the forward's tile kernels (bfloat16 products on AMX, `simd::amx`) take rows
    /// of this type on this CPU.
    fn tile_forward() -> bool {
        false
    }
}

/// Softmax attention from a scaled query `q` over the keys of a key list (dense rows of
/// `q.len()` key channels and `acc.len()` value channels): writes
/// `acc = sum_n e^(logit_n - max) value_n` and returns `(max, sum_n e^(logit_n - max))`, where
/// `logit_n = q . key_n (+ the list's bias_n when the flag is set)`. The last slice is scratch
/// for the logits, of at least the list's `padded_len()`.
///
/// # Safety
/// The list must hold the keys of a row of a validated problem, with dense rows as above.
pub type Attend<A> = unsafe fn(&[A], &KeyList<A>, bool, &mut [A], &mut [A]) -> (A, A);

/// `Attend` for two queries at once: queries, key lists, `offset`, the bias flag, logit scratch
/// and outputs per query, `(max, sum)` per query. The second query's window runs must start
/// `offset` rows (of the same step) after the first's, in a union of at most eight rows that
/// holds both; the lists' extras must be the same rows. Rows are read through the first list
/// only: the second's run addresses need not be set (`Attention::begin_line`).
///
/// # Safety
/// As `Attend`, for both lists, and the union rows must all be keys of one of the queries.
pub type AttendPair<A> = unsafe fn(
    [&[A]; 2],
    [&KeyList<A>; 2],
    usize,
    bool,
    [&mut [A]; 2],
    [&mut [A]; 2],
) -> [(A, A); 2];

/// Dot products of two vectors with the window rows of two queries that share their window
/// runs as in `AttendPair` (vectors, key lists, `offset`): `out[k][n] = v[k] . row_n` over
/// query `k`'s window, in window order, with key rows or (the flag set) value rows.
///
/// # Safety
/// As `AttendPair`, for lists without additional tokens, with dense rows of `v[k].len()`
/// elements; `out[k]` holds list `k`'s window.
pub type PairDots<A> = unsafe fn([&[A]; 2], [&KeyList<A>; 2], usize, bool, [&mut [A]; 2]);

/// `PairDots` kernels for key rows (query channels) and value rows (value channels).
pub type PairDotsKernels<A> = (PairDots<A>, PairDots<A>);

/// An `Attend` kernel and its `AttendPair` counterpart.
pub type AttendKernels<A> = (Attend<A>, AttendPair<A>);

/// Element types whose row loops have explicit SIMD kernels (`simd`), used when the CPU has
/// them.
macro_rules! wide_rows {
    ($($t:ty),*) => {$(
        impl Element for $t {
            type Acc = f32;
            #[inline(always)]
            fn to_acc(self) -> f32 {
                self.into_f32()
            }
            #[inline(always)]
            fn from_acc(a: f32) -> Self {
                <$t>::from_f32_acc(a)
            }
            #[inline(always)]
            unsafe fn dot_rows<R: Rows>(a: &[f32], rows: R, out: &mut [f32]) {
                #[cfg(target_arch = "x86_64")]
                if super::simd::available() {
                    // SAFETY: the CPU has the kernels' features; the rest is the caller's.
                    return unsafe { super::simd::dot_rows::<$t, R>(a, rows, out) };
                }
                for (i, o) in out.iter_mut().enumerate().take(rows.len()) {
                    // SAFETY: by the caller's contract.
                    *o = unsafe { dot(a, rows.at(i) as *const Self, 1) };
                }
            }
            #[inline(always)]
            unsafe fn sum_rows<R: Rows>(w: &[f32], rows: R, acc: &mut [f32]) {
                #[cfg(target_arch = "x86_64")]
                if super::simd::available() {
                    // SAFETY: the CPU has the kernels' features; the rest is the caller's.
                    return unsafe { super::simd::sum_rows::<$t, R>(w, rows, acc) };
                }
                for (i, &weight) in w.iter().enumerate().take(rows.len()) {
                    // SAFETY: by the caller's contract.
                    unsafe { axpy(acc, weight, rows.at(i) as *const Self, 1) };
                }
            }
            #[inline(always)]
            unsafe fn sum_pair<R: WindowRuns>(
                w: [&[f32]; 2],
                offset: usize,
                runs: R,
                acc: [&mut [f32]; 2],
            ) {
                #[cfg(target_arch = "x86_64")]
                if super::simd::isa() >= super::simd::Isa::Avx512 {
                    // SAFETY: the CPU has the kernel's features; the rest is the caller's.
                    return unsafe { super::simd::sum_pair::<$t, R>(w, offset, runs, acc) };
                }
                // SAFETY: forwarded contract.
                unsafe { sum_pair_by_rows::<Self, R>(w, offset, runs, acc) }
            }
            #[inline(always)]
            unsafe fn widen_rows(src: *const Self, step: isize, dst: *mut f32, rows: (usize, usize)) {
                #[cfg(target_arch = "x86_64")]
                if super::simd::available() {
                    // SAFETY: the CPU has the kernels' features; the rest is the caller's.
                    return unsafe { super::simd::widen_rows::<$t>(src, step, dst, rows) };
                }
                // SAFETY: forwarded contract.
                unsafe { widen_rows_portable(src, step, dst, rows) }
            }
            fn attend_kernel() -> Option<Attend<f32>> {
                #[cfg(target_arch = "x86_64")]
                if super::simd::available() {
                    return Some(super::simd::attend::<$t>);
                }
                None
            }
            fn attend_pair_kernel() -> Option<AttendPair<f32>> {
                #[cfg(target_arch = "x86_64")]
                if super::simd::available() {
                    return Some(super::simd::attend_pair::<$t>);
                }
                None
            }
            fn wide_pair_kernel(dim: usize, dim_v: usize) -> Option<AttendPair<f32>> {
                #[cfg(target_arch = "x86_64")]
                if super::simd::isa() >= super::simd::Isa::Avx512 {
                    return super::simd::exact_pair_kernel(dim, dim_v);
                }
                let _ = (dim, dim_v);
                None
            }
            fn pair_dots_kernel(dim: usize) -> Option<PairDots<f32>> {
                #[cfg(target_arch = "x86_64")]
                if super::simd::isa() >= super::simd::Isa::Avx512 {
                    return super::simd::exact_pair_dots::<$t>(dim);
                }
                let _ = dim;
                None
            }
            fn staged_kernels() -> Option<AttendKernels<f32>> {
                #[cfg(target_arch = "x86_64")]
                {
                    use super::simd::{self, Isa};
                    match simd::isa() {
                        Isa::Avx512 | Isa::Amx => {
                            return Some((simd::attend_avx512, simd::attend_pair_avx512));
                        }
                        Isa::Avx2 => return Some((simd::attend::<f32>, simd::attend_pair::<f32>)),
                        Isa::Portable => {}
                    }
                }
                None
            }
            fn tile_forward() -> bool {
                #[cfg(target_arch = "x86_64")]
                if std::any::TypeId::of::<$t>() == std::any::TypeId::of::<bf16>() {
                    return super::simd::isa() >= super::simd::Isa::Amx;
                }
                false
            }
        }
    )*};
}

wide_rows!(f32, f16, bf16);

/// `Element::sum_pair` as two `sum_rows` calls per run, one per query.
///
/// # Safety
/// As `Element::sum_pair`.
#[inline(always)]
unsafe fn sum_pair_by_rows<T: Element, R: WindowRuns>(
    w: [&[T::Acc]; 2],
    offset: usize,
    runs: R,
    [acc_a, acc_b]: [&mut [T::Acc]; 2],
) {
    let lens = run_weights(w, runs);
    for (n, run) in runs.runs().enumerate() {
        let first = Run {
            len: lens[0],
            ..run
        };
        let second = Run {
            first: run.at(offset),
            len: lens[1],
            ..run
        };
        // SAFETY: forwarded contract; both runs are rows of `run`.
        unsafe {
            T::sum_rows(&w[0][n * lens[0]..][..lens[0]], first, &mut *acc_a);
            T::sum_rows(&w[1][n * lens[1]..][..lens[1]], second, &mut *acc_b);
        }
    }
}

/// The portable loop of `Element::widen_rows`.
///
/// # Safety
/// As `Element::widen_rows`.
#[inline(always)]
unsafe fn widen_rows_portable<T: Element>(
    src: *const T,
    step: isize,
    dst: *mut T::Acc,
    (n, len): (usize, usize),
) {
    for r in 0..len {
        for c in 0..n {
            // SAFETY: inside the rows and `dst` by the caller's contract.
            unsafe { *dst.add(r * n + c) = (*src.offset(r as isize * step).add(c)).to_acc() };
        }
    }
}

/// Conversions of the widened types to and from `f32`.
trait F32Convert {
    fn into_f32(self) -> f32;
    fn from_f32_acc(a: f32) -> Self;
}

impl F32Convert for f32 {
    #[inline(always)]
    fn into_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32_acc(a: f32) -> Self {
        a
    }
}

impl F32Convert for f16 {
    #[inline(always)]
    fn into_f32(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_f32_acc(a: f32) -> Self {
        f16::from_f32(a)
    }
}

impl F32Convert for bf16 {
    #[inline(always)]
    fn into_f32(self) -> f32 {
        self.to_f32()
    }
    /// `bf16::from_f32` (nearest, ties to even; NaNs stay NaN, quieted) without its branches,
    /// so that loops of it vectorize.
    #[inline(always)]
    fn from_f32_acc(a: f32) -> Self {
        let x = a.to_bits();
        let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
        let nan = (x & 0x7FFF_FFFF) > 0x7F80_0000;
        bf16::from_bits(if nan { (x >> 16) | 0x40 } else { rounded } as u16)
    }
}

impl Element for f64 {
    type Acc = f64;
    fn to_acc(self) -> f64 {
        self
    }
    fn from_acc(a: f64) -> Self {
        a
    }
}

/// Independent partial sums per dot product: lets the compiler keep a vector register of
/// them without reassociating a single float sum (which it may not do on its own).
const LANES: usize = 8;

/// Read `dst.len()` elements at `src`, `stride` apart, widened.
///
/// # Safety
/// `src + n * stride` must be readable for every `n < dst.len()`.
#[inline(always)]
pub unsafe fn load<T: Element>(dst: &mut [T::Acc], src: *const T, stride: isize) {
    // SAFETY: forwarded contract.
    unsafe { load_scaled(dst, src, stride, T::Acc::ONE) }
}

/// `load`, each element times `scale` (one pass over the row, not two).
///
/// # Safety
/// As `load`.
#[inline(always)]
pub unsafe fn load_scaled<T: Element>(
    dst: &mut [T::Acc],
    src: *const T,
    stride: isize,
    scale: T::Acc,
) {
    if stride == 1 {
        // A dense row: a loop the compiler vectorizes.
        // SAFETY: `dst.len()` elements at `src` by the caller's contract.
        let src = unsafe { std::slice::from_raw_parts(src, dst.len()) };
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &x)| *d = x.to_acc() * scale);
        return;
    }
    for (n, d) in dst.iter_mut().enumerate() {
        // SAFETY: in bounds by the caller's contract.
        *d = unsafe { *src.offset(n as isize * stride) }.to_acc() * scale;
    }
}

/// `sum_n a[n] * b[n * stride]`.
///
/// # Safety
/// `b + n * stride` must be readable for every `n < a.len()`.
#[inline(always)]
pub unsafe fn dot<T: Element>(a: &[T::Acc], b: *const T, stride: isize) -> T::Acc {
    if stride != 1 {
        let mut sum = T::Acc::ZERO;
        for (n, &x) in a.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            sum += x * unsafe { *b.offset(n as isize * stride) }.to_acc();
        }
        return sum;
    }
    // SAFETY: stride 1, so the caller's contract makes `a.len()` elements readable.
    let b = unsafe { std::slice::from_raw_parts(b, a.len()) };
    let mut lanes = [T::Acc::ZERO; LANES];
    let (a_body, a_tail) = a.split_at(a.len() - a.len() % LANES);
    let (b_body, b_tail) = b.split_at(a_body.len());
    for (ca, cb) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] += ca[l] * cb[l].to_acc();
        }
    }
    for (&x, &y) in a_tail.iter().zip(b_tail) {
        lanes[0] += x * y.to_acc();
    }
    sum_lanes(lanes)
}

/// Sum of the lanes as a tree (halves added pairwise), which vectorizes, unlike a running sum.
#[inline(always)]
fn sum_lanes<A: Accum>(l: [A; LANES]) -> A {
    let quads = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let pairs = [quads[0] + quads[2], quads[1] + quads[3]];
    pairs[0] + pairs[1]
}

/// `acc[n] += w * b[n * stride]`.
///
/// # Safety
/// `b + n * stride` must be readable for every `n < acc.len()`.
#[inline(always)]
pub unsafe fn axpy<T: Element>(acc: &mut [T::Acc], w: T::Acc, b: *const T, stride: isize) {
    if stride == 1 {
        // SAFETY: stride 1, so the caller's contract makes `acc.len()` elements readable.
        let b = unsafe { std::slice::from_raw_parts(b, acc.len()) };
        for (s, &x) in acc.iter_mut().zip(b) {
            *s += w * x.to_acc();
        }
        return;
    }
    for (n, s) in acc.iter_mut().enumerate() {
        // SAFETY: in bounds by the caller's contract.
        *s += w * unsafe { *b.offset(n as isize * stride) }.to_acc();
    }
}

/// Write `src` rounded to `dst`, `stride` apart.
///
/// # Safety
/// `dst + n * stride` must be writable for every `n < src.len()`, and no other thread may
/// access those elements meanwhile.
#[inline(always)]
pub unsafe fn store<T: Element>(dst: *mut T, stride: isize, src: &[T::Acc]) {
    if stride == 1 {
        // A dense row: a loop the compiler vectorizes.
        // SAFETY: `src.len()` writable elements at `dst`, ours, by the caller's contract.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst, src.len()) };
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &x)| *d = T::from_acc(x));
        return;
    }
    for (n, &x) in src.iter().enumerate() {
        // SAFETY: in bounds and exclusive by the caller's contract.
        unsafe { *dst.offset(n as isize * stride) = T::from_acc(x) };
    }
}

/// Bytes of a cache line: the unit of prefetches, of staging buffers' alignment, and of what
/// non-temporal stores should fill whole.
pub const LINE_BYTES: usize = 64;

/// `len` elements of `A` starting on a cache-line boundary (so that buffers of whole rows hold
/// them in whole lines), zeroed.
pub struct Aligned<A> {
    buf: Vec<A>,
    offset: usize,
}

impl<A: Copy + Default> Aligned<A> {
    /// A zeroed buffer of `len` elements.
    pub fn new(len: usize) -> Self {
        let slack = LINE_BYTES / std::mem::size_of::<A>();
        let buf = vec![A::default(); len + slack];
        let offset = buf.as_ptr().align_offset(LINE_BYTES).min(slack);
        Aligned { buf, offset }
    }

    /// The first element.
    pub fn ptr(&self) -> *const A {
        self.buf[self.offset..].as_ptr()
    }

    /// The first element, writable.
    pub fn ptr_mut(&mut self) -> *mut A {
        self.buf[self.offset..].as_mut_ptr()
    }
}

/// Write `src` rounded to the dense row at `dst` with non-temporal stores, which skip reading
/// the destination's lines into the caches first (a write-allocate read per line, and output
/// that evicts the inputs still being read). Writes nothing and returns false unless `dst` is
/// line-aligned and the row whole lines (partial lines would leave write-combining buffers half
/// full), or off x86-64. The stores are weakly ordered: call `fence_streams` before anything
/// else may read the row.
///
/// # Safety
/// As `store`, stride 1.
#[inline(always)]
pub unsafe fn stream_row<T: Element>(dst: *mut T, src: &[T::Acc]) -> bool {
    let size = std::mem::size_of::<T>();
    let whole_lines =
        (src.len() * size).is_multiple_of(LINE_BYTES) && LINE_BYTES.is_multiple_of(size);
    if !cfg!(target_arch = "x86_64") || !(dst as usize).is_multiple_of(LINE_BYTES) || !whole_lines {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_load_si128, _mm_stream_si128};
        #[repr(align(64))]
        struct Line([u8; LINE_BYTES]);
        let mut line = Line([0; LINE_BYTES]);
        for (i, chunk) in src.chunks_exact(LINE_BYTES / size).enumerate() {
            let staged = line.0.as_mut_ptr() as *mut T;
            for (j, &x) in chunk.iter().enumerate() {
                // SAFETY: `chunk` holds one line's worth of elements.
                unsafe { staged.add(j).write(T::from_acc(x)) };
            }
            let from = line.0.as_ptr() as *const __m128i;
            // SAFETY: line `i` of the row is ours (the caller's contract) and aligned (checked);
            // SSE2, which these intrinsics need, is part of x86-64.
            unsafe {
                let to = (dst as *mut u8).add(i * LINE_BYTES) as *mut __m128i;
                for k in 0..LINE_BYTES / 16 {
                    _mm_stream_si128(to.add(k), _mm_load_si128(from.add(k)));
                }
            }
        }
    }
    true
}

/// Order this thread's earlier `stream_row` stores before its later stores (among them, the
/// ones that tell other threads its work is done).
#[inline(always)]
pub fn fence_streams() {
    // SAFETY: SSE, which `sfence` needs, is part of x86-64.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(align(64))]
    struct Lines([f32; 48]);

    #[test]
    fn stream_row_writes_whole_aligned_lines_and_refuses_the_rest() {
        let src: Vec<f32> = (0..32).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut dst = Lines([f32::NAN; 48]);
        let base = dst.0.as_mut_ptr();
        // SAFETY (all calls): every row written lies inside `dst`, which nothing else reads.
        let streamed = unsafe { stream_row::<f32>(base, &src) };
        fence_streams();
        assert_eq!(streamed, cfg!(target_arch = "x86_64"));
        if streamed {
            assert_eq!(&dst.0[..32], &src[..]);
            assert!(dst.0[32..].iter().all(|x| x.is_nan()), "wrote past the row");
        }
        // Not line-aligned, or not whole lines: nothing is written.
        let before = dst.0;
        assert!(!unsafe { stream_row::<f32>(base.add(4), &src) });
        assert!(!unsafe { stream_row::<f32>(base, &src[..24]) });
        assert!(dst
            .0
            .iter()
            .zip(&before)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn bf16_rounding_matches_the_half_crate_bit_for_bit() {
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0 + f32::EPSILON * 32768.0, // half a bf16 step past 1: a tie, down to even
            1.0 + f32::EPSILON * 98304.0, // a tie, up to even
        ];
        let sampled = (0..=u32::MAX).step_by(4093).map(f32::from_bits);
        for x in specials.into_iter().chain(sampled) {
            let ours = <bf16 as Element>::from_acc(x).to_bits();
            assert_eq!(
                ours,
                bf16::from_f32(x).to_bits(),
                "{x:e} ({:#010x})",
                x.to_bits()
            );
        }
    }

    #[test]
    fn stream_row_rounds_half_types() {
        let src: Vec<f32> = (0..32).map(|i| 1.0 + i as f32 / 1024.0).collect();
        let mut dst = Lines([0.0; 48]);
        let base = dst.0.as_mut_ptr() as *mut bf16;
        // SAFETY: 32 bf16 (one line) inside `dst`.
        if unsafe { stream_row::<bf16>(base, &src) } {
            fence_streams();
            // SAFETY: the line just written.
            let row = unsafe { std::slice::from_raw_parts(base, 32) };
            for (&got, &x) in row.iter().zip(&src) {
                assert_eq!(got, bf16::from_f32(x));
            }
        }
    }
}
