//! The token grid of a problem with its forward and inverse windows precomputed, and the
//! `(batch, head, token)` rows that the CPU kernels compute one at a time.

use crate::problem::Problem;
use crate::window::{Axis, Span};

/// Windows of every position on the three (padded) axes.
pub struct Grid {
    /// The axes.
    pub axes: [Axis; 3],
    forward: [Vec<Span>; 3],
    inverse: [InverseAxis; 3],
    /// Coordinates of every token, row-major (the token part of `row`).
    points: Vec<[u32; 3]>,
    /// Batch size.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Channels of the rows a kernel sums.
    pub dim: usize,
    /// Window slots per query (product of the kernel sizes).
    pub slots: usize,
    /// Additional tokens after the window slots.
    pub extra: usize,
}

/// A `(batch, head, token)` row.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    /// Batch index.
    pub b: usize,
    /// Head index.
    pub h: usize,
    /// Spatial coordinates on the three axes.
    pub x: [usize; 3],
}

impl Grid {
    /// Precompute the windows of `p`.
    pub fn new(p: &Problem) -> Grid {
        Grid::with(p.axes, (p.batch, p.heads), p.dim, p.extra)
    }

    /// Precompute the windows of `axes`, for rows over `(batch, heads)` summing `dim` channels.
    pub fn with(axes: [Axis; 3], (batch, heads): (usize, usize), dim: usize, extra: usize) -> Grid {
        Grid {
            axes,
            forward: axes.map(|a| a.windows()),
            inverse: axes.map(InverseAxis::new),
            points: points(axes),
            batch,
            heads,
            dim,
            slots: axes.iter().map(|a| a.kernel).product(),
            extra,
        }
    }

    /// Number of `(batch, head, token)` rows.
    pub fn rows(&self) -> usize {
        self.batch * self.heads * self.tokens()
    }

    /// Multiply-adds of one row of a window kernel (for choosing between serial and parallel).
    pub fn row_cost(&self) -> usize {
        (self.slots + self.extra) * self.dim.max(1)
    }

    /// Tokens per batch and head.
    pub fn tokens(&self) -> usize {
        self.axes.iter().map(|a| a.length).product()
    }

    /// Row number `r` of the `(batch, head, token)` space, tokens in `points` order.
    #[inline(always)]
    pub fn row(&self, r: usize) -> Row {
        let tokens = self.points.len();
        let (bh, n) = (r / tokens, r % tokens);
        Row {
            b: bh / self.heads,
            h: bh % self.heads,
            x: self.point(n),
        }
    }

    /// Coordinates of point `n` of the token order (`row` walks it).
    #[inline(always)]
    pub fn point(&self, n: usize) -> [usize; 3] {
        self.points[n].map(|c| c as usize)
    }

    /// Index of `(b, h, x)` in row-major `(batch, head, token)` order (for per-row storage).
    pub fn row_index(&self, b: usize, h: usize, x: [usize; 3]) -> usize {
        let [_, l1, l2] = self.axes.map(|a| a.length);
        (b * self.heads + h) * self.tokens() + (x[0] * l1 + x[1]) * l2 + x[2]
    }

    /// The dilation of each axis.
    #[inline(always)]
    pub fn dilations(&self) -> [usize; 3] {
        self.axes.map(|a| a.dilation)
    }

    /// Keys seen by the query at `x`, per axis.
    pub fn window(&self, x: [usize; 3]) -> [Span; 3] {
        [
            self.forward[0][x[0]],
            self.forward[1][x[1]],
            self.forward[2][x[2]],
        ]
    }

    /// Keys seen along axis `axis` by the queries at position `x` on it.
    #[inline(always)]
    pub fn span(&self, axis: usize, x: usize) -> Span {
        self.forward[axis][x]
    }

    /// `(query position, slot)` of every query that sees key position `j` on axis `axis`.
    pub fn queries_of(&self, axis: usize, j: usize) -> &[(usize, usize)] {
        self.inverse[axis].of(j)
    }

    /// Calls `f(slot, key)` for every slot of the window of the query at `x`, row-major over the
    /// kernel; `key` is `None` for slots past a causal window's end.
    pub fn for_each_slot(&self, x: [usize; 3], mut f: impl FnMut(usize, Option<[usize; 3]>)) {
        let w = self.window(x);
        let [k0, k1, k2] = self.axes.map(|a| a.kernel);
        let d = self.dilations();
        for s0 in 0..k0 {
            for s1 in 0..k1 {
                for s2 in 0..k2 {
                    let slot = (s0 * k1 + s1) * k2 + s2;
                    let valid = s0 < w[0].count && s1 < w[1].count && s2 < w[2].count;
                    let key = [
                        w[0].first + s0 * d[0],
                        w[1].first + s1 * d[1],
                        w[2].first + s2 * d[2],
                    ];
                    f(slot, valid.then_some(key));
                }
            }
        }
    }
}

/// Inverse windows of one axis, flattened: for each key position, the queries that see it and
/// the slot (along this axis) the key takes in each of their windows.
struct InverseAxis {
    /// `terms[offsets[j]..offsets[j + 1]]` belong to key `j`.
    offsets: Vec<usize>,
    terms: Vec<(usize, usize)>,
}

impl InverseAxis {
    fn new(axis: Axis) -> InverseAxis {
        let d = axis.dilation;
        let mut offsets = vec![0];
        let mut terms = Vec::new();
        for (j, run) in axis.inverse_windows().into_iter().enumerate() {
            for n in 0..run.count {
                let x = run.first + n * d;
                terms.push((x, (j - axis.window(x).first) / d));
            }
            offsets.push(terms.len());
        }
        InverseAxis { offsets, terms }
    }

    fn of(&self, j: usize) -> &[(usize, usize)] {
        &self.terms[self.offsets[j]..self.offsets[j + 1]]
    }
}

/// Coordinates of every token of `axes`, in the order rows are computed: row-major over the
/// axes, each axis walked one dilation group at a time (`0, d, 2d, ..`, then `1, 1 + d, ..`).
/// Consecutive rows then share most of their neighbors, which stay in cache; in plain
/// position order, neighbors of consecutive dilated queries are disjoint.
fn points(axes: [Axis; 3]) -> Vec<[u32; 3]> {
    let [o0, o1, o2] = axes.map(|a| {
        let d = a.dilation;
        (0..d)
            .flat_map(|g| (g..a.length).step_by(d))
            .map(|x| x as u32)
            .collect::<Vec<_>>()
    });
    let mut points = Vec::with_capacity(o0.len() * o1.len() * o2.len());
    for &x0 in &o0 {
        for &x1 in &o1 {
            for &x2 in &o2 {
                points.push([x0, x1, x2]);
            }
        }
    }
    points
}
