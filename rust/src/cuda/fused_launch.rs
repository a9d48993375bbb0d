//! What to launch for the fused ops: the `#[repr(C)]` parameter blocks that the kernels mirror
//! (`NaFusedParams` in kernels/common.cuh, `NaFusedBwdParams` in kernels/na_fused_bwd.cu),
//! heads-last tensors as the kernels' six logical axes, and the grids (one warp per row). Pure
//! planning, testable without a GPU.

use super::kernels::{Function, KernelKey, Source, BIAS_SLICE, BLOCK, REDUCE_THREADS};
use super::launch::{Config, View};
use super::tiling::{tasks_fit_31_bits, TcTiling};
use super::tma::{self, Slabs, TmaParams};
use crate::cpu::{FusedGrads, FusedTensors, Saved};
use crate::dlpack::TensorRef;
use crate::layout;
use crate::problem::FusedProblem;
use crate::window::Axis;

/// Threads of a warp: the fused forward gives each query row one.
pub const WARP: u32 = 32;

impl View {
    /// A heads-last token tensor `[B, *spatial, heads, C]` (rank `rank`) as
    /// `[b, h, s0, s1, s2, c]`. Without `channels` the tensor is `[B, *spatial, heads]` (the
    /// logsumexp) and the channel stride is 0.
    pub fn heads_last(t: &TensorRef, rank: usize, channels: bool) -> View {
        View::with(t, layout::tokens_heads_last(t, rank, channels))
    }

    /// A heads-last additional-token tensor `[B, n, heads, C]` as rows `[b, h, e, -, -, c]`.
    pub fn extras_heads_last(t: &TensorRef) -> View {
        View::extra_rows(t, layout::extras_heads_last(t))
    }
}

/// The fused kernels' parameter block (`NaFusedParams` in kernels/common.cuh), by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FusedParams {
    /// The output `[b, h, s0, s1, s2, c]`.
    pub out: View,
    /// The logsumexp `[b, h, s0, s1, s2, -]`, float32.
    pub lse: View,
    /// Queries.
    pub query: View,
    /// Keys (indexed by kv head).
    pub key: View,
    /// Values (indexed by kv head).
    pub value: View,
    /// Additional keys `[b, kv head, e, -, -, c]`.
    pub extra_key: View,
    /// Additional values `[b, kv head, e, -, -, c]`.
    pub extra_value: View,
    /// Relative positional bias `[h, r0, r1, r2, -, -]`.
    pub bias: View,
    /// Batch size.
    pub batch: i64,
    /// Query heads.
    pub heads: i64,
    /// Query heads per kv head.
    pub group: i64,
    /// Tokens per (padded) axis.
    pub length: [i64; 3],
    /// Dilation per (padded) axis.
    pub dilation: [i64; 3],
    /// Additional tokens every query attends.
    pub extra_count: i64,
    /// Logit scale.
    pub scale: f64,
    /// Whether queries attend their neighborhood (0 or 1; 0 is dense attention over extras).
    pub has_window: i32,
    /// Whether `bias` is given (0 or 1).
    pub has_bias: i32,
}

// The static_assert of common.cuh checks the same size on the device side.
const _: () = assert!(std::mem::size_of::<FusedParams>() == 8 * 56 + 10 * 8 + 8 + 2 * 4);

/// One launch of a fused kernel, with its parameter block `P`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedLaunch<P = FusedParams> {
    /// Which kernel.
    pub function: Function,
    /// Its argument.
    pub params: P,
    /// Its shape.
    pub config: Config,
}

impl FusedParams {
    /// The problem's sizes and inputs.
    fn of(p: &FusedProblem, t: &FusedTensors) -> FusedParams {
        let tokens = |t: &TensorRef| View::heads_last(t, p.rank, true);
        let extras = |t: Option<&TensorRef>| t.map(View::extras_heads_last).unwrap_or_default();
        FusedParams {
            query: tokens(t.query),
            key: t.key.map(tokens).unwrap_or_default(),
            value: t.value.map(tokens).unwrap_or_default(),
            extra_key: extras(t.additional_keys),
            extra_value: extras(t.additional_values),
            bias: t.rpb.map(View::bias).unwrap_or_default(),
            batch: p.batch as i64,
            heads: p.heads as i64,
            group: (p.heads / p.heads_kv) as i64,
            length: p.axes.map(|a| a.length as i64),
            dilation: p.axes.map(|a| a.dilation as i64),
            extra_count: p.extra as i64,
            scale: p.scale,
            has_window: i32::from(p.window),
            has_bias: i32::from(t.rpb.is_some()),
            ..FusedParams::default()
        }
    }
}

