//! Fused neighborhood attention, backward, FlashAttention-style: probabilities are recomputed,
//! no `[tokens x window]` buffer is kept. Four passes, each writing its outputs from one task
//! per row (no atomics, deterministic): queries (`d_query`; and per query `delta = d_out . out -
//! d_lse` and the logsumexp, recomputed at the accumulator's precision rather than read from the
//! float32 `lse`), keys over inverse windows (`d_key`, `d_value`), additional tokens, and the
//! bias (summed per batch in a fixed order).

use std::sync::Mutex;

use super::element::{axpy, dot, load, store, Accum, Element};
use super::fused::{Attention, FusedTensors, RowScratch};
use super::grid::{Grid, Row};
use super::parallel::{par_rows, RowKernel};
use super::qk::store_bias_grad;
use super::view::{bias, extras_heads_last, tokens_heads_last, Bias, Extras, Tokens};
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

/// All gradients of a fused problem.
pub fn backward<T: Element>(p: &FusedProblem, t: &FusedTensors, saved: &Saved, grads: &FusedGrads) {
    let g = Grid::with(p.axes, (p.batch, p.heads), p.dim, p.extra);
    let a = Attention::<T>::new(p, &g, t);
    let tokens = |t: &TensorRef| tokens_heads_last::<T>(t, p.rank, true);
    let bwd = Backward {
        a: &a,
        d_out: tokens(saved.d_out),
        out: tokens(saved.out),
        d_lse: saved.d_lse.map(|t| tokens_heads_last(t, p.rank, false)),
        delta: PerRow {
            values: vec![T::Acc::ZERO; g.rows()],
        },
        lse: PerRow {
            values: vec![T::Acc::ZERO; g.rows()],
        },
    };
    let pass = QueryPass {
        bwd: &bwd,
        d_query: tokens(grads.d_query),
    };
    // SAFETY: `QueryPass::row` writes only row `r` of `d_query`, `delta` and `lse`.
    unsafe { par_rows((g.rows(), g.row_cost() * 4), &pass) };
    if let (Some(k), Some(v), Some(dk), Some(dv)) = (t.key, t.value, grads.d_key, grads.d_value) {
        let kv = Grid::with(p.axes, (p.batch, p.heads_kv), p.dim, 0);
        let pass = KeyPass {
            bwd: &bwd,
            kv: &kv,
            k: tokens(k),
            v: tokens(v),
            d_k: tokens(dk),
            d_v: tokens(dv),
        };
        // SAFETY: `KeyPass::row` writes only row `r` of `d_key` and `d_value`.
        unsafe { par_rows((kv.rows(), g.row_cost() * 4 * a.group), &pass) };
    }
    let extras = (
        t.additional_keys,
        t.additional_values,
        grads.d_additional_keys,
        grads.d_additional_values,
    );
    if let (Some(ek), Some(ev), Some(dek), Some(dev)) = extras {
        let pass = ExtraPass {
            bwd: &bwd,
            heads_kv: p.heads_kv,
            ek: extras_heads_last(ek),
            ev: extras_heads_last(ev),
            d_ek: extras_heads_last(dek),
            d_ev: extras_heads_last(dev),
        };
        // SAFETY: `ExtraPass::row` writes only row `r` of the extra-token gradients.
        unsafe {
            par_rows(
                (
                    p.batch * p.heads_kv * p.extra,
                    g.tokens() * g.dim * 4 * a.group,
                ),
                &pass,
            )
        };
    }
    if let Some(d_rpb) = grads.d_rpb {
        bwd.bias_grad(p, bias(d_rpb));
    }
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

/// Scratch of a pass over query rows.
struct QueryScratch<A> {
    row: RowScratch<A>,
    d_o: Vec<A>,
    dp: Vec<A>,
}

impl<T: Element> Backward<'_, '_, T> {
    fn query_scratch(&self) -> QueryScratch<T::Acc> {
        let row = self.a.row_scratch();
        let keys = row.logits.len();
        QueryScratch {
            row,
            d_o: vec![T::Acc::ZERO; self.a.dim_v],
            dp: vec![T::Acc::ZERO; keys],
        }
    }

    /// `ds[n] = p[n] (d_out . value_n - delta)` into `s.row.logits` for the keys of query row
    /// `row`; returns `(lse, delta)`.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem.
    #[inline(always)]
    unsafe fn logit_grads(&self, row: Row, s: &mut QueryScratch<T::Acc>) -> (T::Acc, T::Acc) {
        let a = self.a;
        let Row {
            b,
            h,
            x: [x0, x1, x2],
        } = row;
        // SAFETY (whole block): in shape by the caller's contract.
        unsafe {
            load(
                &mut s.d_o,
                self.d_out.at([b, h, x0, x1, x2, 0]),
                self.d_out.inner_stride(),
            );
            let mut delta = dot(
                &s.d_o,
                self.out.at([b, h, x0, x1, x2, 0]),
                self.out.inner_stride(),
            );
            if let Some(d_lse) = self.d_lse {
                delta = delta - T::Acc::from_f64(f64::from(*d_lse.at([b, h, x0, x1, x2, 0])));
            }
            let lse = a.probabilities(row, &mut s.row);
            a.value_dots(&s.row.keys, &s.d_o, &mut s.dp);
            for (p, &dp) in s.row.logits[..s.row.keys.len].iter_mut().zip(&s.dp) {
                *p = *p * (dp - delta);
            }
            (lse, delta)
        }
    }

    /// Queue head `h`'s query at `x` (whose logit for the key-side row gets `bias`), adding
    /// the queue's contributions whenever it is full.
    ///
    /// # Safety
    /// The query at `x` must be in shape and attend the row.
    #[inline(always)]
    unsafe fn queue_pair(
        &self,
        s: &mut KeyScratch<T::Acc>,
        (b, h, x): (usize, usize, [usize; 3]),
        bias: T::Acc,
    ) {
        let [x0, x1, x2] = x;
        let pairs = &mut s.pairs;
        let n = pairs.len;
        // SAFETY: in shape by the caller's contract.
        unsafe {
            pairs.q[n] = self.a.q.at([b, h, x0, x1, x2, 0]) as usize;
            pairs.d_o[n] = self.d_out.at([b, h, x0, x1, x2, 0]) as usize;
        }
        pairs.row[n] = self.a.g.row_index(b, h, x);
        pairs.bias[n] = bias;
        pairs.len = n + 1;
        if pairs.len == pairs.q.len() {
            // SAFETY: the queue holds queries of this row.
            unsafe { self.flush_pairs(s) };
        }
    }

    /// Add the queued queries' contributions to one key-side row's gradients (`s.k`, `s.v`
    /// loaded): `d_k += ds q`, `d_v += p d_out`, and empty the queue.
    ///
    /// # Safety
    /// The queue must hold queries pushed by `push_pair` for this row.
    #[inline(always)]
    unsafe fn flush_pairs(&self, s: &mut KeyScratch<T::Acc>) {
        let a = self.a;
        let n = s.pairs.len;
        let (q_step, o_step) = (a.q.inner_stride(), self.d_out.inner_stride());
        let (p, dp) = (&mut s.p[..n], &mut s.dp[..n]);
        let pairs = &s.pairs;
        // SAFETY (whole block): queued rows hold `dim` / `dim_v` channels.
        unsafe {
            let dense = (q_step, o_step) == (1, 1);
            if dense {
                T::dot_rows(&s.k, &pairs.q[..n], p);
                T::dot_rows(&s.v, &pairs.d_o[..n], dp);
            } else {
                for ((p, dp), (&q, &d_o)) in p
                    .iter_mut()
                    .zip(dp.iter_mut())
                    .zip(pairs.q.iter().zip(&pairs.d_o))
                {
                    *p = dot(&s.k, q as *const T, q_step);
                    *dp = dot(&s.v, d_o as *const T, o_step);
                }
            }
            for ((p, &bias), &row) in p.iter_mut().zip(&pairs.bias).zip(&pairs.row) {
                *p = a.scale * *p + bias - self.lse.values[row];
            }
            T::Acc::exp_shifted(p, T::Acc::ZERO);
            for ((dp, &p), &row) in dp.iter_mut().zip(p.iter()).zip(&pairs.row) {
                *dp = p * (*dp - self.delta.values[row]);
            }
            if dense {
                T::sum_rows(dp, &pairs.q[..n], &mut s.d_k);
                T::sum_rows(p, &pairs.d_o[..n], &mut s.d_v);
            } else {
                for ((&ds, &p), (&q, &d_o)) in
                    dp.iter().zip(p.iter()).zip(pairs.q.iter().zip(&pairs.d_o))
                {
                    axpy(&mut s.d_k, ds, q as *const T, q_step);
                    axpy(&mut s.d_v, p, d_o as *const T, o_step);
                }
            }
        }
        s.pairs.len = 0;
    }

    /// `d_rpb[h, offset] = sum of ds` at that offset: per `(b, h)` in parallel, then summed over
    /// the batch in a fixed order.
    fn bias_grad(&self, p: &FusedProblem, d_bias: Bias<T>) {
        let span = p.axes.map(|a| 2 * a.kernel - 1);
        let size = span.iter().product::<usize>();
        let pass = BiasPass {
            bwd: self,
            partials: (0..p.batch * p.heads)
                .map(|_| Mutex::new(vec![T::Acc::ZERO; size]))
                .collect(),
        };
        // SAFETY: `BiasPass::row` writes only partial `r`.
        unsafe {
            par_rows(
                (
                    p.batch * p.heads,
                    self.a.g.tokens() * self.a.g.row_cost() * 4,
                ),
                &pass,
            )
        };
        store_bias_grad(pass.partials, p.batch, span, d_bias);
    }
}

/// `d_query = scale * sum_n ds_n key_n`, one task per query row.
struct QueryPass<'a, 'b, 'g, T: Element> {
    bwd: &'a Backward<'b, 'g, T>,
    d_query: Tokens<T>,
}

