//! Fused neighborhood attention, backward, FlashAttention-style: probabilities are recomputed,
//! no `[tokens x window]` buffer is kept. Four passes, each writing its outputs from one task
//! per row (no atomics, deterministic): queries (`d_query`; and per query `delta = d_out . out -
//! d_lse` and the logsumexp, recomputed at the accumulator's precision rather than read from the
//! float32 `lse`), keys over inverse windows (`d_key`, `d_value`), additional tokens, and the
//! bias (summed per batch in a fixed order).

use std::sync::Mutex;

use super::av::weighted_sum;
use super::element::{axpy, dot, load, store, Accum, Element};
use super::fused::{Attention, FusedTensors, Key, KeyTerms};
use super::grid::{Grid, Row};
use super::parallel::{for_each_with, par_rows, RowKernel};
use super::view::{bias, extras_heads_last, tokens_heads_last, Tokens};
use crate::dlpack::TensorRef;
use crate::problem::FusedProblem;

/// Gradients of a fused problem (absent ones are not computed).
pub struct FusedGrads<'a> {
    /// `[B, *spatial, heads, D]`.
    pub d_query: &'a TensorRef,
    /// `[B, *spatial, heads_kv, D]`.
    pub d_key: Option<&'a TensorRef>,
    /// `[B, *spatial, heads_kv, Dv]`.
    pub d_value: Option<&'a TensorRef>,
    /// `[B, n_extra, heads_kv, D]`.
    pub d_additional_keys: Option<&'a TensorRef>,
    /// `[B, n_extra, heads_kv, Dv]`.
    pub d_additional_values: Option<&'a TensorRef>,
    /// `[heads, 2K-1, ...]`.
    pub d_rpb: Option<&'a TensorRef>,
}

/// What the forward pass left and the gradients flowing in.
pub struct Saved<'a> {
    /// `[B, *spatial, heads, Dv]`.
    pub out: &'a TensorRef,
    /// `[B, *spatial, heads, Dv]`.
    pub d_out: &'a TensorRef,
    /// `[B, *spatial, heads]`, float32: the gradient flowing into `lse`, when it was used.
    pub d_lse: Option<&'a TensorRef>,
}

/// Per-query-row values, written by the query pass (one task per row) and read after it.
struct PerRow<A> {
    values: Vec<A>,
}

impl<A: Copy> PerRow<A> {
    /// Write `value` for row `r`.
    ///
    /// # Safety
    /// No other task may access row `r` meanwhile.
    unsafe fn set(&self, r: usize, value: A) {
        assert!(r < self.values.len(), "row {r} out of range");
        // SAFETY: `r` is in range and, by contract, no other task touches it.
        unsafe { *(self.values.as_ptr().add(r) as *mut A) = value };
    }
}

// SAFETY: tasks write disjoint rows (`set`'s contract) and read only after the writing pass.
unsafe impl<A: Send> Sync for PerRow<A> {}

/// Shared state of the backward passes.
struct Backward<'a, 'g, T: Element> {
    a: &'a Attention<'g, T>,
    d_out: Tokens<T>,
    out: Tokens<T>,
    d_lse: Option<Tokens<f32>>,
    /// `d_out . out - d_lse` per query row (row-indexed like the query grid).
    delta: PerRow<T::Acc>,
    /// Logsumexp of the scaled logits per query row.
    lse: PerRow<T::Acc>,
}