/// The fused backward's parameter block (`NaFusedBwdParams` in kernels/na_fused_bwd.cu), by
/// value: the forward's block (its `out` is the forward's output) and the gradients.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FusedBackwardParams {
    /// Inputs and sizes as in the forward.
    pub forward: FusedParams,
    /// The gradient of the output `[b, h, s0, s1, s2, c]`.
    pub d_out: View,
    /// The gradient of the logsumexp `[b, h, s0, s1, s2, -]`, float32 (when `has_d_lse`).
    pub d_lse: View,
    /// Written gradients, laid out as the tensors they belong to.
    pub d_query: View,
    /// Of the keys.
    pub d_key: View,
    /// Of the values.
    pub d_value: View,
    /// Of the additional keys.
    pub d_extra_key: View,
    /// Of the additional values.
    pub d_extra_value: View,
    /// Of the bias `[h, r0, r1, r2, -, -]`.
    pub d_bias: View,
    /// Scratch: `(lse, delta)` per query row at the accumulator's precision, rows numbered
    /// `(b * heads + h) * tokens + token`.
    pub stats: u64,
    /// Whether `d_lse` is given (0 or 1).
    pub has_d_lse: i32,
    /// Padding to a multiple of 8 bytes (as in the kernel source).
    pub reserved: i32,
    /// The launch's tasks and tiles (the tensor-core kernels; zeros otherwise).
    pub tiling: TcTiling,
    /// The tensor maps of the bulk copies of the tensor-core d_query kernel (keys and values)
    /// or key kernel (queries and output gradients), at the next multiple of 128 bytes; zeros
    /// for other kernels and variants.
    pub tma: TmaParams,
}

// The static_assert of fused_bwd.cuh checks the same size on the device side.
const _: () = assert!(
    std::mem::size_of::<FusedBackwardParams>()
        == (std::mem::size_of::<FusedParams>()
            + 8 * 56
            + 8
            + 2 * 4
            + std::mem::size_of::<TcTiling>())
        .div_ceil(128)
            * 128
            + std::mem::size_of::<TmaParams>()
);

/// One launch of a fused backward kernel.
pub type FusedBackwardLaunch = FusedLaunch<FusedBackwardParams>;

/// Elements of the backward's `stats` scratch: `(lse, delta)` for each query row; and where the
/// tensor-core backward would sum `d_rpb` itself (`bias_grads_on_tensor_cores`), every query
/// tile's share of it and every slice's (`bias_sum_rows`).
pub fn backward_stats_len(p: &FusedProblem) -> usize {
    let tokens: usize = p.axes.iter().map(|a| a.length).product();
    let stats = 2 * p.batch * p.heads * tokens;
    let tensor_cores = takes_tensor_cores(Source::FusedBwdTc, p.dtype, (p.dim, p.dim_v))
        && fused_indices_fit_32_bits(p);
    if !(p.rpb && tensor_cores && bias_grads_on_tensor_cores(p)) {
        return stats;
    }
    let (tiles, slices) = bias_sum_rows(p);
    stats + p.heads * (tiles + slices) * bias_key(p).bias_span()
}

/// `indices_fit_32_bits` for fused problem `p`, whose bias the kernels must also address in 32
/// bits.
pub fn fused_indices_fit_32_bits(p: &FusedProblem) -> bool {
    indices_fit_32_bits(p.batch, p.heads, &p.axes, p.extra) && p.rpb_fits_32_bits
}

/// The tensor-core backward's variant for `p`.
fn bias_key(p: &FusedProblem) -> KernelKey {
    KernelKey::for_fused(Source::FusedBwdTc, p)
}

