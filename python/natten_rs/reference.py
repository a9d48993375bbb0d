"""Dense PyTorch oracle for neighborhood attention.

Written straight from spec/NEIGHBORHOOD.md and independent of every kernel in natten_rs: it imports
nothing from the package, so users, tests and the profiler can check any result against it.
Windows come from the spec's per-axis pseudo-code, taken literally; multi-axis neighborhoods are
products of axes, expressed either as a dense ``[N, N]`` mask (query token, key token; tokens
flattened row-major) or as a per-slot key index ``[N, prod(K)]``. Arithmetic runs in float64 and
results are cast back to the input dtype, so the oracle serves half-precision inputs too. Every
function is differentiable by autograd. Clear rather than fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "attention",
    "av",
    "axis_keys",
    "axis_slots",
    "na",
    "neighborhood_mask",
    "qk",
    "rpb_bias",
    "slot_index",
]


# ---------------------------------------------------------------------------------------------
# One axis (spec pseudo-code)
# ---------------------------------------------------------------------------------------------


def _check_axis(length: int, kernel: int, stride: int, dilation: int) -> None:
    if kernel < 2:
        raise ValueError(f"kernel_size must be >= 2, got {kernel}")
    if not 1 <= stride <= kernel:
        raise ValueError(f"stride must be in [1, kernel_size={kernel}], got {stride}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if kernel * dilation > length:
        raise ValueError(
            f"kernel_size * dilation must be <= axis length {length}, got {kernel} * {dilation}"
        )


def _window(i: int, length: int, kernel: int, stride: int, dilation: int, causal: bool):
    """Return ``(start, end, g)``: query ``i`` sees keys ``kj * dilation + g``, kj in [start, end)."""
    d, s = dilation, stride
    g = i % d
    qi = i // d
    group_length = length // d + (1 if g < length % d else 0)
    if causal:
        leader = min((qi // s) * s + s - 1, group_length - 1)
        start = max(leader - (kernel - 1), 0)
        end = min(qi + 1, group_length)
    else:
        leader = min((qi // s) * s + s // 2, group_length - 1)
        start = min(max(leader - kernel // 2, 0), group_length - kernel)
        end = start + kernel
    return start, end, g


def axis_keys(
    length: int, kernel: int, stride: int = 1, dilation: int = 1, causal: bool = False
) -> list[list[int]]:
    """Sorted key positions of every query on one axis of length ``length``."""
    _check_axis(length, kernel, stride, dilation)
    keys = []
    for i in range(length):
        start, end, g = _window(i, length, kernel, stride, dilation, causal)
        keys.append([kj * dilation + g for kj in range(start, end)])
    return keys


def axis_slots(
    length: int, kernel: int, dilation: int = 1, causal: bool = False
) -> list[list[int]]:
    """Per query, ``kernel`` slots: slot k holds key ``(start + k) * d + g``, or -1 past ``end``.

    Stride 1 (the unfused layout has no stride). Only causal windows near the start of an axis
    are shorter than ``kernel``, so only they have -1 slots.
    """
    _check_axis(length, kernel, 1, dilation)
    slots = []
    for i in range(length):
        start, end, g = _window(i, length, kernel, 1, dilation, causal)
        slots.append([(start + k) * dilation + g if start + k < end else -1 for k in range(kernel)])
    return slots


# ---------------------------------------------------------------------------------------------
# Multi-axis neighborhoods
# ---------------------------------------------------------------------------------------------


def _per_axis(value, rank: int, name: str) -> tuple:
    """Expand an int/bool to ``rank`` copies; check a per-axis sequence has ``rank`` entries."""
    if isinstance(value, (int, bool)):
        return (value,) * rank
    if isinstance(value, Sequence) and len(value) == rank:
        return tuple(value)
    raise ValueError(f"{name} must be a scalar or a sequence of {rank} values, got {value!r}")


def _axis_view(t: Tensor, axis: int, rank: int) -> Tensor:
    """View a per-axis ``[A, B]`` table so it broadcasts over ``[*query_axes, *key_axes]``."""
    shape = [1] * (2 * rank)
    shape[axis] = t.shape[0]
    shape[rank + axis] = t.shape[1]
    return t.view(shape)


def neighborhood_mask(
    spatial_shape: Sequence[int],
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    device=None,
) -> Tensor:
    """Bool ``[N, N]``: ``mask[query_token, key_token]``, true iff every axis allows the pair."""
    rank = len(spatial_shape)
    kernel = _per_axis(kernel_size, rank, "kernel_size")
    strides = _per_axis(stride, rank, "stride")
    dilation = _per_axis(dilation, rank, "dilation")
    causal = _per_axis(is_causal, rank, "is_causal")
    mask = torch.ones([1] * (2 * rank), dtype=torch.bool, device=device)
    for a, length in enumerate(spatial_shape):
        axis = torch.zeros(length, length, dtype=torch.bool, device=device)
        for i, keys in enumerate(axis_keys(length, kernel[a], strides[a], dilation[a], causal[a])):
            axis[i, keys] = True
        mask = mask & _axis_view(axis, a, rank)
    tokens = math.prod(spatial_shape)
    return mask.reshape(tokens, tokens)


def slot_index(
    spatial_shape: Sequence[int], kernel_size, dilation=1, is_causal=False, device=None
) -> Tensor:
    """Long ``[N, prod(K)]``: flattened key token of every unfused slot, -1 for invalid slots.

    Slots are row-major over the axes (1-D k; 2-D ki*K1 + kj; 3-D (ka*K1 + ki)*K2 + kj).
    """
    rank = len(spatial_shape)
    kernel = _per_axis(kernel_size, rank, "kernel_size")
    dilation = _per_axis(dilation, rank, "dilation")
    causal = _per_axis(is_causal, rank, "is_causal")
    token_strides = [math.prod(spatial_shape[a + 1 :]) for a in range(rank)]
    index = torch.zeros([1] * (2 * rank), dtype=torch.long, device=device)
    valid = torch.ones([1] * (2 * rank), dtype=torch.bool, device=device)
    for a, length in enumerate(spatial_shape):
        slots = torch.tensor(
            axis_slots(length, kernel[a], dilation[a], causal[a]), dtype=torch.long, device=device
        )
        index = index + _axis_view(slots.clamp(min=0) * token_strides[a], a, rank)
        valid = valid & _axis_view(slots >= 0, a, rank)
    index = torch.where(valid, index, -1)
    return index.reshape(math.prod(spatial_shape), math.prod(kernel))


def rpb_bias(spatial_shape: Sequence[int], kernel_size, dilation, rpb: Tensor) -> Tensor:
    """``[heads, N, N]``: the rpb entry of every query/key pair, 0 where none applies.

    Per axis the index is ``(j - i) / d + K - 1``, defined when i and j share a dilation group and
    the offset fits ``2K - 1`` entries; that covers every stride-1 window, causal or not. Values
    outside the neighborhood are 0 but meaningless: use them only where the mask is true.
    """
    rank = len(spatial_shape)
    kernel = _per_axis(kernel_size, rank, "kernel_size")
    dilation = _per_axis(dilation, rank, "dilation")
    if any(k % 2 == 0 for k in kernel):
        raise NotImplementedError(f"rpb is defined for odd kernel sizes only, got {kernel}")
    if tuple(rpb.shape[1:]) != tuple(2 * k - 1 for k in kernel):
        raise ValueError(f"rpb must be [heads, 2K-1, ...] for kernel {kernel}, got {rpb.shape}")
    indices = []
    defined = torch.ones([1] * (2 * rank), dtype=torch.bool, device=rpb.device)
    for a, length in enumerate(spatial_shape):
        pos = torch.arange(length, device=rpb.device)
        offset = pos[None, :] - pos[:, None]  # [query, key]
        index = offset.div(dilation[a], rounding_mode="floor") + kernel[a] - 1
        ok = (offset % dilation[a] == 0) & (index >= 0) & (index <= 2 * kernel[a] - 2)
        indices.append(_axis_view(index.clamp(0, 2 * kernel[a] - 2), a, rank))
        defined = defined & _axis_view(ok, a, rank)
    bias = rpb[(slice(None), *indices)]  # [heads, *query_axes, *key_axes]
    bias = torch.where(defined, bias, torch.zeros((), dtype=rpb.dtype, device=rpb.device))
    tokens = math.prod(spatial_shape)
    return bias.reshape(rpb.shape[0], tokens, tokens)


# ---------------------------------------------------------------------------------------------
# Unfused ops: heads-first [B, heads, *spatial, D]
# ---------------------------------------------------------------------------------------------


def _check_same(name: str, tensor: Tensor, expected: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")


def _check_extra(name: str, tensor: Tensor, batch: int, heads: int, dim: int) -> None:
    """Unfused extras are ``[batch, heads, n_extra, dim]`` with any n_extra."""
    if tensor.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, heads, n_extra, D], got {tuple(tensor.shape)}")
    _check_same(name, tensor, (batch, heads, tensor.shape[2], dim))


def qk(
    query: Tensor,
    key: Tensor,
    kernel_size,
    dilation=1,
    is_causal=False,
    rpb: Tensor | None = None,
    additional_keys: Tensor | None = None,
) -> Tensor:
    """Raw logits ``[B, heads, *spatial, prod(K) + n_extra]`` (no scale, no softmax).

    query/key ``[B, heads, *spatial, D]``; rpb ``[heads, 2K-1, ...]``; additional_keys
    ``[B, heads, n_extra, D]``, appended after the window slots. Invalid (causal) slots are -inf.
    """
    _check_same("key", key, query.shape)
    batch, heads, *spatial, _ = query.shape
    index = slot_index(spatial, kernel_size, dilation, is_causal, device=query.device)
    q = query.double().flatten(2, -2)  # [B, H, N, D]
    k = key.double().flatten(2, -2)
    gathered = k[:, :, index.clamp(min=0)]  # [B, H, N, P, D]
    logits = torch.einsum("bhnd,bhnpd->bhnp", q, gathered)
    if rpb is not None:
        bias = rpb_bias(spatial, kernel_size, dilation, rpb.double())  # [H, N, N]
        logits = logits + torch.gather(bias, 2, index.clamp(min=0).expand(heads, -1, -1))
    logits = logits.masked_fill(index < 0, -math.inf)
    if additional_keys is not None:
        _check_extra("additional_keys", additional_keys, batch, heads, q.shape[-1])
        extra = torch.einsum("bhnd,bhed->bhne", q, additional_keys.double())
        logits = torch.cat([logits, extra], dim=-1)
    return logits.reshape(batch, heads, *spatial, -1).to(query.dtype)


def av(
    attn: Tensor,
    value: Tensor,
    kernel_size,
    dilation=1,
    is_causal=False,
    additional_values: Tensor | None = None,
) -> Tensor:
    """Weighted sum ``[B, heads, *spatial, Dv]`` of the window's values (+ additional values).

    attn ``[B, heads, *spatial, prod(K) + n_extra]``; value ``[B, heads, *spatial, Dv]``;
    additional_values ``[B, heads, n_extra, Dv]``. Invalid slots get weight 0 whatever attn holds.
    """
    batch, heads, *spatial, _ = value.shape
    index = slot_index(spatial, kernel_size, dilation, is_causal, device=value.device)
    slots = index.shape[1]
    n_extra = 0
    if additional_values is not None:
        _check_extra("additional_values", additional_values, batch, heads, value.shape[-1])
        n_extra = additional_values.shape[2]
    _check_same("attn", attn, (batch, heads, *spatial, slots + n_extra))
    weights = attn.double().flatten(2, -2)  # [B, H, N, P + E]
    window = torch.where(index >= 0, weights[..., :slots], 0.0)
    v = value.double().flatten(2, -2)
    out = torch.einsum("bhnp,bhnpd->bhnd", window, v[:, :, index.clamp(min=0)])
    if additional_values is not None:
        extra_v = additional_values.double()
        out = out + torch.einsum("bhne,bhed->bhnd", weights[..., slots:], extra_v)
    return out.reshape(batch, heads, *spatial, -1).to(value.dtype)


# ---------------------------------------------------------------------------------------------
# Fused ops: heads-last [B, *spatial, heads, D]
# ---------------------------------------------------------------------------------------------


def _expand_heads(t: Tensor, heads: int) -> Tensor:
    """Repeat kv heads along dim -2 so query head h reads kv head h // (heads / heads_kv)."""
    heads_kv = t.shape[-2]
    if heads % heads_kv:
        raise ValueError(f"heads ({heads}) must be a multiple of heads_kv ({heads_kv})")
    return t.repeat_interleave(heads // heads_kv, dim=-2)


def _softmax_attention(q, k, v, scale, mask, bias=None, extra_k=None, extra_v=None):
    """Masked softmax attention on flattened float64 tensors.

    q ``[B, N, H, D]``; k/v ``[B, M, H, D/Dv]`` (kv heads already expanded); mask ``[N, M]``;
    bias ``[H, N, M]``; extras ``[B, E, H, D/Dv]``, never masked. Returns out ``[B, N, H, Dv]``
    and lse ``[B, N, H]``.
    """
    q = q * scale
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k)
    if bias is not None:
        logits = logits + bias
    logits = torch.where(mask, logits, -math.inf)
    values = v
    if extra_k is not None:
        logits = torch.cat([logits, torch.einsum("bnhd,behd->bhne", q, extra_k)], dim=-1)
        values = torch.cat([v, extra_v], dim=1)
    # One exp pass gives both softmax and lse (torch.logsumexp is slow on -inf rows). The shift
    # only keeps exp in range; lse does not depend on it, so it is detached.
    shift = logits.amax(dim=-1, keepdim=True).detach()
    weights = torch.exp(logits - shift)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhnm,bmhd->bnhd", weights / total, values)
    lse = (shift + torch.log(total)).squeeze(-1)
    return out, lse.transpose(1, 2)


