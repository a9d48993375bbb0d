//! The fused ops: `out = softmax(scale * q.k (+ rpb)) . v` over each query's neighborhood plus
//! the additional tokens, heads-last `[B, *spatial, heads, D]`, with GQA/MQA and `Dv != D`.

use super::{axes, expect_tensor, expect_writable, rank_of, Family, Neighborhood};
use crate::dlpack::{DType, Device, TensorRef};
use crate::error::{Error, Result};
use crate::window::Axis;

/// The tensors of a fused problem (`key`/`value` absent only for dense attention over the
/// additional tokens).
#[derive(Clone, Copy, Default)]
pub struct FusedInputs<'a> {
    /// `[B, *spatial, heads, D]`.
    pub query: Option<&'a TensorRef>,
    /// `[B, *spatial, heads_kv, D]`.
    pub key: Option<&'a TensorRef>,
    /// `[B, *spatial, heads_kv, Dv]`.
    pub value: Option<&'a TensorRef>,
    /// `[B, n_extra, heads_kv, D]`.
    pub additional_keys: Option<&'a TensorRef>,
    /// `[B, n_extra, heads_kv, Dv]`.
    pub additional_values: Option<&'a TensorRef>,
    /// `[heads, 2K0-1, ...]`.
    pub rpb: Option<&'a TensorRef>,
}