/// Whether the tensor-core backward of `p` sums `d_rpb` on its own kernels
/// (`KernelKey::bias_grads_on_tensor_cores`), not the warp kernel's.
fn bias_grads_on_tensor_cores(p: &FusedProblem) -> bool {
    bias_key(p).bias_grads_on_tensor_cores()
}

/// Rows of partial sums of `d_rpb` per head on tensor cores: one per query tile of the batch,
/// and one per slice of `BIAS_SLICE` of those.
fn bias_sum_rows(p: &FusedProblem) -> (usize, usize) {
    let tiles = p.batch
        * backward_tiling(p, Function::FusedBackwardBiasTc)
            .per_head
            .divisor as usize;
    (tiles, tiles.div_ceil(BIAS_SLICE))
}

/// One warp per row: enough blocks of `BLOCK` threads for `rows` rows.
fn warp_rows(rows: usize) -> Config {
    Config::covering(rows as u64, BLOCK / WARP, (BLOCK, 1))
}

/// The backward's kernels in launch order, each with its grid: `d_query` and the stats, then
/// `d_key` and `d_value`, the additional tokens' gradients (on tensor cores a tile of 64 rows
/// per block, else one warp per row) and `d_rpb` (on tensor cores, where its table is small
/// enough, two passes over the query tiles' sums; else one block per entry), each when the
/// problem has them and the grid is not empty.
pub fn backward_plan(
    p: &FusedProblem,
    grads: &FusedGrads,
    tensor_cores: bool,
) -> Vec<(Function, Config)> {
    let token_count: usize = p.axes.iter().map(|a| a.length).product();
    let keys = grads.d_key.is_some() && grads.d_value.is_some();
    let extras = grads.d_additional_keys.is_some() && grads.d_additional_values.is_some();
    let span: usize = p.axes.iter().map(|a| 2 * a.kernel - 1).product();
    // A block per task.
    let tile_blocks = |function| {
        let tasks = backward_tiling(p, function).tasks(p.batch);
        (function, Config::covering(tasks as u64, 1, (TC_THREADS, 1)))
    };
    let (query, key, extra) = if tensor_cores {
        (
            tile_blocks(Function::FusedBackwardQueryTc),
            tile_blocks(Function::FusedBackwardKeysTc),
            tile_blocks(Function::FusedBackwardExtrasTc),
        )
    } else {
        (
            (
                Function::FusedBackwardQuery,
                warp_rows(p.batch * p.heads * token_count),
            ),
            (
                Function::FusedBackwardKeys,
                warp_rows(p.batch * p.heads_kv * token_count),
            ),
            (
                Function::FusedBackwardExtras,
                warp_rows(p.batch * p.heads_kv * p.extra),
            ),
        )
    };
    let reduce = |items: usize, per_block: u32| {
        Config::covering(items as u64, per_block, (REDUCE_THREADS, 1))
    };
    let bias: Vec<(Function, Config)> = if tensor_cores && bias_grads_on_tensor_cores(p) {
        let slices = bias_sum_rows(p).1;
        vec![
            (
                Function::FusedBackwardBiasSlicesTc,
                reduce(p.heads * slices * span.div_ceil(WARP as usize), 1),
            ),
            (
                Function::FusedBackwardBiasTc,
                reduce(p.heads * span, REDUCE_THREADS),
            ),
        ]
    } else {
        vec![(Function::FusedBackwardBias, reduce(p.heads * span, 1))]
    };
    let wants_bias = grads.d_rpb.is_some();
    let plan = [(query, true), (key, keys), (extra, extras)]
        .into_iter()
        .chain(bias.into_iter().map(|launch| (launch, wants_bias)));
    plan.filter(|&((_, config), wanted)| wanted && config.grid > 0)
        .map(|(launch, _)| launch)
        .collect()
}