impl<T: Element> RowKernel for QueryPass<'_, '_, '_, T> {
    type Scratch = QueryScratch<T::Acc>;

    fn scratch(&self) -> Self::Scratch {
        self.bwd.query_scratch()
    }

    #[inline(always)]
    unsafe fn row(&self, r: usize, s: &mut QueryScratch<T::Acc>) {
        let a = self.bwd.a;
        let row = a.g.row(r);
        let [x0, x1, x2] = row.x;
        // SAFETY: `row` is a row of the validated problem; row `r` of `d_query`, `delta` and
        // `lse` is ours.
        unsafe {
            let (lse, delta) = self.bwd.logit_grads(row, s);
            self.bwd.lse.set(r, lse);
            self.bwd.delta.set(r, delta);
            let d_query = self.d_query.at([row.b, row.h, x0, x1, x2, 0]);
            let dst = (d_query, self.d_query.inner_stride(), a.g.dim);
            let terms = (row, &s.row.keys, &s.row.logits[..], false);
            a.store_weighted_sum(terms, dst, a.scale, &mut s.row.tail);
        }
    }
}

/// Queries queued against a key-side row before their contributions are added in one go.
const PAIR_BATCH: usize = 256;

/// Queries queued against one key-side row: addresses of their query and output-gradient
/// rows, their row index (for `lse` and `delta`), and the bias of their logit.
struct PairList<A> {
    q: Vec<usize>,
    d_o: Vec<usize>,
    row: Vec<usize>,
    bias: Vec<A>,
    len: usize,
}

