//! Where the fused backward's query pass sums `d_key` and `d_value`: every query adds its terms
//! to each key row of its window (`SumRows::add_query`), so these rows are read and written more
//! than anything else in the backward.
//!
//! The sums live in `KvSums`: the gradient tensors themselves when they hold the accumulator
//! type densely, else a float buffer rounded into them at the end. A task adds its chunk's
//! terms to a `ChunkStage` first, the chunk's key rows one after another in dilation-group
//! order, and adds that into the sums once at its end. In place, a window's rows lie a token
//! apart, a dilated window's `dilation` tokens; heads-last tensors have power-of-two token
//! strides (heads times the head dim), DiNAT layers power-of-two dilations, and the rows then
//! fall into a few cache sets and evict each other. 1-D, kernel 127: the backward ran 1.7x
//! slower with dilation 8 than with 7 or 9; 14x14, kernel 7, head dim 32: with 32 heads (rows
//! 4 KiB apart) 1.7x slower per query in place than staged, with 8 heads 1.02x, and with
//! one head (rows already dense) 0.97x. In the stage they lie densely.

use super::element::{store, Accum, Aligned, Element, RunGrid};
use super::grid::Grid;
use super::pages::prefer_huge_pages_for;
use super::parallel::for_each_with;
use super::view::Tokens;
use crate::window::Span;

/// Bytes of a chunk's staged sums above which the chunk adds to the sums in place.
const STAGE_LIMIT: usize = 8 << 20;

/// Where positions of one axis lie among rows: position `x` at index
/// `(x % dilation) * group + (x / dilation) * step - first`, so that the next key of a window,
/// `dilation` positions on, lies `step` indices on.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Slots {
    dilation: usize,
    group: usize,
    step: usize,
    first: usize,
}

impl Slots {
    /// Positions where they lie in a tensor.
    fn in_place(dilation: usize) -> Self {
        Slots {
            dilation,
            group: 1,
            step: dilation,
            first: 0,
        }
    }

    /// Positions of an axis of `length` in dilation-group order, every group
    /// `ceil(length / dilation)` indices long (the last of shorter groups unused).
    fn grouped(length: usize, dilation: usize) -> Self {
        Slots {
            dilation,
            group: length.div_ceil(dilation),
            step: 1,
            first: 0,
        }
    }

    /// Positions `first..` of one dilation group, in order from index 0 (in-group indices).
    fn one_group(dilation: usize, first: usize) -> Self {
        Slots {
            dilation,
            group: 0,
            step: 1,
            first,
        }
    }

    /// Index of position `x` (no division on undilated axes).
    #[inline(always)]
    fn of(&self, x: usize) -> usize {
        let (group, within) = match self.dilation {
            1 => (0, x),
            d => (x % d, x / d),
        };
        group * self.group + within * self.step - self.first
    }
}

/// Rows sums are added to: `d_k` and `d_v` `[batch, kv head, s0, s1, s2, channel]` views, with
/// each axis's positions where `slots` says.
#[derive(Clone, Copy)]
pub(super) struct SumRows<A> {
    d_k: Tokens<A>,
    d_v: Tokens<A>,
    slots: [Slots; 3],
}

impl<A: Accum> SumRows<A> {
    /// Rows of `dims.0 + dims.1` elements at `ptr` (a key row, then its value row), their
    /// strides in rows for batch, kv head and the three axes `row_strides`.
    fn interleaved(
        ptr: *mut A,
        dims: (usize, usize),
        row_strides: [usize; 5],
        slots: [Slots; 3],
    ) -> Self {
        let width = dims.0 + dims.1;
        let [s0, s1, s2, s3, s4] = row_strides.map(|s| (s * width) as isize);
        let strides = [s0, s1, s2, s3, s4, 1];
        SumRows {
            d_k: Tokens::from_parts(ptr, strides),
            // SAFETY: `dims.0 < width`, inside the first row.
            d_v: Tokens::from_parts(unsafe { ptr.add(dims.0) }, strides),
            slots,
        }
    }

    /// Index of the row of token `x` in batch `b`, kv head `hk`.
    #[inline(always)]
    fn slot(&self, b: usize, hk: usize, x: [usize; 3]) -> [usize; 6] {
        let [s0, s1, s2] = self.slots;
        [b, hk, s0.of(x[0]), s1.of(x[1]), s2.of(x[2]), 0]
    }

