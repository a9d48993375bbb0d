//! Fused neighborhood attention, backward, FlashAttention-style: probabilities are recomputed,
//! no `[tokens x window]` buffer is kept, and every sum runs in a fixed order (no atomics,
//! deterministic). Two passes: queries (`fused_chunks`: `d_query`, per query `delta = d_out .
//! out - d_lse` and the logsumexp, recomputed at the accumulator's precision rather than read
//! from the float32 `lse`, and the window terms of `d_key`, `d_value` and `d_rpb`), then the
//! additional tokens (`fused_kv`).

use super::element::{dot, load, Accum, Element, PairDotsKernels};
use super::fused::{softmax, Attention, FusedTensors, RowScratch};
use super::fused_chunks::query_pass;
use super::grid::{Grid, Row};
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

impl FusedGrads<'_> {
    /// The gradients to write.
    pub fn all(&self) -> impl Iterator<Item = &TensorRef> {
        let optional = [
            self.d_key,
            self.d_value,
            self.d_additional_keys,
            self.d_additional_values,
            self.d_rpb,
        ];
        std::iter::once(self.d_query).chain(optional.into_iter().flatten())
    }
}

/// What the forward pass left and the gradients flowing in.
pub struct Saved<'a> {
    /// `[B, *spatial, heads, Dv]`.
    pub out: &'a TensorRef,
    /// `[B, *spatial, heads]`, float32: the forward's logsumexp (the CUDA tensor-core kernels
    /// read it; the other kernels form it again at their own precision).
    pub lse: &'a TensorRef,
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
    let key_grads = match (t.key, t.value, grads.d_key, grads.d_value) {
        (Some(_), Some(_), Some(dk), Some(dv)) => Some((tokens(dk), tokens(dv))),
        _ => None,
    };
    query_pass(
        &bwd,
        tokens(grads.d_query),
        key_grads,
        grads.d_rpb.map(bias),
    );
    let extras = (
        t.additional_keys,
        t.additional_values,
        grads.d_additional_keys,
        grads.d_additional_values,
    );
    if let (Some(ek), Some(ev), Some(dek), Some(dev)) = extras {
        bwd.extra_pass(p, [ek, ev, dek, dev].map(extras_heads_last));
    }
}

/// Per-query-row values, written by the query pass (one task per row) and read after it.
pub(super) struct PerRow<A> {
    pub(super) values: Vec<A>,
}

impl<A: Copy> PerRow<A> {
    /// Write `value` for row `r`.
    ///
    /// # Safety
    /// No other task may access row `r` meanwhile.
    pub(super) unsafe fn set(&self, r: usize, value: A) {
        assert!(r < self.values.len(), "row {r} out of range");
        // SAFETY: `r` is in range and, by contract, no other task touches it.
        unsafe { *(self.values.as_ptr().add(r) as *mut A) = value };
    }
}

// SAFETY: tasks write disjoint rows (`set`'s contract) and read only after the writing pass.
unsafe impl<A: Send> Sync for PerRow<A> {}

/// Shared state of the backward passes.
pub(super) struct Backward<'a, 'g, T: Element> {
    pub(super) a: &'a Attention<'g, T>,
    pub(super) d_out: Tokens<T>,
    pub(super) out: Tokens<T>,
    pub(super) d_lse: Option<Tokens<f32>>,
    /// `d_out . out - d_lse` per query row (row-indexed like the query grid).
    pub(super) delta: PerRow<T::Acc>,
    /// Logsumexp of the scaled logits per query row.
    pub(super) lse: PerRow<T::Acc>,
}

/// Scratch of a pass over query rows.
pub(super) struct QueryScratch<A> {
    /// The row's keys, scaled query and probabilities.
    pub(super) row: RowScratch<A>,
    /// The row's `d_out`.
    pub(super) d_o: Vec<A>,
    /// The logit gradients `ds` of the row's keys.
    pub(super) dp: Vec<A>,
}

impl<T: Element> Backward<'_, '_, T> {
    pub(super) fn query_scratch(&self) -> QueryScratch<T::Acc> {
        let row = self.a.row_scratch();
        let keys = row.logits.len();
        QueryScratch {
            row,
            d_o: vec![T::Acc::ZERO; self.a.dim_v],
            dp: vec![T::Acc::ZERO; keys],
        }
    }

