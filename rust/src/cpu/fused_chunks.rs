//! The query pass of the fused backward: per query, its probabilities are recomputed once and
//! give `d_query`, and the query's terms of `d_key` and `d_value` are added to float
//! accumulators of its window's key rows right away, while those rows are in cache
//! (`fused_sums` says where they lie), and its logit gradients binned by relative offset, for
//! `d_rpb`. Keys are never revisited from their side, so the backward costs five products per
//! (query, key) pair (logit, `d_out . value`, and the three gradients) instead of seven.
//!
//! Several queries add to one key, so work is split into chunks of one `(batch, kv head)`
//! plane, along one axis inside one dilation group, each at least twice as long as a query's
//! reach: chunks two apart never share a key. Even chunks run in parallel, then odd ones. The
//! split (and whether a chunk's sums are staged) depends on the problem alone, so every key's
//! sum runs in one fixed order (deterministic for any thread count).

use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use super::element::{Accum, Element, PairDotsKernels};
use super::fused_bwd::{Backward, QueryScratch};
use super::fused_sums::{ChunkStage, KvSums, SumRows};
use super::grid::{Grid, Row};
use super::parallel::{par_rows, RowKernel};
use super::qk::store_bias_grad;
use super::stage::prefetch_lines;
use super::view::{Bias, Tokens};
use crate::window::Span;

/// At most this many chunks per dilation group (more buy no parallelism).
const MAX_CHUNKS: usize = 64;

/// How many points past the one or two being computed a line's query, output and output
/// gradient rows are asked for.
const PREFETCH_POINTS: usize = 4;

/// Tile extents along axes 1 and 2 (when they come after the chunk axis); 4 x 8 queries of a
/// 7x7x7 window touch a box of key rows that fits in L2.
const TILE: [usize; 3] = [0, 4, 8];

/// The chunks of a plane: positions `group + j * dilation` for `j` in `range` along `axis`.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Chunk {
    pub(super) group: usize,
    pub(super) range: Range<usize>,
}

/// How the query grid is split for the scatter.
pub(super) struct ChunkPlan {
    /// The axis chunks run along: the first one longer than 1 (consecutive chunks are then
    /// contiguous blocks of tokens).
    pub(super) axis: usize,
    /// Chunks of even and of odd index within their group.
    pub(super) phases: [Vec<Chunk>; 2],
}

impl ChunkPlan {
    pub(super) fn new(g: &Grid) -> ChunkPlan {
        let axis = (0..3).find(|&a| g.axes[a].length > 1).unwrap_or(2);
        let a = g.axes[axis];
        let d = a.dilation;
        let span = (2 * reach(g, axis)).max(1);
        let mut phases = [Vec::new(), Vec::new()];
        for group in 0..d.min(a.length) {
            let len = a.group_len(group);
            let count = (len / span).clamp(1, MAX_CHUNKS);
            for c in 0..count {
                let range = c * len / count..(c + 1) * len / count;
                phases[c % 2].push(Chunk { group, range });
            }
        }
        ChunkPlan { axis, phases }
    }

    /// The keys the queries of `chunk` reach along the chunk axis (one dilation group's,
    /// `dilation` apart).
    pub(super) fn keys(&self, g: &Grid, chunk: &Chunk) -> Span {
        let a = g.axes[self.axis];
        let windows = chunk
            .range
            .clone()
            .map(|j| a.window(chunk.group + j * a.dilation));
        let (first, last) = windows.fold((usize::MAX, 0), |(first, last), w| {
            let end = w.first + w.count.saturating_sub(1) * a.dilation;
            (first.min(w.first), last.max(end))
        });
        Span {
            first,
            count: (last - first) / a.dilation + 1,
        }
    }
}

/// `positions` (in dilation-group order) cut into tiles of at most `len`, none holding two
/// groups' positions: neighbors in a tile then share most keys, and the pair kernels take them
/// two at a time.
fn tiles(positions: &[usize], dilation: usize, len: usize) -> impl Iterator<Item = &[usize]> {
    let groups = positions.chunk_by(move |x, y| x % dilation == y % dilation);
    groups.flat_map(move |group| group.chunks(len))
}

