//! Every shape and argument rule of the ops, checked once, before any memory is touched. A
//! `Problem` that validated is the kernels' proof that indexing by its sizes stays in bounds.
//! Ranks 1 and 2 are padded to rank 3 with leading unit axes.

use crate::dlpack::{DType, Device, TensorRef};
use crate::error::{Error, Result};
use crate::window::Axis;

/// Neighborhood arguments, one entry per spatial axis, as the caller passed them.
#[derive(Clone, Debug)]
pub struct Neighborhood {
    /// `kernel_size`.
    pub kernel: Vec<i64>,
    /// `dilation`.
    pub dilation: Vec<i64>,
    /// `is_causal`.
    pub causal: Vec<bool>,
}

/// A validated unfused neighborhood-attention problem.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// Number of spatial axes the caller used (1 to 3).
    pub rank: usize,
    /// Batch size.
    pub batch: usize,
    /// Number of heads.
    pub heads: usize,
    /// The three spatial axes; the first `3 - rank` are unit axes.
    pub axes: [Axis; 3],
    /// Channels per head of the token tensors.
    pub dim: usize,
    /// Number of additional (extra) tokens appended to every window.
    pub extra: usize,
    /// Element type of every tensor.
    pub dtype: DType,
    /// Device of every tensor.
    pub device: Device,
}

impl Problem {
    /// Validate `attn = query . key^T` over neighborhoods (+ rpb, + additional keys).
    pub fn for_qk(
        query: &TensorRef,
        key: &TensorRef,
        rpb: Option<&TensorRef>,
        additional_keys: Option<&TensorRef>,
        nbhd: &Neighborhood,
    ) -> Result<Problem> {
        let mut p = Problem::from_tokens("query", query, nbhd)?;
        p.expect("key", key, &p.token_shape(p.dim))?;
        if let Some(rpb) = rpb {
            p.expect("rpb", rpb, &p.rpb_shape())?;
        }
        if let Some(extra) = additional_keys {
            p.extra = p.extra_count("additional_keys", extra)?;
        }
        Ok(p)
    }

    /// Validate `out = attn . value` over neighborhoods (+ additional values).
    pub fn for_av(
        attn: &TensorRef,
        value: &TensorRef,
        additional_values: Option<&TensorRef>,
        nbhd: &Neighborhood,
    ) -> Result<Problem> {
        let mut p = Problem::from_tokens("value", value, nbhd)?;
        if let Some(extra) = additional_values {
            p.extra = p.extra_count("additional_values", extra)?;
        }
        p.expect("attn", attn, &p.attn_shape())?;
        Ok(p)
    }

    /// Shape `[B, heads, *spatial, dim]` of a token tensor.
    pub fn token_shape(&self, dim: usize) -> Vec<usize> {
        let mut shape = vec![self.batch, self.heads];
        shape.extend(self.spatial_axes().iter().map(|a| a.length));
        shape.push(dim);
        shape
    }

    /// Shape `[B, heads, *spatial, prod(kernel) + extra]` of attention weights.
    pub fn attn_shape(&self) -> Vec<usize> {
        self.token_shape(self.slots() + self.extra)
    }

    /// Shape `[B, heads, extra, dim]` of additional tokens.
    pub fn extra_shape(&self) -> Vec<usize> {
        vec![self.batch, self.heads, self.extra, self.dim]
    }

    /// Shape `[heads, 2K-1, ...]` of the relative positional bias.
    pub fn rpb_shape(&self) -> Vec<usize> {
        let mut shape = vec![self.heads];
        shape.extend(self.spatial_axes().iter().map(|a| 2 * a.kernel - 1));
        shape
    }

    /// Window slots per query: the product of the kernel sizes.
    pub fn slots(&self) -> usize {
        self.axes.iter().map(|a| a.kernel).product()
    }

    /// Query (= key) tokens per batch and head.
    pub fn tokens(&self) -> usize {
        self.axes.iter().map(|a| a.length).product()
    }

    /// The axes the caller named (without padding).
    pub fn spatial_axes(&self) -> &[Axis] {
        &self.axes[3 - self.rank..]
    }

    /// Check an output tensor: the expected shape, dtype and device, dense, writable, and sharing
    /// no memory with any input (the kernels read inputs while writing outputs).
    pub fn expect_output(
        &self,
        arg: &'static str,
        out: &TensorRef,
        shape: &[usize],
        inputs: &[&TensorRef],
    ) -> Result<()> {
        self.expect(arg, out, shape)?;
        if !out.is_contiguous() {
            return Err(Error::invalid(
                arg,
                "a contiguous output",
                format!("strides {:?}", out.strides),
            ));
        }
        if out.read_only {
            return Err(Error::invalid(
                arg,
                "a writable output",
                "a read-only tensor",
            ));
        }
        let (lo, hi) = out.byte_range();
        if inputs.iter().any(|t| overlaps((lo, hi), t.byte_range())) {
            return Err(Error::invalid(
                arg,
                "an output sharing no memory with the inputs",
                "overlap",
            ));
        }
        Ok(())
    }