/// All gradients of a fused problem.
pub fn backward<T: Element>(p: &FusedProblem, t: &FusedTensors, saved: &Saved, grads: &FusedGrads) {
    let g = Grid::with(p.axes, (p.batch, p.heads), p.dim, p.extra);
    let a = Attention::<T>::new(p, &g, t);
    let bwd = Backward {
        a: &a,
        d_out: tokens_heads_last(saved.d_out, p.rank, true),
        out: tokens_heads_last(saved.out, p.rank, true),
        d_lse: saved.d_lse.map(|t| tokens_heads_last(t, p.rank, false)),
        delta: PerRow {
            values: vec![T::Acc::ZERO; g.rows()],
        },
        lse: PerRow {
            values: vec![T::Acc::ZERO; g.rows()],
        },
    };
    let query_pass = QueryPass {
        bwd: &bwd,
        d_query: tokens_heads_last(grads.d_query, p.rank, true),
    };
    let width = p.dim + p.dim_v + a.max_keys() + p.dim.max(p.dim_v);
    // SAFETY: `QueryPass::row` writes only row `r` of `d_query`, `delta` and `lse`.
    unsafe { par_rows(g.rows(), width, T::Acc::ZERO, &query_pass) };
    if let (Some(d_key), Some(d_value)) = (grads.d_key, grads.d_value) {
        bwd.key_pass(
            p,
            t,
            tokens_heads_last(d_key, p.rank, true),
            tokens_heads_last(d_value, p.rank, true),
        );
    }
    if let (Some(dk), Some(dv)) = (grads.d_additional_keys, grads.d_additional_values) {
        bwd.extra_pass(p, t, (extras_heads_last(dk), extras_heads_last(dv)));
    }
    if let Some(d_rpb) = grads.d_rpb {
        bwd.bias_pass(p, bias(d_rpb));
    }
}

impl<T: Element> Backward<'_, '_, T> {
    /// `ds[n] = p[n] (d_out . value_n - delta)` for the keys of query row `row`, with `p` the
    /// softmax of its logits; returns `(keys, lse, delta)`. `q` and `d_o` are scratch.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem; `ds` at least `max_keys` long.
    #[inline(always)]
    unsafe fn logit_grads(
        &self,
        row: Row,
        (q, d_o): (&mut [T::Acc], &mut [T::Acc]),
        ds: &mut [T::Acc],
    ) -> (usize, T::Acc, T::Acc) {
        let a = self.a;
        let Row {
            b,
            h,
            x: [x0, x1, x2],
        } = row;
        let hk = h / a.group;
        // SAFETY (whole block): in shape by the caller's contract.
        unsafe {
            load(
                d_o,
                self.d_out.at([b, h, x0, x1, x2, 0]),
                self.d_out.inner_stride(),
            );
            let mut delta = dot(
                d_o,
                self.out.at([b, h, x0, x1, x2, 0]),
                self.out.inner_stride(),
            );
            if let Some(d_lse) = self.d_lse {
                delta = delta - T::Acc::from_f64(f64::from(*d_lse.at([b, h, x0, x1, x2, 0])));
            }
            a.load_query(row, q);
            let n = a.scores(row, q, ds);
            let max = ds[..n].iter().fold(T::Acc::NEG_INF, |m, &x| m.max(x));
            let sum = T::Acc::exp_shifted(&mut ds[..n], max);
            let inv = T::Acc::ONE / sum;
            a.for_each_key(row.x, |m, key| {
                let (v, step) = a.value_row(b, hk, key);
                ds[m] = ds[m] * inv * (dot(d_o, v, step) - delta);
            });
            (n, max + sum.ln(), delta)
        }
    }

    /// Add the contributions of head `h`'s query at `x` to the gradients of one key-side row
    /// (`k`, `v` loaded): `d_k += ds q`, `d_v += p d_out`.
    ///
    /// # Safety
    /// `key` must be a key of the query at `x`, which must be in shape.
    #[inline(always)]
    unsafe fn add_pair(
        &self,
        (b, h, x): (usize, usize, [usize; 3]),
        key: Key,
        (k, v): (&[T::Acc], &[T::Acc]),
        (d_k, d_v): (&mut [T::Acc], &mut [T::Acc]),
    ) {
        let a = self.a;
        let [x0, x1, x2] = x;
        // SAFETY (whole block): in shape by the caller's contract.
        unsafe {
            let q = a.q.at([b, h, x0, x1, x2, 0]);
            let d_o = self.d_out.at([b, h, x0, x1, x2, 0]);
            let logit = a.scale * dot(k, q, a.q.inner_stride()) + a.bias_of(h, x, key);
            let r = a.g.row_index(b, h, x);
            let p = (logit - self.lse.values[r]).exp();
            let dp = dot(v, d_o, self.d_out.inner_stride());
            let ds = p * (dp - self.delta.values[r]);
            axpy(d_k, ds, q, a.q.inner_stride());
            axpy(d_v, p, d_o, self.d_out.inner_stride());
        }
    }

