//! Fused neighborhood attention, forward: per query, the logits of its window and the extra
//! tokens are computed into a scratch row (never a `[tokens x window]` matrix), softmaxed, and
//! summed against the values. Heads-last tensors; GQA through `kv head = head / group`.
//!
//! This module holds the entry point (`forward`, which picks the row kernel), the views of a
//! problem's inputs (`Attention`) and of the pass's outputs (`Forward`, which every row kernel
//! takes). A query row's keys are gathered in `lists`, its dots and weighted sums taken in
//! `sums`; the row kernels are `rows` (the portable path, one row at a time, with the softmax
//! the backward shares), `slabbed` (the attend kernels over staged slabs) and `tiles` (AMX).

use rayon::current_num_threads;

use super::element::{Accum, Attend, Element, PairDotsKernels};
use super::grid::{Grid, Row};
use super::keys::{KeyList, LANES};
use super::parallel::par_rows;
use super::stage::Slabs;
use super::view::{bias, extras_heads_last, tokens_heads_last, Bias, Extras, Tokens};
use crate::dlpack::TensorRef;
use crate::problem::FusedProblem;

mod lists;
mod rows;
mod slabbed;
mod sums;
#[cfg(target_arch = "x86_64")]
mod tiles;

pub use rows::{softmax, RowScratch};
use slabbed::Slabbed;
#[cfg(target_arch = "x86_64")]
use tiles::TileForward;

/// The borrowed tensors of a fused problem.
#[derive(Clone, Copy)]
pub struct FusedTensors<'a> {
    /// `[B, *spatial, heads, D]`.
    pub query: &'a TensorRef,
    /// `[B, *spatial, heads_kv, D]` (absent for dense attention over extras).
    pub key: Option<&'a TensorRef>,
    /// `[B, *spatial, heads_kv, Dv]`.
    pub value: Option<&'a TensorRef>,
    /// `[B, n_extra, heads_kv, D]`.
    pub additional_keys: Option<&'a TensorRef>,
    /// `[B, n_extra, heads_kv, Dv]`.
    pub additional_values: Option<&'a TensorRef>,
    /// `[heads, 2K-1, ...]`.
    pub rpb: Option<&'a TensorRef>,
}

/// Views of the inputs of a fused problem.
pub struct Attention<'g, T: Element> {
    /// Windows of the query grid (rows over query heads, `dim` = D).
    pub g: &'g Grid,
    /// Query heads per kv head.
    pub group: usize,
    /// Channels of values.
    pub dim_v: usize,
    /// Logit scale.
    pub scale: T::Acc,
    window: bool,
    /// Queries.
    pub q: Tokens<T>,
    k: Option<Tokens<T>>,
    v: Option<Tokens<T>>,
    ek: Option<Extras<T>>,
    ev: Option<Extras<T>>,
    bias: Option<Bias<T>>,
}

impl<'g, T: Element> Attention<'g, T> {
    /// Views of `t` for problem `p` on its query grid `g`.
    pub fn new(p: &FusedProblem, g: &'g Grid, t: &FusedTensors) -> Self {
        let tokens = |t: &TensorRef| tokens_heads_last(t, p.rank, true);
        Attention {
            g,
            group: p.heads / p.heads_kv,
            dim_v: p.dim_v,
            scale: T::Acc::from_f64(p.scale),
            window: p.window,
            q: tokens(t.query),
            k: t.key.map(tokens),
            v: t.value.map(tokens),
            ek: t.additional_keys.map(extras_heads_last),
            ev: t.additional_values.map(extras_heads_last),
            bias: t.rpb.map(bias),
        }
    }

    /// An empty key list large enough for any query.
    pub fn key_list(&self) -> KeyList<T::Acc> {
        let [k0, k1, _] = self.g.axes.map(|a| a.kernel);
        let window = usize::from(self.window);
        KeyList::new(window * k0 * k1, window * self.g.slots, self.g.extra)
    }

    /// Channel strides of key rows: `(neighbors, extras)`.
    pub fn key_steps(&self) -> (isize, isize) {
        (
            self.k.map_or(1, |k| k.inner_stride()),
            self.ek.map_or(1, |k| k.inner_stride()),
        )
    }

    /// Channel strides of value rows: `(neighbors, extras)`.
    pub fn value_steps(&self) -> (isize, isize) {
        (
            self.v.map_or(1, |v| v.inner_stride()),
            self.ev.map_or(1, |v| v.inner_stride()),
        )
    }

    /// Kv heads a forward task can stage together (see `Stage::new`): all of them where each
    /// position's key rows, and value rows, of all kv heads lie side by side and there are no
    /// additional tokens (staged one head at a time), else one.
    fn side_by_side_heads(&self) -> usize {
        let heads_kv = self.g.heads / self.group;
        let side_by_side =
            |t: Option<Tokens<T>>, dim: usize| t.is_some_and(|t| t.stride(1) == dim as isize);
        let together = self.ek.is_none()
            && side_by_side(self.k, self.g.dim)
            && side_by_side(self.v, self.dim_v);
        if together {
            heads_kv
        } else {
            1
        }
    }
}