/// The largest distance, in steps of the dilation, from a query to a key of its window along
/// `axis`.
fn reach(g: &Grid, axis: usize) -> usize {
    let a = g.axes[axis];
    let d = a.dilation;
    (0..a.length)
        .map(|x| {
            let w = a.window(x);
            let last = w.first + w.count.saturating_sub(1) * d;
            x.abs_diff(w.first).max(last.abs_diff(x)) / d
        })
        .max()
        .unwrap_or(0)
}

/// Where a task adds its queries' key-side terms: the rows and the kv head (`None` when key
/// gradients are not wanted).
type KeySums<A> = Option<(SumRows<A>, usize)>;

/// A worker's scratch: two queries' (for the pair kernels) and, where the problem stages its
/// chunks' key sums, the stage.
struct ChunkScratch<A> {
    queries: [QueryScratch<A>; 2],
    stage: Option<ChunkStage<A>>,
}

/// One task per chunk of one `(batch, kv head)` plane, for the chunks of one phase: every
/// query of the chunk, every head of the group, gets `d_query`, `lse`, `delta` written and its
/// key-side terms added to `sums` (when key gradients are wanted), its logit gradients binned
/// by relative offset into the task's `bins` (when the bias gradient is).
struct ChunkPass<'a, 'b, 'g, T: Element> {
    bwd: &'a Backward<'b, 'g, T>,
    d_query: Tokens<T>,
    sums: Option<&'a KvSums<T::Acc>>,
    bins: Option<&'a BiasBins<T::Acc>>,
    plan: &'a ChunkPlan,
    /// Positions of every axis in dilation-group order (neighbors share most keys).
    orders: &'a [Vec<usize>; 3],
    phase: usize,
    /// The dots kernels that take two queries at once, where the problem allows them.
    dots: Option<PairDotsKernels<T::Acc>>,
}

/// Per task, the bias gradient of each head of its group: `[group][(2K-1)^3]`, summed per
/// `(batch, head)` over the chunks in plan order once both phases have run.
struct BiasBins<A> {
    tasks: Vec<Mutex<Vec<A>>>,
    /// `(2K - 1)` per axis.
    span: [usize; 3],
}

impl<A: Accum> BiasBins<A> {
    fn new(plan: &ChunkPlan, g: &Grid, group: usize) -> Self {
        let span = g.axes.map(|a| 2 * a.kernel - 1);
        let planes = g.batch * g.heads / group;
        let size = group * span.iter().product::<usize>();
        let tasks = planes * (plan.phases[0].len() + plan.phases[1].len());
        BiasBins {
            tasks: (0..tasks)
                .map(|_| Mutex::new(vec![A::ZERO; size]))
                .collect(),
            span,
        }
    }

    /// Task `u` of phase `phase`'s bins.
    fn of(&self, plan: &ChunkPlan, phase: usize, u: usize) -> MutexGuard<'_, Vec<A>> {
        let planes = self.tasks.len() / (plan.phases[0].len() + plan.phases[1].len());
        let offset = if phase == 1 {
            planes * plan.phases[0].len()
        } else {
            0
        };
        let bins = &self.tasks[offset + u];
        bins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Per `(batch, head)` (`b * heads + h`), the sum of its plane's tasks, in plan order.
    fn per_head(self, plan: &ChunkPlan, g: &Grid, group: usize) -> Vec<Mutex<Vec<A>>> {
        let size = self.span.iter().product::<usize>();
        let planes = g.batch * g.heads / group;
        let tasks: Vec<Vec<A>> = self
            .tasks
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let (first, second) = tasks.split_at(planes * plan.phases[0].len());
        let mut heads = vec![vec![A::ZERO; size]; g.batch * g.heads];
        for (bh, head) in heads.iter_mut().enumerate() {
            let (plane, h) = (bh / group, bh % group);
            for (phase, chunks) in [first, second].iter().enumerate() {
                let n = plan.phases[phase].len();
                for bins in &chunks[plane * n..(plane + 1) * n] {
                    for (t, &x) in head.iter_mut().zip(&bins[h * size..(h + 1) * size]) {
                        *t += x;
                    }
                }
            }
        }
        heads.into_iter().map(Mutex::new).collect()
    }
}

