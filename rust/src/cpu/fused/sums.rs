//! What the fused ops compute over a query row's key list: the scaled query, the logits (dots
//! with the key rows, plus the bias), dots with the value rows, and weighted sums of value or
//! key rows, one row at a time or two rows sharing their runs.

use super::{token_index, Attention};
use crate::cpu::av::weighted_sum;
use crate::cpu::element::{dot, load_scaled, store, Accum, Element, Rows};
use crate::cpu::grid::Row;
use crate::cpu::keys::{KeyList, KeyTerms};

impl<T: Element> Attention<'_, T> {
    /// Load the query row of `row`, times the scale, into `q`.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem.
    #[inline(always)]
    pub unsafe fn load_query(&self, row: Row, q: &mut [T::Acc]) {
        // SAFETY: in shape by the caller's contract.
        unsafe { self.load_query_from(self.q.at(token_index(row)), q) };
    }

    /// Load the query row at `src` (a row of the query view), times the scale, into `q`.
    ///
    /// # Safety
    /// `src` must be the first element of a query row.
    #[inline(always)]
    pub(super) unsafe fn load_query_from(&self, src: *const T, q: &mut [T::Acc]) {
        // SAFETY: by the caller's contract.
        unsafe { load_scaled(q, src, self.q.inner_stride(), self.scale) };
    }

    /// `logits[n] = q . key_n + bias_n` over `list` (`q` already scaled).
    ///
    /// # Safety
    /// `list` must hold the keys of a row of the validated problem.
    #[inline(always)]
    pub unsafe fn scores(&self, list: &KeyList<T::Acc>, q: &[T::Acc], logits: &mut [T::Acc]) {
        // SAFETY: the list's rows hold `q.len()` channels.
        unsafe { self.dots(list, false, q, logits) };
        self.add_bias(list, logits);
    }

    /// Add the list's bias (with rpb) to the logits of its window.
    #[inline(always)]
    pub fn add_bias(&self, list: &KeyList<T::Acc>, logits: &mut [T::Acc]) {
        if self.bias.is_some() {
            for (l, &b) in logits[..list.window].iter_mut().zip(&list.bias) {
                *l += b;
            }
        }
    }

    /// `out[n] = a . value_n` over `list`.
    ///
    /// # Safety
    /// `list` must hold the keys of a row of the validated problem; `a` has `dim_v` channels.
    #[inline(always)]
    pub unsafe fn value_dots(&self, list: &KeyList<T::Acc>, a: &[T::Acc], out: &mut [T::Acc]) {
        // SAFETY: the list's value rows hold `dim_v` channels.
        unsafe { self.dots(list, true, a, out) };
    }

    /// `out[n] = a . row_n` over the key rows (or value rows) of `list`.
    ///
    /// # Safety
    /// The rows must hold `a.len()` channels.
    #[inline(always)]
    unsafe fn dots(&self, list: &KeyList<T::Acc>, values: bool, a: &[T::Acc], out: &mut [T::Acc]) {
        let (window_step, extra_step) = if values {
            self.value_steps()
        } else {
            self.key_steps()
        };
        let extra = list.extra_rows(values);
        // SAFETY (whole block): by the caller's contract.
        unsafe {
            for (n, run) in list.runs(values) {
                let out = &mut out[n..n + run.len];
                if window_step == 1 {
                    T::dot_rows(a, run, out);
                } else {
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = dot(a, run.at(i) as *const T, window_step);
                    }
                }
            }
            let out = &mut out[list.window..list.len];
            if extra_step == 1 {
                T::dot_rows(a, extra, out);
            } else {
                for (o, &row) in out.iter_mut().zip(extra) {
                    *o = dot(a, row as *const T, extra_step);
                }
            }
        }
    }
}

impl<T: Element> Attention<'_, T> {
    /// Write `scale * sum_n w[n] row_n` (value rows, or key rows) over `list` to `dim`
    /// channels at `dst`, `step` apart; `tail` is scratch of at least `dim`.
    ///
    /// # Safety
    /// `list` must hold the keys of `row`, a row of the validated problem; `dst` must be
    /// writable and written by this task only.
    #[inline(always)]
    pub unsafe fn store_weighted_sum(
        &self,
        (row, list, w, values): (Row, &KeyList<T::Acc>, &[T::Acc], bool),
        dst: (*mut T, isize, usize),
        scale: T::Acc,
        tail: &mut [T::Acc],
    ) {
        let steps = if values {
            self.value_steps()
        } else {
            self.key_steps()
        };
        let (ptr, step, dim) = dst;
        // SAFETY (whole block): the list's rows hold `dim` channels; `dst` is ours.
        unsafe {
            if steps != (1, 1) {
                let terms = KeyTerms {
                    list,
                    w,
                    values,
                    steps,
                };
                return weighted_sum(&terms, row, dst, scale, tail);
            }
            let acc = &mut tail[..dim];
            acc.fill(T::Acc::ZERO);
            for (n, run) in list.runs(values) {
                T::sum_rows(&w[n..n + run.len], run, acc);
            }
            T::sum_rows(&w[list.window..list.len], list.extra_rows(values), acc);
            acc.iter_mut().for_each(|a| *a = *a * scale);
            store(ptr, step, acc);
        }
    }
}

impl<T: Element> Attention<'_, T> {
    /// `store_weighted_sum` over the key rows for two rows whose windows share their runs
    /// (`offset` from `pair_offset`; dense rows, no additional tokens): each row of a run's
    /// union is read once for both (`Element::sum_pair`).
    ///
    /// # Safety
    /// As `store_weighted_sum`, for both rows and their lists.
    #[inline(always)]
    pub unsafe fn store_weighted_pair(
        &self,
        lists: [&KeyList<T::Acc>; 2],
        (w, offset): ([&[T::Acc]; 2], usize),
        dst: [(*mut T, isize, usize); 2],
        scale: T::Acc,
        [tail_a, tail_b]: [&mut [T::Acc]; 2],
    ) {
        let [la, lb] = lists;
        let dim = dst[0].2;
        let (acc_a, acc_b) = (&mut tail_a[..dim], &mut tail_b[..dim]);
        acc_a.fill(T::Acc::ZERO);
        acc_b.fill(T::Acc::ZERO);
        let union = la.window_runs(false, offset + lb.run_len);
        let weights = [&w[0][..la.window], &w[1][..lb.window]];
        // SAFETY (whole block): the union rows are keys of one of the rows, of `dim` channels;
        // `dst` is this task's.
        unsafe {
            T::sum_pair(weights, offset, union, [&mut *acc_a, &mut *acc_b]);
            for (acc, (ptr, step, _)) in [(acc_a, dst[0]), (acc_b, dst[1])] {
                acc.iter_mut().for_each(|a| *a = *a * scale);
                store(ptr, step, acc);
            }
        }
    }
}