/// Scratch of a pass over key-side rows: the row's key and value, their gradients, and the
/// queries that attend the row with their probabilities and logit gradients.
struct KeyScratch<A> {
    k: Vec<A>,
    v: Vec<A>,
    d_k: Vec<A>,
    d_v: Vec<A>,
    pairs: PairList<A>,
    p: Vec<A>,
    dp: Vec<A>,
}

impl<T: Element> Backward<'_, '_, T> {
    /// Scratch for key-side rows attended by at most `queries` queries.
    fn key_scratch(&self, queries: usize) -> KeyScratch<T::Acc> {
        let (dim, dim_v) = (self.a.g.dim, self.a.dim_v);
        let zeros = |n| vec![T::Acc::ZERO; n];
        let pairs = PairList {
            q: vec![0; queries],
            d_o: vec![0; queries],
            row: vec![0; queries],
            bias: zeros(queries),
            len: 0,
        };
        KeyScratch {
            k: zeros(dim),
            v: zeros(dim_v),
            d_k: zeros(dim),
            d_v: zeros(dim_v),
            pairs,
            p: zeros(queries),
            dp: zeros(queries),
        }
    }

    /// Load one key-side row and clear its gradients.
    ///
    /// # Safety
    /// `k` and `v` must be rows of `dim` and `dim_v` channels, `steps` apart.
    #[inline(always)]
    unsafe fn start_key_row(
        &self,
        s: &mut KeyScratch<T::Acc>,
        (k, v): (*const T, *const T),
        steps: (isize, isize),
    ) {
        // SAFETY: by the caller's contract.
        unsafe {
            load(&mut s.k, k, steps.0);
            load(&mut s.v, v, steps.1);
        }
        s.d_k.fill(T::Acc::ZERO);
        s.d_v.fill(T::Acc::ZERO);
    }

    /// Store a key-side row's gradients (`d_k` times the scale).
    ///
    /// # Safety
    /// `d_k`, `d_v` must be rows written by this task only.
    #[inline(always)]
    unsafe fn finish_key_row(
        &self,
        s: &mut KeyScratch<T::Acc>,
        (d_k, d_v): (*mut T, *mut T),
        steps: (isize, isize),
    ) {
        s.d_k.iter_mut().for_each(|d| *d = *d * self.a.scale);
        // SAFETY: by the caller's contract.
        unsafe {
            store(d_k, steps.0, &s.d_k);
            store(d_v, steps.1, &s.d_v);
        }
    }
}

/// `d_key`, `d_value` over inverse windows: one task per key row `(b, kv head, y)`.
struct KeyPass<'a, 'b, 'g, T: Element> {
    bwd: &'a Backward<'b, 'g, T>,
    kv: &'a Grid,
    k: Tokens<T>,
    v: Tokens<T>,
    d_k: Tokens<T>,
    d_v: Tokens<T>,
}

