//! What to launch for each op: the `#[repr(C)]` parameter block that kernels/common.cuh
//! mirrors (`NaParams`), the strided views of the borrowed tensors, and the grid. Pure
//! planning: nothing here touches the device, so every plan is testable without a GPU.
//!
//! The ops are the same compositions of window primitives as on the CPU (cpu/mod.rs): logits
//! and `d_attn` are `Pairwise`; the output and `d_query` are `Gather`; `d_key` and `d_value` are
//! `Scatter` (a gather over inverse windows); extra-token gradients are `ExtraGrad`; `d_rpb` is
//! `BiasGradTiles` then `BiasGradSum` where the caller gives their scratch (`bias_scratch_len`),
//! else `BiasGrad`.

use super::fused_launch::{
    indices_fit_32_bits, takes_tensor_cores as source_takes, TC_ROWS, TC_THREADS,
};
use super::kernels::{Function, Source, BIAS_TILE_ROWS, BLOCK, EXTRA_ROWS, REDUCE_THREADS};
use super::tiling::TcTiling;
use crate::cpu::{AvGrads, AvTensors, QkGrads, QkTensors};
use crate::dlpack::{DType, TensorRef};
use crate::layout;
use crate::problem::Problem;

/// A strided tensor in the kernels' six logical axes (`NaView`). Strides are in elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Device address of element `[0, 0, ...]`.
    pub data: u64,
    /// Stride of each logical axis; 0 for axes the tensor lacks.
    pub stride: [i64; 6],
}

impl View {
    /// `t` with its logical strides (from `layout`).
    pub fn with(t: &TensorRef, stride: [isize; 6]) -> View {
        View {
            data: t.data as u64,
            stride: stride.map(|s| s as i64),
        }
    }

    /// A token tensor `[B, heads, *spatial, C]` of any rank as `[b, h, s0, s1, s2, c]`.
    pub fn tokens(t: &TensorRef) -> View {
        View::with(t, layout::tokens(t))
    }

    /// An additional-token tensor `[B, heads, n, C]` as rows `[b, h, e, -, -, c]`.
    pub fn extras(t: &TensorRef) -> View {
        View::extra_rows(t, layout::extras(t))
    }

    /// Additional-token strides `[b, h, e, c]` as rows `[b, h, e, -, -, c]`.
    pub fn extra_rows(t: &TensorRef, [b, h, e, c]: [isize; 4]) -> View {
        View::with(t, [b, h, e, 0, 0, c])
    }

    /// A bias tensor `[heads, 2K-1, ...]` of any rank as `[h, r0, r1, r2, -, -]`.
    pub fn bias(t: &TensorRef) -> View {
        let [h, r0, r1, r2] = layout::bias(t);
        View::with(t, [h, r0, r1, r2, 0, 0])
    }
}

/// The kernels' parameter block (`NaParams` in kernels/common.cuh), passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// The output.
    pub out: View,
    /// Query-side rows.
    pub a: View,
    /// Key-side rows.
    pub b: View,
    /// Window weights (attention or its gradient).
    pub w: View,
    /// Additional tokens.
    pub extra: View,
    /// Relative positional bias.
    pub bias: View,
    /// Batch size.
    pub batch: i64,
    /// Heads.
    pub heads: i64,
    /// Tokens per (padded) axis.
    pub length: [i64; 3],
    /// Dilation per (padded) axis.
    pub dilation: [i64; 3],
    /// Channels of the rows that are dotted or summed.
    pub dim: i64,
    /// Additional tokens after the window slots.
    pub extra_count: i64,
    /// Whether `extra` is given (0 or 1).
    pub has_extra: i32,
    /// Whether `bias` is given (0 or 1).
    pub has_bias: i32,
    /// Whether empty causal slots hold -inf rather than 0 (0 or 1).
    pub neg_inf_fill: i32,
    /// Channels a thread of `Gather`/`Scatter` takes: 1, or a 16-byte run (`channel_run`).
    pub run: i32,
    /// The query tiles of the tensor-core kernels (zeros otherwise).
    pub tiling: TcTiling,
}

// The static_asserts of common.cuh check the same sizes on the device side.
const _: () = assert!(std::mem::size_of::<View>() == 56);
const _: () = assert!(
    std::mem::size_of::<Params>() == 6 * 56 + 10 * 8 + 4 * 4 + std::mem::size_of::<TcTiling>()
);

