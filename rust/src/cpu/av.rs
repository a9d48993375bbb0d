//! Window weighted sums: `out[x] = sum_slot w[x, slot] b[key(x, slot)]` (attention output, and
//! the query gradient), its transpose over inverse windows (key and value gradients), and the
//! reduction onto additional tokens.

use rayon::prelude::*;

use super::element::{axpy, store, Accum, Element};
use super::grid::{par_rows, Grid};
use super::view::{Extras, Tokens};

/// `out[x] = sum_slot w[x, slot] b[key] + sum_e w[x, slots + e] extra[e]`.
pub fn gather<T: Element>(
    g: &Grid,
    w: Tokens<T>,
    b: Tokens<T>,
    extra: Option<Extras<T>>,
    out: Tokens<T>,
) {
    let slots = g.slots;
    par_rows(g.rows(), g.dim, T::Acc::ZERO, |r, acc| {
        acc.fill(T::Acc::ZERO);
        let row = g.row(r);
        let (bi, h, [x0, x1, x2]) = (row.b, row.h, row.x);
        // SAFETY: rows of a validated problem are in shape; each output row has one writer.
        unsafe {
            g.for_each_slot(row.x, |slot, key| {
                if let Some([y0, y1, y2]) = key {
                    let weight = (*w.at([bi, h, x0, x1, x2, slot])).to_acc();
                    axpy(acc, weight, b.at([bi, h, y0, y1, y2, 0]), b.inner_stride());
                }
            });
            if let Some(extra) = extra {
                for e in 0..g.extra {
                    let weight = (*w.at([bi, h, x0, x1, x2, slots + e])).to_acc();
                    axpy(acc, weight, extra.at([bi, h, e, 0]), extra.inner_stride());
                }
            }
            store(out.at([bi, h, x0, x1, x2, 0]), out.inner_stride(), acc);
        }
    });
}

/// `out[y] = sum over queries x whose window holds y of w[x, slot(x, y)] a[x]`.
pub fn scatter<T: Element>(g: &Grid, w: Tokens<T>, a: Tokens<T>, out: Tokens<T>) {
    par_rows(g.rows(), g.dim, T::Acc::ZERO, |r, acc| {
        acc.fill(T::Acc::ZERO);
        let row = g.row(r);
        let (bi, h) = (row.b, row.h);
        // SAFETY: rows of a validated problem are in shape; each output row has one writer.
        unsafe {
            g.for_each_query_of(row.x, |[x0, x1, x2], slot| {
                let weight = (*w.at([bi, h, x0, x1, x2, slot])).to_acc();
                axpy(acc, weight, a.at([bi, h, x0, x1, x2, 0]), a.inner_stride());
            });
            let [y0, y1, y2] = row.x;
            store(out.at([bi, h, y0, y1, y2, 0]), out.inner_stride(), acc);
        }
    });
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
