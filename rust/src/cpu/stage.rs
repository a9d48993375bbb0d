//! Staging for the fused forward: queries are taken in slabs (runs of consecutive points that
//! share most of their neighbours), and the key and value rows a slab reads are first copied
//! into compact per-worker buffers, widened to the accumulator type. Heads-last tensors
//! interleave the heads of every token, so a head's key rows lie `heads * D` elements apart,
//! and dilated neighbours further still; read in place, each window touches many more cache
//! lines and pages than it uses (measured on P1: the same kernels ran 1.5x faster on
//! heads-first key and value tensors than on heads-last ones). In the stage, the window's rows
//! lie densely, one dilation step apart, and half types are widened once per slab instead of
//! once per query that reads them.

use std::ops::Range;

use super::element::{Aligned, Element, LINE_BYTES};
use super::grid::Grid;
use super::view::{Extras, Tokens};
use crate::window::Span;

/// Window slots a slab aims to cover in all (`points * slots`): its staged rows then stay in a
/// core's L2 cache while its queries read them.
const SLAB_SLOTS: usize = 1 << 15;

/// Bytes of staged rows above which a slab reads its rows in place.
const STAGE_LIMIT: usize = 8 << 20;

/// Positions staged per query point above which slabs are made larger: copying a row into
/// the stage costs about what attending from a query does, so boxes many times their slab
/// spend most of the forward on copies (3-D, kernel 7: 21 rows staged per query with
/// `SLAB_SLOTS` slabs; P1 and the 1-D problems stage 1.5).
const MAX_STAGED_PER_POINT: f64 = 3.0;

/// The largest box a slab is grown to (past a core's L2 cache, but the copies saved weigh
/// more; measured on the 3-D problem).
const GROWN_BOX_BYTES: usize = 4 << 20;

/// Key positions on a lattice: per axis, `count` positions from `first`, `step` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyBox {
    first: [usize; 3],
    step: [usize; 3],
    count: [usize; 3],
}

impl KeyBox {
    /// The smallest lattice holding the window of every point of `points` (indices into the
    /// grid's point order): along each axis, one dilation step apart when every window there
    /// starts in the same dilation group, else one position apart.
    pub fn of(g: &Grid, points: Range<usize>) -> KeyBox {
        let mut lo = [usize::MAX; 3];
        let mut hi = [0; 3];
        let mut group = [None; 3];
        let mut mixed = [false; 3];
        for p in points {
            let w = g.window(g.point(p));
            for a in 0..3 {
                let Span { first, count } = w[a];
                if count == 0 {
                    continue;
                }
                let d = g.axes[a].dilation;
                lo[a] = lo[a].min(first);
                hi[a] = hi[a].max(first + (count - 1) * d);
                mixed[a] |= *group[a].get_or_insert(first % d) != first % d;
            }
        }
        let step = [0, 1, 2].map(|a| if mixed[a] { 1 } else { g.axes[a].dilation });
        let count = [0, 1, 2].map(|a| match lo[a] {
            usize::MAX => 0,
            first => (hi[a] - first) / step[a] + 1,
        });
        KeyBox {
            first: lo.map(|l| if l == usize::MAX { 0 } else { l }),
            step,
            count,
        }
    }

    /// Positions in the box.
    pub fn volume(&self) -> usize {
        self.count.iter().product()
    }

    /// Lines of the box: its positions that share their leading coordinates.
    pub fn lines(&self) -> usize {
        self.count[0] * self.count[1]
    }

    /// Positions of each line.
    pub fn line_len(&self) -> usize {
        self.count[2]
    }

    /// Positions along the last axis from one of a line's positions to the next.
    pub fn line_step(&self) -> usize {
        self.step[2]
    }

    /// Coordinates of the first position of line `line` (row-major over the leading axes).
    pub fn line_start(&self, line: usize) -> [usize; 3] {
        let c1 = self.count[1].max(1);
        [
            self.first[0] + line / c1 * self.step[0],
            self.first[1] + line % c1 * self.step[1],
            self.first[2],
        ]
    }

    /// The line holding the positions with leading coordinates `(x0, x1)`.
    #[inline(always)]
    pub fn line_of(&self, x0: usize, x1: usize) -> usize {
        steps_in(x0 - self.first[0], self.step[0]) * self.count[1]
            + steps_in(x1 - self.first[1], self.step[1])
    }