/// A validated fused neighborhood-attention problem.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedProblem {
    /// Number of spatial axes the caller used (1 to 3).
    pub rank: usize,
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`; query head `h` reads kv head `h / (heads / heads_kv)`).
    pub heads_kv: usize,
    /// The three spatial axes; the first `3 - rank` are unit axes.
    pub axes: [Axis; 3],
    /// Whether queries attend their neighborhood (false: only the additional tokens).
    pub window: bool,
    /// Channels per head of queries and keys.
    pub dim: usize,
    /// Channels per head of values and outputs.
    pub dim_v: usize,
    /// Additional tokens every query attends.
    pub extra: usize,
    /// Whether a relative positional bias is added.
    pub rpb: bool,
    /// Whether every offset into the bias is below 2^32 (true without one): the tensor-core
    /// kernels address it in 32 bits.
    pub rpb_fits_32_bits: bool,
    /// Whether every row the tensor-core kernels stage is dense and 16-byte aligned
    /// (`TensorRef::rows_dense_and_aligned`): the query, key, value and additional tokens' rows,
    /// and for a backward the output gradient's (`with_output_gradient`). Their variants then
    /// stage by 16-byte copies alone (`KernelKey::dense_rows`).
    pub rows_dense: bool,
    /// Whether tensor maps can describe the keys and values (`TensorRef::fits_tensor_maps`),
    /// so that sm_90's bulk tensor copies may stage them (cuda/tma.rs).
    pub kv_tensor_maps: bool,
    /// Whether tensor maps can describe the queries and, for a backward, the output gradient
    /// (`with_output_gradient`): the backward's key kernel stages those (cuda/tma.rs).
    pub query_tensor_maps: bool,
    /// Logit scale.
    pub scale: f64,
    /// Element type of every tensor but `lse` (float32).
    pub dtype: DType,
    /// Device of every tensor.
    pub device: Device,
}

impl FusedProblem {
    /// The problem of a backward whose output gradient is `d_out`, whose rows are staged too
    /// (`rows_dense`, `query_tensor_maps`).
    pub fn with_output_gradient(mut self, d_out: &TensorRef) -> FusedProblem {
        self.rows_dense &= d_out.rows_dense_and_aligned();
        self.query_tensor_maps &= d_out.fits_tensor_maps();
        self
    }

    /// Validate a fused problem. An empty `nbhd.kernel` means dense attention: no neighborhood,
    /// no key/value, every query attends all additional tokens.
    pub fn new(t: &FusedInputs, nbhd: &Neighborhood, scale: f64) -> Result<FusedProblem> {
        let query = t
            .query
            .ok_or_else(|| Error::invalid("query", "a tensor", "None"))?;
        let window = !nbhd.kernel.is_empty();
        let rank = if window {
            rank_of(nbhd)?
        } else {
            query.shape.len().saturating_sub(3)
        };
        let dtype = query.float_dtype("query")?;
        if query.shape.len() != rank + 3 || rank == 0 {
            let expected = if window {
                format!(
                    "a {}-D tensor [batch, {rank} spatial axes, heads, dim]",
                    rank + 3
                )
            } else {
                "a 4-D to 6-D tensor [batch, tokens (1 to 3 axes), heads, dim]".into()
            };
            return Err(Error::invalid(
                "query",
                expected,
                format!("shape {:?}", query.shape),
            ));
        }
        let spatial = &query.shape[1..=rank];
        let mut p = FusedProblem {
            rank,
            batch: query.shape[0],
            heads: query.shape[rank + 1],
            heads_kv: query.shape[rank + 1],
            axes: [Axis::UNIT; 3],
            window,
            dim: query.shape[rank + 2],
            dim_v: query.shape[rank + 2],
            extra: 0,
            rpb: t.rpb.is_some(),
            rpb_fits_32_bits: t.rpb.is_none_or(TensorRef::offsets_fit_32_bits),
            rows_dense: [t.key, t.value, t.additional_keys, t.additional_values]
                .into_iter()
                .flatten()
                .chain([query])
                .all(TensorRef::rows_dense_and_aligned),
            kv_tensor_maps: [t.key, t.value]
                .into_iter()
                .all(|t| t.is_some_and(TensorRef::fits_tensor_maps)),
            query_tensor_maps: query.fits_tensor_maps(),
            scale,
            dtype,
            device: query.device,
        };
        if p.dim == 0 {
            let got = format!("shape {:?}", query.shape);
            return Err(Error::invalid("query", "a head dim of at least 1", got));
        }
        if !scale.is_finite() {
            return Err(Error::invalid(
                "scale",
                "a finite number",
                scale.to_string(),
            ));
        }
        if window {
            p.axes = axes(spatial, nbhd, Family::Fused)?;
            p.check_key_value(t)?;
        } else {
            for (n, &length) in spatial.iter().enumerate() {
                p.axes[3 - rank + n] = Axis {
                    length,
                    ..Axis::UNIT
                };
            }
        }
        p.check_extras(t)?;
        if let Some(rpb) = t.rpb {
            p.check_rpb(rpb)?;
        }
        Ok(p)
    }

    /// Shape `[B, *spatial, heads, dim]` of a token tensor.
    pub fn token_shape(&self, heads: usize, dim: usize) -> Vec<usize> {
        let mut shape = vec![self.batch];
        shape.extend(self.spatial_axes().iter().map(|a| a.length));
        shape.extend([heads, dim]);
        shape
    }

    /// Shape `[B, *spatial, heads, Dv]` of the output.
    pub fn out_shape(&self) -> Vec<usize> {
        self.token_shape(self.heads, self.dim_v)
    }

    /// Shape `[B, *spatial, heads]` of the logsumexp.
    pub fn lse_shape(&self) -> Vec<usize> {
        let mut shape = self.out_shape();
        shape.pop();
        shape
    }

    /// Shape `[B, n_extra, heads_kv, dim]` of additional tokens.
    pub fn extra_shape(&self, dim: usize) -> Vec<usize> {
        vec![self.batch, self.extra, self.heads_kv, dim]
    }

    /// Shape `[heads, 2K-1, ...]` of the relative positional bias.
    pub fn rpb_shape(&self) -> Vec<usize> {
        let mut shape = vec![self.heads];
        shape.extend(self.spatial_axes().iter().map(|a| 2 * a.kernel - 1));
        shape
    }

    /// The axes the caller named (without padding).
    pub fn spatial_axes(&self) -> &[Axis] {
        &self.axes[3 - self.rank..]
    }

    /// Window slots per query (0 without a neighborhood).
    pub fn slots(&self) -> usize {
        if self.window {
            self.axes.iter().map(|a| a.kernel).product()
        } else {
            0
        }
    }

    /// Check that `t` has this problem's dtype (or `dtype`) and device and the given shape.
    pub fn expect(&self, arg: &'static str, t: &TensorRef, shape: &[usize]) -> Result<()> {
        expect_tensor(arg, t, self.dtype, self.device, shape)
    }

    /// Check an output: shape, `dtype`, device, dense, writable, sharing no memory with inputs.
    pub fn expect_output(
        &self,
        arg: &'static str,
        out: &TensorRef,
        (shape, dtype): (&[usize], DType),
        inputs: &[&TensorRef],
    ) -> Result<()> {
        expect_tensor(arg, out, dtype, self.device, shape)?;
        expect_writable(arg, out, inputs)
    }

    fn check_key_value(&mut self, t: &FusedInputs) -> Result<()> {
        let key = t
            .key
            .ok_or_else(|| Error::invalid("key", "a tensor", "None"))?;
        let value = t
            .value
            .ok_or_else(|| Error::invalid("value", "a tensor", "None"))?;
        self.heads_kv = self.kv_heads("key", key)?;
        self.expect("key", key, &self.token_shape(self.heads_kv, self.dim))?;
        self.dim_v = value.shape.last().copied().unwrap_or(0);
        if self.dim_v == 0 {
            let got = format!("shape {:?}", value.shape);
            return Err(Error::invalid("value", "a head dim of at least 1", got));
        }
        self.expect("value", value, &self.token_shape(self.heads_kv, self.dim_v))
    }

    fn check_extras(&mut self, t: &FusedInputs) -> Result<()> {
        let (keys, values) = match (t.additional_keys, t.additional_values) {
            (None, None) if self.window => return Ok(()),
            (Some(k), Some(v)) => (k, v),
            (None, _) => {
                return Err(Error::invalid(
                    "additional_keys",
                    "a tensor (with additional_values)",
                    "None",
                ))
            }
            (Some(_), None) => {
                return Err(Error::invalid(
                    "additional_values",
                    "a tensor (with additional_keys)",
                    "None",
                ))
            }
        };
        if keys.shape.len() != 4 {
            let got = format!("shape {:?}", keys.shape);
            return Err(Error::invalid(
                "additional_keys",
                "a 4-D tensor [batch, n_extra, heads_kv, dim]",
                got,
            ));
        }
        if !self.window {
            self.heads_kv = self.kv_heads("additional_keys", keys)?;
            self.dim_v = values.shape.last().copied().unwrap_or(0);
        }
        self.extra = keys.shape[1];
        self.expect("additional_keys", keys, &self.extra_shape(self.dim))?;
        self.expect("additional_values", values, &self.extra_shape(self.dim_v))
    }

    fn check_rpb(&self, rpb: &TensorRef) -> Result<()> {
        if !self.window {
            return Err(Error::invalid(
                "rpb",
                "None without a neighborhood",
                "a tensor",
            ));
        }
        if self
            .spatial_axes()
            .iter()
            .any(|a| a.kernel % 2 == 0 || a.stride != 1)
        {
            return Err(Error::Unsupported(
                "rpb with an even kernel_size or a stride > 1".into(),
            ));
        }
        self.expect("rpb", rpb, &self.rpb_shape())
    }

    /// Heads of a key-side tensor `[..., heads_kv, dim]`, which must divide the query heads.
    fn kv_heads(&self, arg: &'static str, t: &TensorRef) -> Result<usize> {
        let heads_kv = if t.shape.len() >= 2 {
            t.shape[t.shape.len() - 2]
        } else {
            0
        };
        if heads_kv == 0 || !self.heads.is_multiple_of(heads_kv) {
            let expected = format!("a number of heads dividing the query's {}", self.heads);
            return Err(Error::invalid(
                arg,
                expected,
                format!("shape {:?}", t.shape),
            ));
        }
        Ok(heads_kv)
    }
}
