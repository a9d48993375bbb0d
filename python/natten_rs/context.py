"""NATTEN's context and capability functions (every name NATTEN 0.15 - 0.21 exports for them).

Flags that pick or tune NATTEN's own CUDA kernels (fused NA, KV parallelism, the auto-tuner,
tiled NA, TF32 in GEMM NA, Flex Attention compilation, memory-usage preference) are accepted,
checked and recorded, and the getters return what was set; natten_rs's kernels do not depend on
them. One does: ``use_gemm_na(False)`` keeps the unfused ops (``na*d_qk``, ``na*d_av``) off the
tensor-core window products that are natten_rs's counterpart of NATTEN's GEMM-based kernels,
on the kernels with a thread per output instead. natten_rs's kernels are deterministic
whatever ``use_deterministic_algorithms`` records.

Capability queries tell the truth about this machine and this build: natten_rs runs on CUDA
wherever torch sees a device (``has_cuda()``), its fused ops on the CPU and on every CUDA device
(``has_fna()``), and its unfused ops' tensor-core products on devices of compute capability 8.0
and later in float16 and bfloat16 (``has_gemm()``; none in float32 or float64, so
``has_tf32_gemm()`` and ``has_fp64_gemm()`` answer False). ``get_device_cc()`` answers 0
without a CUDA device.
"""

from __future__ import annotations

import dataclasses
from enum import Enum

import torch

from . import _core

__all__ = [
    "HAS_LIBNATTEN",
    "MemoryUsagePreference",
    "allow_flex_compile",
    "allow_flex_compile_backprop",
    "are_deterministic_algorithms_enabled",
    "disable_autotuner",
    "disable_flex_compile",
    "disable_flex_compile_backprop",
    "disable_gemm_na",
    "disable_tf32",
    "disable_tiled_na",
    "enable_gemm_na",
    "enable_tf32",
    "enable_tiled_na",
    "get_device_cc",
    "get_memory_usage_preference",
    "has_bfloat",
    "has_cuda",
    "has_fna",
    "has_fp32_gemm",
    "has_fp64_gemm",
    "has_fused_na",
    "has_gemm",
    "has_half",
    "has_tf32_gemm",
    "is_autotuner_enabled",
    "is_autotuner_enabled_for_backward",
    "is_autotuner_enabled_for_forward",
    "is_autotuner_thorough_for_backward",
    "is_autotuner_thorough_for_forward",
    "is_flex_compile_allowed",
    "is_flex_compile_backprop_allowed",
    "is_fna_enabled",
    "is_fused_na_enabled",
    "is_gemm_na_enabled",
    "is_kv_parallelism_in_fused_na_enabled",
    "is_memory_usage_default",
    "is_memory_usage_strict",
    "is_memory_usage_unrestricted",
    "is_tf32_in_gemm_na_enabled",
    "is_tiled_na_enabled",
    "set_memory_usage_preference",
    "use_autotuner",
    "use_deterministic_algorithms",
    "use_fna",
    "use_fused_na",
    "use_gemm_na",
    "use_kv_parallelism_in_fused_na",
    "use_tf32_in_gemm_na",
    "use_tiled_na",
]

# NATTEN 0.20+: whether NATTEN's compiled CUDA library is present. natten_rs ships none.
HAS_LIBNATTEN = False


class MemoryUsagePreference(str, Enum):
    """NATTEN's memory-usage preference; members also compare equal to their string."""

    Default = "default"
    Strict = "strict"
    Unrestricted = "unrestricted"


@dataclasses.dataclass
class _Context:
    deterministic: bool = False
    fused_na: bool = False
    # Whether use_fused_na(False) was called: modules then keep to the unfused ops.
    fused_na_refused: bool = False
    kv_parallel: bool = True
    flex_attention: bool = False
    memory_preference: MemoryUsagePreference = MemoryUsagePreference.Default
    autotune_forward: bool = False
    autotune_backward: bool = False
    autotune_thorough_forward: bool = False
    autotune_thorough_backward: bool = False
    autotune_warmup_steps_forward: int = 5
    autotune_warmup_steps_backward: int = 5
    autotune_steps_forward: int = 5
    autotune_steps_backward: int = 5
    tiled_na: bool = True
    tf32_in_gemm_na: bool = True
    flex_compile: bool = False
    flex_compile_backprop: bool = False