impl<T: Element> ChunkPass<'_, '_, '_, T> {
    /// Tasks of this phase.
    fn tasks(&self) -> usize {
        let a = self.bwd.a;
        a.g.batch * (a.g.heads / a.group) * self.plan.phases[self.phase].len()
    }

    /// Positions of `axis` this chunk covers.
    fn positions(&self, axis: usize, chunk: &Chunk) -> Vec<usize> {
        if axis != self.plan.axis {
            return self.orders[axis].clone();
        }
        let d = self.bwd.a.g.axes[axis].dilation;
        chunk.range.clone().map(|j| chunk.group + j * d).collect()
    }

    /// `d_query`, `lse` and `delta` of row `row`, and its key-side terms.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem in this task's chunk.
    #[inline(always)]
    unsafe fn query(
        &self,
        row: Row,
        key_sums: KeySums<T::Acc>,
        bins: Option<&mut [T::Acc]>,
        s: &mut QueryScratch<T::Acc>,
    ) {
        // SAFETY: forwarded contract.
        unsafe {
            let grads = self.bwd.logit_grads(row, s);
            self.gradients(row, key_sums, grads, bins, s);
        }
    }

    /// The queries of batch `b`, head `h` at leading coordinates `lead` and last-axis
    /// positions `line`, in order: neighbors whose windows share their runs go through the pair
    /// kernels, the others one by one.
    ///
    /// # Safety
    /// Every query must be in this task's chunk, `key_sums` its rows.
    #[inline(always)]
    unsafe fn line(
        &self,
        (b, h): (usize, usize),
        key_sums: KeySums<T::Acc>,
        [x0, x1]: [usize; 2],
        line: &[usize],
        mut bins: Option<&mut [T::Acc]>,
        [sa, sb]: &mut [QueryScratch<T::Acc>; 2],
    ) {
        let row = |x2| Row {
            b,
            h,
            x: [x0, x1, x2],
        };
        // The first rows were asked for before the line (`row`); the rest are asked for a few
        // points ahead, as the forward does: the hardware does not follow a line whose rows lie
        // all the heads apart (the 1-D problem stalled a tenth of its backward on query loads).
        let mut fetched = TILE[2].min(line.len());
        let mut i = 0;
        while i < line.len() {
            let ahead = (i + 2 + PREFETCH_POINTS).min(line.len());
            while fetched < ahead {
                self.prefetch_rows(row(line[fetched]));
                fetched += 1;
            }
            let ra = row(line[i]);
            let pair = match (self.dots, line.get(i + 1)) {
                (Some(dots), Some(&x2)) => {
                    let rb = row(x2);
                    let offset = self.bwd.a.pair_offset(ra, rb).map(|(offset, _)| offset);
                    offset.map(|offset| ([ra, rb], offset, dots))
                }
                _ => None,
            };
            let bins = bins.as_deref_mut();
            // SAFETY (both arms): queries of this task's chunk, by the caller's contract.
            match pair {
                Some(pair) => {
                    unsafe { self.query_pair(pair, key_sums, bins, [&mut *sa, &mut *sb]) };
                    i += 2;
                }
                None => {
                    unsafe { self.query(ra, key_sums, bins, sa) };
                    i += 1;
                }
            }
        }
    }

    /// Hint that row `row`'s query, output and output gradient will be read soon.
    #[inline(always)]
    fn prefetch_rows(&self, row: Row) {
        let a = self.bwd.a;
        let [x0, x1, x2] = row.x;
        let at = [row.b, row.h, x0, x1, x2, 0];
        let size = std::mem::size_of::<T>();
        let (dim, dim_v) = (a.g.dim * size, a.dim_v * size);
        // SAFETY: rows of the validated problem are in shape.
        unsafe {
            prefetch_lines(a.q.at(at) as *const u8, dim);
            prefetch_lines(self.bwd.out.at(at) as *const u8, dim_v);
            prefetch_lines(self.bwd.d_out.at(at) as *const u8, dim_v);
        }
    }

    /// `query` for two consecutive rows whose windows share their runs (`offset` from
    /// `pair_offset`), their probabilities and logit gradients taken together by `dots`.
    ///
    /// # Safety
    /// As `query`, for both rows.
    #[inline(always)]
    unsafe fn query_pair(
        &self,
        (rows, offset, dots): ([Row; 2], usize, PairDotsKernels<T::Acc>),
        key_sums: KeySums<T::Acc>,
        mut bins: Option<&mut [T::Acc]>,
        [sa, sb]: [&mut QueryScratch<T::Acc>; 2],
    ) {
        // SAFETY: forwarded contract.
        unsafe {
            let [ga, gb] = self
                .bwd
                .logit_grads_pair(rows, offset, dots, [&mut *sa, &mut *sb]);
            self.query_stats(rows[0], ga, bins.as_deref_mut(), sa);
            self.query_stats(rows[1], gb, bins, sb);
            let a = self.bwd.a;
            let lists = [&sa.row.keys, &sb.row.keys];
            let weights = [&sa.dp[..sa.row.keys.window], &sb.dp[..sb.row.keys.window]];
            let dst = [self.d_query_row(rows[0]), self.d_query_row(rows[1])];
            let tails = [&mut sa.row.tail[..], &mut sb.row.tail[..]];
            a.store_weighted_pair(lists, (weights, offset), dst, a.scale, tails);
            if let Some((sums, hk)) = key_sums {
                let (wa, wb) = (sa.row.keys.window, sb.row.keys.window);
                let weights = [
                    (&sa.dp[..wa], &sa.row.logits[..wa]),
                    (&sb.dp[..wb], &sb.row.logits[..wb]),
                ];
                let vectors = [(&sa.row.q[..], &sa.d_o[..]), (&sb.row.q[..], &sb.d_o[..])];
                let at = (rows[0].b, hk, [rows[0].x, rows[1].x]);
                sums.add_pair(self.bwd.a.g, at, offset, weights, vectors);
            }
        }
    }

    /// Given row `row`'s probabilities and logit gradients in `s` (and its `(lse, delta)`):
    /// its `d_query`, `lse` and `delta`, and its key-side terms.
    ///
    /// # Safety
    /// As `query`.
    #[inline(always)]
    unsafe fn gradients(
        &self,
        row: Row,
        key_sums: KeySums<T::Acc>,
        grads: (T::Acc, T::Acc),
        bins: Option<&mut [T::Acc]>,
        s: &mut QueryScratch<T::Acc>,
    ) {
        // SAFETY (whole block): forwarded contract.
        unsafe {
            self.query_side(row, grads, bins, s);
            if let Some((sums, hk)) = key_sums {
                let window = s.row.keys.window;
                let weights = (&s.dp[..window], &s.row.logits[..window]);
                let a = self.bwd.a;
                sums.add_query(a.g, (row.b, hk, row.x), weights, (&s.row.q, &s.d_o));
            }
        }
    }

    /// The query-side part of `gradients`: `d_query`, `lse`, `delta` and the bias bins.
    ///
    /// # Safety
    /// As `query`.
    #[inline(always)]
    unsafe fn query_side(
        &self,
        row: Row,
        grads: (T::Acc, T::Acc),
        bins: Option<&mut [T::Acc]>,
        s: &mut QueryScratch<T::Acc>,
    ) {
        let a = self.bwd.a;
        // SAFETY (whole block): forwarded contract.
        unsafe {
            self.query_stats(row, grads, bins, s);
            let terms = (row, &s.row.keys, &s.dp[..], false);
            a.store_weighted_sum(terms, self.d_query_row(row), a.scale, &mut s.row.tail);
        }
    }

    /// Where row `row`'s `d_query` goes: `(address, channel stride, channels)`.
    #[inline(always)]
    fn d_query_row(&self, row: Row) -> (*mut T, isize, usize) {
        let [x0, x1, x2] = row.x;
        // SAFETY: rows of the validated problem are in shape.
        let at = unsafe { self.d_query.at([row.b, row.h, x0, x1, x2, 0]) };
        (at, self.d_query.inner_stride(), self.bwd.a.g.dim)
    }

    /// `query_side` but for `d_query`: `lse`, `delta` and the bias bins.
    ///
    /// # Safety
    /// As `query`.
    #[inline(always)]
    unsafe fn query_stats(
        &self,
        row: Row,
        (lse, delta): (T::Acc, T::Acc),
        bins: Option<&mut [T::Acc]>,
        s: &mut QueryScratch<T::Acc>,
    ) {
        let a = self.bwd.a;
        let bwd = self.bwd;
        // SAFETY (whole block): `row` is in shape; its rows of `lse` and `delta` are this
        // task's (the chunk's contract).
        unsafe {
            let index = a.g.row_index(row.b, row.h, row.x);
            bwd.lse.set(index, lse);
            bwd.delta.set(index, delta);
            if let Some(bins) = bins {
                let keys = &s.row.keys;
                let size = bins.len() / a.group;
                let head = &mut bins[(row.h % a.group) * size..];
                for (&bin, &ds) in keys.bias_bin[..keys.window].iter().zip(&s.dp) {
                    head[bin] += ds;
                }
            }
        }
    }
}