    /// `d_key`, `d_value` over inverse windows: one task per key row `(b, kv head, y)`.
    fn key_pass(&self, p: &FusedProblem, t: &FusedTensors, d_key: Tokens<T>, d_value: Tokens<T>) {
        let kv = Grid::with(p.axes, (p.batch, p.heads_kv), p.dim, 0);
        let (k, v) = (
            tokens_heads_last::<T>(t.key.unwrap(), p.rank, true),
            tokens_heads_last::<T>(t.value.unwrap(), p.rank, true),
        );
        let (dim, dim_v) = (p.dim, p.dim_v);
        for_each_with(
            kv.rows(),
            || vec![T::Acc::ZERO; 2 * (dim + dim_v)],
            |r, scratch| {
                let Row { b, h: hk, x: y } = kv.row(r);
                let (kb, rest) = scratch.split_at_mut(dim);
                let (vb, rest) = rest.split_at_mut(dim_v);
                let (dk, dv) = rest.split_at_mut(dim);
                dk.fill(T::Acc::ZERO);
                dv.fill(T::Acc::ZERO);
                let [y0, y1, y2] = y;
                // SAFETY: key rows and their inverse windows are in shape; row `r` of the outputs
                // is written by this task only.
                unsafe {
                    load(kb, k.at([b, hk, y0, y1, y2, 0]), k.inner_stride());
                    load(vb, v.at([b, hk, y0, y1, y2, 0]), v.inner_stride());
                    for h in hk * self.a.group..(hk + 1) * self.a.group {
                        for &(x0, _) in kv.queries_of(0, y0) {
                            for &(x1, _) in kv.queries_of(1, y1) {
                                for &(x2, _) in kv.queries_of(2, y2) {
                                    self.add_pair(
                                        (b, h, [x0, x1, x2]),
                                        Key::At(y),
                                        (kb, vb),
                                        (dk, dv),
                                    );
                                }
                            }
                        }
                    }
                    dk.iter_mut().for_each(|d| *d = *d * self.a.scale);
                    store(d_key.at([b, hk, y0, y1, y2, 0]), d_key.inner_stride(), dk);
                    store(
                        d_value.at([b, hk, y0, y1, y2, 0]),
                        d_value.inner_stride(),
                        dv,
                    );
                }
            },
        );
    }

    /// Gradients of the additional tokens: one task per `(b, kv head, e)`.
    fn extra_pass(
        &self,
        p: &FusedProblem,
        t: &FusedTensors,
        (d_ek, d_ev): (super::view::Extras<T>, super::view::Extras<T>),
    ) {
        let (ek, ev) = (
            extras_heads_last::<T>(t.additional_keys.unwrap()),
            extras_heads_last::<T>(t.additional_values.unwrap()),
        );
        let (dim, dim_v, extra, heads_kv) = (p.dim, p.dim_v, p.extra, p.heads_kv);
        let g = self.a.g;
        for_each_with(
            p.batch * heads_kv * extra,
            || vec![T::Acc::ZERO; 2 * (dim + dim_v)],
            |r, scratch| {
                let (b, hk, e) = (r / (heads_kv * extra), (r / extra) % heads_kv, r % extra);
                let (kb, rest) = scratch.split_at_mut(dim);
                let (vb, rest) = rest.split_at_mut(dim_v);
                let (dk, dv) = rest.split_at_mut(dim);
                dk.fill(T::Acc::ZERO);
                dv.fill(T::Acc::ZERO);
                // SAFETY: extra rows and every query are in shape; this task alone writes row `r`.
                unsafe {
                    load(kb, ek.at([b, hk, e, 0]), ek.inner_stride());
                    load(vb, ev.at([b, hk, e, 0]), ev.inner_stride());
                    for h in hk * self.a.group..(hk + 1) * self.a.group {
                        for n in 0..g.tokens() {
                            self.add_pair((b, h, g.row(n).x), Key::Extra(e), (kb, vb), (dk, dv));
                        }
                    }
                    dk.iter_mut().for_each(|d| *d = *d * self.a.scale);
                    store(d_ek.at([b, hk, e, 0]), d_ek.inner_stride(), dk);
                    store(d_ev.at([b, hk, e, 0]), d_ev.inner_stride(), dv);
                }
            },
        );
    }