    /// Where last-axis coordinate `x2` lies on a line (positions from its start).
    #[inline(always)]
    pub fn along_line(&self, x2: usize) -> usize {
        steps_in(x2 - self.first[2], self.step[2])
    }

    /// Index of position `x` (in the box) in row-major box order.
    #[inline(always)]
    fn index(&self, x: [usize; 3]) -> usize {
        let along = |a: usize| steps_in(x[a] - self.first[a], self.step[a]);
        (along(0) * self.count[1] + along(1)) * self.count[2] + along(2)
    }

    /// Positions numbered `numbers` in the box (row-major), with their numbers: the first
    /// found by division, the rest by counting on.
    fn positions(self, numbers: Range<usize>) -> impl Iterator<Item = (usize, [usize; 3])> {
        let [_, c1, c2] = self.count;
        let n = numbers.start;
        let mut i = [
            n / (c1 * c2).max(1),
            n / c2.max(1) % c1.max(1),
            n % c2.max(1),
        ];
        numbers.map(move |n| {
            let x = [0, 1, 2].map(|a| self.first[a] + i[a] * self.step[a]);
            i[2] += 1;
            if i[2] == c2 {
                i[2] = 0;
                i[1] += 1;
                if i[1] == c1 {
                    i[1] = 0;
                    i[0] += 1;
                }
            }
            (n, x)
        })
    }
}

/// `offset / step` for a box step of 1 (no division: the common, undilated case) or more.
#[inline(always)]
fn steps_in(offset: usize, step: usize) -> usize {
    if step == 1 {
        offset
    } else {
        offset / step
    }
}

/// The forward's slabs of a grid: contiguous ranges of its point order, each with the box of
/// keys its queries read (`None` when too large to stage).
pub struct Slabs {
    /// Point ranges.
    pub ranges: Vec<Range<usize>>,
    /// Their key boxes.
    pub boxes: Vec<Option<KeyBox>>,
    /// The largest staged box's volume.
    pub max_volume: usize,
}

impl Slabs {
    /// Cut `g`'s points into slabs of about `SLAB_SLOTS / slots` points, never mixing
    /// dilation groups of the leading axes, and for rows longer than a slab, never mixing
    /// groups of the last axis either; rows of `row_bytes` staged bytes per position.
    ///
    /// Where those slabs' boxes would stage each position many times over (windows reaching
    /// far past a slab along the leading axes, as in 3-D), the slabs are made larger, while
    /// their boxes stay within `GROWN_BOX_BYTES`.
    pub fn plan(g: &Grid, row_bytes: usize) -> Slabs {
        let mut target = (SLAB_SLOTS / g.slots.max(1)).max(16);
        let mut slabs = Slabs::cut(g, row_bytes, target);
        while slabs.staged_per_point(g) > MAX_STAGED_PER_POINT && target < g.tokens() {
            target *= 2;
            let larger = Slabs::cut(g, row_bytes, target);
            if larger.max_volume * row_bytes > GROWN_BOX_BYTES {
                break;
            }
            slabs = larger;
        }
        slabs
    }

    /// Slabs of about `target` points.
    fn cut(g: &Grid, row_bytes: usize, target: usize) -> Slabs {
        let line = g.axes[2].length;
        let n = g.tokens();
        let mut ranges = Vec::new();
        let mut start = 0;
        for p in 1..=n {
            if p == n || cut_before(g, (start, p), target, line) {
                ranges.push(start..p);
                start = p;
            }
        }
        let boxes: Vec<_> = ranges
            .iter()
            .map(|r| {
                Some(KeyBox::of(g, r.clone())).filter(|b| b.volume() * row_bytes <= STAGE_LIMIT)
            })
            .collect();
        let max_volume = boxes
            .iter()
            .flatten()
            .map(KeyBox::volume)
            .max()
            .unwrap_or(0);
        Slabs {
            ranges,
            boxes,
            max_volume,
        }
    }

    /// Positions staged per point of the grid, over all staged slabs.
    fn staged_per_point(&self, g: &Grid) -> f64 {
        let staged: usize = self.boxes.iter().flatten().map(KeyBox::volume).sum();
        staged as f64 / g.tokens().max(1) as f64
    }
}

