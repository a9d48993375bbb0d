//! The unfused (legacy) ops: `attn = q . k^T` and `out = attn . v` over neighborhoods,
//! heads-first `[B, heads, *spatial, D]`.

use super::{axes, expect_tensor, expect_writable, rank_of, Family, Neighborhood};
use crate::dlpack::{DType, Device, TensorRef};
use crate::error::{Error, Result};
use crate::window::Axis;

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
    /// Whether a relative positional bias is added (`for_qk`).
    pub rpb: bool,
    /// Whether every offset into the bias is below 2^32 (true without one): the tensor-core
    /// kernels address it in 32 bits.
    pub rpb_fits_32_bits: bool,
    /// Whether every row of the tensor the tensor-core kernels stage (the keys of `for_qk`, the
    /// values of `for_av`) is dense and 16-byte aligned (`TensorRef::rows_dense_and_aligned`):
    /// their variants then stage by 16-byte copies alone (`KernelKey::dense_rows`).
    pub rows_dense: bool,
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
        p.rows_dense = key.rows_dense_and_aligned();
        if let Some(rpb) = rpb {
            p.expect("rpb", rpb, &p.rpb_shape())?;
            p.rpb = true;
            p.rpb_fits_32_bits = rpb.offsets_fit_32_bits();
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
        p.rows_dense = value.rows_dense_and_aligned();
        if let Some(extra) = additional_values {
            p.extra = p.extra_count("additional_values", extra)?;
        }
        p.expect("attn", attn, &p.attn_shape())?;
        Ok(p)
    }

    /// The padded kernel sizes and causal flags of an unfused neighborhood, checked by the ops'
    /// rules; for compiling kernels ahead of time, when no tensor gives the lengths.
    pub fn kernel_shape(kernel: Vec<i64>, causal: Vec<bool>) -> Result<([usize; 3], [bool; 3])> {
        let dilation = vec![1; kernel.len()];
        let nbhd = Neighborhood::unfused(kernel, dilation, causal);
        rank_of(&nbhd)?;
        // Lengths equal to the kernel sizes: the smallest inputs the kernels accept.
        let spatial: Vec<usize> = nbhd.kernel.iter().map(|&k| k.max(0) as usize).collect();
        let axes = axes(&spatial, &nbhd, Family::Unfused)?;
        Ok((axes.map(|a| a.kernel), axes.map(|a| a.causal)))
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
        expect_writable(arg, out, inputs)
    }
    /// Build the problem's sizes from a token tensor `[B, heads, *spatial, dim]`.
    fn from_tokens(arg: &'static str, t: &TensorRef, nbhd: &Neighborhood) -> Result<Problem> {
        let rank = rank_of(nbhd)?;
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
        if !nbhd.stride.is_empty() {
            return Err(Error::invalid(
                "stride",
                "no stride (unfused ops)",
                format!("{:?}", nbhd.stride),
            ));
        }
        let axes = axes(&t.shape[2..2 + rank], nbhd, Family::Unfused)?;
        Ok(Problem {
            rank,
            batch: t.shape[0],
            heads: t.shape[1],
            axes,
            dim: t.shape[rank + 2],
            extra: 0,
            rpb: false,
            rpb_fits_32_bits: true,
            rows_dense: false,
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
        expect_tensor(arg, t, self.dtype, self.device, shape)
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
