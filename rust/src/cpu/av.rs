//! Window weighted sums: `out[x] = sum_slot w[x, slot] b[key(x, slot)]` (attention output, and
//! the query gradient), its transpose over inverse windows (key and value gradients), and the
//! reduction onto additional tokens.

use rayon::prelude::*;

use super::element::{axpy, store, Accum, Element};
use super::grid::Grid;
use super::isa::{par_rows, RowKernel};
use super::view::{Extras, Tokens};

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
    unsafe { par_rows(g.rows(), g.dim, T::Acc::ZERO, &kernel) };
}

struct GatherRows<'a, T> {
    g: &'a Grid,
    w: Tokens<T>,
    b: Tokens<T>,
    extra: Option<Extras<T>>,
    out: Tokens<T>,
}

impl<T: Element> RowKernel for GatherRows<'_, T> {
    type Acc = T::Acc;

    #[inline(always)]
    unsafe fn row(&self, r: usize, acc: &mut [T::Acc]) {
        let g = self.g;
        let row = g.row(r);
        let (bi, h, [x0, x1, x2]) = (row.b, row.h, row.x);
        let win = g.window(row.x);
        let k = g.axes.map(|a| a.kernel);
        let key_step = [0, 1, 2].map(|a| (g.axes[a].dilation as isize) * self.b.stride(2 + a));
        acc.fill(T::Acc::ZERO);
        // SAFETY (whole block): indices come from a validated problem, so every address is in
        // its tensor; row `r` of `out` is written by this call only.
        unsafe {
            let weights = self.w.at([bi, h, x0, x1, x2, 0]);
            let w_step = self.w.inner_stride();
            let first_key = self
                .b
                .at([bi, h, win[0].first, win[1].first, win[2].first, 0]);
            for s0 in 0..win[0].count {
                for s1 in 0..win[1].count {
                    for s2 in 0..win[2].count {
                        let slot = ((s0 * k[1] + s1) * k[2] + s2) as isize;
                        let weight = (*weights.offset(slot * w_step)).to_acc();
                        let s = [s0 as isize, s1 as isize, s2 as isize];
                        let key = first_key
                            .offset(s[0] * key_step[0] + s[1] * key_step[1] + s[2] * key_step[2]);
                        axpy(acc, weight, key, self.b.inner_stride());
                    }
                }
            }
            if let Some(extra) = self.extra {
                for e in 0..g.extra {
                    let weight = (*weights.offset((g.slots + e) as isize * w_step)).to_acc();
                    axpy(acc, weight, extra.at([bi, h, e, 0]), extra.inner_stride());
                }
            }
            store(
                self.out.at([bi, h, x0, x1, x2, 0]),
                self.out.inner_stride(),
                acc,
            );
        }
    }
}

/// `out[y] = sum over queries x whose window holds y of w[x, slot(x, y)] a[x]`.
pub fn scatter<T: Element>(g: &Grid, w: Tokens<T>, a: Tokens<T>, out: Tokens<T>) {
    let kernel = ScatterRows { g, w, a, out };
    // SAFETY: `ScatterRows::row` touches only row `r` of `out`, for any `r < g.rows()`.
    unsafe { par_rows(g.rows(), g.dim, T::Acc::ZERO, &kernel) };
}

struct ScatterRows<'a, T> {
    g: &'a Grid,
    w: Tokens<T>,
    a: Tokens<T>,
    out: Tokens<T>,
}

impl<T: Element> RowKernel for ScatterRows<'_, T> {
    type Acc = T::Acc;

    #[inline(always)]
    unsafe fn row(&self, r: usize, acc: &mut [T::Acc]) {
        let row = self.g.row(r);
        let (bi, h) = (row.b, row.h);
        acc.fill(T::Acc::ZERO);
        // SAFETY (whole block): indices come from a validated problem, so every address is in
        // its tensor; row `r` of `out` is written by this call only.
        unsafe {
            self.g.for_each_query_of(row.x, |[x0, x1, x2], slot| {
                let weight = (*self.w.at([bi, h, x0, x1, x2, slot])).to_acc();
                axpy(
                    acc,
                    weight,
                    self.a.at([bi, h, x0, x1, x2, 0]),
                    self.a.inner_stride(),
                );
            });
            let [y0, y1, y2] = row.x;
            store(
                self.out.at([bi, h, y0, y1, y2, 0]),
                self.out.inner_stride(),
                acc,
            );
        }
    }
}

/// `out[e] = sum_x w[x, slots + e] a[x]`, per batch and head.
pub fn extra_grad<T: Element>(g: &Grid, w: Tokens<T>, a: Tokens<T>, out: Extras<T>) {
    let (slots, heads, count) = (g.slots, g.heads, g.extra);
    (0..g.batch * heads * count).into_par_iter().for_each(|r| {
        let (bi, h, e) = (r / (heads * count), (r / count) % heads, r % count);
        let mut acc = vec![T::Acc::ZERO; g.dim];
        for n in 0..g.tokens() {
            let [x0, x1, x2] = g.row(n).x;
            // SAFETY: in-shape indices of a validated problem; output row `r` has one writer.
            unsafe {
                let weight = (*w.at([bi, h, x0, x1, x2, slots + e])).to_acc();
                axpy(
                    &mut acc,
                    weight,
                    a.at([bi, h, x0, x1, x2, 0]),
                    a.inner_stride(),
                );
            }
        }
        // SAFETY: as above.
        unsafe { store(out.at([bi, h, e, 0]), out.inner_stride(), &acc) };
    });
}