/// Whether a slab that started at point `start` ends before point `p`.
fn cut_before(g: &Grid, (start, p): (usize, usize), target: usize, line: usize) -> bool {
    let (x, y) = (g.point(p - 1), g.point(p));
    let d = g.dilations();
    let new_line = (x[0], x[1]) != (y[0], y[1]);
    if x[0] != y[0] || x[1] % d[1] != y[1] % d[1] {
        return true;
    }
    if line >= target {
        new_line || x[2] % d[2] != y[2] % d[2] || p - start >= target
    } else {
        new_line && p - start + line > target
    }
}

/// A worker's staged rows, widened to the accumulator type (so that half types are widened
/// once, not once per query that reads them): the key and value rows of every position of a
/// box, row-major, one plane of them per staged kv head, and the additional tokens' rows, each
/// set in a 64-byte aligned buffer.
///
/// The box is filled a line at a time as the slab's queries reach it (`reach`), with the
/// sources of the next positions prefetched meanwhile, so that reading keys and values from
/// memory overlaps the attention of the queries before them instead of stalling ahead of all
/// of them.
pub struct Stage<T: Element> {
    keys: Aligned<T::Acc>,
    values: Aligned<T::Acc>,
    extra_keys: Aligned<T::Acc>,
    extra_values: Aligned<T::Acc>,
    /// Elements of one head's key row and value row.
    dims: (usize, usize),
    /// Consecutive kv heads staged together (see `new`), and the first of them.
    heads: usize,
    first_head: usize,
    kbox: Option<KeyBox>,
    /// Where the box's rows come from: the views and `(batch, first kv head)`.
    source: Option<(StagedViews<T>, (usize, usize))>,
    /// Positions of the box staged so far (a prefix, row-major).
    filled: usize,
    /// Where prefetching has got to (fills start on a new box line each time, so they carry
    /// nothing from call to call).
    prefetched: Segment<T>,
}

/// Box positions `next..end` on one line of the box, whose source rows lie `steps` elements
/// apart from `rows` (those of `next`) on.
#[derive(Clone, Copy)]
struct Segment<T> {
    next: usize,
    end: usize,
    rows: (*const T, *const T),
    steps: (isize, isize),
}

impl<T> Segment<T> {
    /// No positions.
    fn empty() -> Self {
        Segment {
            next: 0,
            end: 0,
            rows: (std::ptr::null(), std::ptr::null()),
            steps: (0, 0),
        }
    }
}

impl<T: Element> Stage<T> {
    /// Buffers for boxes of up to `volume` positions of `heads` consecutive kv heads, and
    /// `extra` additional tokens (with one head only), rows of `dims` (keys, values) elements
    /// per head.
    ///
    /// Heads-last tensors hold the kv heads of a position side by side, so staging them
    /// together reads each position's rows as one dense block (no cache line fetched for one
    /// head's rows and again for another's), and walks the box once for all of them; each
    /// head's rows still go to a plane of their own, so that kernels read them densely. P1's
    /// forward (two heads) took 0.96x the time it took staging a head at a time.
    pub fn new(volume: usize, extra: usize, dims: (usize, usize), heads: usize) -> Self {
        debug_assert!(
            extra == 0 || heads == 1,
            "additional tokens stage one head at a time"
        );
        Stage {
            keys: Aligned::new(volume * heads * dims.0),
            values: Aligned::new(volume * heads * dims.1),
            extra_keys: Aligned::new(extra * dims.0),
            extra_values: Aligned::new(extra * dims.1),
            dims,
            heads,
            first_head: 0,
            kbox: None,
            source: None,
            filled: 0,
            prefetched: Segment::empty(),
        }
    }

    /// Start staging the key and value rows of batch `b`, kv heads `hk..hk + heads` (as
    /// `new` was given) at the positions of `kbox` (filled by `reach`), and stage the
    /// additional tokens' rows when given.
    ///
    /// # Safety
    /// The views must have dense rows of `dims` elements, the staged heads' rows of a position
    /// one after the other, and hold those heads of batch `b`, every position of the box and
    /// the additional tokens; box and extras must fit the buffers.
    pub unsafe fn begin(&mut self, rows: StagedViews<T>, (b, hk): (usize, usize), kbox: KeyBox) {
        let (dk, dv) = self.dims;
        if let Some((ek, ev, extra)) = rows.extras {
            for e in 0..extra {
                // SAFETY: in shape and in the buffers by the caller's contract.
                unsafe {
                    let (keys, values) = (self.extra_keys.ptr_mut(), self.extra_values.ptr_mut());
                    widen_rows(ek.at([b, hk, e, 0]), 0, keys.add(e * dk), (dk, 1));
                    widen_rows(ev.at([b, hk, e, 0]), 0, values.add(e * dv), (dv, 1));
                }
            }
        }
        self.kbox = Some(kbox);
        self.source = Some((rows, (b, hk)));
        self.first_head = hk;
        (self.filled, self.prefetched) = (0, Segment::empty());
    }