impl<T: Element> RowKernel for ChunkPass<'_, '_, '_, T> {
    type Scratch = ChunkScratch<T::Acc>;

    fn scratch(&self) -> Self::Scratch {
        let a = self.bwd.a;
        let plan = self.plan;
        let stage = self.sums.and_then(|_| {
            let keys = plan
                .phases
                .iter()
                .flatten()
                .map(|c| plan.keys(a.g, c).count);
            ChunkStage::new(a.g, plan.axis, keys.max()?, (a.g.dim, a.dim_v))
        });
        ChunkScratch {
            queries: [self.bwd.query_scratch(), self.bwd.query_scratch()],
            stage,
        }
    }

    #[inline(always)]
    unsafe fn row(&self, u: usize, scratch: &mut Self::Scratch) {
        let a = self.bwd.a;
        let chunks = &self.plan.phases[self.phase];
        let heads_kv = a.g.heads / a.group;
        let (bh, chunk) = (u / chunks.len(), &chunks[u % chunks.len()]);
        let (b, hk) = (bh / heads_kv, bh % heads_kv);
        let mut bins = self.bins.map(|bins| bins.of(self.plan, self.phase, u));
        let ChunkScratch { queries, stage } = scratch;
        let staged = match (self.sums, stage.as_mut()) {
            (Some(_), Some(stage)) => Some(stage.begin(a.g, self.plan.keys(a.g, chunk))),
            _ => None,
        };
        let key_sums = staged
            .or(self.sums.map(|sums| sums.rows))
            .map(|rows| (rows, hk));
        let [p0, p1, p2] = [0, 1, 2].map(|axis| self.positions(axis, chunk));
        // The axes after the chunk axis are walked in tiles, each tile along the whole chunk
        // axis: the tile's window box then slides one position at a time, and the key rows
        // it adds to stay in cache while every query of the tile reaches them.
        let tile = |axis: usize| match axis > self.plan.axis {
            true => TILE[axis],
            false => usize::MAX,
        };
        let d = a.g.dilations();
        for t1 in tiles(&p1, d[1], tile(1)) {
            for t2 in tiles(&p2, d[2], tile(2)) {
                let heads = hk * a.group..(hk + 1) * a.group;
                let mut lines = p0
                    .iter()
                    .flat_map(|&x0| t1.iter().map(move |&x1| (x0, x1)))
                    .flat_map(|x| heads.clone().map(move |h| (x, h)))
                    .peekable();
                while let Some(((x0, x1), h)) = lines.next() {
                    // The next line's rows arrive while this one is computed: a tile's line is
                    // too short, and too far from the last, for the hardware to guess it (a
                    // line longer than a tile's streams on from its first rows).
                    if let Some(&((n0, n1), nh)) = lines.peek() {
                        for &x2 in t2.iter().take(TILE[2]) {
                            self.prefetch_rows(Row {
                                b,
                                h: nh,
                                x: [n0, n1, x2],
                            });
                        }
                    }
                    let bins = bins.as_deref_mut().map(|b| &mut b[..]);
                    // SAFETY: queries of this task's chunk.
                    unsafe { self.line((b, h), key_sums, [x0, x1], t2, bins, queries) };
                }
            }
        }
        if let (Some(_), Some(stage), Some(sums)) = (staged, stage, self.sums) {
            // SAFETY: the chunk's keys are this task's (no chunk of the phase shares one).
            unsafe { stage.add_into(sums, (b, hk)) };
        }
    }
}

