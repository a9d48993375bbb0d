//! Window dot products: `out[x, slot] = a[x] . b[key(x, slot)]` (attention logits, and the
//! gradient of attention weights), and the reduction of logit gradients onto the bias.

use rayon::prelude::*;

use super::element::{dot, load, Accum, Element};
use super::grid::{par_rows, Grid};
use super::view::{Bias, Extras, Tokens};

/// Inputs of a window dot product.
pub struct Pairwise<T> {
    /// Query-side rows `[B, H, *, C]`.
    pub a: Tokens<T>,
    /// Key-side rows `[B, H, *, C]`.
    pub b: Tokens<T>,
    /// Additional key-side rows, dotted into the slots after the window.
    pub extra: Option<Extras<T>>,
    /// Bias added per relative offset.
    pub bias: Option<Bias<T>>,
    /// Whether slots past a causal window's end hold `-inf` (logits) rather than 0 (gradients).
    pub mask_with_neg_inf: bool,
}

/// `out[x, slot] = a[x] . b[key] (+ bias)`; slots past the window hold `fill`.
pub fn pairwise<T: Element>(g: &Grid, op: &Pairwise<T>, out: Tokens<T>) {
    let fill = T::from_acc(if op.mask_with_neg_inf {
        T::Acc::NEG_INF
    } else {
        T::Acc::ZERO
    });
    let (ca, cb) = (op.a.inner_stride(), op.b.inner_stride());
    par_rows(g.rows(), g.dim, T::Acc::ZERO, |r, query| {
        let row = g.row(r);
        let (b, h, [x0, x1, x2]) = (row.b, row.h, row.x);
        // SAFETY: rows of a validated problem are in shape; each output row has one writer.
        unsafe {
            load(query, op.a.at([b, h, x0, x1, x2, 0]), ca);
            g.for_each_slot(row.x, |slot, key| {
                let dst = out.at([b, h, x0, x1, x2, slot]);
                *dst = match key {
                    None => fill,
                    Some([y0, y1, y2]) => {
                        let mut logit = dot(query, op.b.at([b, h, y0, y1, y2, 0]), cb);
                        if let Some(bias) = &op.bias {
                            let idx = bias_index(g, row.x, [y0, y1, y2]);
                            logit += (*bias.at([h, idx[0], idx[1], idx[2]])).to_acc();
                        }
                        T::from_acc(logit)
                    }
                };
            });
            if let Some(extra) = &op.extra {
                for e in 0..g.extra {
                    let logit = dot(query, extra.at([b, h, e, 0]), extra.inner_stride());
                    *out.at([b, h, x0, x1, x2, g.slots + e]) = T::from_acc(logit);
                }
            }
        }
    });
}

/// `d_bias[h, offset] = sum over batch and queries of d_logits[.., slot]` at that offset,
/// summed in a fixed order (deterministic).
pub fn bias_grad<T: Element>(g: &Grid, d_logits: Tokens<T>, d_bias: Bias<T>) {
    let (batch, heads) = (g.batch, g.heads);
    let span = g.axes.map(|a| 2 * a.kernel - 1);
    let size = span.iter().product::<usize>();
    let partials: Vec<Vec<T::Acc>> = (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let mut sums = vec![T::Acc::ZERO; size];
            for n in 0..g.tokens() {
                let x = g.row(n).x;
                g.for_each_slot(x, |slot, key| {
                    if let Some(y) = key {
                        let [i0, i1, i2] = bias_index(g, x, y);
                        // SAFETY: in-shape index of a validated problem.
                        let w = unsafe { *d_logits.at([b, h, x[0], x[1], x[2], slot]) };
                        sums[(i0 * span[1] + i1) * span[2] + i2] += w.to_acc();
                    }
                });
            }
            sums
        })
        .collect();
    for h in 0..heads {
        let mut total = vec![T::Acc::ZERO; size];
        for b in 0..batch {
            for (t, &p) in total.iter_mut().zip(&partials[b * heads + h]) {
                *t += p;
            }
        }
        for (i, &sum) in total.iter().enumerate() {
            let idx = [
                i / (span[1] * span[2]),
                (i / span[2]) % span[1],
                i % span[2],
            ];
            // SAFETY: in-shape index of the validated bias output, written by this thread only.
            unsafe { *d_bias.at([h, idx[0], idx[1], idx[2]]) = T::from_acc(sum) };
        }
    }
}

fn bias_index(g: &Grid, x: [usize; 3], y: [usize; 3]) -> [usize; 3] {
    [0, 1, 2].map(|a| g.axes[a].bias_index(x[a], y[a]))
}