    /// The runs of the window of query `x` in batch `b`, kv head `hk`: in the key sums and in
    /// the value sums, each run `len` rows long from the window's first key along the last
    /// axis.
    #[inline(always)]
    fn run_grids(
        &self,
        g: &Grid,
        (b, hk, x): (usize, usize, [usize; 3]),
        len: usize,
    ) -> [RunGrid; 2] {
        let w = g.window(x);
        let size = std::mem::size_of::<A>() as isize;
        let [s0, s1, s2] = self.slots;
        // A window's keys lie one dilation step apart, `step` indices: the first key's index
        // is found once, the others' by counting on.
        let first = self.slot(b, hk, [w[0].first, w[1].first, w[2].first]);
        let grid = |view: Tokens<A>| RunGrid {
            // SAFETY: the window's first key is a row of the view.
            first: unsafe { view.at(first) } as usize,
            steps: [
                s0.step as isize * view.stride(2) * size,
                s1.step as isize * view.stride(3) * size,
            ],
            counts: [w[0].count, w[1].count],
            row_step: s2.step as isize * view.stride(4) * size,
            len,
        };
        [grid(self.d_k), grid(self.d_v)]
    }

    /// Add one query's terms to its window's rows: `d_key_n += ds[n] q`,
    /// `d_value_n += p[n] d_o` (`n` in window order).
    ///
    /// # Safety
    /// `x` must be a query of `g` in batch `b` of kv head `hk` whose window's rows these are;
    /// no other task may touch them meanwhile.
    #[inline(always)]
    pub(super) unsafe fn add_query(
        &self,
        g: &Grid,
        (b, hk, x): (usize, usize, [usize; 3]),
        (ds, p): (&[A], &[A]),
        (q, d_o): (&[A], &[A]),
    ) {
        let len = g.window(x)[2].count;
        let [keys, values] = self.run_grids(g, (b, hk, x), len);
        let mut n = 0;
        for s0 in 0..keys.counts[0] {
            for s1 in 0..keys.counts[1] {
                // SAFETY: the runs' rows are this task's, by the caller's contract.
                unsafe {
                    A::spread_rows(&ds[n..n + len], q, keys.run(s0, s1));
                    A::spread_rows(&p[n..n + len], d_o, values.run(s0, s1));
                }
                n += len;
            }
        }
    }

    /// `add_query` for two consecutive queries `x` of one line whose windows share their runs,
    /// the second's starting `offset` keys into the first's (`Attention::pair_offset`): each
    /// row of a run's union is updated once for both.
    ///
    /// # Safety
    /// As `add_query`, for both queries.
    #[inline(always)]
    pub(super) unsafe fn add_pair(
        &self,
        g: &Grid,
        (b, hk, x): (usize, usize, [[usize; 3]; 2]),
        offset: usize,
        [(ds_a, p_a), (ds_b, p_b)]: [(&[A], &[A]); 2],
        [(q_a, d_o_a), (q_b, d_o_b)]: [(&[A], &[A]); 2],
    ) {
        let union = offset + g.span(2, x[1][2]).count;
        let [keys, values] = self.run_grids(g, (b, hk, x[0]), union);
        // SAFETY: the union rows are keys of one of the queries, this task's rows.
        unsafe {
            A::spread_pair([ds_a, ds_b], offset, [q_a, q_b], keys);
            A::spread_pair([p_a, p_b], offset, [d_o_a, d_o_b], values);
        }
    }
}

/// Where `d_key` and `d_value` are summed, in the accumulator type: the gradient tensors
/// themselves when they hold that type densely (float32, float64), else a buffer of rows of
/// `dim + dim_v`, `(b, kv head, token)` row-major, rounded into them at the end.
pub(super) struct KvSums<A> {
    pub(super) rows: SumRows<A>,
    /// The memory behind `rows` when they are not the gradient tensors (its length 0: every
    /// row is cleared by writing before anything reads it).
    buffer: Option<Vec<A>>,
    dims: (usize, usize),
    lengths: [usize; 3],
    planes: (usize, usize),
}

// SAFETY: tasks of one phase add to disjoint rows (chunks of one parity share no key); the
// clearing and rounding passes touch each row from one task.
unsafe impl<A: Send> Sync for KvSums<A> {}

