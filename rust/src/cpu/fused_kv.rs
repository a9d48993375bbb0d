//! The additional-token pass of the fused backward: one task per additional token, over every
//! query of its `(batch, kv head)`, which come in runs along the last axis that the SIMD row
//! kernels take as they are.

use super::element::{axpy, dot, load, store, Accum, Element, Rows, Run};
use super::fused_bwd::Backward;
use super::parallel::{par_rows, RowKernel};
use super::view::{Extras, Tokens};
use crate::problem::FusedProblem;

impl<T: Element> Backward<'_, '_, T> {
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

    /// Add the contributions of `count` queries of head `h` along the last axis, from `x`
    /// on, `step` positions apart, to one additional token's gradients (`s.k`, `s.v` loaded):
    /// `d_k += ds q`, `d_v += p d_out`.
    ///
    /// # Safety
    /// Every such query must be in shape and attend the row; `count` fits the scratch.
    #[inline(always)]
    unsafe fn add_run(
        &self,
        s: &mut KeyScratch<T::Acc>,
        (b, h, x, step): (usize, usize, [usize; 3], usize),
        count: usize,
    ) {
        let a = self.a;
        let [x0, x1, x2] = x;
        let size = std::mem::size_of::<T>() as isize;
        let run = |t: Tokens<T>| Run {
            // SAFETY: the run's first query is in shape.
            first: unsafe { t.at([b, h, x0, x1, x2, 0]) } as usize,
            step: step as isize * t.stride(4) * size,
            len: count,
        };
        let (q, d_o) = (run(a.q), run(self.d_out));
        let (q_step, o_step) = (a.q.inner_stride(), self.d_out.inner_stride());
        let first_row = a.g.row_index(b, h, x);
        let (p, dp) = (&mut s.p[..count], &mut s.dp[..count]);
        // SAFETY (whole block): the runs' rows hold `dim` / `dim_v` channels.
        unsafe {
            let dense = (q_step, o_step) == (1, 1);
            if dense {
                T::dot_rows(&s.k, q, p);
                T::dot_rows(&s.v, d_o, dp);
            } else {
                for i in 0..count {
                    p[i] = dot(&s.k, q.at(i) as *const T, q_step);
                    dp[i] = dot(&s.v, d_o.at(i) as *const T, o_step);
                }
            }
            for (i, p) in p.iter_mut().enumerate() {
                let row = first_row + i * step;
                *p = a.scale * *p - self.lse.values[row];
            }
            T::Acc::exp_shifted(p, T::Acc::ZERO);
            for (i, (dp, &p)) in dp.iter_mut().zip(p.iter()).enumerate() {
                *dp = p * (*dp - self.delta.values[first_row + i * step]);
            }
            if dense {
                T::sum_rows(dp, q, &mut s.d_k);
                T::sum_rows(p, d_o, &mut s.d_v);
            } else {
                for i in 0..count {
                    axpy(&mut s.d_k, dp[i], q.at(i) as *const T, q_step);
                    axpy(&mut s.d_v, p[i], d_o.at(i) as *const T, o_step);
                }
            }
        }
    }
}

/// Scratch of a pass over key-side rows: the row's key and value, their gradients, and the
/// probabilities and logit gradients of a run of queries that attend the row.
struct KeyScratch<A> {
    k: Vec<A>,
    v: Vec<A>,
    d_k: Vec<A>,
    d_v: Vec<A>,
    p: Vec<A>,
    dp: Vec<A>,
}

impl<T: Element> Backward<'_, '_, T> {
    /// Scratch for key-side rows attended by at most `queries` queries.
    /// Scratch for key-side rows; runs of queries are at most one line of the last axis.
    fn key_scratch(&self) -> KeyScratch<T::Acc> {
        let (dim, dim_v) = (self.a.g.dim, self.a.dim_v);
        let line = self.a.g.axes[2].length;
        let zeros = |n| vec![T::Acc::ZERO; n];
        KeyScratch {
            k: zeros(dim),
            v: zeros(dim_v),
            d_k: zeros(dim),
            d_v: zeros(dim_v),
            p: zeros(line),
            dp: zeros(line),
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
        self.bwd.key_scratch()
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
            let [l0, l1, l2] = g.axes.map(|a| a.length);
            for h in hk * bwd.a.group..(hk + 1) * bwd.a.group {
                for x0 in 0..l0 {
                    for x1 in 0..l1 {
                        bwd.add_run(s, (b, h, [x0, x1, 0], 1), l2);
                    }
                }
            }
            let steps = (self.d_ek.inner_stride(), self.d_ev.inner_stride());
            bwd.finish_key_row(
                s,
                (self.d_ek.at([b, hk, e, 0]), self.d_ev.at([b, hk, e, 0])),
                steps,
            );
        }
    }
}
