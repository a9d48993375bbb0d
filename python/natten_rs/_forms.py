"""Argument forms: per-axis lists from ints or tuples, tensor and type checks, default scale,
NATTEN's tuning keywords. Values are checked by the Rust core, not here."""

from __future__ import annotations

import torch
from torch import Tensor

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

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


def per_axis(name: str, value, rank: int, kind: type) -> list:
    """``value`` as a list of ``rank`` items of ``kind`` (an int or bool repeats)."""
    # The common case first: every op call forms four of these.
    if type(value) is kind and (kind is bool or INT64_MIN <= value <= INT64_MAX):
        return [value] * rank
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


def _is(value, kind: type) -> bool:
    # bool is an int in Python; refuse it where an int is meant.
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def neighborhood(rank: int, kernel_size, dilation, is_causal) -> tuple[list, list, list]:
    """Per-axis ``(kernel_size, dilation, is_causal)``; None means the default."""
    return (
        per_axis("kernel_size", kernel_size, rank, int),
        per_axis("dilation", 1 if dilation is None else dilation, rank, int),
        per_axis("is_causal", False if is_causal is None else is_causal, rank, bool),
    )


def tensor_arg(name: str, value, optional: bool = False) -> Tensor | None:
    """Check that ``value`` is a tensor (or None where allowed)."""
    if value is None and optional:
        return None
    if not isinstance(value, Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name}: expected a strided (dense) tensor, got layout {value.layout}")
    return value


def scale_arg(scale, query: Tensor) -> float:
    """``scale`` as a float; None means ``head_dim ** -0.5``."""
    if scale is None:
        # A head dim of 0 is refused by the core, which names it; any scale will do until then.
        return query.shape[-1] ** -0.5 if query.shape[-1] > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    return float(scale)


def check_tuning(function: str, tuning: dict) -> None:
    """Accept NATTEN's tuning keywords; refuse any other keyword."""
    unknown = sorted(set(tuning) - NATTEN_TUNING_KWARGS)
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword argument(s) {unknown}")


def depth_first(depth, plane):
    """NATTEN's 3-D legacy ops take the depth size apart and one int for both planar axes."""
    return (depth, plane, plane) if _is(depth, int) and _is(plane, int) else (depth, plane)


def autocast(*tensors: Tensor | None) -> tuple:
    """Under autocast, floating-point ``tensors`` in the autocast dtype (the ops take one
    dtype, like matmul under autocast); otherwise unchanged."""
    device = next(t.device.type for t in tensors if t is not None)
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
