"""The Rust extension. Tensors travel as DLPack capsules (``tensor.__dlpack__()``); every
function validates all of its arguments before touching memory and raises ValueError, TypeError
or NotImplementedError naming the offending argument."""

from typing import Any, TypeAlias

Capsule: TypeAlias = Any

class KernelError(RuntimeError):
    """A CUDA driver or NVRTC failure; the message carries the compiler log."""

def qk_output_shape(
    query: Capsule,
    key: Capsule,
    rpb: Capsule | None,
    additional_keys: Capsule | None,
    kernel_size: list[int],
    dilation: list[int],
    is_causal: list[bool],
) -> list[int]:
    """Validate the inputs of ``na_qk``; the shape of ``attn``."""

def av_output_shape(
    attn: Capsule,
    value: Capsule,
    additional_values: Capsule | None,
    kernel_size: list[int],
    dilation: list[int],
    is_causal: list[bool],
) -> list[int]:
    """Validate the inputs of ``na_av``; the shape of ``out``."""

def na_qk(
    query: Capsule,
    key: Capsule,
    rpb: Capsule | None,
    additional_keys: Capsule | None,
    attn: Capsule,
    kernel_size: list[int],
    dilation: list[int],
    is_causal: list[bool],
) -> None:
    """Write neighborhood logits ``[B, heads, *spatial, prod(K) + n_extra]`` into ``attn``."""

def na_av(
    attn: Capsule,
    value: Capsule,
    additional_values: Capsule | None,
    out: Capsule,
    kernel_size: list[int],
    dilation: list[int],
    is_causal: list[bool],
) -> None:
    """Write the neighborhood weighted sum ``[B, heads, *spatial, D]`` into ``out``."""

def na_qk_backward(
    d_attn: Capsule,
    query: Capsule,
    key: Capsule,
    additional_keys: Capsule | None,
    d_query: Capsule,
    d_key: Capsule,
    d_rpb: Capsule | None,
    d_additional_keys: Capsule | None,
    kernel_size: list[int],
    dilation: list[int],
    is_causal: list[bool],
) -> None:
    """Write the gradients of ``na_qk`` (``d_rpb``/``d_additional_keys`` when given)."""

def na_av_backward(
    d_out: Capsule,
    attn: Capsule,
    value: Capsule,
    additional_values: Capsule | None,
    d_attn: Capsule,
    d_value: Capsule,
    d_additional_values: Capsule | None,
    kernel_size: list[int],
    dilation: list[int],
    is_causal: list[bool],
) -> None:
    """Write the gradients of ``na_av`` (``d_additional_values`` when given)."""

def dlpack_info(capsule: Capsule) -> tuple[int, list[int], list[int], str, str]:
    """``(data address, shape, strides, dtype, device)`` as natten_rs reads the capsule."""