impl<A: Accum> KvSums<A> {
    /// Cleared sums for `d_k`, `d_v` `[B, *spatial, heads_kv, D / Dv]` over the grid `g`.
    pub(super) fn new<T: Element<Acc = A>>(
        g: &Grid,
        heads_kv: usize,
        dims: (usize, usize),
        (d_k, d_v): (Tokens<T>, Tokens<T>),
    ) -> Self {
        let mut sums = KvSums {
            rows: SumRows {
                d_k: d_k.cast(),
                d_v: d_v.cast(),
                slots: g.axes.map(|a| Slots::in_place(a.dilation)),
            },
            buffer: None,
            dims,
            lengths: g.axes.map(|a| a.length),
            planes: (g.batch, heads_kv),
        };
        let in_place = T::is_acc() && d_k.inner_stride() == 1 && d_v.inner_stride() == 1;
        if !in_place {
            let [_, l1, l2] = sums.lengths;
            let tokens = g.tokens();
            let mut buffer = Vec::with_capacity(g.batch * heads_kv * tokens * (dims.0 + dims.1));
            let bytes = buffer.capacity() * std::mem::size_of::<A>();
            prefer_huge_pages_for(buffer.as_ptr() as usize, bytes);
            let row_strides = [heads_kv * tokens, tokens, l1 * l2, l2, 1];
            let slots = sums.rows.slots;
            sums.rows = SumRows::interleaved(buffer.as_mut_ptr(), dims, row_strides, slots);
            sums.buffer = Some(buffer);
        }
        // Cleared by writes: memory read before its first write maps the zero page, and the
        // first addition to it then faults again and flushes every core's TLB (a fresh buffer
        // allocated zeroed cost a dilated 1-D backward more time than its products).
        sums.for_each_row(|_, dk, dv| {
            dk.fill(A::ZERO);
            dv.fill(A::ZERO);
        });
        sums
    }

    /// The `d_key` and `d_value` rows of token `x` in batch `b`, kv head `hk` (the sums' rows
    /// lie in the tensors' order).
    ///
    /// # Safety
    /// `x` must be a token of the grid; no other task may use its rows meanwhile, nor may they
    /// outlive the sums' tensors.
    #[inline(always)]
    unsafe fn rows_of<'a>(&self, b: usize, hk: usize, x: [usize; 3]) -> (&'a mut [A], &'a mut [A]) {
        let at = [b, hk, x[0], x[1], x[2], 0];
        // SAFETY: forwarded contract.
        unsafe {
            (
                row(self.rows.d_k, at, self.dims.0),
                row(self.rows.d_v, at, self.dims.1),
            )
        }
    }

    /// Call `f(index, d_key row, d_value row)` for every kv row, in parallel, a line of the
    /// last axis per task (the index arithmetic once per line: per row, its divisions cost
    /// more than clearing the row, a twentieth of P1's backward).
    fn for_each_row(&self, f: impl Fn([usize; 6], &mut [A], &mut [A]) + Sync) {
        let [l0, l1, l2] = self.lengths;
        let (batch, heads_kv) = self.planes;
        let width = self.dims.0 + self.dims.1;
        let rows = self.rows;
        for_each_with(
            (batch * heads_kv * l0 * l1, l2 * width),
            || (),
            |r, _| {
                let (plane, line) = (r / (l0 * l1), r % (l0 * l1));
                let (b, hk, x0, x1) = (plane / heads_kv, plane % heads_kv, line / l1, line % l1);
                for x2 in 0..l2 {
                    let at = [b, hk, x0, x1, x2, 0];
                    // SAFETY: every row of the kv grid is in shape, dense, and this task's.
                    unsafe {
                        let dk = row(rows.d_k, at, self.dims.0);
                        f(at, dk, row(rows.d_v, at, self.dims.1))
                    }
                }
            },
        );
    }

    /// Round buffered sums into `d_key` and `d_value` (nothing to do when summed in place).
    pub(super) fn finish<T: Element<Acc = A>>(&self, (d_k, d_v): (Tokens<T>, Tokens<T>)) {
        if self.buffer.is_none() {
            return;
        }
        self.for_each_row(|at, dk, dv| {
            // SAFETY: every kv row is in shape and stored by this task only.
            unsafe {
                store(d_k.at(at), d_k.inner_stride(), dk);
                store(d_v.at(at), d_v.inner_stride(), dv);
            }
        });
    }
}

/// The dense row of `len` elements of `view` at `at`.
///
/// # Safety
/// `at` must index a row of `view`; no other task may use the row meanwhile.
#[inline(always)]
unsafe fn row<'a, A>(view: Tokens<A>, at: [usize; 6], len: usize) -> &'a mut [A] {
    // SAFETY: by the caller's contract; rows of the sums are dense.
    unsafe { std::slice::from_raw_parts_mut(view.at(at), len) }
}

