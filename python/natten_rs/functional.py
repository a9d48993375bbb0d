"""Neighborhood attention ops under NATTEN's names, for 1-D, 2-D and 3-D (``rank``) inputs.

Fused ops (NATTEN 0.20+), heads-last:
  * ``query`` ``[B, *spatial, heads, D]``, ``key`` ``[B, *spatial, heads_kv, D]``, ``value``
    ``[B, *spatial, heads_kv, Dv]`` (``heads_kv`` divides ``heads``: GQA/MQA)
  * ``additional_keys`` / ``additional_values`` ``[B, n_extra, heads_kv, D / Dv]``: attended by
    every query; ``rpb`` ``[heads, 2*K0-1, ...]`` (odd kernel, stride 1)
  * out ``[B, *spatial, heads, Dv]``; with ``return_lse`` also lse ``[B, *spatial, heads]``
    (float32, natural log). ``backend`` and NATTEN's tuning keywords are accepted and ignored.

Unfused (legacy) ops, heads-first:
  * ``query``, ``key``, ``value``: ``[B, heads, *spatial, D]`` (any strides, e.g. permuted views)
  * ``attn``: ``[B, heads, *spatial, prod(kernel_size) + n_extra]``; ``qk`` returns raw logits
    (no scale, no softmax) with ``-inf`` in the empty slots of causal windows
  * ``rpb``: ``[heads, 2*K0-1 (, 2*K1-1 (, 2*K2-1))]``
  * ``additional_keys`` / ``additional_values``: ``[B, heads, n_extra, D]``

``kernel_size``, ``stride`` and ``dilation`` take an int (every axis) or one int per axis;
``is_causal`` a bool or one bool per axis. This module only brings arguments to that per-axis
form; every value rule is checked by the Rust core.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ops
from ._forms import (
    autocast,
    check_tuning,
    depth_first,
    neighborhood,
    per_axis,
    scale_arg,
    tensor_arg,
)

__all__ = [
    "attention",
    "merge_attentions",
    "na1d",
    "na1d_av",
    "na1d_qk",
    "na1d_qk_with_bias",
    "na2d",
    "na2d_av",
    "na2d_qk",
    "na2d_qk_with_bias",
    "na3d",
    "na3d_av",
    "na3d_qk",
    "na3d_qk_with_bias",
    "natten1dav",
    "natten1dqk",
    "natten1dqkrpb",
    "natten2dav",
    "natten2dqk",
    "natten2dqkrpb",
    "natten3dav",
    "natten3dqk",
    "natten3dqkrpb",
]

_SPATIAL = {1: "L", 2: "H, W", 3: "T, H, W"}


def _named(fn, name: str, doc: str):
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


def _fused(rank: int):
    def na(
        query,
        key,
        value,
        kernel_size,
        stride=1,
        dilation=1,
        is_causal=False,
        scale=None,
        additional_keys=None,
        additional_values=None,
        rpb=None,
        return_lse=False,
        backend=None,
        **tuning,
    ):
        check_tuning(f"na{rank}d", tuning)
        tensors = autocast(
            tensor_arg("query", query),
            tensor_arg("key", key),
            tensor_arg("value", value),
            tensor_arg("additional_keys", additional_keys, optional=True),
            tensor_arg("additional_values", additional_values, optional=True),
            tensor_arg("rpb", rpb, optional=True),
        )
        out, lse = _ops.na_fused(
            *tensors,
            per_axis("kernel_size", kernel_size, rank, int),
            per_axis("stride", 1 if stride is None else stride, rank, int),
            per_axis("dilation", 1 if dilation is None else dilation, rank, int),
            per_axis("is_causal", False if is_causal is None else is_causal, rank, bool),
            scale_arg(scale, tensors[0]),
        )
        return (out, lse) if return_lse else out

    spatial = _SPATIAL[rank]
    return _named(
        na,
        f"na{rank}d",
        f"Fused {rank}-D neighborhood attention: query "
        f"``[B, {spatial}, heads, D]`` -> out ``[B, {spatial}, heads, Dv]`` (and lse).",
    )


def _qk(rank: int):
    def qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None):
        return _ops.na_qk(
            *autocast(
                tensor_arg("query", query),
                tensor_arg("key", key),
                tensor_arg("rpb", rpb, optional=True),
                tensor_arg("additional_keys", additional_keys, optional=True),
            ),
            *neighborhood(rank, kernel_size, dilation, is_causal),
        )

    spatial = _SPATIAL[rank]
    return _named(
        qk,
        f"na{rank}d_qk",
        f"{rank}-D neighborhood logits: ``[B, heads, {spatial}, "
        f"D]`` -> ``[B, heads, {spatial}, prod(kernel_size) + n_extra]``.",
    )


def _av(rank: int):
    def av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False):
        return _ops.na_av(
            *autocast(
                tensor_arg("attn", attn),
                tensor_arg("value", value),
                tensor_arg("additional_values", additional_values, optional=True),
            ),
            *neighborhood(rank, kernel_size, dilation, is_causal),
        )

    spatial = _SPATIAL[rank]
    return _named(
        av,
        f"na{rank}d_av",
        f"{rank}-D neighborhood weighted sum: attn ``[B, heads, "
        f"{spatial}, prod(kernel_size) + n_extra]`` -> ``[B, heads, {spatial}, D]``.",
    )


def _qk_with_bias(qk):
    # NATTEN 0.15 names: the bias comes third, positionally.
    def with_bias(query, key, bias, kernel_size, dilation, additional_keys=None):
        return qk(query, key, kernel_size, dilation, additional_keys, rpb=bias)

    return _named(with_bias, f"{qk.__name__}_with_bias", f"``{qk.__name__}`` with ``rpb=bias``.")


na1d, na2d, na3d = (_fused(r) for r in (1, 2, 3))
na1d_qk, na2d_qk, na3d_qk = (_qk(r) for r in (1, 2, 3))
na1d_av, na2d_av, na3d_av = (_av(r) for r in (1, 2, 3))
na1d_qk_with_bias, na2d_qk_with_bias, na3d_qk_with_bias = (
    _qk_with_bias(qk) for qk in (na1d_qk, na2d_qk, na3d_qk)
)


# NATTEN 0.14 - 0.17.4 names: positional, one int for every axis (3-D: depth given apart).
def _legacy(rank: int, qk, av):
    def qkrpb(query, key, rpb, kernel_size, dilation):
        return qk(query, key, kernel_size, dilation, rpb=rpb)

    def qk_plain(query, key, kernel_size, dilation):
        return qk(query, key, kernel_size, dilation)

    def av_plain(attn, value, kernel_size, dilation):
        return av(attn, value, kernel_size, dilation)

    return (
        _named(qkrpb, f"natten{rank}dqkrpb", f"``{qk.__name__}`` with ``rpb`` (may be None)."),
        _named(qk_plain, f"natten{rank}dqk", f"``{qk.__name__}`` without bias."),
        _named(av_plain, f"natten{rank}dav", f"``{av.__name__}``."),
    )


natten1dqkrpb, natten1dqk, natten1dav = _legacy(1, na1d_qk, na1d_av)
natten2dqkrpb, natten2dqk, natten2dav = _legacy(2, na2d_qk, na2d_av)


def natten3dqkrpb(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation):
    """``na3d_qk`` with kernel ``(kernel_size_d, kernel_size, kernel_size)``, same for dilation."""
    kernel, dil = depth_first(kernel_size_d, kernel_size), depth_first(dilation_d, dilation)
    return na3d_qk(query, key, kernel, dil, rpb=rpb)


def natten3dqk(query, key, kernel_size_d, kernel_size, dilation_d, dilation):
    """``natten3dqkrpb`` without bias."""
    return natten3dqkrpb(query, key, None, kernel_size_d, kernel_size, dilation_d, dilation)


def natten3dav(attn, value, kernel_size_d, kernel_size, dilation_d, dilation):
    """``na3d_av`` with kernel ``(kernel_size_d, kernel_size, kernel_size)``, same for dilation."""
    kernel, dil = depth_first(kernel_size_d, kernel_size), depth_first(dilation_d, dilation)
    return na3d_av(attn, value, kernel, dil)


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    **tuning,
):
    """Dense attention, heads-last: query ``[B, N, heads, D]`` (or ``[B, *spatial, heads, D]``,
    tokens taken row-major), key ``[B, M, heads_kv, D]``, value ``[B, M, heads_kv, Dv]``.
    Causal attention needs ``M == N`` (query i sees keys ``<= i``). Returns out ``[..., heads,
    Dv]`` and, with ``return_lse``, lse ``[..., heads]`` (float32)."""
    check_tuning("attention", tuning)
    query, key, value = (
        tensor_arg(n, t) for n, t in (("query", query), ("key", key), ("value", value))
    )
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__name__}")
    q = query.flatten(1, -3) if query.dim() > 3 else query
    if is_causal:
        if q.shape[1] != key.shape[1]:
            raise NotImplementedError(
                f"causal attention with {q.shape[1]} queries and {key.shape[1]} keys"
            )
        out, lse = na1d(q, key, value, q.shape[1], is_causal=True, scale=scale, return_lse=True)
    else:
        q, key, value = autocast(q, key, value)
        out, lse = _ops.na_fused(
            q, None, None, key, value, None, [], [], [], [], scale_arg(scale, query)
        )
    out = out.reshape(*query.shape[:-1], out.shape[-1])
    lse = lse.reshape(query.shape[:-1])
    return (out, lse) if return_lse else out


def merge_attentions(outputs: Sequence[Tensor], lse_tensors: Sequence[Tensor]):
    """Merge attention results over disjoint key sets: ``lse = logsumexp_i(lse_i)`` and
    ``out = sum_i exp(lse_i - lse) out_i``. outputs ``[B, *, heads, Dv]``, lses ``[B, *, heads]``
    (float32). Returns ``(out, lse)``; differentiable in every input."""
    if len(outputs) != len(lse_tensors) or len(outputs) < 1:
        raise ValueError(
            f"outputs, lse_tensors: expected equally many (at least one), got "
            f"{len(outputs)} and {len(lse_tensors)}"
        )
    for i, (out, lse) in enumerate(zip(outputs, lse_tensors)):
        tensor_arg(f"outputs[{i}]", out)
        tensor_arg(f"lse_tensors[{i}]", lse)
        if out.shape[:-1] != lse.shape or out.shape != outputs[0].shape:
            raise ValueError(
                f"outputs[{i}], lse_tensors[{i}]: expected shapes {tuple(outputs[0].shape)} "
                f"and {tuple(outputs[0].shape[:-1])}, got {tuple(out.shape)} and "
                f"{tuple(lse.shape)}"
            )
    # Half outputs are merged in float32, float64 ones in float64.
    dtype = torch.promote_types(outputs[0].dtype, torch.float32)
    lses = torch.stack([lse.to(dtype) for lse in lse_tensors])
    lse = torch.logsumexp(lses, dim=0)
    # Where every part attended nothing (lse -inf) the merge attends nothing too: output 0.
    finite = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lses - finite).unsqueeze(-1)
    stacked = torch.stack([out.to(dtype) for out in outputs])
    out = (weights * stacked).sum(dim=0).to(outputs[0].dtype)
    return out, lse.float()