/// The tasks and tiles of backward kernel `function` on tensor cores (zeros for the warp
/// kernels): tiles of `TC_ROWS` queries over the query heads (the `d_rpb` sums follow them), the
/// same tiles of keys over the kv heads, and tiles of `TC_ROWS` additional tokens over the kv
/// heads.
pub fn backward_tiling(p: &FusedProblem, function: Function) -> TcTiling {
    match function {
        Function::FusedBackwardQueryTc
        | Function::FusedBackwardBiasSlicesTc
        | Function::FusedBackwardBiasTc => TcTiling::new(&p.axes, TC_ROWS, p.heads),
        Function::FusedBackwardKeysTc => TcTiling::new(&p.axes, TC_ROWS, p.heads_kv),
        Function::FusedBackwardExtrasTc => TcTiling::of_rows(p.extra, p.heads_kv),
        _ => TcTiling::default(),
    }
}

/// Backward, in launch order (`backward_plan`); `tensor_cores` picks the tensor-core kernels
/// for `d_query`, `d_key` and `d_value`, and `bulk_copies` gives their d_query and key kernels
/// the tensor maps of their bulk copies (their variant takes them: `KernelKey::tma`, in the host
/// build's encoding). `stats` is the scratch of `backward_stats_len` elements of the accumulator type.
pub fn backward(
    p: &FusedProblem,
    t: &FusedTensors,
    saved: &Saved,
    grads: &FusedGrads,
    stats: &TensorRef,
    (tensor_cores, bulk_copies): (bool, bool),
) -> Vec<FusedBackwardLaunch> {
    let tokens = |t: &TensorRef| View::heads_last(t, p.rank, true);
    let extras = |t: Option<&TensorRef>| t.map(View::extras_heads_last).unwrap_or_default();
    let params = FusedBackwardParams {
        forward: FusedParams {
            out: tokens(saved.out),
            lse: View::heads_last(saved.lse, p.rank, false),
            ..FusedParams::of(p, t)
        },
        d_out: tokens(saved.d_out),
        d_lse: saved
            .d_lse
            .map(|t| View::heads_last(t, p.rank, false))
            .unwrap_or_default(),
        d_query: tokens(grads.d_query),
        d_key: grads.d_key.map(tokens).unwrap_or_default(),
        d_value: grads.d_value.map(tokens).unwrap_or_default(),
        d_extra_key: extras(grads.d_additional_keys),
        d_extra_value: extras(grads.d_additional_values),
        d_bias: grads.d_rpb.map(View::bias).unwrap_or_default(),
        stats: stats.data as u64,
        has_d_lse: i32::from(saved.d_lse.is_some()),
        reserved: 0,
        ..FusedBackwardParams::default()
    };
    let maps = |slabs, tensors| match bulk_copies {
        true => bulk_copy_params(p, slabs, tensors, TC_ROWS),
        false => TmaParams::default(),
    };
    let f = &params.forward;
    let (query_maps, key_maps) = (
        maps(Slabs::Keys, [&f.key, &f.value]),
        maps(Slabs::Queries, [&f.query, &params.d_out]),
    );
    backward_plan(p, grads, tensor_cores)
        .into_iter()
        .map(|(function, config)| FusedBackwardLaunch {
            function,
            params: FusedBackwardParams {
                tiling: backward_tiling(p, function),
                tma: match function {
                    Function::FusedBackwardQueryTc => query_maps,
                    Function::FusedBackwardKeysTc => key_maps,
                    _ => TmaParams::default(),
                },
                ..params
            },
            config,
        })
        .collect()
}

/// Forward: `out` and `lse`, one warp per query row; `None` when there is no row (CUDA refuses
/// empty grids).
pub fn forward(
    p: &FusedProblem,
    t: &FusedTensors,
    out: &TensorRef,
    lse: &TensorRef,
) -> Option<FusedLaunch> {
    let params = FusedParams {
        out: View::heads_last(out, p.rank, true),
        lse: View::heads_last(lse, p.rank, false),
        ..FusedParams::of(p, t)
    };
    let tokens: usize = p.axes.iter().map(|a| a.length).product();
    let config = warp_rows(p.batch * p.heads * tokens);
    (config.grid > 0).then_some(FusedLaunch {
        function: Function::FusedForward,
        params,
        config,
    })
}

/// The tensor-core forward's parameter block (`NaFusedTcParams` in kernels/na_fused_tc.cu): the
/// forward's, how the queries are tiled, and the bulk copies' tensor maps (variants that take
/// them: `KernelKey::tma`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FusedTcParams {
    /// Inputs, outputs and sizes as in the forward.
    pub forward: FusedParams,
    /// The query tiles.
    pub tiling: TcTiling,
    /// The tensor maps (at the next multiple of 128 bytes; zeros but with the bulk copies).
    pub tma: TmaParams,
}