    /// For the keys of query row `row`: probabilities `p[n]` into `s.row.logits` and
    /// `ds[n] = p[n] (d_out . value_n - delta)` into `s.dp`; returns `(lse, delta)`.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem.
    #[inline(always)]
    pub(super) unsafe fn logit_grads(
        &self,
        row: Row,
        s: &mut QueryScratch<T::Acc>,
    ) -> (T::Acc, T::Acc) {
        let a = self.a;
        // SAFETY (whole block): in shape by the caller's contract.
        unsafe {
            let delta = self.load_d_out(row, &mut s.d_o);
            let lse = a.probabilities(row, &mut s.row);
            a.value_dots(&s.row.keys, &s.d_o, &mut s.dp);
            logit_grads_from(s, delta);
            (lse, delta)
        }
    }

    /// `logit_grads` for two consecutive rows whose windows share their runs (`offset` from
    /// `pair_offset`, no additional tokens): the dot products with the key rows (`dots.0`, query
    /// channels) and the value rows (`dots.1`, value channels) are taken for both rows at once.
    ///
    /// # Safety
    /// As `logit_grads`, for both rows; the kernels take rows as they lie in the tensors.
    #[inline(always)]
    pub(super) unsafe fn logit_grads_pair(
        &self,
        rows: [Row; 2],
        offset: usize,
        dots: PairDotsKernels<T::Acc>,
        [sa, sb]: [&mut QueryScratch<T::Acc>; 2],
    ) -> [(T::Acc, T::Acc); 2] {
        let a = self.a;
        // SAFETY (whole block): by the caller's contract.
        unsafe {
            let mut delta = [T::Acc::ZERO; 2];
            for (k, s) in [&mut *sa, &mut *sb].into_iter().enumerate() {
                delta[k] = self.load_d_out(rows[k], &mut s.d_o);
                a.load_query(rows[k], &mut s.row.q);
                a.collect_keys(rows[k], &mut s.row.keys);
            }
            let lists = [&sa.row.keys, &sb.row.keys];
            let logits = [&mut sa.row.logits[..], &mut sb.row.logits[..]];
            (dots.0)([&sa.row.q, &sb.row.q], lists, offset, false, logits);
            let dp = [&mut sa.dp[..], &mut sb.dp[..]];
            (dots.1)([&sa.d_o, &sb.d_o], lists, offset, true, dp);
            // Called for each rather than mapped over an array of the two: `array::map` kept
            // its closure out of line, compiled without the caller's instruction set.
            [
                self.probabilities_and_grads(sa, delta[0]),
                self.probabilities_and_grads(sb, delta[1]),
            ]
        }
    }

    /// From the logits of a row's keys in `s` (bias not yet added): its probabilities and
    /// logit gradients, as `logit_grads` leaves them; returns `(lse, delta)`.
    #[inline(always)]
    fn probabilities_and_grads(
        &self,
        s: &mut QueryScratch<T::Acc>,
        delta: T::Acc,
    ) -> (T::Acc, T::Acc) {
        self.a.add_bias(&s.row.keys, &mut s.row.logits);
        let lse = softmax(&mut s.row.logits[..s.row.keys.len]);
        logit_grads_from(s, delta);
        (lse, delta)
    }

    /// Load row `row`'s `d_out` into `d_o`; returns its `delta = d_out . out - d_lse`.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem.
    #[inline(always)]
    unsafe fn load_d_out(&self, row: Row, d_o: &mut [T::Acc]) -> T::Acc {
        let Row {
            b,
            h,
            x: [x0, x1, x2],
        } = row;
        let at = [b, h, x0, x1, x2, 0];
        // SAFETY (whole block): in shape by the caller's contract.
        unsafe {
            load(d_o, self.d_out.at(at), self.d_out.inner_stride());
            let delta = dot(d_o, self.out.at(at), self.out.inner_stride());
            match self.d_lse {
                Some(d_lse) => delta - T::Acc::from_f64(f64::from(*d_lse.at(at))),
                None => delta,
            }
        }
    }
}

/// `ds[n] = p[n] (dp[n] - delta)` in place of `dp`, from the probabilities in `s.row.logits`.
#[inline(always)]
fn logit_grads_from<A: Accum>(s: &mut QueryScratch<A>, delta: A) {
    for (dp, &p) in s.dp[..s.row.keys.len].iter_mut().zip(&s.row.logits) {
        *dp = p * (*dp - delta);
    }
}
