//! Neighborhood math of spec/NEIGHBORHOOD.md: which keys a query sees along one axis (forward
//! windows) and which queries see a key (inverse windows). Every other module asks this one.

/// Neighborhood parameters along one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Axis {
    /// Number of tokens along the axis (`L`).
    pub length: usize,
    /// Window size (`K`), at least 1 (1 only for the unit axes that pad ranks 1 and 2 to 3).
    pub kernel: usize,
    /// Query stride (`s`), `1 <= s <= K`.
    pub stride: usize,
    /// Dilation (`d`), at least 1.
    pub dilation: usize,
    /// Whether a query only sees keys at or before itself.
    pub causal: bool,
}

/// An arithmetic run of token positions `first, first + step, ...` (`count` of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Span {
    /// Position of the first token.
    pub first: usize,
    /// Number of tokens.
    pub count: usize,
}

impl Axis {
    /// A unit axis (length 1, kernel 1): pads rank 1 and 2 problems to rank 3.
    pub const UNIT: Axis = Axis {
        length: 1,
        kernel: 1,
        stride: 1,
        dilation: 1,
        causal: false,
    };

    /// Length of dilation group `g` (groups below `L % d` are one longer).
    pub fn group_len(&self, g: usize) -> usize {
        let d = self.dilation;
        self.length / d + usize::from(g < self.length % d)
    }

    /// Window of query `i` inside its dilation group, as `[start, end)` group indices.
    fn group_window(&self, i: usize) -> (usize, usize) {
        let (k, s) = (self.kernel, self.stride);
        let qi = i / self.dilation;
        let lg = self.group_len(i % self.dilation);
        if self.causal {
            let leader = ((qi / s) * s + s - 1).min(lg - 1);
            let start = (leader + 1).saturating_sub(k);
            (start, (qi + 1).min(lg))
        } else {
            let leader = ((qi / s) * s + s / 2).min(lg - 1);
            let start = leader.saturating_sub(k / 2).min(lg - k);
            (start, start + k)
        }
    }

    /// Keys of query `i`: positions `first + n * dilation` for `n < count`. Slot `n` of the
    /// query's window holds the `n`-th of them; slots `count..kernel` are empty (causal only).
    pub fn window(&self, i: usize) -> Span {
        let (start, end) = self.group_window(i);
        Span {
            first: start * self.dilation + i % self.dilation,
            count: end - start,
        }
    }

    /// Forward windows of every query, indexed by query position.
    pub fn windows(&self) -> Vec<Span> {
        (0..self.length).map(|i| self.window(i)).collect()
    }

    /// Inverse windows: for every key position, the queries whose window holds it, as positions
    /// `first + n * dilation`. Windows move monotonically with the query, so this is one run.
    pub fn inverse_windows(&self) -> Vec<Span> {
        let d = self.dilation;
        let mut inverse = vec![Span::default(); self.length];
        for i in 0..self.length {
            let w = self.window(i);
            for n in 0..w.count {
                let run = &mut inverse[w.first + n * d];
                if run.count == 0 {
                    run.first = i;
                }
                run.count += 1;
            }
        }
        inverse
    }

    /// Relative-position-bias index (per axis) of key `j` for query `i`: `(j - i) / d + K - 1`.
    pub fn bias_index(&self, i: usize, j: usize) -> usize {
        (j + (self.kernel - 1) * self.dilation - i) / self.dilation
    }
}

/// An axis from its parameters, for tests.
#[cfg(test)]
pub(crate) fn axis(
    length: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    causal: bool,
) -> Axis {
    Axis {
        length,
        kernel,
        stride,
        dilation,
        causal,
    }
}

#[cfg(test)]
mod tests;
