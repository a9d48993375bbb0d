//! Fused neighborhood attention, forward: per query, the logits of its window and the extra
//! tokens are computed into a scratch row (never a `[tokens x window]` matrix), softmaxed, and
//! summed against the values. Heads-last tensors; GQA through `kv head = head / group`.

use super::av::{weighted_sum, WeightedSum};
use super::element::{dot, load, Accum, Element};
use super::grid::{Grid, Row};
use super::parallel::{par_rows, RowKernel};
use super::view::{bias, extras_heads_last, tokens_heads_last, Bias, Extras, Tokens};
use crate::dlpack::TensorRef;
use crate::problem::FusedProblem;

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

/// One key a query attends: a neighbor at spatial coordinates, or additional token `e`.
#[derive(Clone, Copy)]
pub enum Key {
    /// A neighbor.
    At([usize; 3]),
    /// An additional token.
    Extra(usize),
}

/// Views of the inputs of a fused problem, and the walk over each query's keys.
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

    /// Most keys a query attends.
    pub fn max_keys(&self) -> usize {
        usize::from(self.window) * self.g.slots + self.g.extra
    }

    /// Calls `f(n, key)` for the keys of the query at `x`: window slots row-major, then extras.
    #[inline(always)]
    pub fn for_each_key(&self, x: [usize; 3], mut f: impl FnMut(usize, Key)) {
        let mut n = 0;
        if self.window {
            let w = self.g.window(x);
            let d = self.g.axes.map(|a| a.dilation);
            for s0 in 0..w[0].count {
                for s1 in 0..w[1].count {
                    for s2 in 0..w[2].count {
                        let y = [
                            w[0].first + s0 * d[0],
                            w[1].first + s1 * d[1],
                            w[2].first + s2 * d[2],
                        ];
                        f(n, Key::At(y));
                        n += 1;
                    }
                }
            }
        }
        for e in 0..self.g.extra {
            f(n, Key::Extra(e));
            n += 1;
        }
    }

    /// The key row of `key` for batch `b`, kv head `hk`, and its channel stride.
    ///
    /// # Safety
    /// `key` must be a key of a query of the validated problem.
    #[inline(always)]
    pub unsafe fn key_row(&self, b: usize, hk: usize, key: Key) -> (*const T, isize) {
        // SAFETY: in shape by the caller's contract; window keys exist only with `key` given.
        unsafe { row_of(self.k, self.ek, b, hk, key) }
    }

    /// The value row of `key` for batch `b`, kv head `hk`, and its channel stride.
    ///
    /// # Safety
    /// As `key_row`.
    #[inline(always)]
    pub unsafe fn value_row(&self, b: usize, hk: usize, key: Key) -> (*const T, isize) {
        // SAFETY: as `key_row`.
        unsafe { row_of(self.v, self.ev, b, hk, key) }
    }

    /// The bias head `h`'s query at `x` gets for `key` (0 without rpb and for extra tokens).
    ///
    /// # Safety
    /// `key` must be a key of the query at `x`.
    #[inline(always)]
    pub unsafe fn bias_of(&self, h: usize, x: [usize; 3], key: Key) -> T::Acc {
        match (self.bias, key) {
            (Some(bias), Key::At(y)) => {
                let [i0, i1, i2] = [0, 1, 2].map(|a| self.g.axes[a].bias_index(x[a], y[a]));
                // SAFETY: offsets inside a window index the validated `[heads, 2K-1, ...]`.
                unsafe { (*bias.at([h, i0, i1, i2])).to_acc() }
            }
            _ => T::Acc::ZERO,
        }
    }

    /// Load the query row of `row`, times the scale, into `q`.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem.
    #[inline(always)]
    pub unsafe fn load_query(&self, row: Row, q: &mut [T::Acc]) {
        let [x0, x1, x2] = row.x;
        // SAFETY: in shape by the caller's contract.
        unsafe {
            load(
                q,
                self.q.at([row.b, row.h, x0, x1, x2, 0]),
                self.q.inner_stride(),
            )
        };
        q.iter_mut().for_each(|v| *v = *v * self.scale);
    }

    /// `logits[n] = q . key_n + bias_n` for the keys of `row` (`q` already scaled); returns
    /// the number of keys.
    ///
    /// # Safety
    /// `row` must be a row of the validated problem; `logits` at least `max_keys` long.
    #[inline(always)]
    pub unsafe fn scores(&self, row: Row, q: &[T::Acc], logits: &mut [T::Acc]) -> usize {
        let hk = row.h / self.group;
        let mut count = 0;
        self.for_each_key(row.x, |n, key| {
            // SAFETY: keys of a row of the validated problem.
            unsafe {
                let (k, step) = self.key_row(row.b, hk, key);
                logits[n] = dot(q, k, step) + self.bias_of(row.h, row.x, key);
            }
            count = n + 1;
        });
        count
    }

    /// Whether value rows have channel stride 1.
    fn dense_values(&self) -> bool {
        self.v.is_none_or(|v| v.inner_stride() == 1)
            && self.ev.is_none_or(|v| v.inner_stride() == 1)
    }

    /// Whether key rows have channel stride 1.
    pub fn dense_keys(&self) -> bool {
        self.k.is_none_or(|v| v.inner_stride() == 1)
            && self.ek.is_none_or(|v| v.inner_stride() == 1)
    }
}