impl<T: Element> Attention<'_, T> {
    /// Whether key and value rows are dense (channel stride 1), as `Attend` kernels read them.
    fn dense_rows(&self) -> bool {
        self.key_steps() == (1, 1) && self.value_steps() == (1, 1)
    }

    /// The dots kernels for pairs of query rows (key rows against query channels, value rows
    /// against value channels), where this problem's rows allow them: dense window rows and no
    /// additional tokens.
    pub(super) fn pair_dots(&self) -> Option<PairDotsKernels<T::Acc>> {
        let fits = self.window && self.g.extra == 0 && self.dense_rows();
        let kernels = T::pair_dots_kernel(self.g.dim).zip(T::pair_dots_kernel(self.dim_v));
        kernels.filter(|_| fits)
    }

    /// For two consecutive rows: the offset of the second's window runs in the first's and the
    /// length of their union, when one contiguous union of at most twice a window's last-axis
    /// kernel holds both (same batch, head and leading coordinates, windows in one dilation
    /// group along the last axis, the second's starting inside or just past the first's).
    pub(super) fn pair_offset(&self, a: Row, b: Row) -> Option<(usize, usize)> {
        if (a.b, a.h, a.x[0], a.x[1]) != (b.b, b.h, b.x[0], b.x[1]) {
            return None;
        }
        self.pair_offset_along(a.x[2], b.x[2])
    }

    /// `pair_offset` for two consecutive rows of one line, at `a` and `b` on its last axis.
    #[inline(always)]
    fn pair_offset_along(&self, a: usize, b: usize) -> Option<(usize, usize)> {
        let (wa, wb) = (self.g.span(2, a), self.g.span(2, b));
        let d = self.g.axes[2].dilation;
        let shift = wb.first.checked_sub(wa.first)?;
        if shift % d != 0 {
            return None;
        }
        let offset = shift / d;
        let union = offset + wb.count;
        let longest = 2 * self.g.axes[2].kernel;
        (offset <= wa.count && wa.count <= union && union <= longest.max(LANES))
            .then_some((offset, union))
    }
}

/// Index of row `row`'s token (channel 0) in a `[B, heads, *spatial, C]` view.
fn token_index(row: Row) -> [usize; 6] {
    let [x0, x1, x2] = row.x;
    [row.b, row.h, x0, x1, x2, 0]
}

/// Forward into `out` `[B, *spatial, heads, Dv]` and `lse` `[B, *spatial, heads]` (float32).
pub fn forward<T: Element>(p: &FusedProblem, t: &FusedTensors, out: &TensorRef, lse: &TensorRef) {
    let g = Grid::with(p.axes, (p.batch, p.heads), p.dim, p.extra);
    let a = Attention::<T>::new(p, &g, t);
    let attend = T::attend_kernel().filter(|_| a.dense_rows());
    let out_bytes = out.numel() * std::mem::size_of::<T>();
    let kernel = Forward {
        attend,
        a: &a,
        out: tokens_heads_last(out, p.rank, true),
        lse: tokens_heads_last(lse, p.rank, false),
        // Only the slabbed path (taken with an attend kernel) fences its streams.
        stream: attend.is_some() && out_bytes >= STREAM_OUTPUT_BYTES,
    };
    if kernel.attend.is_none() {
        // SAFETY: `Forward::row` writes only row `r` of `out` and `lse`, for any `r < g.rows()`.
        return unsafe { par_rows((g.rows(), g.row_cost() * 2), &kernel) };
    }
    let row_bytes = (p.dim + p.dim_v) * std::mem::size_of::<T::Acc>();
    let slabs = Slabs::plan(&g, row_bytes);
    // Heads staged together must not change the slabs (boxes grown for long windows are
    // bounded in bytes: the 3-D problem's forward took 1.2x the time with its four heads
    // together; boxes too large are not staged), nor leave the threads too few tasks.
    let same_slabs = |heads: usize| {
        let together = Slabs::plan(&g, heads * row_bytes);
        together.ranges == slabs.ranges && together.boxes == slabs.boxes
    };
    let heads = Some(a.side_by_side_heads())
        .filter(|&heads| heads > 1)
        .filter(|_| p.batch * slabs.ranges.len() >= MIN_TASKS_PER_THREAD * current_num_threads())
        .filter(|&heads| same_slabs(heads))
        .unwrap_or(1);
    #[cfg(target_arch = "x86_64")]
    let tiles = TileForward::new(&kernel, &slabs);
    let slabbed = Slabbed {
        forward: &kernel,
        #[cfg(target_arch = "x86_64")]
        tiles,
        pair: T::attend_pair_kernel(),
        wide: T::wide_pair_kernel(p.dim, p.dim_v).filter(|_| p.extra == 0),
        staged: T::staged_kernels(),
        slabs,
        heads,
    };
    let tasks = p.batch * p.heads_kv / heads * slabbed.slabs.ranges.len();
    let cost = (g.rows() * g.row_cost() * 2).div_ceil(tasks.max(1));
    // SAFETY: task `u` writes only the rows of its slab, batch and kv heads' query heads.
    unsafe { par_rows((tasks, cost), &slabbed) }
}

/// Output bytes from which the forward writes its output rows with non-temporal stores: an
/// output larger than a core's L2 cache would leave it before anything reads it, so reading
/// its lines in first (and evicting staged rows for them) is wasted. On P1 (6.4 MB of output)
/// streaming took the forward from 1.0 to about 0.93-0.95 of its time, the 1-D problems to
/// 0.94-0.98.
const STREAM_OUTPUT_BYTES: usize = 2 << 20;

/// Tasks per thread below which the forward stages kv heads one at a time (making as many
/// times more tasks as there are kv heads), so that the threads have work to balance: with
/// a few tasks each, one thread finishes a whole task before the others (P1 with B = 1 on two
/// threads: five tasks with its two heads together).
const MIN_TASKS_PER_THREAD: usize = 4;

struct Forward<'a, 'g, T: Element> {
    /// The one-call kernel for a row, where the type has one and the rows are dense.
    attend: Option<Attend<T::Acc>>,
    a: &'a Attention<'g, T>,
    out: Tokens<T>,
    lse: Tokens<f32>,
    /// Whether output rows are written with non-temporal stores (`stream_row`).
    stream: bool,
}