    /// Make sure the window `w` (inside the box) is staged: fill the box to the end of the
    /// line holding the window's last position, and prefetch the sources of the positions up
    /// to a line past that position.
    ///
    /// Whole lines are filled at once: filling only the positions a pair of queries newly
    /// reaches, two or so per call, made P1's forward about 1.1x slower, even with the walk
    /// carried along the line from call to call (no position lookups). The prefetches stay
    /// spread over the calls, a few positions each, so that they never queue up behind each
    /// other in the memory system (prefetching whole lines at once was slower too).
    #[inline(always)]
    pub fn reach(&mut self, w: &[Span; 3], dilation: [usize; 3]) {
        let kbox = self.kbox.expect("a begun stage");
        if w.iter().any(|s| s.count == 0) {
            return;
        }
        let last = |a: usize| w[a].first + (w[a].count - 1) * dilation[a];
        let need = kbox.index([last(0), last(1), last(2)]) + 1;
        let (line, volume) = (kbox.count[2].max(1), kbox.volume());
        let ahead = (need + line).min(volume);
        // SAFETY: positions of the box; the views hold them (`begin`'s contract).
        unsafe { self.prefetch(ahead) };
        if need > self.filled {
            let end = need.next_multiple_of(line).min(volume);
            // SAFETY: as above.
            unsafe { self.fill(self.filled..end) };
            self.filled = end;
        }
    }

    /// Copy the rows of box positions `positions`.
    ///
    /// Inlined into the forward's row kernel, so that the copies take its instruction set
    /// (wide moves, and vector conversions of half types) rather than the baseline's.
    ///
    /// # Safety
    /// As `begin`, for positions of the box.
    #[inline(always)]
    unsafe fn fill(&mut self, positions: Range<usize>) {
        let (dk, dv) = self.dims;
        let (keys, values) = (self.keys.ptr_mut(), self.values.ptr_mut());
        let (heads, volume) = (self.heads, self.volume());
        // SAFETY: in shape and in the buffers by the caller's contract.
        unsafe {
            self.walk(&mut Segment::empty(), positions, |(k, v), steps, n, len| {
                for j in 0..heads {
                    let to = j * volume + n;
                    widen_rows(k.add(j * dk), steps.0, keys.add(to * dk), (dk, len));
                    widen_rows(v.add(j * dv), steps.1, values.add(to * dv), (dv, len));
                }
            });
        }
    }

    /// Positions in the box being staged (rows in each head's plane).
    fn volume(&self) -> usize {
        self.kbox.map_or(0, |b| b.volume())
    }

    /// Ask the memory system for the source rows of the box positions from where the last
    /// call stopped (or the first unfilled one) up to `end`.
    ///
    /// # Safety
    /// As `fill`, for `end` at most the box's volume.
    #[inline(always)]
    unsafe fn prefetch(&mut self, end: usize) {
        let size = std::mem::size_of::<T>();
        let (dk, dv) = self.row_widths();
        let (key_bytes, value_bytes) = (dk * size, dv * size);
        let mut cursor = self.prefetched;
        let start = cursor.next.max(self.filled);
        // SAFETY: forwarded contract (only hints are issued for the addresses).
        unsafe {
            self.walk(&mut cursor, start..end, |(mut k, mut v), steps, _, len| {
                for _ in 0..len {
                    prefetch_lines(k as *const u8, key_bytes);
                    prefetch_lines(v as *const u8, value_bytes);
                    (k, v) = (k.wrapping_offset(steps.0), v.wrapping_offset(steps.1));
                }
            });
        }
        self.prefetched = cursor;
    }

