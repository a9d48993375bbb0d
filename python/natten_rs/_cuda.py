"""CUDA plumbing on the Python side: making libnvrtc loadable for the Rust core, the stream a
launch goes on, and compiling kernels ahead of time. Nothing here runs until CUDA is used.

The Rust core opens libnvrtc by its usual names (``libnvrtc.so.13``, ``libnvrtc.so.12``, ...).
torch's CUDA wheels bring it inside the ``nvidia`` package, where the system loader does not
look, so it is loaded here first (``RTLD_GLOBAL``): a later open by name finds the loaded one.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pathlib
import sys
import threading
from collections.abc import Iterable

import torch
from torch import Tensor

from . import _core
from ._core import KernelError
from ._forms import per_axis

_lock = threading.Lock()
_nvrtc_path: str | None = None


def _torch_cuda_major() -> int | None:
    version = torch.version.cuda
    return int(version.split(".")[0]) if version else None


def install_hint() -> str:
    """What to install to get libnvrtc for this torch."""
    packages = {12: "nvidia-cuda-nvrtc-cu12", 13: "nvidia-cuda-nvrtc"}
    major = _torch_cuda_major()
    if major in packages:
        return f"install it with `pip install {packages[major]}` (CUDA {major}, as torch)"
    return (
        "install the one matching torch's CUDA version: `pip install nvidia-cuda-nvrtc-cu12` "
        "(CUDA 12) or `pip install nvidia-cuda-nvrtc` (CUDA 13)"
    )


def _wheel_libraries() -> list[pathlib.Path]:
    """libnvrtc inside the ``nvidia`` wheels (``nvidia/cu13/lib`` for CUDA 13,
    ``nvidia/cuda_nvrtc/lib`` for CUDA 12), the one matching torch's CUDA version first."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    roots = [pathlib.Path(p) for p in spec.submodule_search_locations]
    cu13 = [root / "cu13" / "lib" / "libnvrtc.so.13" for root in roots]
    cu12 = [root / "cuda_nvrtc" / "lib" / "libnvrtc.so.12" for root in roots]
    ordered = cu12 + cu13 if _torch_cuda_major() == 12 else cu13 + cu12
    return [path for path in ordered if path.is_file()]


def _candidates(path) -> list[str]:
    if path is not None:
        return [os.fspath(path)]
    if sys.platform != "linux":
        return []  # elsewhere the system's search path is the only place the core looks
    wheels = [str(p) for p in _wheel_libraries()]
    system = ["libnvrtc.so.12", "libnvrtc.so.13"]
    if _torch_cuda_major() != 12:
        system.reverse()
    return wheels + system


def load_nvrtc(path: str | os.PathLike | None = None) -> str | None:
    """Load libnvrtc so that the Rust core finds it, and return the path loaded.

    ``path`` (else ``$NATTEN_RS_NVRTC``) names the library; by default it is looked for in the
    ``nvidia`` wheels torch depends on, then on the system's search path. Raises
    ``KernelError`` saying what to install when it cannot be loaded. Returns None where the
    core looks on its own (not Linux).
    """
    global _nvrtc_path
    if path is None:
        path = os.environ.get("NATTEN_RS_NVRTC") or None
    if path is None and _nvrtc_path is not None:
        return _nvrtc_path
    with _lock:
        candidates = _candidates(path)
        if not candidates:
            return None
        tried = []
        for candidate in candidates:
            try:
                ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
            except OSError as error:
                tried.append(f"{candidate} ({error})")
                continue
            if path is None:
                _nvrtc_path = candidate
            return candidate
    raise KernelError(
        "libnvrtc (NVRTC, the CUDA runtime compiler natten_rs builds its kernels with) could "
        f"not be loaded; {install_hint()}. Tried: {'; '.join(tried)}"
    )


