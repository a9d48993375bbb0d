"""torch.library custom ops over the Rust core: forward and backward ops, fakes, autograd.

Layouts (unfused ops, heads-first): tokens ``[B, heads, *spatial, D]``; attention weights
``[B, heads, *spatial, prod(kernel_size) + n_extra]``; additional tokens ``[B, heads, n_extra, D]``;
rpb ``[heads, 2*K0-1, ...]``. Every argument is already in its normal form here: one int/bool per
spatial axis. Validation happens in Rust; this module only allocates outputs and wires autograd.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from . import _core
from ._cuda import launch_stream


def _probe_versioned_export():
    """torch's versioned DLPack export itself, where this torch has it under the name and
    signature it has had since DLPack 1.0 support, else None.

    ``Tensor.__dlpack__`` wraps it in Python checks and stream handling that cost about 2 us a
    tensor, and an op call exports five or more: a fifth of the time of a call on a small problem.
    On the CPU, with the checks that matter made here (``_export_cpu``), the wrapper adds
    nothing."""
    export = getattr(torch._C, "_to_dlpack_versioned", None)
    if export is None:
        return None
    try:
        export(torch.zeros(1))
    except (TypeError, RuntimeError):  # a different signature: keep to the public protocol
        return None
    return export


_VERSIONED_EXPORT = _probe_versioned_export()


def dlpack(t: Optional[Tensor]):
    """A DLPack capsule lending ``t``'s memory (no copy), or None."""
    if t is None:
        return None
    if t.device.type == "cpu":
        return _export_cpu(t)
    t = t.detach()
    if t.device.type != "cuda":
        return _export(t, {})
    # stream=-1: no stream synchronisation (the kernels run on the current stream of the
    # tensor's device, like torch's own ops). torch exports CUDA tensors of the current device
    # only, hence the device guard.
    with torch.cuda.device(t.device):
        return _export(t, {"stream": -1})


def _export_cpu(t: Tensor):
    # The public protocol for what the fast path would export wrongly or not at all: tensor
    # subclasses (which may override it), conjugated views, non-strided layouts.
    plain = type(t) is Tensor and t.layout == torch.strided and not t.is_conj()
    if _VERSIONED_EXPORT is None or not plain:
        return _export(t.detach(), {})
    return _VERSIONED_EXPORT(t.detach() if t.requires_grad else t)


def _export(t: Tensor, kwargs: dict):
    try:
        return t.__dlpack__(max_version=(1, 0), **kwargs)
    except TypeError:  # torch without versioned DLPack
        return t.__dlpack__(**kwargs)


def _empty_like_rows(t: Tensor) -> Tensor:
    """Placeholder for an absent optional gradient (ops cannot return None)."""
    return t.new_empty(0)


def _extra_count(extra: Optional[Tensor]) -> int:
    return 0 if extra is None else extra.shape[-2]


def _attn_shape(query: Tensor, kernel_size: List[int], extra: Optional[Tensor]) -> list:
    return [*query.shape[:-1], math.prod(kernel_size) + _extra_count(extra)]


def _rpb_shape(query: Tensor, kernel_size: List[int]) -> list:
    return [query.shape[1], *(2 * k - 1 for k in kernel_size)]


# --- qk ------------------------------------------------------------------------------------------


@torch.library.custom_op("natten_rs::na_qk", mutates_args=())
def na_qk(
    query: Tensor,
    key: Tensor,
    rpb: Optional[Tensor],
    additional_keys: Optional[Tensor],
    kernel_size: List[int],
    dilation: List[int],
    is_causal: List[bool],
) -> Tensor:
    """Neighborhood logits ``attn[..., slot] = query . key[neighbor(slot)] (+ rpb)``."""
    params = (kernel_size, dilation, is_causal)
    inputs = (dlpack(query), dlpack(key), dlpack(rpb), dlpack(additional_keys))
    attn = query.new_empty(_core.qk_output_shape(*inputs, *params))
    _core.na_qk(*inputs, dlpack(attn), *params, launch_stream(query))
    return attn


@na_qk.register_fake
def _(query, key, rpb, additional_keys, kernel_size, dilation, is_causal):
    return query.new_empty(_attn_shape(query, kernel_size, additional_keys))