    /// Call `f(first rows, steps, first position, positions)` for the box positions
    /// `positions`, a segment of a box line at a time, carrying `cursor` along: a call that
    /// goes on from where the cursor stopped, on the same box line, looks up no position.
    ///
    /// # Safety
    /// As `begin`, for positions of the box.
    #[inline(always)]
    unsafe fn walk(
        &self,
        cursor: &mut Segment<T>,
        positions: Range<usize>,
        mut f: impl FnMut((*const T, *const T), (isize, isize), usize, usize),
    ) {
        let mut n = positions.start;
        while n < positions.end {
            if n != cursor.next || n == cursor.end {
                // SAFETY: by the caller's contract.
                let Some(segment) = (unsafe { self.segment(n) }) else {
                    return;
                };
                *cursor = segment;
            }
            let len = positions.end.min(cursor.end) - n;
            let (k, v) = cursor.rows;
            f((k, v), cursor.steps, n, len);
            let moved = |step: isize| step * len as isize;
            cursor.rows = (
                k.wrapping_offset(moved(cursor.steps.0)),
                v.wrapping_offset(moved(cursor.steps.1)),
            );
            cursor.next += len;
            n += len;
        }
    }

    /// The positions from box position `n` to the end of its box line, with their source rows
    /// (none without a source).
    ///
    /// # Safety
    /// As `begin`, for a position of the box.
    #[inline(always)]
    unsafe fn segment(&self, n: usize) -> Option<Segment<T>> {
        let kbox = self.kbox.expect("a begun stage");
        let ((k, v), (b, hk)) = self.source.map(|(rows, at)| (rows.window, at))?;
        let line = kbox.count[2].max(1);
        let (_, [x0, x1, x2]) = kbox.positions(n..n + 1).next()?;
        let at = [b, hk, x0, x1, x2, 0];
        let step = |t: Tokens<T>| t.stride(4) * kbox.step[2] as isize;
        Some(Segment {
            next: n,
            end: (n / line + 1) * line,
            // SAFETY: box positions are in the views' shape (the caller's contract).
            rows: unsafe { (k.at(at) as *const T, v.at(at) as *const T) },
            steps: (step(k), step(v)),
        })
    }

    /// Elements of a staged position's key rows and value rows (all its staged heads').
    fn row_widths(&self) -> (usize, usize) {
        (self.heads * self.dims.0, self.heads * self.dims.1)
    }

    /// Addresses of additional token `e`'s staged key row and value row.
    #[inline(always)]
    pub fn extra_rows(&self, e: usize) -> (usize, usize) {
        let (dk, dv) = self.dims;
        let size = std::mem::size_of::<T::Acc>();
        (
            self.extra_keys.ptr() as usize + e * dk * size,
            self.extra_values.ptr() as usize + e * dv * size,
        )
    }

    /// The staged window `w` (inside the filled box) of kv head `hk`: addresses of its first
    /// key and value rows, and the byte steps between neighbours along each axis.
    #[inline(always)]
    fn window_rows(&self, w: &[Span; 3], dilation: [usize; 3], hk: usize) -> WindowRows {
        let kbox = self.kbox.expect("a begun stage");
        let size = std::mem::size_of::<T::Acc>();
        let first = kbox.index([w[0].first, w[1].first, w[2].first]);
        let pitch = [kbox.count[1] * kbox.count[2], kbox.count[2], 1];
        let (dk, dv) = self.dims;
        let row = (hk - self.first_head) * kbox.volume() + first;
        let step = |a: usize| {
            let rows = (steps_in(dilation[a], kbox.step[a]) * pitch[a]) as isize;
            (rows * (dk * size) as isize, rows * (dv * size) as isize)
        };
        let steps = [step(0), step(1), step(2)];
        WindowRows {
            first: (
                self.keys.ptr() as usize + row * dk * size,
                self.values.ptr() as usize + row * dv * size,
            ),
            steps,
        }
    }

    /// Where the windows of kv head `hk` on the line holding window `w` lie in the stage (see
    /// `LineRows`).
    #[inline(always)]
    pub fn line_rows(&self, w: &[Span; 3], dilation: [usize; 3], hk: usize) -> LineRows {
        let kbox = self.kbox.expect("a begun stage");
        let size = std::mem::size_of::<T::Acc>() as isize;
        let origin = Span {
            first: kbox.first[2],
            count: 0,
        };
        LineRows {
            rows: self.window_rows(&[w[0], w[1], origin], dilation, hk),
            origin: origin.first,
            unit: kbox.step[2],
            unit_bytes: (self.dims.0 as isize * size, self.dims.1 as isize * size),
        }
    }
}