def _extras(additional_keys, additional_values, heads):
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is None:
        return None, None
    return (
        _expand_heads(additional_keys.double(), heads),
        _expand_heads(additional_values.double(), heads),
    )


def _finish(out: Tensor, lse: Tensor, shape: Sequence[int], dtype, return_lse: bool):
    """Unflatten tokens; out in the query dtype, lse float32 ``[B, *spatial, heads]``."""
    out = out.reshape(*shape, out.shape[-1]).to(dtype)
    if not return_lse:
        return out
    return out, lse.reshape(*shape).float()


def na(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale: float | None = None,
    additional_keys: Tensor | None = None,
    additional_values: Tensor | None = None,
    rpb: Tensor | None = None,
    return_lse: bool = False,
):
    """Fused neighborhood attention: ``softmax(scale * q.k (+ rpb)) . v`` over the neighborhood.

    query ``[B, *spatial, heads, D]``; key/value ``[B, *spatial, heads_kv, D/Dv]``;
    additional_keys/values ``[B, n_extra, heads_kv, D/Dv]``; rpb ``[heads, 2K-1, ...]`` (odd K,
    stride 1). Returns out ``[B, *spatial, heads, Dv]`` and, with return_lse, lse float32
    ``[B, *spatial, heads]`` (natural log of the scaled logits' sum of exponentials).
    """
    batch, *spatial, heads, dim = query.shape
    _check_same("key", key, (batch, *spatial, key.shape[-2], dim))
    _check_same("value", value, (*key.shape[:-1], value.shape[-1]))
    scale = dim**-0.5 if scale is None else scale
    mask = neighborhood_mask(spatial, kernel_size, stride, dilation, is_causal, query.device)
    bias = None
    if rpb is not None:
        if any(s != 1 for s in _per_axis(stride, len(spatial), "stride")):
            raise NotImplementedError(f"rpb is defined for stride 1 only, got stride={stride}")
        bias = rpb_bias(spatial, kernel_size, dilation, rpb.double())
    extra_k, extra_v = _extras(additional_keys, additional_values, heads)
    out, lse = _softmax_attention(
        query.double().flatten(1, -3),
        _expand_heads(key.double().flatten(1, -3), heads),
        _expand_heads(value.double().flatten(1, -3), heads),
        scale,
        mask,
        bias,
        extra_k,
        extra_v,
    )
    return _finish(out, lse, (batch, *spatial, heads), query.dtype, return_lse)


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Dense self/cross attention, heads-last, tokens flattened row-major.

    query ``[B, *q_spatial, heads, D]``; key/value ``[B, *kv_spatial, heads_kv, D/Dv]``. Causal
    means key token j is visible to query token i iff j <= i (top-left aligned).
    """
    batch, *spatial, heads, dim = query.shape
    q = query.double().flatten(1, -3)
    k = _expand_heads(key.double().flatten(1, -3), heads)
    v = _expand_heads(value.double().flatten(1, -3), heads)
    scale = dim**-0.5 if scale is None else scale
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=query.device)
    if is_causal:
        mask = mask.tril()
    out, lse = _softmax_attention(q, k, v, scale, mask)
    return _finish(out, lse, (batch, *spatial, heads), query.dtype, return_lse)