/// Row of `key` in `tokens` (neighbors) or `extras`.
///
/// # Safety
/// `key` must be in shape; `tokens` given whenever `key` is a neighbor, `extras` for extras.
#[inline(always)]
unsafe fn row_of<T>(
    tokens: Option<Tokens<T>>,
    extras: Option<Extras<T>>,
    b: usize,
    h: usize,
    key: Key,
) -> (*const T, isize) {
    // SAFETY: in shape by the caller's contract.
    unsafe {
        match key {
            Key::At([y0, y1, y2]) => {
                let t = tokens.expect("neighbors exist only with key/value tensors");
                (t.at([b, h, y0, y1, y2, 0]), t.inner_stride())
            }
            Key::Extra(e) => {
                let t = extras.expect("extra keys exist only with extra tensors");
                (t.at([b, h, e, 0]), t.inner_stride())
            }
        }
    }
}

/// `sum_n w[n] value_n` (or `key_n`) over the keys of one query row.
pub struct KeyTerms<'a, 'g, T: Element> {
    /// The problem.
    pub a: &'a Attention<'g, T>,
    /// Weights, one per key in `for_each_key` order.
    pub w: &'a [T::Acc],
    /// Sum value rows (true) or key rows (false).
    pub values: bool,
}

impl<T: Element> WeightedSum<T> for KeyTerms<'_, '_, T> {
    #[inline(always)]
    unsafe fn terms(&self, row: Row, mut f: impl FnMut(T::Acc, *const T, isize)) {
        let hk = row.h / self.a.group;
        self.a.for_each_key(row.x, |n, key| {
            // SAFETY: keys of a row of the validated problem.
            let (src, step) = unsafe {
                if self.values {
                    self.a.value_row(row.b, hk, key)
                } else {
                    self.a.key_row(row.b, hk, key)
                }
            };
            f(self.w[n], src, step);
        });
    }

    fn dense_terms(&self) -> bool {
        if self.values {
            self.a.dense_values()
        } else {
            self.a.dense_keys()
        }
    }
}

/// Forward into `out` `[B, *spatial, heads, Dv]` and `lse` `[B, *spatial, heads]` (float32).
pub fn forward<T: Element>(p: &FusedProblem, t: &FusedTensors, out: &TensorRef, lse: &TensorRef) {
    let g = Grid::with(p.axes, (p.batch, p.heads), p.dim, p.extra);
    let a = Attention::<T>::new(p, &g, t);
    let kernel = Forward {
        a: &a,
        out: tokens_heads_last(out, p.rank, true),
        lse: tokens_heads_last(lse, p.rank, false),
    };
    let width = p.dim + a.max_keys() + p.dim.max(p.dim_v);
    // SAFETY: `Forward::row` writes only row `r` of `out` and `lse`, for any `r < g.rows()`.
    unsafe { par_rows(g.rows(), width, T::Acc::ZERO, &kernel) };
}

struct Forward<'a, 'g, T: Element> {
    a: &'a Attention<'g, T>,
    out: Tokens<T>,
    lse: Tokens<f32>,
}

impl<T: Element> RowKernel for Forward<'_, '_, T> {
    type Acc = T::Acc;

    #[inline(always)]
    unsafe fn row(&self, r: usize, scratch: &mut [T::Acc]) {
        let a = self.a;
        let row = a.g.row(r);
        let [x0, x1, x2] = row.x;
        let (q, rest) = scratch.split_at_mut(a.g.dim);
        let (logits, tail) = rest.split_at_mut(a.max_keys());
        // SAFETY (whole block): `row` is a row of the validated problem; its output rows are
        // written by this call only.
        unsafe {
            a.load_query(row, q);
            let n = a.scores(row, q, logits);
            let p = &mut logits[..n];
            let max = p.iter().fold(T::Acc::NEG_INF, |m, &x| m.max(x));
            let sum = T::Acc::exp_shifted(p, max);
            let dst = (
                self.out.at([row.b, row.h, x0, x1, x2, 0]),
                self.out.inner_stride(),
                a.dim_v,
            );
            weighted_sum(
                &KeyTerms {
                    a,
                    w: p,
                    values: true,
                },
                row,
                dst,
                T::Acc::ONE / sum,
                tail,
            );
            *self.lse.at([row.b, row.h, x0, x1, x2, 0]) = (max + sum.ln()).to_f32();
        }
    }
}