/// Where the windows of one line's queries lie (queries that differ only along the last axis,
/// whose windows then differ only along it): the rows of the window that starts at `origin`
/// on the last axis, and how far the rows move per `unit` positions that a window starts
/// further on. A line's queries then find their rows with one multiplication each.
#[derive(Clone, Copy, Debug)]
pub struct LineRows {
    /// The rows of the window starting at `origin`.
    pub rows: WindowRows,
    /// Where that window starts on the last axis.
    pub origin: usize,
    /// Positions on the last axis per row moved (a window's start lies a whole number of
    /// units past the origin).
    pub unit: usize,
    /// Bytes key rows and value rows move per unit.
    pub unit_bytes: (isize, isize),
}

impl LineRows {
    /// Bytes `(keys, values)` from the origin's rows to those of the window starting at
    /// `first` on the last axis.
    #[inline(always)]
    pub fn shift(&self, first: usize) -> (isize, isize) {
        let units = steps_in(first - self.origin, self.unit) as isize;
        (units * self.unit_bytes.0, units * self.unit_bytes.1)
    }
}

/// The inputs a stage copies from: key and value tokens, and the additional tokens' keys and
/// values with their count.
pub struct StagedViews<T> {
    /// Key and value tokens.
    pub window: (Tokens<T>, Tokens<T>),
    /// Additional keys, values, and how many.
    pub extras: Option<(Extras<T>, Extras<T>, usize)>,
}

impl<T> Clone for StagedViews<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for StagedViews<T> {}