impl Params {
    /// The problem's sizes, with no tensors yet.
    fn of(p: &Problem) -> Params {
        Params {
            batch: p.batch as i64,
            heads: p.heads as i64,
            length: p.axes.map(|a| a.length as i64),
            dilation: p.axes.map(|a| a.dilation as i64),
            dim: p.dim as i64,
            extra_count: p.extra as i64,
            ..Params::default()
        }
    }

    fn with_extra(mut self, extra: Option<&TensorRef>) -> Params {
        self.extra = extra.map(View::extras).unwrap_or_default();
        self.has_extra = i32::from(extra.is_some());
        self
    }
}

/// Grid and block shape of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Blocks (one-dimensional grid; kernels loop over any excess work).
    pub grid: u32,
    /// Threads per block `(x, y)`.
    pub block: (u32, u32),
}

/// The largest one-dimensional grid CUDA allows.
const MAX_GRID: u64 = (1 << 31) - 1;

impl Config {
    /// `work` units of `per_block` each: enough blocks to cover them, capped at the grid limit.
    pub(super) fn covering(work: u64, per_block: u32, block: (u32, u32)) -> Config {
        Config {
            grid: work.div_ceil(u64::from(per_block)).min(MAX_GRID) as u32,
            block,
        }
    }
}

/// One kernel launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Which kernel.
    pub function: Function,
    /// Its argument.
    pub params: Params,
    /// Its shape.
    pub config: Config,
}

impl Launch {
    /// A launch of `function` with `params`, shaped for the work it has; `None` when there is
    /// no output to write (CUDA refuses empty grids).
    fn new(function: Function, p: &Problem, mut params: Params) -> Option<Launch> {
        let rows = (p.batch * p.heads * p.tokens()) as u64;
        let config = match function {
            // One thread per query row, for all of its slots.
            Function::Pairwise => Config::covering(rows, BLOCK, (BLOCK, 1)),
            Function::Gather | Function::Scatter => {
                params.run = channel_run(function, p, &params);
                Config::covering(rows * (p.dim as u64 / params.run as u64), BLOCK, (BLOCK, 1))
            }
            // One block per tile of queries of every (batch, head).
            Function::PairwiseTc | Function::GatherTc => {
                params.tiling = TcTiling::new(&p.axes, TC_ROWS, p.heads);
                Config::covering(params.tiling.tasks(p.batch) as u64, 1, (TC_THREADS, 1))
            }
            Function::ExtraGrad => {
                let blocks = (p.batch * p.heads * p.extra * p.dim.div_ceil(32)) as u64;
                Config::covering(blocks, 1, (32, EXTRA_ROWS))
            }
            // The fused kernels take their own parameter blocks (fused_launch.rs).
            Function::FusedForward
            | Function::FusedForwardTc
            | Function::FusedBackwardQuery
            | Function::FusedBackwardKeys
            | Function::FusedBackwardExtras
            | Function::FusedBackwardBias
            | Function::FusedBackwardQueryTc
            | Function::FusedBackwardKeysTc
            | Function::FusedBackwardExtrasTc
            | Function::FusedBackwardBiasSlicesTc
            | Function::FusedBackwardBiasTc => return None,
            Function::BiasGrad => {
                Config::covering((p.heads * bias_span(p)) as u64, 1, (REDUCE_THREADS, 1))
            }
            Function::BiasGradTiles => {
                let tiles = p.batch * p.heads * p.tokens().div_ceil(BIAS_TILE_ROWS);
                Config::covering(tiles as u64, 1, (REDUCE_THREADS, 1))
            }
            Function::BiasGradSum => {
                let chunks = p.heads * bias_span(p).div_ceil(32);
                Config::covering(chunks as u64, 1, (REDUCE_THREADS, 1))
            }
        };
        (config.grid > 0).then_some(Launch {
            function,
            params,
            config,
        })
    }
}