impl<T: Element> RowKernel for KeyPass<'_, '_, '_, T> {
    type Scratch = KeyScratch<T::Acc>;

    fn scratch(&self) -> Self::Scratch {
        self.bwd.key_scratch(PAIR_BATCH)
    }

    #[inline(always)]
    unsafe fn row(&self, r: usize, s: &mut KeyScratch<T::Acc>) {
        let (bwd, kv) = (self.bwd, self.kv);
        let Row { b, h: hk, x: y } = kv.row(r);
        let at = [b, hk, y[0], y[1], y[2], 0];
        // SAFETY (whole block): key rows and their inverse windows are in shape; row `r` of the
        // outputs is written by this task only.
        unsafe {
            let steps = (self.k.inner_stride(), self.v.inner_stride());
            bwd.start_key_row(s, (self.k.at(at), self.v.at(at)), steps);
            for h in hk * bwd.a.group..(hk + 1) * bwd.a.group {
                for &(x0, _) in kv.queries_of(0, y[0]) {
                    for &(x1, _) in kv.queries_of(1, y[1]) {
                        for &(x2, _) in kv.queries_of(2, y[2]) {
                            let x = [x0, x1, x2];
                            bwd.queue_pair(s, (b, h, x), bwd.a.bias_at(h, x, y));
                        }
                    }
                }
            }
            bwd.flush_pairs(s);
            let steps = (self.d_k.inner_stride(), self.d_v.inner_stride());
            bwd.finish_key_row(s, (self.d_k.at(at), self.d_v.at(at)), steps);
        }
    }
}

/// Gradients of the additional tokens: one task per `(b, kv head, e)`.
struct ExtraPass<'a, 'b, 'g, T: Element> {
    bwd: &'a Backward<'b, 'g, T>,
    heads_kv: usize,
    ek: Extras<T>,
    ev: Extras<T>,
    d_ek: Extras<T>,
    d_ev: Extras<T>,
}

impl<T: Element> RowKernel for ExtraPass<'_, '_, '_, T> {
    type Scratch = KeyScratch<T::Acc>;

    fn scratch(&self) -> Self::Scratch {
        self.bwd.key_scratch(PAIR_BATCH)
    }

    #[inline(always)]
    unsafe fn row(&self, r: usize, s: &mut KeyScratch<T::Acc>) {
        let (bwd, g) = (self.bwd, self.bwd.a.g);
        let (b, hk, e) = (
            r / (self.heads_kv * g.extra),
            (r / g.extra) % self.heads_kv,
            r % g.extra,
        );
        // SAFETY (whole block): extra rows and every query are in shape; this task alone
        // writes row `r` of the outputs.
        unsafe {
            let steps = (self.ek.inner_stride(), self.ev.inner_stride());
            bwd.start_key_row(
                s,
                (self.ek.at([b, hk, e, 0]), self.ev.at([b, hk, e, 0])),
                steps,
            );
            for h in hk * bwd.a.group..(hk + 1) * bwd.a.group {
                for n in 0..g.tokens() {
                    bwd.queue_pair(s, (b, h, g.row(n).x), T::Acc::ZERO);
                }
            }
            bwd.flush_pairs(s);
            let steps = (self.d_ek.inner_stride(), self.d_ev.inner_stride());
            bwd.finish_key_row(
                s,
                (self.d_ek.at([b, hk, e, 0]), self.d_ev.at([b, hk, e, 0])),
                steps,
            );
        }
    }
}

/// Bias gradient per `(b, h)`: its queries' `ds` binned by relative offset.
struct BiasPass<'a, 'b, 'g, T: Element> {
    bwd: &'a Backward<'b, 'g, T>,
    partials: Vec<Mutex<Vec<T::Acc>>>,
}

impl<T: Element> RowKernel for BiasPass<'_, '_, '_, T> {
    type Scratch = QueryScratch<T::Acc>;

    fn scratch(&self) -> Self::Scratch {
        self.bwd.query_scratch()
    }

    #[inline(always)]
    unsafe fn row(&self, bh: usize, s: &mut QueryScratch<T::Acc>) {
        let g = self.bwd.a.g;
        let mut bins = self.partials[bh].lock().unwrap_or_else(|e| e.into_inner());
        for n in 0..g.tokens() {
            // SAFETY: rows of the validated problem.
            unsafe { self.bwd.logit_grads(g.row(bh * g.tokens() + n), s) };
            let keys = &s.row.keys;
            for (&bin, &ds) in keys.bias_bin[..keys.window].iter().zip(&s.row.logits) {
                bins[bin] += ds;
            }
        }
    }
}