/// Hint that the `bytes` bytes from `p` will be used soon: every cache line they touch (a
/// no-op where there is no such hint). Lines about to be written are fetched the same way: a
/// line no other core holds arrives exclusive, so the stores to it then wait for nothing.
#[inline(always)]
pub(super) fn prefetch_lines(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // A plain loop: `step_by` cost about sixty instructions a call here, more than the
        // two or three prefetches of a row.
        let (mut line, end) = (p as usize & !(LINE_BYTES - 1), p as usize + bytes);
        while line < end {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
            line += LINE_BYTES;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// `len` rows of `n` elements, `step` elements apart from `src` on, to consecutive rows at
/// `dst`, widened to the accumulator type.
///
/// # Safety
/// `src` must hold the rows and `dst` `len * n` writable elements.
#[inline(always)]
unsafe fn widen_rows<T: Element>(
    src: *const T,
    step: isize,
    dst: *mut T::Acc,
    (n, len): (usize, usize),
) {
    if T::is_acc() {
        let src = src as *const T::Acc;
        // SAFETY (all arms): by the caller's contract; the types are the same.
        unsafe {
            match n {
                16 => return copy_rows::<_, 16>(src, step, dst, len),
                32 => return copy_rows::<_, 32>(src, step, dst, len),
                64 => return copy_rows::<_, 64>(src, step, dst, len),
                _ => {}
            }
        }
    }
    // SAFETY: by the caller's contract.
    unsafe { T::widen_rows(src, step, dst, (n, len)) };
}

/// `widen_rows` for rows of exactly `N` elements of the accumulator type: a row is a fixed
/// number of wide moves, with no loop per row (the common head dims; a loop over each row's
/// sixteen-element blocks cost several times the moves).
///
/// # Safety
/// As `widen_rows`.
#[inline(always)]
unsafe fn copy_rows<A: Copy, const N: usize>(src: *const A, step: isize, dst: *mut A, len: usize) {
    for r in 0..len {
        // SAFETY: by the caller's contract.
        unsafe {
            let row = (src.offset(r as isize * step) as *const [A; N]).read_unaligned();
            (dst.add(r * N) as *mut [A; N]).write_unaligned(row);
        }
    }
}

/// Where a query's window lies in memory: addresses of its first key row and first value row,
/// and the byte steps `(keys, values)` between window neighbours along each axis.
#[derive(Clone, Copy, Debug)]
pub struct WindowRows {
    /// Addresses of the first key row and first value row.
    pub first: (usize, usize),
    /// Byte steps between neighbours per axis, keys and values.
    pub steps: [(isize, isize); 3],
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{axis, Axis};

    /// Slabs cover every point once, in order, and each slab's box holds every window key
    /// of its points on its lattice (`index` lands inside the box).
    #[test]
    fn slabs_partition_the_points_and_boxes_hold_their_windows() {
        let grids = [
            [Axis::UNIT, Axis::UNIT, axis(1100, 129, 3, 3, true)],
            [
                Axis::UNIT,
                axis(40, 15, 1, 2, false),
                axis(46, 13, 1, 3, true),
            ],
            [
                axis(6, 5, 2, 1, true),
                axis(20, 7, 1, 2, false),
                axis(21, 7, 1, 3, false),
            ],
            [
                Axis::UNIT,
                axis(56, 7, 1, 4, false),
                axis(56, 7, 1, 4, false),
            ],
        ];
        for axes in grids {
            let g = Grid::with(axes, (1, 1), 8, 0);
            let slabs = Slabs::plan(&g, 64);
            assert!(slabs.ranges.len() > 1, "{axes:?}: one slab tests nothing");
            let mut next = 0;
            for (range, kbox) in slabs.ranges.iter().zip(&slabs.boxes) {
                assert_eq!(range.start, next, "{axes:?}");
                next = range.end;
                let kbox = kbox.expect("small boxes are staged");
                for p in range.clone() {
                    let x = g.point(p);
                    g.for_each_slot(x, |_, key| {
                        let Some(y) = key else { return };
                        for a in 0..3 {
                            let offset = y[a] - kbox.first[a];
                            assert_eq!(offset % kbox.step[a], 0, "{axes:?} {x:?} {y:?}");
                            assert!(offset / kbox.step[a] < kbox.count[a], "{axes:?} {y:?}");
                        }
                        assert!(kbox.index(y) < kbox.volume());
                    });
                }
            }
            assert_eq!(next, g.tokens(), "{axes:?}");
        }
    }

    /// Where first-cut boxes stage many rows per point (3-D, kernel 7), slabs grow until they
    /// stage few, or their boxes reach the grown limit; slabs of problems that stage few rows
    /// are left as cut.
    #[test]
    fn slabs_grow_where_boxes_stage_many_rows_per_point() {
        let cube = [
            axis(16, 7, 1, 1, false),
            axis(32, 7, 1, 1, false),
            axis(32, 7, 1, 1, false),
        ];
        let g = Grid::with(cube, (1, 1), 64, 0);
        let row_bytes = 512;
        let first = Slabs::cut(&g, row_bytes, SLAB_SLOTS / g.slots);
        let grown = Slabs::plan(&g, row_bytes);
        assert!(first.staged_per_point(&g) > MAX_STAGED_PER_POINT);
        assert!(grown.staged_per_point(&g) < first.staged_per_point(&g) / 2.0);
        assert!(grown.max_volume * row_bytes <= GROWN_BOX_BYTES);
        assert!(grown.ranges.len() > 1, "still more than one slab per plane");
        let plane = [
            Axis::UNIT,
            axis(56, 7, 1, 1, false),
            axis(56, 7, 1, 1, false),
        ];
        let g = Grid::with(plane, (1, 1), 32, 0);
        let planned = Slabs::plan(&g, 256);
        assert_eq!(
            planned.ranges,
            Slabs::cut(&g, 256, SLAB_SLOTS / g.slots).ranges
        );
    }

    /// Staged boxes stay near the slab's own window union: dilated axes keep their step.
    #[test]
    fn dilated_slabs_stage_one_dilation_group() {
        let axes = [Axis::UNIT, Axis::UNIT, axis(8192, 127, 1, 8, false)];
        let g = Grid::with(axes, (1, 1), 64, 0);
        let slabs = Slabs::plan(&g, 512);
        for (range, kbox) in slabs.ranges.iter().zip(&slabs.boxes) {
            let kbox = kbox.expect("staged");
            assert_eq!(kbox.step[2], 8);
            assert!(kbox.volume() <= range.len() + 126, "{range:?}: {kbox:?}");
        }
    }

    /// Counting positions on from any start gives each number's position, and `index` maps
    /// it back to its number.
    #[test]
    fn positions_count_on_in_row_major_order() {
        let kbox = KeyBox {
            first: [2, 1, 3],
            step: [1, 3, 2],
            count: [3, 4, 5],
        };
        for start in [0, 1, 4, 5, 19, 20, 37] {
            for (n, x) in kbox.positions(start..kbox.volume()) {
                let i = [n / 20, n / 5 % 4, n % 5];
                let expected = [0, 1, 2].map(|a| kbox.first[a] + i[a] * kbox.step[a]);
                assert_eq!(x, expected, "start {start}, n {n}");
                assert_eq!(kbox.index(x), n);
            }
        }
    }
}
