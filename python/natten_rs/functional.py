"""Neighborhood attention ops under NATTEN's names.

Unfused (legacy) ops, heads-first layout:
  * ``query``, ``key``, ``value``: ``[B, heads, *spatial, D]`` (any strides, e.g. permuted views)
  * ``attn``: ``[B, heads, *spatial, prod(kernel_size) + n_extra]``; ``qk`` returns raw logits
    (no scale, no softmax) with ``-inf`` in the empty slots of causal windows
  * ``rpb``: ``[heads, 2*K0-1 (, 2*K1-1 (, 2*K2-1))]``
  * ``additional_keys`` / ``additional_values``: ``[B, heads, n_extra, D]``

``kernel_size`` and ``dilation`` take an int (every axis) or one int per axis; ``is_causal`` a
bool or one bool per axis. This module only brings arguments to that per-axis form; every value
rule is checked by the Rust core.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ops

IntOrInts = int | Sequence[int]
BoolOrBools = bool | Sequence[bool]

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


def per_axis(name: str, value, rank: int, kind: type) -> list:
    """``value`` as a list of ``rank`` items of ``kind`` (an int or bool repeats)."""
    if _is(value, kind):
        value = [value] * rank
    if not isinstance(value, (tuple, list)) or not all(_is(v, kind) for v in value):
        expected = f"{kind.__name__} or a tuple of {rank} {kind.__name__}s"
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    if len(value) != rank:
        raise ValueError(f"{name}: expected {rank} values (one per spatial axis), got {len(value)}")
    if kind is int and any(not INT64_MIN <= v <= INT64_MAX for v in value):
        raise ValueError(f"{name}: expected values that fit in 64 bits, got {value!r}")
    return [kind(v) for v in value]


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is(value, kind: type) -> bool:
    # bool is an int in Python; refuse it where an int is meant.
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def tensor_arg(name: str, value, optional: bool = False) -> Tensor | None:
    """Check that ``value`` is a tensor (or None where allowed)."""
    if value is None and optional:
        return None
    if not isinstance(value, Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    return value


def _neighborhood(rank: int, kernel_size, dilation, is_causal) -> tuple[list, list, list]:
    return (
        per_axis("kernel_size", kernel_size, rank, int),
        per_axis("dilation", 1 if dilation is None else dilation, rank, int),
        per_axis("is_causal", False if is_causal is None else is_causal, rank, bool),
    )


def _qk(rank, query, key, kernel_size, dilation, additional_keys, is_causal, rpb) -> Tensor:
    return _ops.na_qk(
        tensor_arg("query", query),
        tensor_arg("key", key),
        tensor_arg("rpb", rpb, optional=True),
        tensor_arg("additional_keys", additional_keys, optional=True),
        *_neighborhood(rank, kernel_size, dilation, is_causal),
    )


def _av(rank, attn, value, kernel_size, dilation, additional_values, is_causal) -> Tensor:
    return _ops.na_av(
        tensor_arg("attn", attn),
        tensor_arg("value", value),
        tensor_arg("additional_values", additional_values, optional=True),
        *_neighborhood(rank, kernel_size, dilation, is_causal),
    )


def na1d_qk(
    query: Tensor,
    key: Tensor,
    kernel_size: IntOrInts,
    dilation: IntOrInts = 1,
    additional_keys: Tensor | None = None,
    is_causal: BoolOrBools = False,
    rpb: Tensor | None = None,
) -> Tensor:
    """1-D neighborhood logits: ``[B, heads, L, D] x [B, heads, L, D] -> [B, heads, L, K+n]``."""
    return _qk(1, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na2d_qk(
    query: Tensor,
    key: Tensor,
    kernel_size: IntOrInts,
    dilation: IntOrInts = 1,
    additional_keys: Tensor | None = None,
    is_causal: BoolOrBools = False,
    rpb: Tensor | None = None,
) -> Tensor:
    """2-D neighborhood logits: ``[B, heads, H, W, D] -> [B, heads, H, W, K0*K1+n]``."""
    return _qk(2, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na3d_qk(
    query: Tensor,
    key: Tensor,
    kernel_size: IntOrInts,
    dilation: IntOrInts = 1,
    additional_keys: Tensor | None = None,
    is_causal: BoolOrBools = False,
    rpb: Tensor | None = None,
) -> Tensor:
    """3-D neighborhood logits: ``[B, heads, T, H, W, D] -> [B, heads, T, H, W, K0*K1*K2+n]``."""
    return _qk(3, query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na1d_av(
    attn: Tensor,
    value: Tensor,
    kernel_size: IntOrInts,
    dilation: IntOrInts = 1,
    additional_values: Tensor | None = None,
    is_causal: BoolOrBools = False,
) -> Tensor:
    """1-D neighborhood weighted sum: ``[B, heads, L, K+n] x [B, heads, L, D] -> [B, heads, L, D]``."""
    return _av(1, attn, value, kernel_size, dilation, additional_values, is_causal)


def na2d_av(
    attn: Tensor,
    value: Tensor,
    kernel_size: IntOrInts,
    dilation: IntOrInts = 1,
    additional_values: Tensor | None = None,
    is_causal: BoolOrBools = False,
) -> Tensor:
    """2-D neighborhood weighted sum: ``[B, heads, H, W, K0*K1+n] -> [B, heads, H, W, D]``."""
    return _av(2, attn, value, kernel_size, dilation, additional_values, is_causal)


def na3d_av(
    attn: Tensor,
    value: Tensor,
    kernel_size: IntOrInts,
    dilation: IntOrInts = 1,
    additional_values: Tensor | None = None,
    is_causal: BoolOrBools = False,
) -> Tensor:
    """3-D neighborhood weighted sum: ``[B, heads, T, H, W, K0*K1*K2+n] -> [B, heads, T, H, W, D]``."""
    return _av(3, attn, value, kernel_size, dilation, additional_values, is_causal)


# NATTEN 0.15 names: the bias comes third, positionally.
def na1d_qk_with_bias(query, key, bias, kernel_size, dilation, additional_keys=None):
    """``na1d_qk`` with ``rpb=bias``."""
    return na1d_qk(query, key, kernel_size, dilation, additional_keys, rpb=bias)


def na2d_qk_with_bias(query, key, bias, kernel_size, dilation, additional_keys=None):
    """``na2d_qk`` with ``rpb=bias``."""
    return na2d_qk(query, key, kernel_size, dilation, additional_keys, rpb=bias)


def na3d_qk_with_bias(query, key, bias, kernel_size, dilation, additional_keys=None):
    """``na3d_qk`` with ``rpb=bias``."""
    return na3d_qk(query, key, kernel_size, dilation, additional_keys, rpb=bias)


# NATTEN 0.14 - 0.17.4 names: positional, one int for every axis (3-D: depth given apart).
def natten1dqkrpb(query, key, rpb, kernel_size, dilation):
    """``na1d_qk(query, key, kernel_size, dilation, rpb=rpb)``; ``rpb`` may be None."""
    return na1d_qk(query, key, kernel_size, dilation, rpb=rpb)


def natten1dqk(query, key, kernel_size, dilation):
    """``na1d_qk`` without bias."""
    return na1d_qk(query, key, kernel_size, dilation)


def natten1dav(attn, value, kernel_size, dilation):
    """``na1d_av``."""
    return na1d_av(attn, value, kernel_size, dilation)


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    """``na2d_qk(query, key, kernel_size, dilation, rpb=rpb)``; ``rpb`` may be None."""
    return na2d_qk(query, key, kernel_size, dilation, rpb=rpb)


def natten2dqk(query, key, kernel_size, dilation):
    """``na2d_qk`` without bias."""
    return na2d_qk(query, key, kernel_size, dilation)


def natten2dav(attn, value, kernel_size, dilation):
    """``na2d_av``."""
    return na2d_av(attn, value, kernel_size, dilation)


def natten3dqkrpb(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation):
    """``na3d_qk`` with kernel ``(kernel_size_d, kernel_size, kernel_size)``, same for dilation."""
    return na3d_qk(
        query,
        key,
        _depth_first(kernel_size_d, kernel_size),
        _depth_first(dilation_d, dilation),
        rpb=rpb,
    )


def natten3dqk(query, key, kernel_size_d, kernel_size, dilation_d, dilation):
    """``natten3dqkrpb`` without bias."""
    return natten3dqkrpb(query, key, None, kernel_size_d, kernel_size, dilation_d, dilation)


def natten3dav(attn, value, kernel_size_d, kernel_size, dilation_d, dilation):
    """``na3d_av`` with kernel ``(kernel_size_d, kernel_size, kernel_size)``, same for dilation."""
    return na3d_av(
        attn, value, _depth_first(kernel_size_d, kernel_size), _depth_first(dilation_d, dilation)
    )


def _depth_first(depth, plane):
    # 3-D legacy ops take the depth size apart and one int for both planar axes.
    return (depth, plane, plane) if _is(depth, int) and _is(plane, int) else (depth, plane)


# --- fused ops (heads-last) ----------------------------------------------------------------------

# Keyword arguments NATTEN's fused ops take to pick and tune its CUDA kernels. They mean nothing
# here and are ignored; any other keyword is an error, as in NATTEN.
NATTEN_TUNING_KWARGS = frozenset(
    {
        "attention_kwargs",
        "q_tile_shape",
        "kv_tile_shape",
        "backward_q_tile_shape",
        "backward_kv_tile_shape",
        "backward_kv_splits",
        "backward_use_pt_reduction",
        "run_persistent_kernel",
        "kernel_schedule",
        "torch_compile",
        "try_fuse_additional_kv",
        "q_tile_size",
        "kv_tile_size",
        "backward_q_tile_size",
        "backward_kv_tile_size",
    }
)


def _check_tuning(function: str, tuning: dict) -> None:
    unknown = sorted(set(tuning) - NATTEN_TUNING_KWARGS)
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword argument(s) {unknown}")


def _scale(scale, query: Tensor) -> float:
    if scale is None:
        # A head dim of 0 is refused by the core, which names it; any scale will do until then.
        return query.shape[-1] ** -0.5 if query.shape[-1] > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    return float(scale)


def _na(
    rank,
    query,
    key,
    value,
    kernel_size,
    stride,
    dilation,
    is_causal,
    scale,
    additional_keys,
    additional_values,
    rpb,
    return_lse,
):
    query = tensor_arg("query", query)
    out, lse = _ops.na_fused(
        query,
        tensor_arg("key", key),
        tensor_arg("value", value),
        tensor_arg("additional_keys", additional_keys, optional=True),
        tensor_arg("additional_values", additional_values, optional=True),
        tensor_arg("rpb", rpb, optional=True),
        per_axis("kernel_size", kernel_size, rank, int),
        per_axis("stride", 1 if stride is None else stride, rank, int),
        per_axis("dilation", 1 if dilation is None else dilation, rank, int),
        per_axis("is_causal", False if is_causal is None else is_causal, rank, bool),
        _scale(scale, query),
    )
    return (out, lse) if return_lse else out


def na1d(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: IntOrInts,
    stride: IntOrInts = 1,
    dilation: IntOrInts = 1,
    is_causal: BoolOrBools = False,
    scale: float | None = None,
    additional_keys: Tensor | None = None,
    additional_values: Tensor | None = None,
    rpb: Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    **tuning,
):
    """Fused 1-D neighborhood attention, heads-last.

    query ``[B, L, heads, D]``, key ``[B, L, heads_kv, D]``, value ``[B, L, heads_kv, Dv]``
    (``heads_kv`` divides ``heads``: GQA/MQA); additional keys/values ``[B, n_extra, heads_kv,
    D/Dv]`` are attended by every query; rpb ``[heads, 2K-1]`` (odd K, stride 1). Returns out
    ``[B, L, heads, Dv]``, and with ``return_lse`` also lse ``[B, L, heads]`` (float32, natural
    log). ``backend`` and NATTEN's tuning keywords are accepted and ignored.
    """
    _check_tuning("na1d", tuning)
    return _na(
        1,
        query,
        key,
        value,
        kernel_size,
        stride,
        dilation,
        is_causal,
        scale,
        additional_keys,
        additional_values,
        rpb,
        return_lse,
    )


def na2d(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: IntOrInts,
    stride: IntOrInts = 1,
    dilation: IntOrInts = 1,
    is_causal: BoolOrBools = False,
    scale: float | None = None,
    additional_keys: Tensor | None = None,
    additional_values: Tensor | None = None,
    rpb: Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    **tuning,
):
    """Fused 2-D neighborhood attention, heads-last: query ``[B, H, W, heads, D]``; as ``na1d``."""
    _check_tuning("na2d", tuning)
    return _na(
        2,
        query,
        key,
        value,
        kernel_size,
        stride,
        dilation,
        is_causal,
        scale,
        additional_keys,
        additional_values,
        rpb,
        return_lse,
    )


def na3d(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: IntOrInts,
    stride: IntOrInts = 1,
    dilation: IntOrInts = 1,
    is_causal: BoolOrBools = False,
    scale: float | None = None,
    additional_keys: Tensor | None = None,
    additional_values: Tensor | None = None,
    rpb: Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    **tuning,
):
    """Fused 3-D neighborhood attention, heads-last: query ``[B, T, H, W, heads, D]``; as
    ``na1d``."""
    _check_tuning("na3d", tuning)
    return _na(
        3,
        query,
        key,
        value,
        kernel_size,
        stride,
        dilation,
        is_causal,
        scale,
        additional_keys,
        additional_values,
        rpb,
        return_lse,
    )


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
    _check_tuning("attention", tuning)
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
        out, lse = _na(1, q, key, value, q.shape[1], 1, 1, True, scale, None, None, None, True)
    else:
        out, lse = _ops.na_fused(
            q, None, None, key, value, None, [], [], [], [], _scale(scale, query)
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