    /// Build the problem's sizes from a token tensor `[B, heads, *spatial, dim]`.
    fn from_tokens(arg: &'static str, t: &TensorRef, nbhd: &Neighborhood) -> Result<Problem> {
        let rank = nbhd.kernel.len();
        if !(1..=3).contains(&rank) {
            return Err(Error::invalid(
                "kernel_size",
                "1 to 3 values",
                format!("{rank} values"),
            ));
        }
        let dtype = t.float_dtype(arg)?;
        if t.shape.len() != rank + 3 {
            return Err(Error::invalid(
                arg,
                format!(
                    "a {}-D tensor [batch, heads, {rank} spatial axes, dim]",
                    rank + 3
                ),
                format!("shape {:?}", t.shape),
            ));
        }
        let axes = unfused_axes(&t.shape[2..2 + rank], nbhd)?;
        Ok(Problem {
            rank,
            batch: t.shape[0],
            heads: t.shape[1],
            axes,
            dim: t.shape[rank + 2],
            extra: 0,
            dtype,
            device: t.device,
        })
    }

    /// Number of tokens in an additional-token tensor `[B, heads, n, dim]`.
    fn extra_count(&self, arg: &'static str, t: &TensorRef) -> Result<usize> {
        let n = if t.shape.len() == 4 { t.shape[2] } else { 0 };
        self.expect(arg, t, &[self.batch, self.heads, n, self.dim])?;
        Ok(n)
    }

    /// Check that `t` has this problem's dtype and device and the given shape.
    pub fn expect(&self, arg: &'static str, t: &TensorRef, shape: &[usize]) -> Result<()> {
        let dtype = t.float_dtype(arg)?;
        if dtype != self.dtype {
            return Err(Error::invalid(arg, self.dtype.name(), dtype.name()));
        }
        if t.device != self.device {
            return Err(Error::invalid(
                arg,
                format!("a tensor on {}", self.device),
                t.device.to_string(),
            ));
        }
        if t.shape != shape {
            return Err(Error::invalid(
                arg,
                format!("shape {shape:?}"),
                format!("shape {:?}", t.shape),
            ));
        }
        Ok(())
    }
}

/// Axes of an unfused problem over `spatial` (padded to three), after checking every argument.
fn unfused_axes(spatial: &[usize], nbhd: &Neighborhood) -> Result<[Axis; 3]> {
    let rank = spatial.len();
    if nbhd.dilation.len() != rank {
        return Err(per_axis("dilation", rank, nbhd.dilation.len()));
    }
    if nbhd.causal.len() != rank {
        return Err(per_axis("is_causal", rank, nbhd.causal.len()));
    }
    if nbhd.kernel.iter().any(|&k| k < 3 || k % 2 == 0) {
        return Err(Error::invalid(
            "kernel_size",
            "odd sizes >= 3 (unfused ops)",
            format!("{:?}", nbhd.kernel),
        ));
    }
    if nbhd.dilation.iter().any(|&d| d < 1) {
        return Err(Error::invalid(
            "dilation",
            "values >= 1",
            format!("{:?}", nbhd.dilation),
        ));
    }
    let mut axes = [Axis::UNIT; 3];
    for (n, &length) in spatial.iter().enumerate() {
        let (kernel, dilation) = (nbhd.kernel[n] as usize, nbhd.dilation[n] as usize);
        if kernel.saturating_mul(dilation) > length {
            return Err(Error::invalid(
                "kernel_size",
                "kernel_size * dilation <= the input's size on every axis",
                format!(
                    "kernel_size {:?} * dilation {:?} on spatial shape {spatial:?}",
                    nbhd.kernel, nbhd.dilation
                ),
            ));
        }
        let causal = nbhd.causal[n];
        axes[3 - rank + n] = Axis {
            length,
            kernel,
            stride: 1,
            dilation,
            causal,
        };
    }
    Ok(axes)
}

fn per_axis(arg: &'static str, rank: usize, got: usize) -> Error {
    Error::invalid(
        arg,
        format!("{rank} values (one per spatial axis)"),
        format!("{got} values"),
    )
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1
}

#[cfg(test)]
mod tests;