    /// `d_rpb[h, offset] = sum of ds` at that offset, per `(b, h)` in parallel, then summed over
    /// the batch in a fixed order.
    fn bias_pass(&self, p: &FusedProblem, d_bias: super::view::Bias<T>) {
        let g = self.a.g;
        let span = p.axes.map(|a| 2 * a.kernel - 1);
        let size = span.iter().product::<usize>();
        let partials: Vec<Mutex<Vec<T::Acc>>> = (0..p.batch * p.heads)
            .map(|_| Mutex::new(vec![T::Acc::ZERO; size]))
            .collect();
        let width = p.dim + p.dim_v + self.a.max_keys();
        for_each_with(
            p.batch * p.heads,
            || vec![T::Acc::ZERO; width],
            |bh, scratch| {
                let mut sums = partials[bh].lock().unwrap_or_else(|e| e.into_inner());
                let (q, rest) = scratch.split_at_mut(p.dim);
                let (d_o, ds) = rest.split_at_mut(p.dim_v);
                for n in 0..g.tokens() {
                    let row = g.row(bh * g.tokens() + n);
                    // SAFETY: rows of the validated problem.
                    unsafe { self.logit_grads(row, (&mut *q, &mut *d_o), ds) };
                    self.a.for_each_key(row.x, |m, key| {
                        if let Key::At(y) = key {
                            let [i0, i1, i2] =
                                [0, 1, 2].map(|a| g.axes[a].bias_index(row.x[a], y[a]));
                            sums[(i0 * span[1] + i1) * span[2] + i2] += ds[m];
                        }
                    });
                }
            },
        );
        let partials: Vec<Vec<T::Acc>> = partials
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect();
        for h in 0..p.heads {
            let mut total = vec![T::Acc::ZERO; size];
            for b in 0..p.batch {
                for (t, &x) in total.iter_mut().zip(&partials[b * p.heads + h]) {
                    *t += x;
                }
            }
            for (i, &sum) in total.iter().enumerate() {
                let idx = [
                    i / (span[1] * span[2]),
                    (i / span[2]) % span[1],
                    i % span[2],
                ];
                // SAFETY: in-shape index of the validated bias gradient, written by this thread.
                unsafe { *d_bias.at([h, idx[0], idx[1], idx[2]]) = T::from_acc(sum) };
            }
        }
    }
}

/// Pass 1: `d_query = scale * sum_n ds_n key_n`, one task per query row.
struct QueryPass<'a, 'b, 'g, T: Element> {
    bwd: &'a Backward<'b, 'g, T>,
    d_query: Tokens<T>,
}

impl<T: Element> RowKernel for QueryPass<'_, '_, '_, T> {
    type Acc = T::Acc;

    #[inline(always)]
    unsafe fn row(&self, r: usize, scratch: &mut [T::Acc]) {
        let a = self.bwd.a;
        let row = a.g.row(r);
        let [x0, x1, x2] = row.x;
        let (q, rest) = scratch.split_at_mut(a.g.dim);
        let (d_o, rest) = rest.split_at_mut(a.dim_v);
        let (ds, tail) = rest.split_at_mut(a.max_keys());
        // SAFETY: `row` is a row of the validated problem; row `r` of `d_query`, `delta` and
        // `lse` is ours.
        unsafe {
            let (n, lse, delta) = self.bwd.logit_grads(row, (q, d_o), ds);
            self.bwd.lse.set(r, lse);
            self.bwd.delta.set(r, delta);
            let dst = (
                self.d_query.at([row.b, row.h, x0, x1, x2, 0]),
                self.d_query.inner_stride(),
                a.g.dim,
            );
            weighted_sum(
                &KeyTerms {
                    a,
                    w: &ds[..n],
                    values: false,
                },
                row,
                dst,
                a.scale,
                tail,
            );
        }
    }
}
