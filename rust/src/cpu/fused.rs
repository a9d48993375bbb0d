//! Fused neighborhood attention, forward: per query, the logits of its window and the extra
//! tokens are computed into a scratch row (never a `[tokens x window]` matrix), softmaxed, and
//! summed against the values. Heads-last tensors; GQA through `kv head = head / group`.

use std::ops::Range;

use rayon::current_num_threads;

use super::av::weighted_sum;
use super::element::{
    dot, fence_streams, load_scaled, store, stream_row, Accum, Attend, AttendKernels, AttendPair,
    Element, PairDotsKernels, Rows, Run,
};
use super::grid::{Grid, Row};
use super::keys::{KeyList, KeyTerms, LANES};
use super::parallel::{par_rows, RowKernel};
use super::stage::{prefetch_lines, LineRows, Slabs, Stage, StagedViews, WindowRows};
use super::view::{bias, extras_heads_last, tokens_heads_last, Bias, Extras, Tokens};
use crate::dlpack::TensorRef;
use crate::problem::FusedProblem;
use crate::window::Span;

#[cfg(target_arch = "x86_64")]
mod tiles;
#[cfg(target_arch = "x86_64")]
use tiles::{TileForward, TileScratch};

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
    unsafe fn begin_line(
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
                    let d = self.g.axes.map(|a| a.dilation);
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
    unsafe fn point_keys(&self, row: Row, line: Option<&LineRows>, list: &mut KeyList<T::Acc>) {
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
    unsafe fn load_query_from(&self, src: *const T, q: &mut [T::Acc]) {
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
        let union = offset + lb.run_len;
        // SAFETY (whole block): the union rows are keys of one of the rows, of `dim` channels;
        // `dst` is this task's.
        unsafe {
            for ((na, run), (nb, _)) in la.runs(false).zip(lb.runs(false)) {
                let weights = [&w[0][na..na + la.run_len], &w[1][nb..nb + lb.run_len]];
                let union_rows = Run { len: union, ..run };
                T::sum_pair(weights, offset, union_rows, [&mut *acc_a, &mut *acc_b]);
            }
            for (acc, (ptr, step, _)) in [(acc_a, dst[0]), (acc_b, dst[1])] {
                acc.iter_mut().for_each(|a| *a = *a * scale);
                store(ptr, step, acc);
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

/// How many points ahead of the pair being attended the staged forward fetches query rows and
/// output lines: with neither, the query loads and output stores stalled P1's forward by about
/// a fifth. Every point is fetched, the pair's two included (fetching one point per step, as
/// pairs step two points, left every other query unfetched: twice the query-load stalls).
const PREFETCH_POINTS: usize = 4;

/// The forward pass of the attend kernels, one slab (`stage`) of one batch and `heads`
/// consecutive kv heads per task: the slab's key and value rows are staged once, then every
/// query head of those kv heads attends from the slab's queries, two consecutive rows through
/// one `AttendPair` call where their windows allow (neighbors along the last axis share most
/// keys), else one by one.
///
/// Attending eight consecutive queries of a line at once instead (lanes holding queries,
/// keys staged channel-major, so that a block's logits at one offset from each query's column
/// take one multiply-add per channel and no sums across lanes) was built and measured three
/// times, on AVX-512 (Zen 4), and never paid overall. Its interior blocks beat the pair
/// kernel (about 88 ns per query against 110-117 on P1's rows in cache), but the blocks at a
/// line's ends, whose clamped windows widen the offsets to ten and mask lanes, took about
/// 175, and transposing keys into the stage cost more than copying them: P1's forward took
/// 0.95 to 1.2x the time of this path, the 3-D problem 1.1 to 1.4x (one build took the 1-D
/// problem 0.84x).
///
/// Neither does keeping the rows a worker staged for the last slab that the next slab's box
/// shares (six of P1's eighteen box lines) pay: moved in the stage rather than copied again,
/// P1's forward on one thread took the same time, the rows it would read again still cached.
struct Slabbed<'k, 'a, 'g, T: Element> {
    forward: &'k Forward<'a, 'g, T>,
    /// The tile forward, where it takes the problem (and then every staged slab).
    #[cfg(target_arch = "x86_64")]
    tiles: Option<TileForward<'g>>,
    pair: Option<AttendPair<T::Acc>>,
    /// The pair kernel for staged rows whose windows' union is longer than `LANES` rows.
    wide: Option<AttendPair<T::Acc>>,
    /// The kernels for staged (widened) rows; without them, slabs are not staged.
    staged: Option<AttendKernels<T::Acc>>,
    slabs: Slabs,
    /// Kv heads a task stages together (all of `Attention::side_by_side_heads`, or one).
    heads: usize,
}

/// Per-worker scratch of `Slabbed`.
struct SlabScratch<T: Element> {
    rows: [RowScratch<T::Acc>; 2],
    stage: Stage<T>,
    #[cfg(target_arch = "x86_64")]
    tiles: Option<TileScratch>,
}

impl<T: Element> RowKernel for Slabbed<'_, '_, '_, T> {
    type Scratch = SlabScratch<T>;

    fn scratch(&self) -> Self::Scratch {
        let a = self.forward.a;
        SlabScratch {
            rows: [a.row_scratch(), a.row_scratch()],
            stage: Stage::new(
                self.slabs.max_volume,
                a.g.extra,
                (a.g.dim, a.dim_v),
                self.heads,
            ),
            #[cfg(target_arch = "x86_64")]
            tiles: self.tiles.as_ref().map(TileForward::scratch),
        }
    }

    #[inline(always)]
    unsafe fn row(&self, u: usize, s: &mut Self::Scratch) {
        let (f, a) = (self.forward, self.forward.a);
        let slabs = self.slabs.ranges.len();
        let stages = a.g.heads / a.group / self.heads;
        // A slab's stages (one per kv head where they are staged one at a time) are
        // consecutive tasks: heads-last rows interleave the heads, so the second stage finds
        // the lines the first one brought in still in cache.
        let (b, slab, hk) = (
            u / stages / slabs,
            u / stages % slabs,
            u % stages * self.heads,
        );
        let points = self.slabs.ranges[slab].clone();
        #[cfg(target_arch = "x86_64")]
        if let (Some(tiles), Some(kbox), Some(scratch)) =
            (&self.tiles, &self.slabs.boxes[slab], &mut s.tiles)
        {
            let heads = hk..hk + self.heads;
            // SAFETY: the tile forward exists only on the AMX tier; this task's slab, batch
            // and heads, whose box holds the slab's windows.
            return unsafe { tiles.attend_slab((b, heads), points, kbox, scratch) };
        }
        let SlabScratch { rows, stage, .. } = s;
        let staged = match (self.staged, self.slabs.boxes[slab], a.k, a.v) {
            (Some(_), Some(kbox), Some(k), Some(v)) => {
                let views = StagedViews {
                    window: (k, v),
                    extras: a.ek.zip(a.ev).map(|(ek, ev)| (ek, ev, a.g.extra)),
                };
                // SAFETY: dense rows (the attend kernels' condition); the box holds positions
                // of the grid and fits the buffers (`max_volume`), as do the extras.
                unsafe { stage.begin(views, (b, hk), kbox) };
                true
            }
            _ => false,
        };
        let kernels = match (staged, self.staged) {
            (true, Some((single, pair))) => LineKernels {
                single,
                pair: Some(pair),
                wide: self.wide,
            },
            _ => LineKernels {
                single: f.attend.expect("an attend kernel"),
                pair: self.pair,
                wide: None,
            },
        };
        let length = a.g.axes[2].length;
        for h in hk * a.group..(hk + self.heads) * a.group {
            // The other heads of the group find the whole box staged.
            let reach = staged && h == hk * a.group;
            let mut start = points.start;
            while start < points.end {
                // A line's points are consecutive in the point order, `length` of them.
                let end = points.end.min((start / length + 1) * length);
                let line = SlabLine {
                    b,
                    h,
                    points: start..end,
                    slab_end: points.end,
                };
                let stage = staged.then_some(&mut *stage);
                // SAFETY: points of this task's slab, batch and head; the stage (begun above)
                // holds the slab's box.
                unsafe { f.attend_line(line, kernels, (stage, reach), rows) };
                start = end;
            }
        }
        if f.stream {
            fence_streams();
        }
    }
}

/// The kernels a task of `Slabbed` attends with: one row at a time, pairs whose union fits
/// `LANES` rows, and pairs with longer unions.
#[derive(Clone, Copy)]
struct LineKernels<A> {
    single: Attend<A>,
    pair: Option<AttendPair<A>>,
    wide: Option<AttendPair<A>>,
}

/// Part of one line (the points of `points`, consecutive in the point order and sharing
/// their leading coordinates) of batch `b` and head `h`, in a slab that ends at `slab_end`.
struct SlabLine {
    b: usize,
    h: usize,
    points: Range<usize>,
    slab_end: usize,
}

/// The query, output and lse views of one line, from the line's first position on: a point
/// of the line finds its rows with one multiplication along the last axis.
struct LineViews<T> {
    q: Tokens<T>,
    out: Tokens<T>,
    lse: Tokens<f32>,
}

impl<T> LineViews<T> {
    /// Index of the element (channel 0) of the point at `x` on the line's last axis.
    #[inline(always)]
    fn at(x: usize) -> [usize; 6] {
        [0, 0, 0, 0, x, 0]
    }
}

struct Forward<'a, 'g, T: Element> {
    /// The one-call kernel for a row, where the type has one and the rows are dense.
    attend: Option<Attend<T::Acc>>,
    a: &'a Attention<'g, T>,
    out: Tokens<T>,
    lse: Tokens<f32>,
    /// Whether output rows are written with non-temporal stores (`stream_row`).
    stream: bool,
}

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

/// Index of row `row`'s token (channel 0) in a `[B, heads, *spatial, C]` view.
fn token_index(row: Row) -> [usize; 6] {
    let [x0, x1, x2] = row.x;
    [row.b, row.h, x0, x1, x2, 0]
}

impl<T: Element> Forward<'_, '_, T> {
    /// The queries of `line` through `kernels`, two at a time where their windows allow,
    /// their windows read from the stage when given; first filling the stage as far as the
    /// line's queries reach (`reach`, set for the first head of a kv head's group).
    ///
    /// Everything that is the same along a line (the key runs' addresses up to a shift, and
    /// where the line's queries, outputs and lse lie) is found once per line.
    ///
    /// # Safety
    /// The line's rows must be rows of the validated problem, written by this task only; the
    /// kernels must read rows as they lie (staged rows are widened); a stage must have begun
    /// on a box holding the line's windows.
    #[inline(always)]
    unsafe fn attend_line(
        &self,
        line: SlabLine,
        kernels: LineKernels<T::Acc>,
        (mut stage, reach): (Option<&mut Stage<T>>, bool),
        [sa, sb]: &mut [RowScratch<T::Acc>; 2],
    ) {
        let (a, g) = (self.a, self.a.g);
        let first = Row {
            b: line.b,
            h: line.h,
            x: g.point(line.points.start),
        };
        let at = |p: usize| Row {
            x: g.point(p),
            ..first
        };
        let d = g.axes.map(|axis| axis.dilation);
        // SAFETY (whole block): rows of the validated problem, ours to write; the stage holds
        // every window it is asked for (`reach` before each use).
        unsafe {
            let views = self.line_views(first);
            let rows = a.begin_line(first, stage.as_deref(), true, &mut sa.keys);
            a.begin_line(first, stage.as_deref(), false, &mut sb.keys);
            let mut p = line.points.start;
            // Points up to here have been asked for (the line's first few by the line before).
            let mut fetched = (p + PREFETCH_POINTS).min(line.slab_end);
            while p < line.points.end {
                let ra = at(p);
                let rb = (p + 1 < line.points.end).then(|| at(p + 1));
                // Every point up to PREFETCH_POINTS past this step's (one or two).
                let ahead = (p + 2 + PREFETCH_POINTS).min(line.slab_end);
                while fetched < ahead {
                    if fetched < line.points.end {
                        self.prefetch_point(&views, g.point(fetched)[2]);
                    } else {
                        self.prefetch_point(&self.line_views(at(fetched)), g.point(fetched)[2]);
                    }
                    fetched += 1;
                }
                let paired = rb.and_then(|rb| {
                    let (offset, union) = a.pair_offset_along(ra.x[2], rb.x[2])?;
                    let kernel = if union <= LANES {
                        kernels.pair
                    } else {
                        kernels.wide
                    };
                    kernel.map(|kernel| (kernel, rb, offset))
                });
                if let Some(stage) = stage.as_deref_mut().filter(|_| reach) {
                    let last = paired.map_or(ra, |(_, rb, _)| rb);
                    stage.reach(&g.window(last.x), d);
                }
                let line = (&views, rows.as_ref());
                match paired {
                    Some((pair, rb, offset)) => {
                        self.attend_pair(pair, [ra, rb], offset, line, [sa, sb]);
                        p += 2;
                    }
                    None => {
                        self.attend_row(kernels.single, ra, line, sa);
                        p += 1;
                    }
                }
            }
        }
    }

    /// The views of the line of `row`, from the line's first position on.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem.
    #[inline(always)]
    unsafe fn line_views(&self, row: Row) -> LineViews<T> {
        let [x0, x1, _] = row.x;
        let start = [row.b, row.h, x0, x1, 0, 0];
        // SAFETY: the line's first position is in shape with the row's.
        unsafe {
            LineViews {
                q: self.a.q.rebased(start),
                out: self.out.rebased(start),
                lse: self.lse.rebased(start),
            }
        }
    }

    /// Row `row` (on the line of `views`, whose key runs `begin_line` put in `s.keys` with
    /// `rows`) through `kernel`.
    ///
    /// # Safety
    /// As `attend_line`, for a row of the line.
    #[inline(always)]
    unsafe fn attend_row(
        &self,
        kernel: Attend<T::Acc>,
        row: Row,
        (views, rows): (&LineViews<T>, Option<&LineRows>),
        s: &mut RowScratch<T::Acc>,
    ) {
        let a = self.a;
        // SAFETY: by the caller's contract.
        unsafe {
            a.load_query_from(views.q.at(LineViews::<T>::at(row.x[2])), &mut s.q);
            a.point_keys(row, rows, &mut s.keys);
            let acc = &mut s.tail[..a.dim_v];
            let result = kernel(&s.q, &s.keys, a.bias.is_some(), &mut s.logits, acc);
            self.finish(views, row.x[2], result, acc);
        }
    }

    /// Rows `rows` through one `AttendPair` call (the second's window runs start `offset` rows
    /// into the first's), as `attend_row` does one.
    ///
    /// # Safety
    /// As `attend_row`, for both rows, and `offset` from `pair_offset_along`.
    #[inline(always)]
    unsafe fn attend_pair(
        &self,
        pair: AttendPair<T::Acc>,
        [ra, rb]: [Row; 2],
        offset: usize,
        (views, rows): (&LineViews<T>, Option<&LineRows>),
        [sa, sb]: [&mut RowScratch<T::Acc>; 2],
    ) {
        let (a, dim) = (self.a, self.a.dim_v);
        // SAFETY: by the caller's contract.
        unsafe {
            // Only the first list's runs are read, so only it needs their shift. Written out
            // rather than looped over an array of rows: reading the rows back from such an
            // array stalled on store forwarding (a seventh of the forward on P1).
            a.load_query_from(views.q.at(LineViews::<T>::at(ra.x[2])), &mut sa.q);
            a.point_keys(ra, rows, &mut sa.keys);
            a.load_query_from(views.q.at(LineViews::<T>::at(rb.x[2])), &mut sb.q);
            a.point_keys(rb, None, &mut sb.keys);
            let results = pair(
                [&sa.q, &sb.q],
                [&sa.keys, &sb.keys],
                offset,
                a.bias.is_some(),
                [&mut sa.logits, &mut sb.logits],
                [&mut sa.tail[..dim], &mut sb.tail[..dim]],
            );
            self.finish(views, ra.x[2], results[0], &mut sa.tail[..dim]);
            self.finish(views, rb.x[2], results[1], &mut sb.tail[..dim]);
        }
    }

    /// Hint that the query at `x` on the line of `views` will be read soon, and its output
    /// written (unless streamed).
    #[inline(always)]
    fn prefetch_point(&self, views: &LineViews<T>, x: usize) {
        let size = std::mem::size_of::<T>();
        // SAFETY: points of the line are in shape.
        let (query, out) = unsafe {
            let at = LineViews::<T>::at(x);
            (views.q.at(at), views.out.at(at))
        };
        prefetch_lines(query as *const u8, self.a.g.dim * size);
        if !self.stream {
            prefetch_lines(out as *const u8, self.a.dim_v * size);
        }
    }

    /// Where row `row`'s output goes: `(address, channel stride, channels)`.
    fn out_row(&self, row: Row) -> (*mut T, isize, usize) {
        let [x0, x1, x2] = row.x;
        // SAFETY: rows of the validated problem are in shape.
        let at = unsafe { self.out.at([row.b, row.h, x0, x1, x2, 0]) };
        (at, self.out.inner_stride(), self.a.dim_v)
    }

    /// Write the output `acc / sum` and the lse of the point at `x` on the line of `views`
    /// from an attend kernel's `(max, sum)`. (Taking the logarithms of a whole line at once, a
    /// vectorized loop instead of a libm call per point, which had 3.6% of P1's forward samples,
    /// left the forward's time as it was: 1.005x.)
    ///
    /// # Safety
    /// The point's row must be a row of the validated problem, written by this task only.
    #[inline(always)]
    unsafe fn finish(
        &self,
        views: &LineViews<T>,
        x: usize,
        (max, sum): (T::Acc, T::Acc),
        acc: &mut [T::Acc],
    ) {
        // A row that sees no key (merged attention over nothing) gives zeros, lse -inf.
        let inv = if sum > T::Acc::ZERO {
            T::Acc::ONE / sum
        } else {
            T::Acc::ZERO
        };
        acc.iter_mut().for_each(|x| *x = *x * inv);
        let at = LineViews::<T>::at(x);
        // SAFETY: by the caller's contract.
        unsafe {
            let ptr = views.out.at(at);
            if !(self.stream && stream_row(ptr, acc)) {
                store(ptr, views.out.inner_stride(), acc);
            }
            *views.lse.at(at) = (max + sum.ln()).to_f32();
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
