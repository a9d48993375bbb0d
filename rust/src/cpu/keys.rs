//! The keys of one query row of the fused op: window neighbors as runs along the window's last
//! axis, then the additional tokens; and weighted sums over them for the portable path.

use super::av::WeightedSum;
use super::element::{Accum, Element, Rows, Run, WindowRuns};
use super::grid::Row;
use super::stage::WindowRows;

/// Logits a SIMD kernel computes at once.
pub const LANES: usize = 8;

/// The keys of one query row, gathered once and walked by every loop over them: window
/// neighbors first (as runs along the window's last axis, whose keys lie a fixed step apart),
/// then the additional tokens.
pub struct KeyList<A> {
    /// Per run: addresses of its first key row and first value row, before `shift`.
    pub(super) runs: Vec<(usize, usize)>,
    /// Bytes added to every run's key and value addresses: the queries of one line share
    /// their runs' addresses up to this shift along the last axis (`LineRows`).
    pub(super) shift: (isize, isize),
    pub(super) run_count: usize,
    /// Keys per run.
    pub(super) run_len: usize,
    /// Bytes between consecutive key rows, and value rows, of a run.
    pub(super) steps: (isize, isize),
    /// Addresses of the additional tokens' key rows and value rows.
    pub(super) extra_keys: Vec<usize>,
    pub(super) extra_values: Vec<usize>,
    /// The bias each neighbor's logit gets (filled only with rpb).
    pub bias: Vec<A>,
    /// For neighbors with rpb: flat index into the `(2K0-1) x (2K1-1) x (2K2-1)` bias box.
    pub bias_bin: Vec<usize>,
    /// Number of keys.
    pub len: usize,
    /// Number of neighbors (the first `window` keys).
    pub window: usize,
}

/// A key list's runs, of key rows or of value rows (`KeyList::window_runs`).
#[derive(Clone, Copy)]
pub struct ListRuns<'a> {
    firsts: &'a [(usize, usize)],
    values: bool,
    shift: isize,
    step: isize,
    len: usize,
}

impl WindowRuns for ListRuns<'_> {
    #[inline(always)]
    fn count(&self) -> usize {
        self.firsts.len()
    }

    #[inline(always)]
    fn runs(self) -> impl Iterator<Item = Run> + Clone {
        self.firsts.iter().map(move |&(k, v)| Run {
            first: if self.values { v } else { k }.wrapping_add_signed(self.shift),
            step: self.step,
            len: self.len,
        })
    }
}

impl<A: Accum> KeyList<A> {
    pub(super) fn new(runs: usize, neighbors: usize, extra: usize) -> Self {
        KeyList {
            runs: vec![(0, 0); runs],
            shift: (0, 0),
            run_count: 0,
            run_len: 0,
            steps: (0, 0),
            extra_keys: vec![0; extra],
            extra_values: vec![0; extra],
            bias: vec![A::ZERO; neighbors],
            bias_bin: vec![0; neighbors],
            len: 0,
            window: 0,
        }
    }

    /// Set the run addresses (and the step along each run) of a window of `counts` runs
    /// along its first two axes, whose rows lie as `rows` says; no shift.
    #[inline(always)]
    pub(super) fn set_runs(&mut self, rows: WindowRows, counts: [usize; 2]) {
        let (k0, v0) = rows.first;
        let [(k_step0, v_step0), (k_step1, v_step1), steps] = rows.steps;
        self.steps = steps;
        self.shift = (0, 0);
        let mut runs = self.runs.iter_mut();
        for s0 in 0..counts[0] as isize {
            let (k, v) = (
                k0.wrapping_add_signed(s0 * k_step0),
                v0.wrapping_add_signed(s0 * v_step0),
            );
            for (s1, run) in (0..counts[1] as isize).zip(&mut runs) {
                *run = (
                    k.wrapping_add_signed(s1 * k_step1),
                    v.wrapping_add_signed(s1 * v_step1),
                );
            }
        }
    }

    /// The neighbors' key rows (or value rows) as runs, each with the index of its first key.
    #[inline(always)]
    pub fn runs(&self, values: bool) -> impl Iterator<Item = (usize, Run)> + '_ {
        let runs = self.window_runs(values, self.run_len).runs();
        runs.enumerate().map(|(i, run)| (i * self.run_len, run))
    }

    /// The neighbors' key rows (or value rows) as the runs of a window, each `len` rows long
    /// (from each run's first key: a pair's union is longer than its first query's runs).
    #[inline(always)]
    pub fn window_runs(&self, values: bool, len: usize) -> ListRuns<'_> {
        let (step, shift) = if values {
            (self.steps.1, self.shift.1)
        } else {
            (self.steps.0, self.shift.0)
        };
        ListRuns {
            firsts: &self.runs[..self.run_count],
            values,
            shift,
            step,
            len,
        }
    }

    /// Logit slots of a kernel that gives each run, and the extras, whole groups of
    /// `LANES` slots (the padding slots hold -inf).
    pub fn padded_len(&self) -> usize {
        self.run_count * self.run_len.next_multiple_of(LANES)
            + (self.len - self.window).next_multiple_of(LANES)
    }

    /// The additional tokens' key rows (or value rows).
    #[inline(always)]
    pub fn extra_rows(&self, values: bool) -> &[usize] {
        let rows = if values {
            &self.extra_values
        } else {
            &self.extra_keys
        };
        &rows[..self.len - self.window]
    }
}

/// `sum_n w[n] value_n` (or `key_n`) over a key list.
pub struct KeyTerms<'a, T: Element> {
    /// The keys.
    pub list: &'a KeyList<T::Acc>,
    /// Weights, one per key.
    pub w: &'a [T::Acc],
    /// Sum value rows (true) or key rows (false).
    pub values: bool,
    /// Channel strides `(neighbors, extras)` of the summed rows.
    pub steps: (isize, isize),
}

impl<T: Element> WeightedSum<T> for KeyTerms<'_, T> {
    #[inline(always)]
    unsafe fn terms(&self, _row: Row, mut f: impl FnMut(T::Acc, *const T, isize)) {
        for (n, run) in self.list.runs(self.values) {
            for i in 0..run.len {
                f(self.w[n + i], run.at(i) as *const T, self.steps.0);
            }
        }
        let extra = self.list.extra_rows(self.values);
        for (&w, &row) in self.w[self.list.window..].iter().zip(extra) {
            f(w, row as *const T, self.steps.1);
        }
    }

    fn dense_terms(&self) -> bool {
        self.steps == (1, 1)
    }
}