def current_stream(t: Tensor) -> int:
    """The handle of torch's current CUDA stream on ``t``'s device (0 for other devices)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def launch_stream(t: Tensor) -> int:
    """``current_stream(t)``, with libnvrtc loaded first when ``t`` is a CUDA tensor (its
    kernels may need compiling)."""
    if t.device.type == "cuda":
        load_nvrtc()
    return current_stream(t)


def _dtype_name(dtype) -> str:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtypes: expected torch dtypes, got {dtype!r}")
    return str(dtype).removeprefix("torch.")


def _kernel_shape(kernel_size) -> list[int]:
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        return [kernel_size]
    if isinstance(kernel_size, (tuple, list)):
        return per_axis("kernel_sizes", list(kernel_size), len(kernel_size), int)
    raise TypeError(
        f"kernel_sizes: expected entries that are an int or a tuple of ints, got {kernel_size!r}"
    )


def _head_dims(entry) -> tuple[int, int]:
    """``(head_dim, head_dim_v)`` of one ``head_dims`` entry (the core checks the range)."""
    pair = (entry, entry) if not isinstance(entry, (tuple, list)) else tuple(entry)
    if len(pair) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) for d in pair):
        raise TypeError(
            "head_dims: expected entries that are an int or a (head_dim, head_dim_v) pair of "
            f"ints, got {entry!r}"
        )
    # The core checks the upper limit; values it could not even take are refused here.
    if not all(1 <= d < 2**63 for d in pair):
        raise ValueError(f"head_dims: expected positive head dims, got {entry!r}")
    return pair


def _device_index(device) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {device}")
    return torch.cuda.current_device() if device.index is None else device.index


def precompile(
    kernel_sizes: Iterable[int | tuple[int, ...]] = (7, (7, 7)),
    dtypes: Iterable[torch.dtype] = (torch.float16, torch.bfloat16, torch.float32),
    is_causal: bool | tuple[bool, ...] = False,
    arch: str | None = None,
    device: int | str | torch.device | None = None,
    head_dims: Iterable[int | tuple[int, int]] = (),
    rpb: bool = False,
) -> list[tuple[str, int | None, int | None]]:
    """Compile CUDA kernels ahead of time, so that no first call pauses: those of the unfused
    ops, and with ``head_dims``, those of the fused ops (``na1d``/``na2d``/``na3d``).

    ``kernel_sizes`` lists neighborhood shapes, one entry each: an int for 1-D, a tuple for
    2-D/3-D (``[7, (7, 7), (3, 3, 3)]``). ``is_causal`` is a bool or a per-axis tuple applied to
    every shape of its rank. Fused kernels are specialised by head dim as well: each entry of
    ``head_dims`` is an int (query, key and value head dim) or a ``(head_dim, head_dim_v)``
    pair, up to 256; they are built for stride 1 (strided problems compile at first use), the
    forward the GPU would run (tensor cores for float16/bfloat16 with head dims in multiples of
    8 on sm_80 and later) and the backward. The tensor-core kernels are specialised by whether
    the problems add a relative positional bias: ``rpb=True`` builds those of problems with one
    (NAT/DiNAT models). ``arch`` (``"sm_80"``, ``"sm_90a"``, ...) defaults to that of ``device``
    (default: the current CUDA device); with an explicit ``arch`` no GPU is needed.
    Binaries land in the disk cache (``$NATTEN_RS_CACHE_DIR``, default ``~/.cache/natten_rs``)
    and in memory. Each compiled module is logged at INFO on the ``natten_rs`` logger.

    Returns ``(kernel, registers, spill bytes)`` per kernel (registers and spills are None
    when NVRTC wrote no resource report).
    """
    if isinstance(kernel_sizes, (int, str)) or not isinstance(kernel_sizes, Iterable):
        raise TypeError(
            f"kernel_sizes: expected a list of kernel shapes (ints or tuples), got {kernel_sizes!r}"
        )
    shapes = []
    for entry in kernel_sizes:
        kernel = _kernel_shape(entry)
        shapes.append((kernel, per_axis("is_causal", is_causal, len(kernel), bool)))
    names = [_dtype_name(d) for d in dtypes]
    dims = [_head_dims(entry) for entry in head_dims]
    index = 0
    if arch is None:
        if not torch.cuda.is_available():
            raise ValueError(
                "arch: expected an architecture such as 'sm_80' or 'sm_90a' (there is no CUDA "
                "device to take it from), got None"
            )
        index = _device_index(device)
    elif not isinstance(arch, str):
        raise TypeError(f"arch: expected a str such as 'sm_80' or None, got {arch!r}")
    load_nvrtc()
    if not isinstance(rpb, bool):
        raise TypeError(f"rpb: expected a bool, got {rpb!r}")
    rows = _core.precompile(arch, index, names, shapes, dims, rpb)
    return [(name, registers, spills) for name, registers, spills, _log, _origin in rows]


def compile_kernels(arch: str) -> list[tuple[str, int | None, int | None, str, str]]:
    """Compile a spread of kernel variants covering every kernel's code paths for ``arch``
    (needs libnvrtc, no GPU): ``(kernel, registers, spill bytes, compile log, origin)`` each,
    origin being ``"compiled"``, ``"disk"`` or ``"memory"``."""
    load_nvrtc()
    return _core.compile_kernels(arch)