_STATE = _Context()


def _reset() -> None:
    """Restore every flag to its default (for tests)."""
    global _STATE
    _STATE = _Context()
    _core.use_unfused_tensor_cores(True)


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def _opt_bool(name: str, value) -> bool | None:
    return None if value is None else _bool(name, value)


def _opt_steps(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Determinism, fused NA, KV parallelism, memory preference
# ---------------------------------------------------------------------------------------------


def use_deterministic_algorithms(mode: bool = True) -> None:
    """Record NATTEN's deterministic mode. natten_rs's CPU kernels are always deterministic."""
    _STATE.deterministic = _bool("mode", mode)


def are_deterministic_algorithms_enabled() -> bool:
    return _STATE.deterministic


def use_kv_parallelism_in_fused_na(mode: bool = True) -> None:
    """Record whether NATTEN's fused backward may split over keys/values (non-deterministic
    there). As in NATTEN, enabling it in NATTEN's deterministic mode is a RuntimeError."""
    if not _bool("mode", mode):
        _STATE.kv_parallel = False
        return
    if _STATE.deterministic:
        raise RuntimeError(
            "mode: KV parallelism is non-deterministic, but NATTEN's deterministic mode is "
            "enabled (natten.use_deterministic_algorithms)"
        )
    _STATE.kv_parallel = True


def is_kv_parallelism_in_fused_na_enabled() -> bool:
    return _STATE.kv_parallel


def use_fused_na(
    mode: bool = True, kv_parallel: bool = True, use_flex_attention: bool = False
) -> None:
    """Record whether NATTEN's fused kernels are preferred. natten_rs's ops are fused where
    NATTEN's fused API is called and unfused where its unfused API is; the modules use the
    fused op where they can unless ``use_fused_na(False)`` was called."""
    mode = _bool("mode", mode)
    kv_parallel = _bool("kv_parallel", kv_parallel)
    use_flex_attention = _bool("use_flex_attention", use_flex_attention)
    _STATE.fused_na_refused = not mode
    if not mode:
        _STATE.fused_na = False
        _STATE.flex_attention = False
        use_kv_parallelism_in_fused_na(False)
        return
    use_kv_parallelism_in_fused_na(kv_parallel)
    _STATE.fused_na = True
    _STATE.flex_attention = use_flex_attention


def is_fused_na_enabled() -> bool:
    return _STATE.fused_na


def fused_na_refused() -> bool:
    """Whether ``use_fused_na(False)`` was the last word (modules then use the unfused ops)."""
    return _STATE.fused_na_refused


use_fna = use_fused_na
is_fna_enabled = is_fused_na_enabled


def set_memory_usage_preference(pref: str = "default") -> None:
    """Record the memory-usage preference: ``"default"``, ``"strict"`` or ``"unrestricted"``."""
    if not isinstance(pref, str):
        raise TypeError(f"pref: expected a str, got {type(pref).__name__} {pref!r}")
    try:
        _STATE.memory_preference = MemoryUsagePreference(pref)
    except ValueError:
        raise ValueError(
            f"pref: expected one of 'default', 'strict', 'unrestricted', got {pref!r}"
        ) from None


def get_memory_usage_preference() -> MemoryUsagePreference:
    return _STATE.memory_preference


def is_memory_usage_default() -> bool:
    return _STATE.memory_preference is MemoryUsagePreference.Default


def is_memory_usage_strict() -> bool:
    return _STATE.memory_preference is MemoryUsagePreference.Strict


def is_memory_usage_unrestricted() -> bool:
    return _STATE.memory_preference is MemoryUsagePreference.Unrestricted


# ---------------------------------------------------------------------------------------------
# Auto-tuner (NATTEN 0.17)
# ---------------------------------------------------------------------------------------------


def use_autotuner(
    forward_pass: bool | None = None,
    backward_pass: bool | None = None,
    thorough_mode_forward: bool | None = None,
    thorough_mode_backward: bool | None = None,
    warmup_steps_forward: int | None = None,
    warmup_steps_backward: int | None = None,
    steps_forward: int | None = None,
    steps_backward: int | None = None,
) -> None:
    """Record NATTEN's auto-tuner settings; ``None`` leaves a setting unchanged. Enabling it in
    NATTEN's deterministic mode is a RuntimeError, as in NATTEN."""
    args = {
        "forward_pass": _opt_bool("forward_pass", forward_pass),
        "backward_pass": _opt_bool("backward_pass", backward_pass),
        "thorough_mode_forward": _opt_bool("thorough_mode_forward", thorough_mode_forward),
        "thorough_mode_backward": _opt_bool("thorough_mode_backward", thorough_mode_backward),
        "warmup_steps_forward": _opt_steps("warmup_steps_forward", warmup_steps_forward),
        "warmup_steps_backward": _opt_steps("warmup_steps_backward", warmup_steps_backward),
        "steps_forward": _opt_steps("steps_forward", steps_forward),
        "steps_backward": _opt_steps("steps_backward", steps_backward),
    }
    for name in ("forward_pass", "backward_pass"):
        if args[name] and _STATE.deterministic:
            raise RuntimeError(
                f"{name}: the auto-tuner is non-deterministic, but NATTEN's deterministic mode "
                "is enabled (natten.use_deterministic_algorithms)"
            )
    fields = {
        "forward_pass": "autotune_forward",
        "backward_pass": "autotune_backward",
        "thorough_mode_forward": "autotune_thorough_forward",
        "thorough_mode_backward": "autotune_thorough_backward",
        "warmup_steps_forward": "autotune_warmup_steps_forward",
        "warmup_steps_backward": "autotune_warmup_steps_backward",
        "steps_forward": "autotune_steps_forward",
        "steps_backward": "autotune_steps_backward",
    }
    for name, value in args.items():
        if value is not None:
            setattr(_STATE, fields[name], value)


def disable_autotuner() -> None:
    _STATE.autotune_forward = _STATE.autotune_backward = False
    _STATE.autotune_thorough_forward = _STATE.autotune_thorough_backward = False


def is_autotuner_enabled() -> bool:
    return _STATE.autotune_forward or _STATE.autotune_backward


def is_autotuner_enabled_for_forward() -> bool:
    return _STATE.autotune_forward


def is_autotuner_enabled_for_backward() -> bool:
    return _STATE.autotune_backward


def is_autotuner_thorough_for_forward() -> bool:
    return _STATE.autotune_thorough_forward


def is_autotuner_thorough_for_backward() -> bool:
    return _STATE.autotune_thorough_backward


# ---------------------------------------------------------------------------------------------
# Tiled / GEMM NA and TF32 (NATTEN 0.15 - 0.17); enable_* / disable_* return the new setting
# ---------------------------------------------------------------------------------------------


def use_tiled_na(mode: bool = True) -> None:
    _STATE.tiled_na = _bool("mode", mode)


def is_tiled_na_enabled() -> bool:
    return _STATE.tiled_na


def use_gemm_na(mode: bool = True) -> None:
    """Let the unfused ops take their tensor-core window products where they fit (the default),
    or (``False``) keep them on the kernels with a thread per output: a way round the
    tensor-core kernels, as NATTEN's flag turned its GEMM-based kernels off."""
    _core.use_unfused_tensor_cores(_bool("mode", mode))


def is_gemm_na_enabled() -> bool:
    return _core.unfused_tensor_cores()


def use_tf32_in_gemm_na(mode: bool = True) -> None:
    _STATE.tf32_in_gemm_na = _bool("mode", mode)


def is_tf32_in_gemm_na_enabled() -> bool:
    return _STATE.tf32_in_gemm_na


def enable_tf32() -> bool:
    use_tf32_in_gemm_na(True)
    return is_tf32_in_gemm_na_enabled()


def disable_tf32() -> bool:
    use_tf32_in_gemm_na(False)
    return is_tf32_in_gemm_na_enabled()


def enable_gemm_na() -> bool:
    use_gemm_na(True)
    return is_gemm_na_enabled()


def disable_gemm_na() -> bool:
    use_gemm_na(False)
    return is_gemm_na_enabled()


def enable_tiled_na() -> bool:
    use_tiled_na(True)
    return is_tiled_na_enabled()


def disable_tiled_na() -> bool:
    use_tiled_na(False)
    return is_tiled_na_enabled()


# ---------------------------------------------------------------------------------------------
# Flex Attention compilation (NATTEN 0.20+)
# ---------------------------------------------------------------------------------------------


def allow_flex_compile(mode: bool = True, backprop: bool = False) -> None:
    """Record whether NATTEN's Flex backends may use ``torch.compile`` (forward, and with
    ``backprop`` also backward)."""
    mode, backprop = _bool("mode", mode), _bool("backprop", backprop)
    _STATE.flex_compile = mode
    _STATE.flex_compile_backprop = mode and backprop


def allow_flex_compile_backprop(mode: bool = True) -> None:
    allow_flex_compile(_STATE.flex_compile, _bool("mode", mode))


def disable_flex_compile() -> None:
    allow_flex_compile(False)


def disable_flex_compile_backprop() -> None:
    allow_flex_compile(_STATE.flex_compile, False)


def is_flex_compile_allowed() -> bool:
    return _STATE.flex_compile


def is_flex_compile_backprop_allowed() -> bool:
    return _STATE.flex_compile_backprop


# ---------------------------------------------------------------------------------------------
# Capability queries: the truth about this machine and this build
# ---------------------------------------------------------------------------------------------


def _is_cpu(device_index) -> bool:
    """Whether NATTEN's ``device_index`` argument names the CPU. ``None`` means the current
    CUDA device where CUDA is available, and otherwise the CPU."""
    if device_index is None:
        return not torch.cuda.is_available()
    if isinstance(device_index, str):
        try:
            device_index = torch.device(device_index)
        except RuntimeError:
            raise ValueError(f"device_index: not a device: {device_index!r}") from None
    if isinstance(device_index, torch.device):
        return device_index.type == "cpu"
    if isinstance(device_index, bool) or not isinstance(device_index, int):
        raise TypeError(
            f"device_index: expected None, an int, a str or a torch.device, got "
            f"{type(device_index).__name__} {device_index!r}"
        )
    return False


def get_device_cc(device_index=None) -> int:
    """Compute capability of a CUDA device as ``10 * major + minor`` (0 without CUDA, or for
    the CPU)."""
    if _is_cpu(device_index) or not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


def has_cuda() -> bool:
    """Whether natten_rs can run on CUDA here: whenever torch sees a CUDA device (the kernels
    are compiled for it at first use)."""
    return torch.cuda.is_available()


def has_half(device_index=None) -> bool:
    """float16 support: on the CPU, and on every CUDA device (the kernels convert halves
    themselves, so no architecture is excluded)."""
    return _is_cpu(device_index) or torch.cuda.is_available()


def has_bfloat(device_index=None) -> bool:
    """bfloat16 support: as ``has_half``."""
    return has_half(device_index)


def has_gemm(device_index=None) -> bool:
    """Whether the unfused ops have tensor-core window products on the device (NATTEN's
    GEMM-based kernels): CUDA devices of compute capability 8.0 and later."""
    return not _is_cpu(device_index) and get_device_cc(device_index) >= 80


def _no_gemm(device_index=None) -> bool:
    _is_cpu(device_index)  # type-checks the argument
    return False


def has_tf32_gemm(device_index=None) -> bool:
    """False: the tensor-core window products take float16 and bfloat16 only."""
    return _no_gemm(device_index)


def has_fp64_gemm(device_index=None) -> bool:
    """False: the tensor-core window products take float16 and bfloat16 only."""
    return _no_gemm(device_index)


def has_fna(device_index=None) -> bool:
    """Whether the fused ops run on the device: on the CPU, and on every CUDA device torch
    sees."""
    return _is_cpu(device_index) or torch.cuda.is_available()


has_fp32_gemm = has_tf32_gemm
has_fused_na = has_fna
