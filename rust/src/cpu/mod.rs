//! CPU kernels, one task per `(batch, head, token)` row (`parallel` says on which threads).
//! The unfused ops and all their gradients are compositions of four window primitives:
//! `pairwise` (dots over a window), `gather` (weighted sum over a window), `scatter` (its
//! transpose, over inverse windows) and the reductions onto extra tokens and the bias. The fused
//! op (`fused`, `fused_bwd`, `fused_chunks`, `fused_sums`, `fused_kv`) keeps one query's logits
//! in scratch and never builds the attention matrix; `simd` holds the explicit SIMD tiers (AVX2,
//! AVX-512) both families run on.

mod av;
mod element;
mod fused;
mod fused_bwd;
mod fused_chunks;
mod fused_kv;
mod fused_sums;
mod grid;
mod keys;
mod math;
mod pages;
mod parallel;
mod qk;
mod simd;
mod stage;
mod view;

use half::{bf16, f16};

use crate::dlpack::{DType, TensorRef};
use crate::problem::{FusedProblem, Problem};
use av::{extra_grad, gather, scatter};
use grid::Grid;
use pages::prefer_huge_pages;
use qk::{bias_grad, pairwise, Pairwise};
use view::{bias, extras, tokens};

/// Run `$body` with `$T` bound to the Rust element type of `$dtype`.
macro_rules! with_element {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
        }
    };
}

/// Tensors of `attn = query . key^T` (+ rpb, + additional keys).
pub struct QkTensors<'a> {
    /// `[B, heads, *spatial, D]`.
    pub query: &'a TensorRef,
    /// `[B, heads, *spatial, D]`.
    pub key: &'a TensorRef,
    /// `[heads, 2K-1, ...]`; in the backward pass, the bias gradient to write.
    pub rpb: Option<&'a TensorRef>,
    /// `[B, heads, n_extra, D]`; in the backward pass, also its gradient.
    pub additional_keys: Option<&'a TensorRef>,
}

/// Tensors of `out = attn . value` (+ additional values).
pub struct AvTensors<'a> {
    /// `[B, heads, *spatial, prod(K) + n_extra]`.
    pub attn: &'a TensorRef,
    /// `[B, heads, *spatial, D]`.
    pub value: &'a TensorRef,
    /// `[B, heads, n_extra, D]`.
    pub additional_values: Option<&'a TensorRef>,
}

/// Forward `qk` into `attn`.
pub fn qk(p: &Problem, t: &QkTensors, attn: &TensorRef) {
    prefer_huge_pages([attn]);
    with_element!(p.dtype, T => {
        let op = Pairwise::<T> {
            a: tokens(t.query),
            b: tokens(t.key),
            extra: t.additional_keys.map(extras),
            bias: t.rpb.map(bias),
            mask_with_neg_inf: true,
        };
        pairwise(&Grid::new(p), &op, tokens(attn));
    })
}

/// Forward `av` into `out`.
pub fn av(p: &Problem, t: &AvTensors, out: &TensorRef) {
    prefer_huge_pages([out]);
    with_element!(p.dtype, T => {
        let extra = t.additional_values.map(extras::<T>);
        gather(&Grid::new(p), tokens(t.attn), tokens(t.value), extra, tokens(out));
    })
}

/// Gradients of `qk`, given `d_attn`.
pub struct QkGrads<'a> {
    /// `[B, heads, *spatial, D]`.
    pub d_query: &'a TensorRef,
    /// `[B, heads, *spatial, D]`.
    pub d_key: &'a TensorRef,
    /// `[heads, 2K-1, ...]`, when the forward had a bias.
    pub d_rpb: Option<&'a TensorRef>,
    /// `[B, heads, n_extra, D]`, when the forward had additional keys.
    pub d_additional_keys: Option<&'a TensorRef>,
    /// Scratch for the CUDA kernels of `d_rpb` (`cuda::bias_scratch_len` accumulators; the CPU
    /// kernels take none).
    pub bias_scratch: Option<&'a TensorRef>,
}

/// Backward of `qk`: `d_query = d_attn . key`, `d_key = d_attn^T . query`, and the reductions.
pub fn qk_backward(p: &Problem, d_attn: &TensorRef, t: &QkTensors, grads: &QkGrads) {
    let optional = [grads.d_rpb, grads.d_additional_keys];
    prefer_huge_pages(
        [grads.d_query, grads.d_key]
            .into_iter()
            .chain(optional.into_iter().flatten()),
    );
    let g = Grid::new(p);
    with_element!(p.dtype, T => {
        let d_logits = tokens::<T>(d_attn);
        let extra = t.additional_keys.map(extras::<T>);
        gather(&g, d_logits, tokens(t.key), extra, tokens(grads.d_query));
        scatter(&g, d_logits, tokens(t.query), tokens(grads.d_key));
        if let Some(d_extra) = grads.d_additional_keys {
            extra_grad(&g, d_logits, tokens(t.query), extras(d_extra));
        }
        if let Some(d_rpb) = grads.d_rpb {
            bias_grad(&g, d_logits, bias(d_rpb));
        }
    })
}

/// Gradients of `av`, given `d_out`.
pub struct AvGrads<'a> {
    /// `[B, heads, *spatial, prod(K) + n_extra]`.
    pub d_attn: &'a TensorRef,
    /// `[B, heads, *spatial, D]`.
    pub d_value: &'a TensorRef,
    /// `[B, heads, n_extra, D]`, when the forward had additional values.
    pub d_additional_values: Option<&'a TensorRef>,
}

/// Backward of `av`: `d_attn = d_out . value^T` (0 in empty slots), `d_value = attn^T . d_out`.
pub fn av_backward(p: &Problem, d_out: &TensorRef, t: &AvTensors, grads: &AvGrads) {
    let optional = grads.d_additional_values;
    prefer_huge_pages([grads.d_attn, grads.d_value].into_iter().chain(optional));
    let g = Grid::new(p);
    with_element!(p.dtype, T => {
        let op = Pairwise::<T> {
            a: tokens(d_out),
            b: tokens(t.value),
            extra: t.additional_values.map(extras),
            bias: None,
            mask_with_neg_inf: false,
        };
        pairwise(&g, &op, tokens(grads.d_attn));
        scatter::<T>(&g, tokens(t.attn), tokens(d_out), tokens(grads.d_value));
        if let Some(d_extra) = grads.d_additional_values {
            extra_grad::<T>(&g, tokens(t.attn), tokens(d_out), extras(d_extra));
        }
    })
}

pub use fused::FusedTensors;
pub use fused_bwd::{FusedGrads, Saved};
pub use simd::{detected as detected_isa, isa, set_ceiling as set_isa_ceiling, Isa};

/// Fused forward into `out` and `lse`.
pub fn fused_forward(p: &FusedProblem, t: &FusedTensors, out: &TensorRef, lse: &TensorRef) {
    prefer_huge_pages([out, lse]);
    with_element!(p.dtype, T => fused::forward::<T>(p, t, out, lse))
}

/// Fused backward: every gradient in `grads`.
pub fn fused_backward(p: &FusedProblem, t: &FusedTensors, saved: &Saved, grads: &FusedGrads) {
    prefer_huge_pages(grads.all());
    with_element!(p.dtype, T => fused_bwd::backward::<T>(p, t, saved, grads))
}
