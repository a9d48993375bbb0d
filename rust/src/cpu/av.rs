//! Window weighted sums: `out[x] = sum_slot w[x, slot] b[key(x, slot)]` (attention output, and
//! the query gradient), its transpose over inverse windows (key and value gradients), and the
//! reduction onto additional tokens.

use super::element::{axpy, store, Accum, Element};
use super::grid::{Grid, Row};
use super::parallel::{for_each_with, par_rows, RowKernel};
use super::view::{Extras, Tokens};

/// An output row that is a weighted sum of input rows (`terms`).
pub trait WeightedSum<T: Element> {
    /// Calls `f(weight, row, channel_stride)` for every term of row `row`'s sum.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem.
    unsafe fn terms(&self, row: Row, f: impl FnMut(T::Acc, *const T, isize));
    /// Whether every term row has channel stride 1 (register-chunked sums apply).
    fn dense_terms(&self) -> bool;
}

/// Terms gathered per call of `Element::sum_rows` by `weighted_sum`.
const TERM_BATCH: usize = 64;

/// Write `scale * sum` for row `row` to `dim` channels at `dst`, with `scratch` (at least
/// `dim` long) as the accumulator. Dense terms are gathered in batches and summed by
/// `Element::sum_rows` (explicit SIMD, independent of how the compiler treats this loop);
/// strided ones one channel run at a time.
///
/// # Safety
/// `row` must be a row of the validated problem; `dst` must be writable for `dim` channels
/// `dst_step` apart and written by this call only.
#[inline(always)]
pub unsafe fn weighted_sum<T: Element, S: WeightedSum<T>>(
    sum: &S,
    row: Row,
    (dst, dst_step, dim): (*mut T, isize, usize),
    scale: T::Acc,
    scratch: &mut [T::Acc],
) {
    let acc = &mut scratch[..dim];
    acc.fill(T::Acc::ZERO);
    // SAFETY (whole block): terms point at rows of `dim` channels; `dst` is this row's output.
    unsafe {
        if sum.dense_terms() {
            let mut weights = [T::Acc::ZERO; TERM_BATCH];
            let mut rows = [0usize; TERM_BATCH];
            let mut n = 0;
            sum.terms(row, |w, src, _| {
                weights[n] = w;
                rows[n] = src as usize;
                n += 1;
                if n == TERM_BATCH {
                    T::sum_rows(&weights, &rows[..], acc);
                    n = 0;
                }
            });
            T::sum_rows(&weights[..n], &rows[..n], acc);
        } else {
            sum.terms(row, |w, src, step| axpy(acc, w, src, step));
        }
        acc.iter_mut().for_each(|a| *a = *a * scale);
        store(dst, dst_step, acc);
    }
}

/// Output row `r` of a token view, as `weighted_sum` takes it.
fn out_row<T>(g: &Grid, out: Tokens<T>, r: usize) -> (Row, (*mut T, isize, usize)) {
    let row = g.row(r);
    let [x0, x1, x2] = row.x;
    // SAFETY: rows of a validated problem are in shape.
    let dst = unsafe { out.at([row.b, row.h, x0, x1, x2, 0]) };
    (row, (dst, out.inner_stride(), g.dim))
}

/// `out[x] = sum_slot w[x, slot] b[key] + sum_e w[x, slots + e] extra[e]`.
pub fn gather<T: Element>(
    g: &Grid,
    w: Tokens<T>,
    b: Tokens<T>,
    extra: Option<Extras<T>>,
    out: Tokens<T>,
) {
    let kernel = GatherRows {
        g,
        w,
        b,
        extra,
        out,
    };
    // SAFETY: `GatherRows::row` touches only row `r` of `out`, for any `r < g.rows()`.
    unsafe { par_rows((g.rows(), g.row_cost()), &kernel) };
}

struct GatherRows<'a, T> {
    g: &'a Grid,
    w: Tokens<T>,
    b: Tokens<T>,
    extra: Option<Extras<T>>,
    out: Tokens<T>,
}

impl<T: Element> WeightedSum<T> for GatherRows<'_, T> {
    #[inline(always)]
    unsafe fn terms(&self, row: Row, mut f: impl FnMut(T::Acc, *const T, isize)) {
        let g = self.g;
        let (bi, h, [x0, x1, x2]) = (row.b, row.h, row.x);
        let win = g.window(row.x);
        let k = g.axes.map(|a| a.kernel);
        let key_step = [0, 1, 2].map(|a| (g.axes[a].dilation as isize) * self.b.stride(2 + a));
        let cb = self.b.inner_stride();
        // SAFETY (whole block): indices come from a validated problem.
        unsafe {
            let weights = self.w.at([bi, h, x0, x1, x2, 0]);
            let w_step = self.w.inner_stride();
            let first_key = self
                .b
                .at([bi, h, win[0].first, win[1].first, win[2].first, 0]);
            for s0 in 0..win[0].count {
                for s1 in 0..win[1].count {
                    let first_slot = ((s0 * k[1] + s1) * k[2]) as isize;
                    let row_key =
                        first_key.offset(s0 as isize * key_step[0] + s1 as isize * key_step[1]);
                    for s2 in 0..win[2].count as isize {
                        let weight = (*weights.offset((first_slot + s2) * w_step)).to_acc();
                        f(weight, row_key.offset(s2 * key_step[2]), cb);
                    }
                }
            }
            if let Some(extra) = self.extra {
                for e in 0..g.extra {
                    let weight = (*weights.offset((g.slots + e) as isize * w_step)).to_acc();
                    f(weight, extra.at([bi, h, e, 0]), extra.inner_stride());
                }
            }
        }
    }

    fn dense_terms(&self) -> bool {
        self.b.inner_stride() == 1 && self.extra.is_none_or(|e| e.inner_stride() == 1)
    }
}