// The static_assert of na_fused_tc.cu checks the same size on the device side.
const _: () = assert!(
    std::mem::size_of::<FusedTcParams>()
        == (std::mem::size_of::<FusedParams>() + std::mem::size_of::<TcTiling>()).div_ceil(128)
            * 128
            + std::mem::size_of::<TmaParams>()
);

/// Warps per block of the tensor-core kernels (the forward's may take more:
/// `KernelKey::tensor_core_warps`).
pub const TC_WARPS: usize = 4;
/// Rows per tile of the tensor-core kernels: sixteen per warp.
pub const TC_ROWS: usize = 16 * TC_WARPS;
/// Threads per block of the tensor-core kernels.
pub const TC_THREADS: u32 = WARP * TC_WARPS as u32;

/// Whether tensor-core source `source` takes problems of `dtype` with head dims `(query/key,
/// value)`: the dtypes it compiles for, and head dims that are multiples of 8 up to its limit.
pub fn takes_tensor_cores(
    source: Source,
    dtype: crate::dlpack::DType,
    (dim, dim_v): (usize, usize),
) -> bool {
    let dims_fit = |d: usize| d > 0 && d.is_multiple_of(8) && d <= source.max_dim();
    source.dtypes().contains(&dtype) && dims_fit(dim) && dims_fit(dim_v)
}

/// Whether every index the tensor-core kernels (fused and unfused) form for a problem fits their
/// 32 bits: batch and head numbers, additional tokens, the tokens of one (batch, head), which
/// bound each position along an axis and each column of a key box, and the task numbers, which
/// they divide in 31 (`tasks_fit_31_bits`). Larger problems take the other kernels, which index
/// in 64 bits.
pub fn indices_fit_32_bits(batch: usize, heads: usize, axes: &[Axis; 3], extra: usize) -> bool {
    let tokens = axes.iter().try_fold(1usize, |n, a| n.checked_mul(a.length));
    let fits = |n: usize| n <= i32::MAX as usize;
    tokens.is_some_and(fits)
        && [batch, heads, extra].into_iter().all(fits)
        && tasks_fit_31_bits(batch, heads, axes, extra)
}

/// The tensor-core forward of variant `key`, in blocks of its warps
/// (`KernelKey::tensor_core_warps`): one per query tile (sixteen queries a warp) of every
/// `(batch, head)`, with the tensor maps of its bulk copies where it takes them (in the host
/// build's encoding); `None` when there is no query.
pub fn tensor_core_forward(
    p: &FusedProblem,
    t: &FusedTensors,
    out: &TensorRef,
    lse: &TensorRef,
    key: &KernelKey,
) -> Option<FusedLaunch<FusedTcParams>> {
    let plain = forward(p, t, out, lse)?;
    let warps = key.tensor_core_warps();
    let rows = 16 * warps;
    let tiling = TcTiling::new(&p.axes, rows, p.heads);
    let tma = match key.tma {
        true => bulk_copy_params(
            p,
            Slabs::Keys,
            [&plain.params.key, &plain.params.value],
            rows,
        ),
        false => TmaParams::default(),
    };
    Some(FusedLaunch {
        function: Function::FusedForwardTc,
        params: FusedTcParams {
            forward: plain.params,
            tiling,
            tma,
        },
        config: Config::covering(tiling.tasks(p.batch) as u64, 1, (WARP * warps as u32, 1)),
    })
}

/// The tensor maps of `tensors`, staged as `slabs` for tiles of `rows` (a variant takes bulk
/// copies only where `tma::takes_bulk_copies` found them plannable).
fn bulk_copy_params(p: &FusedProblem, slabs: Slabs, tensors: [&View; 2], rows: usize) -> TmaParams {
    tma::params(p, slabs, tensors, rows)
        .expect("variants take bulk copies only where the tensors' maps can be planned")
}

#[cfg(test)]
#[path = "fused_launch_tests.rs"]
pub(crate) mod tests;
