//! Window dot products: `out[x, slot] = a[x] . b[key(x, slot)]` (attention logits, and the
//! gradient of attention weights), and the reduction of logit gradients onto the bias.

use std::sync::Mutex;

use super::element::{dot, load, Accum, Element};
use super::grid::Grid;
use super::parallel::{for_each_with, par_rows, RowKernel};
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

/// `out[x, slot] = a[x] . b[key] (+ bias)`; slots past the window hold `-inf` or 0.
pub fn pairwise<T: Element>(g: &Grid, op: &Pairwise<T>, out: Tokens<T>) {
    let fill = T::from_acc(if op.mask_with_neg_inf {
        T::Acc::NEG_INF
    } else {
        T::Acc::ZERO
    });
    let kernel = PairwiseRows { g, op, out, fill };
    // SAFETY: `PairwiseRows::row` touches only row `r` of `out`, for any `r < g.rows()`.
    unsafe { par_rows((g.rows(), g.row_cost()), &kernel) };
}

struct PairwiseRows<'a, T> {
    g: &'a Grid,
    op: &'a Pairwise<T>,
    out: Tokens<T>,
    fill: T,
}

impl<T: Element> RowKernel for PairwiseRows<'_, T> {
    type Scratch = Vec<T::Acc>;

    fn scratch(&self) -> Vec<T::Acc> {
        vec![T::Acc::ZERO; self.g.dim]
    }

    #[inline(always)]
    unsafe fn row(&self, r: usize, query: &mut Vec<T::Acc>) {
        let (g, op) = (self.g, self.op);
        let row = g.row(r);
        let (b, h, [x0, x1, x2]) = (row.b, row.h, row.x);
        let w = g.window(row.x);
        let k = g.axes.map(|a| a.kernel);
        let key_step = [0, 1, 2].map(|a| (g.axes[a].dilation as isize) * op.b.stride(2 + a));
        // SAFETY (whole block): indices come from a validated problem, so every address is in
        // its tensor; row `r` of `out` is written by this call only.
        unsafe {
            load(query, op.a.at([b, h, x0, x1, x2, 0]), op.a.inner_stride());
            let first_key = op.b.at([b, h, w[0].first, w[1].first, w[2].first, 0]);
            let first_bias = op.bias.map(|bias| {
                let [i0, i1, i2] = [0, 1, 2].map(|a| g.axes[a].bias_index(row.x[a], w[a].first));
                (bias.at([h, i0, i1, i2]), [1, 2, 3].map(|a| bias.stride(a)))
            });
            let dst = self.out.at([b, h, x0, x1, x2, 0]);
            let dst_step = self.out.inner_stride();
            let cb = op.b.inner_stride();
            for s0 in 0..k[0] {
                for s1 in 0..k[1] {
                    let (s0i, s1i) = (s0 as isize, s1 as isize);
                    let first_slot = ((s0 * k[1] + s1) * k[2]) as isize;
                    let write = |s2: usize, logit: T::Acc| {
                        let biased = match first_bias {
                            None => logit,
                            Some((bias, st)) => {
                                let at = s0i * st[0] + s1i * st[1] + s2 as isize * st[2];
                                logit + (*bias.offset(at)).to_acc()
                            }
                        };
                        *dst.offset((first_slot + s2 as isize) * dst_step) = T::from_acc(biased);
                    };
                    let valid = if s0 < w[0].count && s1 < w[1].count {
                        w[2].count
                    } else {
                        0
                    };
                    let row_key = first_key.offset(s0i * key_step[0] + s1i * key_step[1]);
                    let key = |s2: usize| row_key.offset(s2 as isize * key_step[2]) as *const T;
                    for s2 in 0..valid {
                        write(s2, dot(query, key(s2), cb));
                    }
                    for s2 in valid..k[2] {
                        *dst.offset((first_slot + s2 as isize) * dst_step) = self.fill;
                    }
                }
            }
            if let Some(extra) = op.extra {
                for e in 0..g.extra {
                    let logit = dot(query, extra.at([b, h, e, 0]), extra.inner_stride());
                    *dst.offset((g.slots + e) as isize * dst_step) = T::from_acc(logit);
                }
            }
        }
    }
}

/// `d_bias[h, offset] = sum over batch and queries of d_logits[.., slot]` at that offset,
/// summed in a fixed order (deterministic).
pub fn bias_grad<T: Element>(g: &Grid, d_logits: Tokens<T>, d_bias: Bias<T>) {
    let (batch, heads) = (g.batch, g.heads);
    let span = g.axes.map(|a| 2 * a.kernel - 1);
    let size = span.iter().product::<usize>();
    let partials: Vec<Mutex<Vec<T::Acc>>> = (0..batch * heads)
        .map(|_| Mutex::new(vec![T::Acc::ZERO; size]))
        .collect();
    for_each_with(
        (batch * heads, g.tokens() * g.slots),
        || (),
        |bh, _| {
            let (b, h) = (bh / heads, bh % heads);
            let mut sums = partials[bh].lock().unwrap_or_else(|e| e.into_inner());
            for n in 0..g.tokens() {
                let x = g.row(n).x;
                g.for_each_slot(x, |slot, key| {
                    if let Some(y) = key {
                        let [i0, i1, i2] = [0, 1, 2].map(|a| g.axes[a].bias_index(x[a], y[a]));
                        // SAFETY: in-shape index of a validated problem.
                        let w = unsafe { *d_logits.at([b, h, x[0], x[1], x[2], slot]) };
                        sums[(i0 * span[1] + i1) * span[2] + i2] += w.to_acc();
                    }
                });
            }
        },
    );
    store_bias_grad(partials, batch, span, d_bias);
}

/// Write `d_bias[h] = sum over b of partials[b * heads + h]`, summed in batch order (so the
/// result does not depend on how the partials were scheduled).
pub fn store_bias_grad<T: Element>(
    partials: Vec<Mutex<Vec<T::Acc>>>,
    batch: usize,
    span: [usize; 3],
    d_bias: Bias<T>,
) {
    let heads = partials.len() / batch.max(1);
    let partials: Vec<Vec<T::Acc>> = partials
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect();
    for h in 0..heads {
        let mut total = vec![T::Acc::ZERO; span.iter().product()];
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
            // SAFETY: in-shape index of the validated bias gradient, written by this thread only.
            unsafe { *d_bias.at([h, idx[0], idx[1], idx[2]]) = T::from_acc(sum) };
        }
    }
}