/// Channels a `Gather` or `Scatter` thread takes: the 16 bytes one load moves, where the rows it
/// reads along channels and the output rows are dense, and every row and run starts 16-byte
/// aligned (each view's address and its strides past the channel axis in whole runs, and `dim`
/// in whole runs); else 1.
fn channel_run(function: Function, p: &Problem, params: &Params) -> i32 {
    let run = 16 / p.dtype.size();
    let views = match function {
        Function::Gather if params.has_extra != 0 => vec![&params.out, &params.b, &params.extra],
        Function::Gather => vec![&params.out, &params.b],
        Function::Scatter => vec![&params.out, &params.a],
        _ => return 1,
    };
    let aligned = |v: &View| {
        v.stride[5] == 1
            && v.data.is_multiple_of(16)
            && v.stride[..5].iter().all(|s| s % run as i64 == 0)
    };
    if p.dim.is_multiple_of(run) && views.into_iter().all(aligned) {
        run as i32
    } else {
        1
    }
}

/// Shared memory a block of the unfused tensor-core kernels takes (na_unfused_tc.cu): two slabs
/// of 64 staged rows (channels padded to whole 16-channel steps, then skewed by 8) with a 4-byte
/// key number per row, a tile of `TC_ROWS` rows of window slots (padded to an odd count), and a
/// bias table of a 4-byte number per slab row and one word (its entries are staged only where
/// they fit beside the rest).
fn tensor_core_shared_bytes(dtype: DType, dim: usize, slots: usize) -> usize {
    const SLAB: usize = 64;
    let slabs = 2 * SLAB * ((dim.next_multiple_of(16) + 8) * dtype.size() + 4);
    let bias_table = 4 * (SLAB + 1);
    slabs + TC_ROWS * (slots | 1) * dtype.size() + bias_table
}

/// Static shared memory a kernel may take (no opt-in).
const STATIC_SHARED_BYTES: usize = 48 * 1024;

/// Whether the window products of `dtype` rows of `dim` channels over `slots` window slots and
/// `extra` additional tokens fit the tensor-core kernels (na_unfused_tc.cu): half types, head
/// dims in eights up to 128, no additional tokens, and a slot tile that fits beside the slabs.
pub fn products_take_tensor_cores(dtype: DType, dim: usize, slots: usize, extra: usize) -> bool {
    extra == 0
        && source_takes(Source::UnfusedTc, dtype, (dim, dim))
        && tensor_core_shared_bytes(dtype, dim, slots) <= STATIC_SHARED_BYTES
}

/// `products_take_tensor_cores` for problem `p`, whose indices fit the kernels' 32 bits
/// (`indices_fit_32_bits`), as do the offsets into its bias.
pub fn takes_tensor_cores(p: &Problem) -> bool {
    let slots = p.axes.iter().map(|a| a.kernel).product();
    products_take_tensor_cores(p.dtype, p.dim, slots, p.extra)
        && indices_fit_32_bits(p.batch, p.heads, &p.axes, p.extra)
        && p.rpb_fits_32_bits
}

/// The kernels of the window products: on tensor cores (where the problem takes them and the
/// device has them) or not.
#[derive(Clone, Copy)]
struct Products {
    pairwise: Function,
    gather: Function,
}

impl Products {
    fn on(tensor_cores: bool) -> Products {
        match tensor_cores {
            true => Products {
                pairwise: Function::PairwiseTc,
                gather: Function::GatherTc,
            },
            false => Products {
                pairwise: Function::Pairwise,
                gather: Function::Gather,
            },
        }
    }
}

/// Forward `qk`: logits into `attn`; the window products on tensor cores where `tensor_cores`
/// (the problem takes them, `takes_tensor_cores`, and the device has them), as in every plan
/// below.
pub fn qk(p: &Problem, t: &QkTensors, attn: &TensorRef, tensor_cores: bool) -> Vec<Launch> {
    let mut params = Params::of(p).with_extra(t.additional_keys);
    params.out = View::tokens(attn);
    params.a = View::tokens(t.query);
    params.b = View::tokens(t.key);
    params.bias = t.rpb.map(View::bias).unwrap_or_default();
    params.has_bias = i32::from(t.rpb.is_some());
    params.neg_inf_fill = 1;
    Launch::new(Products::on(tensor_cores).pairwise, p, params)
        .into_iter()
        .collect()
}

/// Forward `av`: the weighted sum into `out`.
pub fn av(p: &Problem, t: &AvTensors, out: &TensorRef, tensor_cores: bool) -> Vec<Launch> {
    let mut params = Params::of(p).with_extra(t.additional_values);
    params.out = View::tokens(out);
    params.w = View::tokens(t.attn);
    params.b = View::tokens(t.value);
    Launch::new(Products::on(tensor_cores).gather, p, params)
        .into_iter()
        .collect()
}