/// A worker's sums of one chunk's keys (see the module's notes): the chunk's range of key
/// positions along its axis, in its dilation group, and every position of the other axes in
/// dilation-group order, for one plane (batch, kv head), rows of `dim + dim_v`.
pub(super) struct ChunkStage<A> {
    buffer: Aligned<A>,
    dims: (usize, usize),
    /// The chunk axis and its dilation.
    axis: usize,
    dilation: usize,
    /// Per axis, the position at each index of the stage (`None`: padding), the chunk
    /// axis's set by `begin`.
    positions: [Vec<Option<usize>>; 3],
}

impl<A: Accum> ChunkStage<A> {
    /// A stage for chunks along `axis` of `g` whose keys along it number up to `keys`, rows
    /// of `dims`; `None` when it would be larger than `STAGE_LIMIT`.
    pub(super) fn new(g: &Grid, axis: usize, keys: usize, dims: (usize, usize)) -> Option<Self> {
        let positions = g.axes.map(|a| {
            let slots = Slots::grouped(a.length, a.dilation);
            let mut at = vec![None; a.length.div_ceil(a.dilation) * a.dilation];
            (0..a.length).for_each(|x| at[slots.of(x)] = Some(x));
            at
        });
        let mut extents = positions.each_ref().map(Vec::len);
        extents[axis] = keys;
        let volume = extents.iter().product::<usize>() * (dims.0 + dims.1);
        if volume * std::mem::size_of::<A>() > STAGE_LIMIT {
            return None;
        }
        Some(ChunkStage {
            buffer: Aligned::new(volume),
            dims,
            axis,
            dilation: g.axes[axis].dilation,
            positions,
        })
    }

    /// Clear the stage for the chunk-axis keys `keys` (one dilation group's, `dilation`
    /// apart); returns its rows, which take the chunk's queries' terms.
    pub(super) fn begin(&mut self, g: &Grid, keys: Span) -> SumRows<A> {
        let d = self.dilation;
        let along = &mut self.positions[self.axis];
        along.clear();
        along.extend((0..keys.count).map(|j| Some(keys.first + j * d)));
        let [e0, e1, e2] = self.positions.each_ref().map(Vec::len);
        let ptr = self.buffer.ptr_mut();
        let volume = e0 * e1 * e2 * (self.dims.0 + self.dims.1);
        // SAFETY: the buffer holds the largest chunk's stage (`new`).
        unsafe { std::slice::from_raw_parts_mut(ptr, volume) }.fill(A::ZERO);
        let mut slots = g.axes.map(|a| Slots::grouped(a.length, a.dilation));
        slots[self.axis] = Slots::one_group(d, keys.first / d);
        SumRows::interleaved(ptr, self.dims, [0, 0, e1 * e2, e2, 1], slots)
    }

    /// Add the stage begun last into batch `b`, kv head `hk` of `sums`, in the stage's order
    /// (its rows one after another; no index arithmetic but the sums' strides).
    ///
    /// # Safety
    /// The staged key rows of that plane must be this task's.
    #[inline(always)]
    pub(super) unsafe fn add_into(&self, sums: &KvSums<A>, (b, hk): (usize, usize)) {
        let (dims, width) = (self.dims, self.dims.0 + self.dims.1);
        let [p0, p1, p2] = &self.positions;
        let mut staged = self.buffer.ptr();
        for &x0 in p0 {
            for &x1 in p1 {
                for &x2 in p2 {
                    if let (Some(x0), Some(x1), Some(x2)) = (x0, x1, x2) {
                        // SAFETY: `staged` is a row of the stage; the sums' row is this
                        // task's.
                        unsafe {
                            let (to_k, to_v) = sums.rows_of(b, hk, [x0, x1, x2]);
                            add(to_k, std::slice::from_raw_parts(staged, dims.0));
                            add(to_v, std::slice::from_raw_parts(staged.add(dims.0), dims.1));
                        }
                    }
                    // SAFETY: at most one row past the stage's last.
                    staged = unsafe { staged.add(width) };
                }
            }
        }
    }
}