impl<T: Element> RowKernel for GatherRows<'_, T> {
    type Scratch = Vec<T::Acc>;

    fn scratch(&self) -> Vec<T::Acc> {
        vec![T::Acc::ZERO; self.g.dim]
    }

    #[inline(always)]
    unsafe fn row(&self, r: usize, scratch: &mut Vec<T::Acc>) {
        let (row, dst) = out_row(self.g, self.out, r);
        // SAFETY: forwarded contract.
        unsafe { weighted_sum(self, row, dst, T::Acc::ONE, scratch) }
    }
}

/// `out[y] = sum over queries x whose window holds y of w[x, slot(x, y)] a[x]`.
pub fn scatter<T: Element>(g: &Grid, w: Tokens<T>, a: Tokens<T>, out: Tokens<T>) {
    let kernel = ScatterRows { g, w, a, out };
    // SAFETY: `ScatterRows::row` touches only row `r` of `out`, for any `r < g.rows()`.
    unsafe { par_rows((g.rows(), g.row_cost()), &kernel) };
}

struct ScatterRows<'a, T> {
    g: &'a Grid,
    w: Tokens<T>,
    a: Tokens<T>,
    out: Tokens<T>,
}

impl<T: Element> WeightedSum<T> for ScatterRows<'_, T> {
    #[inline(always)]
    unsafe fn terms(&self, row: Row, mut f: impl FnMut(T::Acc, *const T, isize)) {
        let (g, w, a) = (self.g, self.w, self.a);
        let [_, k1, k2] = g.axes.map(|a| a.kernel);
        let [y0, y1, y2] = row.x;
        let (w_step, a_step) = (w.inner_stride(), a.inner_stride());
        // SAFETY (whole block): queries of a key of a validated problem are in shape, and so
        // are their slots.
        unsafe {
            let (w_bh, a_bh) = (
                w.at([row.b, row.h, 0, 0, 0, 0]),
                a.at([row.b, row.h, 0, 0, 0, 0]),
            );
            for &(x0, s0) in g.queries_of(0, y0) {
                let (w0, a0) = (x0 as isize * w.stride(2), x0 as isize * a.stride(2));
                for &(x1, s1) in g.queries_of(1, y1) {
                    let (w1, a1) = (
                        w0 + x1 as isize * w.stride(3),
                        a0 + x1 as isize * a.stride(3),
                    );
                    let slot01 = (s0 * k1 + s1) * k2;
                    for &(x2, s2) in g.queries_of(2, y2) {
                        let slot = (slot01 + s2) as isize;
                        let weight = *w_bh.offset(w1 + x2 as isize * w.stride(4) + slot * w_step);
                        f(
                            weight.to_acc(),
                            a_bh.offset(a1 + x2 as isize * a.stride(4)),
                            a_step,
                        );
                    }
                }
            }
        }
    }

    fn dense_terms(&self) -> bool {
        self.a.inner_stride() == 1
    }
}

impl<T: Element> RowKernel for ScatterRows<'_, T> {
    type Scratch = Vec<T::Acc>;

    fn scratch(&self) -> Vec<T::Acc> {
        vec![T::Acc::ZERO; self.g.dim]
    }

    #[inline(always)]
    unsafe fn row(&self, r: usize, scratch: &mut Vec<T::Acc>) {
        let (row, dst) = out_row(self.g, self.out, r);
        // SAFETY: forwarded contract.
        unsafe { weighted_sum(self, row, dst, T::Acc::ONE, scratch) }
    }
}

/// `out[e] = sum_x w[x, slots + e] a[x]`, per batch and head.
pub fn extra_grad<T: Element>(g: &Grid, w: Tokens<T>, a: Tokens<T>, out: Extras<T>) {
    let (slots, heads, count) = (g.slots, g.heads, g.extra);
    for_each_with(
        (g.batch * heads * count, g.tokens() * g.dim),
        || vec![T::Acc::ZERO; g.dim],
        |r, acc| {
            let (bi, h, e) = (r / (heads * count), (r / count) % heads, r % count);
            acc.fill(T::Acc::ZERO);
            for n in 0..g.tokens() {
                let [x0, x1, x2] = g.row(n).x;
                // SAFETY: in-shape indices of a validated problem; output row `r` has one writer.
                unsafe {
                    let weight = (*w.at([bi, h, x0, x1, x2, slots + e])).to_acc();
                    axpy(acc, weight, a.at([bi, h, x0, x1, x2, 0]), a.inner_stride());
                }
            }
            // SAFETY: as above.
            unsafe { store(out.at([bi, h, e, 0]), out.inner_stride(), acc) };
        },
    );
}
