//! The portable forward, one query row at a time (`Forward` as a `RowKernel`), for problems
//! without an attend kernel; and what every row-at-a-time pass shares with it, the backward's
//! included: the per-worker scratch (`RowScratch`), a row's probabilities and the softmax.

use super::{token_index, Attention, Forward};
use crate::cpu::element::{Accum, Element};
use crate::cpu::grid::Row;
use crate::cpu::keys::{KeyList, LANES};
use crate::cpu::parallel::RowKernel;

/// Per-worker scratch of the forward pass.
pub struct RowScratch<A> {
    /// The scaled query.
    pub q: Vec<A>,
    /// Logits, then probabilities (or their gradients), per key.
    pub logits: Vec<A>,
    /// Channels a weighted sum keeps outside registers.
    pub tail: Vec<A>,
    /// The row's keys.
    pub keys: KeyList<A>,
}

impl<T: Element> Attention<'_, T> {
    /// Scratch for one worker of a query-row pass.
    pub fn row_scratch(&self) -> RowScratch<T::Acc> {
        let keys = self.key_list();
        RowScratch {
            q: vec![T::Acc::ZERO; self.g.dim],
            logits: vec![T::Acc::ZERO; self.logit_slots()],
            tail: vec![T::Acc::ZERO; self.g.dim.max(self.dim_v)],
            keys,
        }
    }

    /// Logit slots a row needs: one per key, or per key of runs padded to whole SIMD groups.
    fn logit_slots(&self) -> usize {
        let [k0, k1, k2] = self.g.axes.map(|a| a.kernel);
        let runs = usize::from(self.window) * k0 * k1;
        // Pair kernels keep sixteen slots per eight union rows, unions up to twice `k2` long.
        let pairs = (2 * k2).div_ceil(LANES) * 2 * LANES;
        let padded =
            runs * k2.next_multiple_of(LANES).max(pairs) + self.g.extra.next_multiple_of(LANES);
        padded.max(runs * k2 + self.g.extra)
    }

    /// The softmax of row `row`'s logits into `s.logits`; returns the logsumexp.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem.
    #[inline(always)]
    pub unsafe fn probabilities(&self, row: Row, s: &mut RowScratch<T::Acc>) -> T::Acc {
        // SAFETY: forwarded contract.
        unsafe {
            self.load_query(row, &mut s.q);
            self.collect_keys(row, &mut s.keys);
            self.scores(&s.keys, &s.q, &mut s.logits);
        }
        softmax(&mut s.logits[..s.keys.len])
    }
}

/// Logits to probabilities in place; returns their logsumexp.
#[inline(always)]
pub fn softmax<A: Accum>(p: &mut [A]) -> A {
    let max = max_of(p);
    let sum = A::exp_shifted(p, max);
    let inv = A::ONE / sum;
    p.iter_mut().for_each(|x| *x = *x * inv);
    max + sum.ln()
}

/// The largest of `xs`, NaNs passed over (-inf for none): eight running maxima, one per lane,
/// so that the loop vectorizes (a single running maximum waits on every comparison in turn:
/// the backward spent a twentieth of its time there on P1).
#[inline(always)]
fn max_of<A: Accum>(xs: &[A]) -> A {
    let larger = |m: A, x: A| if x > m { x } else { m };
    let mut lanes = [A::NEG_INF; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = larger(*m, x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(A::NEG_INF, |m, &x| larger(m, x));
    lanes.into_iter().fold(tail, larger)
}

impl<T: Element> RowKernel for Forward<'_, '_, T> {
    type Scratch = RowScratch<T::Acc>;

    fn scratch(&self) -> Self::Scratch {
        self.a.row_scratch()
    }

    /// The portable path, for problems without an attend kernel (`Slabbed` takes the rest).
    #[inline(always)]
    unsafe fn row(&self, r: usize, s: &mut RowScratch<T::Acc>) {
        let a = self.a;
        let row = a.g.row(r);
        // SAFETY (whole block): `row` is a row of the validated problem; its output rows are
        // written by this call only.
        unsafe {
            let lse = a.probabilities(row, s);
            let terms = (row, &s.keys, &s.logits[..], true);
            a.store_weighted_sum(terms, self.out_row(row), T::Acc::ONE, &mut s.tail);
            *self.lse.at(token_index(row)) = lse.to_f32();
        }
    }
}

impl<T: Element> Forward<'_, '_, T> {
    /// Where row `row`'s output goes: `(address, channel stride, channels)`.
    fn out_row(&self, row: Row) -> (*mut T, isize, usize) {
        let [x0, x1, x2] = row.x;
        // SAFETY: rows of the validated problem are in shape.
        let at = unsafe { self.out.at([row.b, row.h, x0, x1, x2, 0]) };
        (at, self.out.inner_stride(), self.a.dim_v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane-wise maximum is the plain running one: NaNs passed over wherever they fall
    /// (lanes, tail), -inf for an empty or all-NaN slice, every length around the lane count.
    #[test]
    fn max_of_matches_a_running_maximum_and_skips_nans() {
        let running = |xs: &[f32]| {
            xs.iter()
                .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
        };
        for len in 0..=27 {
            for peak in 0..len.max(1) {
                let mut xs: Vec<f32> = (0..len)
                    .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
                    .collect();
                if peak < len {
                    xs[peak] = 9.5;
                }
                for nan in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                    let mut ys = xs.clone();
                    if let Some(i) = nan.filter(|&i| i < len) {
                        ys[i] = f32::NAN;
                    }
                    assert_eq!(
                        max_of(&ys),
                        running(&ys),
                        "len {len}, peak {peak}, nan {nan:?}"
                    );
                }
            }
        }
        assert_eq!(max_of::<f32>(&[]), f32::NEG_INFINITY);
        assert_eq!(max_of(&[f32::NAN; 11]), f32::NEG_INFINITY);
        assert_eq!(
            max_of(&[f32::NEG_INFINITY, 3.0, f32::INFINITY]),
            f32::INFINITY
        );
        assert_eq!(
            max_of(&[1.0f64, -2.0, 7.5, 7.25, 0.0, 1.0, 2.0, 3.0, 4.0]),
            7.5
        );
    }
}
