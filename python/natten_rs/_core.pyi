"""The Rust extension. Tensors travel as DLPack capsules (``tensor.__dlpack__()``); every
function validates all of its arguments before touching memory and raises ValueError, TypeError
or NotImplementedError naming the offending argument.

``stream`` (last argument of every op) is the handle of torch's current CUDA stream on the
tensors' device (``torch.cuda.current_stream(device).cuda_stream``): CUDA kernels are enqueued
there, in the device's primary context. It is ignored for CPU tensors (pass 0)."""

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
    stream: int,
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
    stream: int,
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
    stream: int,
    bias_scratch: Capsule | None = None,
) -> None:
    """Write the gradients of ``na_qk`` (``d_rpb``/``d_additional_keys`` when given);
    ``bias_scratch``, ``qk_bias_scratch_shape`` of it, lets the CUDA kernels sum ``d_rpb`` a tile
    of queries at a time."""

def qk_bias_scratch_shape(
    query: Capsule, key: Capsule, kernel_size: list[int], dilation: list[int], is_causal: list[bool]
) -> tuple[int, str]:
    """The scratch ``na_qk_backward`` takes for ``d_rpb``: ``(elements, dtype name)``, no elements
    where the CPU kernels run or the CUDA ones need none."""

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
    stream: int,
) -> None:
    """Write the gradients of ``na_av`` (``d_additional_values`` when given)."""

FusedInputs: TypeAlias = tuple[
    Capsule, Capsule | None, Capsule | None, Capsule | None, Capsule | None, Capsule | None
]
"""``(query, key, value, additional_keys, additional_values, rpb)``, heads-last."""
Neighborhood: TypeAlias = tuple[list[int], list[int], list[int], list[bool]]
"""``(kernel_size, stride, dilation, is_causal)``; an empty kernel means dense attention."""

def fused_output_shapes(
    inputs: FusedInputs, nbhd: Neighborhood, scale: float
) -> tuple[list[int], list[int]]:
    """Validate the inputs of a fused op; the shapes of ``(out, lse)``."""

def na_fused(
    inputs: FusedInputs,
    nbhd: Neighborhood,
    scale: float,
    out: Capsule,
    lse: Capsule,
    stream: int,
) -> None:
    """Fused attention into ``out`` ``[B, *spatial, heads, Dv]`` and ``lse`` (float32), on
    the CPU or on ``stream`` of the tensors' CUDA device."""

def na_fused_backward(
    inputs: FusedInputs,
    nbhd: Neighborhood,
    scale: float,
    saved: tuple[Capsule, Capsule, Capsule, Capsule | None],
    grads: FusedInputs,
    stats: Capsule,
    stream: int,
) -> None:
    """Gradients of a fused op. ``saved`` is ``(out, lse, d_out, d_lse)``; ``grads`` holds the
    gradient outputs in ``inputs`` order, each written when given; ``stats`` is scratch of
    ``fused_stats_shape`` (used by the CUDA kernels)."""

def fused_stats_shape(inputs: FusedInputs, nbhd: Neighborhood, scale: float) -> tuple[int, str]:
    """Validate the inputs of a fused op; the backward's scratch as ``(elements, dtype name)``."""

def dlpack_info(capsule: Capsule) -> tuple[int, list[int], list[int], str, str]:
    """``(data address, shape, strides, dtype, device)`` as natten_rs reads the capsule."""

def cpu_isa() -> tuple[str, str]:
    """The CPU kernels' instruction-set tier: ``(in use, best this CPU has)``, each one of
    ``"portable"``, ``"avx2"``, ``"avx512"``, ``"amx"`` (AVX-512 plus AMX bfloat16 tiles)."""

def set_cpu_isa(isa: str) -> str:
    """Cap the CPU kernels' tier at ``isa`` (a tier the CPU lacks runs as the best it has);
    returns the previous cap. ``ValueError`` for an unknown name."""

KernelRow: TypeAlias = tuple[str, int | None, int | None, str, str]
"""``(kernel, registers, spill bytes, compile log, origin)``; origin is ``"compiled"``,
``"disk"`` or ``"memory"``; registers and spills are None without a ptxas report."""

def compile_kernels(arch: str) -> list[KernelRow]:
    """Compile (or fetch from the caches) a spread of variants covering every kernel's code paths
    for ``arch`` (``"sm_80"``, ``"sm_90a"``, ...). Needs libnvrtc, no GPU."""

def precompile(
    arch: str | None,
    device: int,
    dtypes: list[str],
    shapes: list[tuple[list[int], list[bool]]],
    head_dims: list[tuple[int, int]] = ...,
    rpb: bool = ...,
) -> list[KernelRow]:
    """Compile the unfused kernels for every dtype name and ``(kernel_size, is_causal)`` shape,
    and the fused ones for every ``(head_dim, head_dim_v)`` in ``head_dims``, for ``arch`` or
    (when None) for CUDA device ``device``, the tensor-core ones for problems with a relative
    positional bias where ``rpb``; logs each module at INFO."""

def nvrtc_version() -> tuple[int, int]:
    """The version of the libnvrtc in use."""

def run_cuda_kernels_on_host(
    directory: str | None,
    compiler: str = "c++",
    max_grid: int = 2**32 - 1,
    reversed_threads: bool = False,
) -> bool:
    """While ``directory`` is set, ops on CPU tensors run the CUDA kernels, built there by the
    host C++ compiler ``compiler``, each launch on at most ``max_grid`` blocks, a block's threads
    taking their turns last first where ``reversed_threads`` (a test aid: a missing barrier
    shows in one order or the other); ``None`` turns it off. Whether it was on."""

def forget_compiled() -> None:
    """Forget the compiled kernels held in memory (the disk cache and loaded modules stay)."""
