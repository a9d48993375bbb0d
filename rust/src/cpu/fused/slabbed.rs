//! The forward with the attend kernels (`Slabbed`): per task, one slab of one batch and its
//! kv heads, handed to the tile forward where it takes the slab, else with the slab's key and
//! value rows staged (where kernels for staged rows exist) and each line of queries attended
//! two rows at a time where their windows allow.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use super::tiles::{TileForward, TileScratch};
use super::{Forward, RowScratch};
use crate::cpu::element::{
    fence_streams, store, stream_row, Accum, Attend, AttendKernels, AttendPair, Element,
};
use crate::cpu::grid::Row;
use crate::cpu::keys::LANES;
use crate::cpu::parallel::RowKernel;
use crate::cpu::stage::{prefetch_lines, LineRows, Slabs, Stage, StagedViews};
use crate::cpu::view::Tokens;

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
pub(super) struct Slabbed<'k, 'a, 'g, T: Element> {
    pub(super) forward: &'k Forward<'a, 'g, T>,
    /// The tile forward, where it takes the problem (and then every staged slab).
    #[cfg(target_arch = "x86_64")]
    pub(super) tiles: Option<TileForward<'g>>,
    pub(super) pair: Option<AttendPair<T::Acc>>,
    /// The pair kernel for staged rows whose windows' union is longer than `LANES` rows.
    pub(super) wide: Option<AttendPair<T::Acc>>,
    /// The kernels for staged (widened) rows; without them, slabs are not staged.
    pub(super) staged: Option<AttendKernels<T::Acc>>,
    pub(super) slabs: Slabs,
    /// Kv heads a task stages together (all of `Attention::side_by_side_heads`, or one).
    pub(super) heads: usize,
}

/// Per-worker scratch of `Slabbed`.
pub(super) struct SlabScratch<T: Element> {
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
        let d = g.dilations();
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
