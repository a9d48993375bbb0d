//! What to launch for the fused ops: the `#[repr(C)]` parameter block that kernels/common.cuh
//! mirrors (`NaFusedParams`), heads-last tensors as the kernels' six logical axes, and the grid
//! (one warp per query row). Pure planning, testable without a GPU.

use super::kernels::{Function, BLOCK};
use super::launch::{Config, View};
use crate::cpu::FusedTensors;
use crate::dlpack::TensorRef;
use crate::layout;
use crate::problem::FusedProblem;

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

/// One launch of a fused kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedLaunch {
    /// Which kernel.
    pub function: Function,
    /// Its argument.
    pub params: FusedParams,
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
    let rows = (p.batch * p.heads * tokens) as u64;
    let config = Config::covering(rows, BLOCK / WARP, (BLOCK, 1));
    (config.grid > 0).then_some(FusedLaunch {
        function: Function::FusedForward,
        params,
        config,
    })
}

#[cfg(test)]
#[path = "fused_launch_tests.rs"]
mod tests;