@torch.library.custom_op("natten_rs::na_qk_backward", mutates_args=())
def na_qk_backward(
    d_attn: Tensor,
    query: Tensor,
    key: Tensor,
    additional_keys: Optional[Tensor],
    with_rpb: bool,
    kernel_size: List[int],
    dilation: List[int],
    is_causal: List[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d_query, d_key, d_rpb, d_additional_keys)``; absent ones are empty tensors."""
    d_query, d_key, d_rpb, d_extra = _qk_grads(query, key, additional_keys, with_rpb, kernel_size)
    bias_scratch = None
    if with_rpb:
        # Scratch for the CUDA kernels of d_rpb (a table per tile of query rows; none on the CPU).
        shape = _core.qk_bias_scratch_shape(
            dlpack(query), dlpack(key), kernel_size, dilation, is_causal
        )
        if shape[0] > 0:
            bias_scratch = dlpack(query.new_empty(shape[0], dtype=getattr(torch, shape[1])))
    _core.na_qk_backward(
        dlpack(d_attn),
        dlpack(query),
        dlpack(key),
        dlpack(additional_keys),
        dlpack(d_query),
        dlpack(d_key),
        dlpack(d_rpb) if with_rpb else None,
        dlpack(d_extra) if additional_keys is not None else None,
        kernel_size,
        dilation,
        is_causal,
        launch_stream(query),
        bias_scratch,
    )
    return d_query, d_key, d_rpb, d_extra


def _qk_grads(query, key, additional_keys, with_rpb, kernel_size):
    d_rpb = query.new_empty(_rpb_shape(query, kernel_size)) if with_rpb else _empty_like_rows(query)
    extra = (
        _empty_like_rows(query)
        if additional_keys is None
        else torch.empty_like(additional_keys, memory_format=torch.contiguous_format)
    )
    contiguous = torch.contiguous_format
    d_query = torch.empty_like(query, memory_format=contiguous)
    return d_query, torch.empty_like(key, memory_format=contiguous), d_rpb, extra


@na_qk_backward.register_fake
def _(d_attn, query, key, additional_keys, with_rpb, kernel_size, dilation, is_causal):
    return _qk_grads(query, key, additional_keys, with_rpb, kernel_size)


def _qk_setup(ctx, inputs, output):
    query, key, rpb, additional_keys, kernel_size, dilation, is_causal = inputs
    ctx.save_for_backward(query, key, additional_keys)
    ctx.with_rpb = rpb is not None
    ctx.params = (kernel_size, dilation, is_causal)


def _qk_backward(ctx, d_attn):
    query, key, additional_keys = ctx.saved_tensors
    d_query, d_key, d_rpb, d_extra = na_qk_backward(
        d_attn, query, key, additional_keys, ctx.with_rpb, *ctx.params
    )
    return (
        d_query,
        d_key,
        d_rpb if ctx.with_rpb else None,
        d_extra if additional_keys is not None else None,
        None,
        None,
        None,
    )


na_qk.register_autograd(_qk_backward, setup_context=_qk_setup)


# --- av ------------------------------------------------------------------------------------------


@torch.library.custom_op("natten_rs::na_av", mutates_args=())
def na_av(
    attn: Tensor,
    value: Tensor,
    additional_values: Optional[Tensor],
    kernel_size: List[int],
    dilation: List[int],
    is_causal: List[bool],
) -> Tensor:
    """Neighborhood weighted sum ``out = sum_slot attn[..., slot] value[neighbor(slot)]``."""
    params = (kernel_size, dilation, is_causal)
    inputs = (dlpack(attn), dlpack(value), dlpack(additional_values))
    out = value.new_empty(_core.av_output_shape(*inputs, *params))
    _core.na_av(*inputs, dlpack(out), *params, launch_stream(value))
    return out


@na_av.register_fake
def _(attn, value, additional_values, kernel_size, dilation, is_causal):
    return torch.empty_like(value, memory_format=torch.contiguous_format)


@torch.library.custom_op("natten_rs::na_av_backward", mutates_args=())
def na_av_backward(
    d_out: Tensor,
    attn: Tensor,
    value: Tensor,
    additional_values: Optional[Tensor],
    kernel_size: List[int],
    dilation: List[int],
    is_causal: List[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_attn, d_value, d_additional_values)``; the last is empty when absent."""
    d_attn, d_value, d_extra = _av_grads(attn, value, additional_values)
    _core.na_av_backward(
        dlpack(d_out),
        dlpack(attn),
        dlpack(value),
        dlpack(additional_values),
        dlpack(d_attn),
        dlpack(d_value),
        dlpack(d_extra) if additional_values is not None else None,
        kernel_size,
        dilation,
        is_causal,
        launch_stream(value),
    )
    return d_attn, d_value, d_extra


def _av_grads(attn, value, additional_values):
    contiguous = torch.contiguous_format
    extra = (
        _empty_like_rows(value)
        if additional_values is None
        else torch.empty_like(additional_values, memory_format=contiguous)
    )
    d_attn = torch.empty_like(attn, memory_format=contiguous)
    return d_attn, torch.empty_like(value, memory_format=contiguous), extra


@na_av_backward.register_fake
def _(d_out, attn, value, additional_values, kernel_size, dilation, is_causal):
    return _av_grads(attn, value, additional_values)


def _av_setup(ctx, inputs, output):
    attn, value, additional_values, kernel_size, dilation, is_causal = inputs
    ctx.save_for_backward(attn, value, additional_values)
    ctx.params = (kernel_size, dilation, is_causal)


def _av_backward(ctx, d_out):
    attn, value, additional_values = ctx.saved_tensors
    d_attn, d_value, d_extra = na_av_backward(d_out, attn, value, additional_values, *ctx.params)
    return d_attn, d_value, d_extra if additional_values is not None else None, None, None, None


na_av.register_autograd(_av_backward, setup_context=_av_setup)


# --- fused ---------------------------------------------------------------------------------------
# Layouts (heads-last): query [B, *spatial, heads, D]; key [B, *spatial, heads_kv, D]; value
# [B, *spatial, heads_kv, Dv]; additional keys/values [B, n_extra, heads_kv, D/Dv]; rpb
# [heads, 2K-1, ...]; out [B, *spatial, heads, Dv]; lse [B, *spatial, heads] float32. An empty
# kernel_size means dense attention: no key/value, every query attends the additional tokens.


def _fused_inputs(query, key, value, additional_keys, additional_values, rpb) -> tuple:
    return tuple(dlpack(t) for t in (query, key, value, additional_keys, additional_values, rpb))


def _fused_shapes(query, value, additional_values) -> tuple[list, list]:
    dim_v = (value if value is not None else additional_values).shape[-1]
    return [*query.shape[:-1], dim_v], list(query.shape[:-1])


@torch.library.custom_op("natten_rs::na_fused", mutates_args=())
def na_fused(
    query: Tensor,
    key: Optional[Tensor],
    value: Optional[Tensor],
    additional_keys: Optional[Tensor],
    additional_values: Optional[Tensor],
    rpb: Optional[Tensor],
    kernel_size: List[int],
    stride: List[int],
    dilation: List[int],
    is_causal: List[bool],
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Fused neighborhood attention: ``(out, lse)``."""
    inputs = _fused_inputs(query, key, value, additional_keys, additional_values, rpb)
    nbhd = (kernel_size, stride, dilation, is_causal)
    out_shape, lse_shape = _core.fused_output_shapes(inputs, nbhd, scale)
    out = query.new_empty(out_shape)
    lse = query.new_empty(lse_shape, dtype=torch.float32)
    _core.na_fused(inputs, nbhd, scale, dlpack(out), dlpack(lse), launch_stream(query))
    return out, lse


@na_fused.register_fake
def _(query, key, value, additional_keys, additional_values, rpb, *params):
    out_shape, lse_shape = _fused_shapes(query, value, additional_values)
    return query.new_empty(out_shape), query.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("natten_rs::na_fused_backward", mutates_args=())
def na_fused_backward(
    d_out: Tensor,
    d_lse: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    query: Tensor,
    key: Optional[Tensor],
    value: Optional[Tensor],
    additional_keys: Optional[Tensor],
    additional_values: Optional[Tensor],
    rpb: Optional[Tensor],
    kernel_size: List[int],
    stride: List[int],
    dilation: List[int],
    is_causal: List[bool],
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients wrt ``(query, key, value, additional_keys, additional_values, rpb)``; absent
    inputs get empty tensors. ``out`` and ``lse`` are the forward's outputs."""
    inputs = (query, key, value, additional_keys, additional_values, rpb)
    grads = _fused_grads(*inputs)
    exported = _fused_inputs(*inputs)
    nbhd = (kernel_size, stride, dilation, is_causal)
    # Per-row scratch for the CUDA kernels (a few bytes per query row; the CPU ignores it).
    length, dtype = _core.fused_stats_shape(exported, nbhd, scale)
    stats = query.new_empty(length, dtype=getattr(torch, dtype))
    _core.na_fused_backward(
        exported,
        nbhd,
        scale,
        (dlpack(out), dlpack(lse), dlpack(d_out), dlpack(d_lse)),
        tuple(None if t is None else dlpack(g) for t, g in zip(inputs, grads)),
        dlpack(stats),
        launch_stream(query),
    )
    return grads


def _fused_grads(*inputs) -> tuple:
    query = inputs[0]
    return tuple(
        _empty_like_rows(query)
        if t is None
        else torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in inputs
    )


@na_fused_backward.register_fake
def _(d_out, d_lse, out, lse, query, key, value, additional_keys, additional_values, rpb, *params):
    return _fused_grads(query, key, value, additional_keys, additional_values, rpb)


def _fused_setup(ctx, inputs, output):
    *tensors, kernel_size, stride, dilation, is_causal, scale = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.params = (kernel_size, stride, dilation, is_causal, scale)


def _fused_backward(ctx, d_out, d_lse):
    *tensors, out, lse = ctx.saved_tensors
    grads = na_fused_backward(d_out, d_lse, out, lse, *tensors, *ctx.params)
    return (
        *(None if t is None else g for t, g in zip(tensors, grads)),
        None,
        None,
        None,
        None,
        None,
    )


na_fused.register_autograd(_fused_backward, setup_context=_fused_setup)
