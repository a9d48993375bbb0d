//! Key-side passes of the fused backward: one task per key row (`d_key`, `d_value`, over the
//! row's inverse windows) or per additional token, each queueing the queries that attend it and
//! adding their contributions through the SIMD row kernels.

use super::element::{axpy, dot, load, store, Accum, Element};
use super::fused_bwd::Backward;
use super::grid::{Grid, Row};
use super::parallel::{par_rows, RowKernel};
use super::view::{Extras, Tokens};
use crate::problem::FusedProblem;

impl<T: Element> Backward<'_, '_, T> {
    /// `d_key`, `d_value` from `[key, value, d_key, d_value]`.
    pub(super) fn key_pass(&self, p: &FusedProblem, [k, v, d_k, d_v]: [Tokens<T>; 4]) {
        let kv = Grid::with(p.axes, (p.batch, p.heads_kv), p.dim, 0);
        let pass = KeyPass {
            bwd: self,
            kv: &kv,
            k,
            v,
            d_k,
            d_v,
        };
        let cost = self.a.g.row_cost() * 4 * self.a.group;
        // SAFETY: `KeyPass::row` writes only row `r` of `d_key` and `d_value`.
        unsafe { par_rows((kv.rows(), cost), &pass) };
    }

    /// Gradients of the additional tokens from `[keys, values, d_keys, d_values]`.
    pub(super) fn extra_pass(&self, p: &FusedProblem, [ek, ev, d_ek, d_ev]: [Extras<T>; 4]) {
        let pass = ExtraPass {
            bwd: self,
            heads_kv: p.heads_kv,
            ek,
            ev,
            d_ek,
            d_ev,
        };
        let cost = self.a.g.tokens() * self.a.g.dim * 4 * self.a.group;
        // SAFETY: `ExtraPass::row` writes only row `r` of the extra-token gradients.
        unsafe { par_rows((p.batch * p.heads_kv * p.extra, cost), &pass) };
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