/// `to += from`, element by element.
#[inline(always)]
fn add<A: Accum>(to: &mut [A], from: &[A]) {
    for (t, &f) in to.iter_mut().zip(from) {
        *t += f;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::fused_chunks::ChunkPlan;
    use crate::window::{axis, Axis};

    #[test]
    fn slots_place_every_position_once_and_a_windows_keys_step_apart() {
        for (length, d) in [(1, 1), (9, 1), (9, 2), (10, 3), (16, 8), (7, 7)] {
            let cases = [Slots::in_place(d), Slots::grouped(length, d)];
            for (slots, span) in cases.into_iter().zip([length, length.div_ceil(d) * d]) {
                let mut seen = vec![false; span];
                for x in 0..length {
                    let i = slots.of(x);
                    assert!(i < span && !seen[i], "{slots:?}: {x} -> {i}");
                    seen[i] = true;
                    if x + d < length {
                        assert_eq!(slots.of(x + d), i + slots.step, "{slots:?}: {x}");
                    }
                }
            }
            for group in 0..d.min(length) {
                let from = group + d;
                let slots = Slots::one_group(d, from / d);
                let indices: Vec<_> = (from..length).step_by(d).map(|x| slots.of(x)).collect();
                let expected: Vec<_> = (0..indices.len()).collect();
                assert_eq!(indices, expected, "{slots:?}");
            }
        }
    }

    /// Sums of every query's terms (small integers: exact in any order), added in place or,
    /// where `staged`, through a chunk stage per chunk.
    fn key_sums(g: &Grid, dims: (usize, usize), staged: bool) -> Vec<f64> {
        let width = dims.0 + dims.1;
        let mut memory = vec![f64::NAN; g.tokens() * width];
        let [_, l1, l2] = g.axes.map(|a| a.length);
        let slots = g.axes.map(|a| Slots::in_place(a.dilation));
        let rows = SumRows::interleaved(memory.as_mut_ptr(), dims, [0, 0, l1 * l2, l2, 1], slots);
        let sums = KvSums::new(g, 1, dims, (rows.d_k, rows.d_v));
        let plan = ChunkPlan::new(g);
        let keys = plan.phases.iter().flatten().map(|c| plan.keys(g, c).count);
        let mut stage = ChunkStage::new(g, plan.axis, keys.max().unwrap(), dims).filter(|_| staged);
        assert_eq!(stage.is_some(), staged, "the grid stages its chunks");
        for chunk in plan.phases.iter().flatten() {
            let rows = match stage.as_mut() {
                Some(stage) => stage.begin(g, plan.keys(g, chunk)),
                None => sums.rows,
            };
            let a = g.axes[plan.axis];
            for j in chunk.range.clone() {
                for point in 0..g.tokens() {
                    let x = g.point(point);
                    if x[plan.axis] != chunk.group + j * a.dilation {
                        continue;
                    }
                    let window: usize = g.window(x).iter().map(|w| w.count).product();
                    let weight = |n: usize, salt: usize| ((n * 7 + salt + point) % 5) as f64 - 2.0;
                    let ds: Vec<_> = (0..window).map(|n| weight(n, 1)).collect();
                    let p: Vec<_> = (0..window).map(|n| weight(n, 3)).collect();
                    let q: Vec<_> = (0..dims.0).map(|c| weight(c, point)).collect();
                    let d_o: Vec<_> = (0..dims.1).map(|c| weight(c, 2 * point)).collect();
                    // SAFETY: the rows are the query's window's; one thread.
                    unsafe { rows.add_query(g, (0, 0, x), (&ds, &p), (&q, &d_o)) };
                }
            }
            if let Some(stage) = &stage {
                // SAFETY: one thread.
                unsafe { stage.add_into(&sums, (0, 0)) };
            }
        }
        memory
    }

    #[test]
    fn staged_chunks_sum_what_in_place_sums_do() {
        let cases = [
            [Axis::UNIT, axis(9, 3, 1, 1, false), axis(10, 4, 1, 1, true)],
            [Axis::UNIT, Axis::UNIT, axis(40, 5, 1, 4, false)],
            [
                Axis::UNIT,
                axis(13, 3, 2, 3, true),
                axis(10, 4, 1, 2, false),
            ],
            [
                axis(9, 3, 1, 2, false),
                axis(8, 2, 1, 1, false),
                axis(7, 3, 3, 2, true),
            ],
        ];
        for axes in cases {
            let g = Grid::with(axes, (1, 1), 8, 0);
            let dims = (8, 16);
            assert_eq!(
                key_sums(&g, dims, true),
                key_sums(&g, dims, false),
                "{axes:?}"
            );
        }
    }
}
