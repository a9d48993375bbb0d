//! Key lists of the fused forward's query rows (`KeyList`): the runs of a row's window,
//! found once per line and shifted for each of its queries, its bias and the additional tokens.

use super::Attention;
use crate::cpu::element::Element;
use crate::cpu::grid::Row;
use crate::cpu::keys::KeyList;
use crate::cpu::stage::{LineRows, Stage, WindowRows};
use crate::cpu::view::{Bias, Tokens};
use crate::window::Span;

impl<T: Element> Attention<'_, T> {
    /// Gather the keys of query row `row` into `list`.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem.
    #[inline(always)]
    pub unsafe fn collect_keys(&self, row: Row, list: &mut KeyList<T::Acc>) {
        // SAFETY: forwarded contract.
        unsafe {
            let line = self.begin_line(row, None, true, list);
            self.point_keys(row, line.as_ref(), list);
        }
    }

    /// Start the key lists of the queries on `row`'s line (same batch, head and leading
    /// coordinates): the runs' count, and their addresses up to the shift along the last
    /// axis (returned) when `addresses`; the additional tokens. `point_keys` finishes the
    /// list for each query of the line.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem; a stage must hold the windows of the
    /// line's queries that `point_keys` takes.
    #[inline(always)]
    pub(super) unsafe fn begin_line(
        &self,
        row: Row,
        stage: Option<&Stage<T>>,
        addresses: bool,
        list: &mut KeyList<T::Acc>,
    ) -> Option<LineRows> {
        let Row { b, h, x } = row;
        let hk = h / self.group;
        list.run_count = 0;
        let mut line = None;
        // SAFETY (whole block): window keys of a validated row, and its extras, are in shape.
        unsafe {
            if let (Some(k), Some(v)) = (self.k, self.v) {
                let w = self.g.window(x);
                list.run_count = w[0].count * w[1].count;
                if addresses {
                    let d = self.g.dilations();
                    let rows = match stage {
                        Some(stage) => stage.line_rows(&w, d, hk),
                        None => line_rows((k, v), (b, hk), &w, d),
                    };
                    list.set_runs(rows.rows, [w[0].count, w[1].count]);
                    line = Some(rows);
                }
            }
            if let (Some(ek), Some(ev)) = (self.ek, self.ev) {
                for e in 0..self.g.extra {
                    (list.extra_keys[e], list.extra_values[e]) = match stage {
                        Some(stage) => stage.extra_rows(e),
                        None => (ek.at([b, hk, e, 0]) as usize, ev.at([b, hk, e, 0]) as usize),
                    };
                }
            }
        }
        line
    }

    /// Finish the key list of `row` on the line that `begin_line` started in `list` (which
    /// returned `line` when it set addresses): its runs' length, their shift and its bias.
    ///
    /// # Safety
    /// As `begin_line`, for a row of that line.
    #[inline(always)]
    pub(super) unsafe fn point_keys(
        &self,
        row: Row,
        line: Option<&LineRows>,
        list: &mut KeyList<T::Acc>,
    ) {
        let extra = if self.ek.is_some() { self.g.extra } else { 0 };
        list.window = 0;
        if self.k.is_some() && self.v.is_some() {
            let span = self.g.span(2, row.x[2]);
            list.run_len = span.count;
            list.window = list.run_count * span.count;
            if let Some(line) = line {
                list.shift = line.shift(span.first);
            }
            if let Some(bias) = self.bias {
                // SAFETY: the window of a validated row.
                unsafe { self.collect_bias(bias, row, self.g.window(row.x), list) };
            }
        }
        list.len = list.window + extra;
    }

    /// The bias (and its bin in the `(2K-1)^3` box) of every neighbor of `row`, window order.
    ///
    /// # Safety
    /// `w` must be the window of `row`, a row of the validated problem.
    #[inline(always)]
    unsafe fn collect_bias(
        &self,
        bias: Bias<T>,
        row: Row,
        w: [Span; 3],
        list: &mut KeyList<T::Acc>,
    ) {
        let first = [0, 1, 2].map(|a| self.g.axes[a].bias_index(row.x[a], w[a].first));
        let span = self.g.axes.map(|a| 2 * a.kernel - 1);
        let mut n = 0;
        for s0 in 0..w[0].count {
            for s1 in 0..w[1].count {
                for s2 in 0..w[2].count {
                    let i = [first[0] + s0, first[1] + s1, first[2] + s2];
                    list.bias_bin[n] = (i[0] * span[1] + i[1]) * span[2] + i[2];
                    // SAFETY: offsets inside a window index the validated `[heads, 2K-1, ...]`.
                    list.bias[n] = unsafe { (*bias.at([row.h, i[0], i[1], i[2]])).to_acc() };
                    n += 1;
                }
            }
        }
    }
}

/// Where the key and value tensors of batch `b`, kv head `hk` hold the windows of the line
/// holding window `w` (see `LineRows`).
///
/// # Safety
/// The window must be in the tensors' validated shape.
#[inline(always)]
unsafe fn line_rows<T: Element>(
    (k, v): (Tokens<T>, Tokens<T>),
    (b, hk): (usize, usize),
    w: &[Span; 3],
    dilation: [usize; 3],
) -> LineRows {
    let at = [b, hk, w[0].first, w[1].first, 0, 0];
    let size = std::mem::size_of::<T>() as isize;
    let step = |t: Tokens<T>, a: usize| dilation[a] as isize * t.stride(2 + a) * size;
    LineRows {
        rows: WindowRows {
            // SAFETY: in shape by the caller's contract.
            first: unsafe { (k.at(at) as usize, v.at(at) as usize) },
            steps: [0, 1, 2].map(|a| (step(k, a), step(v, a))),
        },
        origin: 0,
        unit: 1,
        unit_bytes: (k.stride(4) * size, v.stride(4) * size),
    }
}