/// Entries of a head's bias table: `2 K - 1` per axis.
fn bias_span(p: &Problem) -> usize {
    p.axes.iter().map(|a| 2 * a.kernel - 1).product()
}

/// Whether `BiasGradTiles` takes problem `p`: a copy of the bias table per warp of its blocks,
/// in accumulators, fits 48 KiB of static shared memory (`NA_BIAS_TILES_FIT`).
pub fn bias_grad_takes_tiles(p: &Problem) -> bool {
    (REDUCE_THREADS as usize / 32) * bias_span(p) * p.dtype.accumulator().size()
        <= STATIC_SHARED_BYTES
}

/// Accumulators of scratch `d_rpb` takes on CUDA (`BiasGradTiles`' rows: a table per tile of
/// `BIAS_TILE_ROWS` query rows of every batch and head), or 0 where it takes `BiasGrad`.
pub fn bias_scratch_len(p: &Problem) -> usize {
    if !bias_grad_takes_tiles(p) {
        return 0;
    }
    p.batch * p.heads * p.tokens().div_ceil(BIAS_TILE_ROWS) * bias_span(p)
}

/// Backward of `qk`: `d_query` (gather), `d_key` (scatter), then the reductions.
pub fn qk_backward(
    p: &Problem,
    d_attn: &TensorRef,
    t: &QkTensors,
    g: &QkGrads,
    tensor_cores: bool,
) -> Vec<Launch> {
    let base = Params {
        w: View::tokens(d_attn),
        ..Params::of(p)
    };
    let d_query = Params {
        out: View::tokens(g.d_query),
        b: View::tokens(t.key),
        ..base.with_extra(t.additional_keys)
    };
    let d_key = Params {
        out: View::tokens(g.d_key),
        a: View::tokens(t.query),
        ..base
    };
    let mut launches = vec![
        Launch::new(Products::on(tensor_cores).gather, p, d_query),
        Launch::new(Function::Scatter, p, d_key),
    ];
    if let Some(d_extra) = g.d_additional_keys {
        let params = Params {
            out: View::extras(d_extra),
            a: View::tokens(t.query),
            ..base
        };
        launches.push(Launch::new(Function::ExtraGrad, p, params));
    }
    if let Some(d_rpb) = g.d_rpb {
        let params = Params {
            out: View::bias(d_rpb),
            ..base
        };
        match g.bias_scratch.filter(|_| bias_scratch_len(p) > 0) {
            Some(scratch) => {
                // The kernels find their scratch at the bias's address (a backward has none).
                let params = Params {
                    bias: View::with(scratch, [0; 6]),
                    ..params
                };
                launches.push(Launch::new(Function::BiasGradTiles, p, params));
                launches.push(Launch::new(Function::BiasGradSum, p, params));
            }
            None => launches.push(Launch::new(Function::BiasGrad, p, params)),
        }
    }
    launches.into_iter().flatten().collect()
}

/// Backward of `av`: `d_attn` (pairwise, 0 in empty slots), `d_value` (scatter), and the
/// extra-value reduction.
pub fn av_backward(
    p: &Problem,
    d_out: &TensorRef,
    t: &AvTensors,
    g: &AvGrads,
    tensor_cores: bool,
) -> Vec<Launch> {
    let d_attn = Params {
        out: View::tokens(g.d_attn),
        a: View::tokens(d_out),
        b: View::tokens(t.value),
        ..Params::of(p).with_extra(t.additional_values)
    };
    let d_value = Params {
        out: View::tokens(g.d_value),
        w: View::tokens(t.attn),
        a: View::tokens(d_out),
        ..Params::of(p)
    };
    let mut launches = vec![
        Launch::new(Products::on(tensor_cores).pairwise, p, d_attn),
        Launch::new(Function::Scatter, p, d_value),
    ];
    if let Some(d_extra) = g.d_additional_values {
        let params = Params {
            out: View::extras(d_extra),
            w: View::tokens(t.attn),
            a: View::tokens(d_out),
            ..Params::of(p)
        };
        launches.push(Launch::new(Function::ExtraGrad, p, params));
    }
    launches.into_iter().flatten().collect()
}

#[cfg(test)]
#[path = "launch_tests.rs"]
mod tests;