/// Run the query pass: both phases, then the key sums rounded into `d_key`, `d_value` and the
/// bias bins summed into `d_rpb`.
pub(super) fn query_pass<T: Element>(
    bwd: &Backward<'_, '_, T>,
    d_query: Tokens<T>,
    key_grads: Option<(Tokens<T>, Tokens<T>)>,
    d_bias: Option<Bias<T>>,
) {
    let a = bwd.a;
    let g = a.g;
    let plan = ChunkPlan::new(g);
    let orders = g.axes.map(|axis| {
        let d = axis.dilation;
        (0..d)
            .flat_map(|group| (group..axis.length).step_by(d))
            .collect()
    });
    let heads_kv = g.heads / a.group;
    let sums = key_grads.map(|grads| KvSums::new(g, heads_kv, (g.dim, a.dim_v), grads));
    let bins = d_bias.map(|_| BiasBins::new(&plan, g, a.group));
    for phase in 0..2 {
        let pass = ChunkPass {
            bwd,
            d_query,
            sums: sums.as_ref(),
            bins: bins.as_ref(),
            plan: &plan,
            orders: &orders,
            phase,
            dots: a.pair_dots(),
        };
        let cost = g.rows() * g.row_cost() * 5 / pass.tasks().max(1);
        // SAFETY: a task writes the query rows of its chunk and adds to its chunk's keys, which
        // no other task of the phase touches.
        unsafe { par_rows((pass.tasks(), cost), &pass) };
    }
    if let (Some(sums), Some(grads)) = (sums, key_grads) {
        sums.finish(grads);
    }
    if let (Some(bins), Some(d_bias)) = (bins, d_bias) {
        let span = bins.span;
        store_bias_grad(bins.per_head(&plan, g, a.group), g.batch, span, d_bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{axis, Axis};

    fn grid(axes: [Axis; 3]) -> Grid {
        Grid::with(axes, (1, 1), 8, 0)
    }

    /// Keys (positions along the chunk axis) the queries of `chunk` reach.
    fn keys_of(g: &Grid, axis: usize, chunk: &Chunk) -> Vec<usize> {
        let a = g.axes[axis];
        let mut keys = Vec::new();
        for j in chunk.range.clone() {
            let w = a.window(chunk.group + j * a.dilation);
            keys.extend((0..w.count).map(|n| w.first + n * a.dilation));
        }
        keys
    }

    #[test]
    fn chunks_cover_every_query_once_and_same_phase_chunks_share_no_key() {
        let cases = [
            axis(56, 7, 1, 1, false),
            axis(56, 7, 1, 4, false),
            axis(57, 8, 3, 2, false),
            axis(40, 5, 5, 1, false),
            axis(33, 6, 2, 3, true),
            axis(5, 5, 1, 1, false),
            axis(200, 3, 1, 1, true),
        ];
        for a in cases {
            let g = grid([Axis::UNIT, a, axis(9, 3, 1, 1, false)]);
            let plan = ChunkPlan::new(&g);
            assert_eq!(plan.axis, 1, "{a:?}");
            let mut seen = vec![0; a.length];
            for phase in &plan.phases {
                for (i, c) in phase.iter().enumerate() {
                    for j in c.range.clone() {
                        seen[c.group + j * a.dilation] += 1;
                    }
                    let mine = keys_of(&g, 1, c);
                    for other in &phase[i + 1..] {
                        let theirs = keys_of(&g, 1, other);
                        assert!(
                            mine.iter().all(|k| !theirs.contains(k)),
                            "{a:?}: {c:?} and {other:?} share a key"
                        );
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{a:?}: {seen:?}");
        }
    }

    #[test]
    fn long_axes_split_into_several_chunks() {
        let g = grid([
            axis(56, 7, 1, 1, false),
            axis(56, 7, 1, 1, false),
            Axis::UNIT,
        ]);
        let plan = ChunkPlan::new(&g);
        assert_eq!(plan.axis, 0);
        assert_eq!(plan.phases[0].len() + plan.phases[1].len(), 56 / 12);
    }
}
