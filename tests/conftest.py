"""Shared test helpers: devices, dtypes, tolerances against the float64 oracle, input factories.

Test files import these names with ``from conftest import ...``; tests/ is put on sys.path here
so that works (and ``import reference``) whatever pytest's import mode.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
from collections.abc import Callable

import pytest
import torch

TESTS_DIR = str(pathlib.Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Parametrize with DEVICE_PARAMS: the cuda entry carries the `cuda` marker.
DEVICE_PARAMS = [
    pytest.param(device, marks=[pytest.mark.cuda] if device == "cuda" else [], id=device)
    for device in DEVICES
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_PARAMS = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in DTYPES]

# Largest error allowed, as a fraction of the largest expected magnitude. The oracle runs in
# float64 on the very same (already rounded) inputs, so what remains is the kernel's accumulation
# error plus the rounding of its outputs (and of intermediates such as fp16 softmax weights).
# Error is measured against the max magnitude, not per element, because entries of sums that
# cancel to near zero carry absolute, not relative, error. Each budget is several ulps of the
# storage type: fp16 eps = 9.8e-4, bf16 eps = 7.8e-3, fp32 eps = 1.2e-7 (plus summation of up to a
# few thousand terms), fp64 eps = 2.2e-16.
TOLERANCES = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

LAYOUTS = ("contiguous", "permuted", "packed", "sliced", "shifted")


def _usable_cores() -> int:
    """The cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest-xdist): a worker per core, at most eight (each holds torch, and most of
    the suite's time goes to single-threaded compiles of the CUDA kernels for the host, which the
    workers then share: test_cuda_host.py)."""
    return min(_usable_cores(), 8)


# pytest-xdist's workers share the cores: each takes its share of torch's threads, which run
# natten_rs's CPU kernels too (one OpenMP team), rather than every worker spinning up a thread
# per core; at least two, so that the kernels' parallel paths still run on several threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(2, _usable_cores() // _WORKERS))


def pytest_configure(config):
    # pyproject registers the marker too; registering here keeps tests/ self-contained.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long or memory-hungry")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "") -> None:
    """Compare ``actual`` with a float64 oracle result at the tolerance of ``dtype``.

    ``dtype`` defaults to ``actual.dtype``. Infinities must match exactly (position and sign),
    NaN is never accepted; finite entries must be within ``TOLERANCES[dtype] * max|expected|``.
    """
    dtype = actual.dtype if dtype is None else dtype
    label = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{label}shape {actual.shape} != {expected.shape}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert not a.isnan().any(), f"{label}NaN in result"
    assert torch.equal(a.isposinf(), e.isposinf()), f"{label}+inf positions differ"
    assert torch.equal(a.isneginf(), e.isneginf()), f"{label}-inf positions differ"
    finite = e.isfinite()
    if not finite.any():
        return
    magnitude = e[finite].abs().max().item()
    error = (a[finite] - e[finite]).abs().max().item()
    bound = TOLERANCES[dtype] * magnitude
    assert error <= bound, (
        f"{label}max error {error:.3e} > {bound:.3e} ({dtype}, max {magnitude:.3e})"
    )


def _storage_shape(shape, layout: str, heads_first: bool) -> tuple[list[int], Callable]:
    """Shape to allocate and the view that turns it into a tensor of logical ``shape``.

    permuted: NATTEN/DiNAT's heads-first view of a heads-last buffer (or the reverse); tensors of
    rank < 4 are stored transposed instead. packed: DiNAT's qkv buffer ``[B, *spatial, 3, H, D]``,
    taking entry 1 (a storage offset as well as permuted strides). sliced: every other element of
    a last dimension twice as long. shifted: dense rows that start one element into a last
    dimension one longer (aligned to the element alone, as a channel slice leaves them).
    """
    shape = list(shape)
    rank = len(shape)
    if layout == "contiguous":
        return shape, lambda t: t
    if layout == "sliced":
        return shape[:-1] + [2 * shape[-1]], lambda t: t[..., ::2]
    if layout == "shifted":
        return shape[:-1] + [shape[-1] + 1], lambda t: t[..., 1:]
    if rank < 4:
        return shape[::-1], lambda t: t.permute(*reversed(range(rank)))
    # The heads axis sits at 1 in a heads-first shape and at -2 in a heads-last one; the buffer
    # has it at the other place.
    src, dst = (rank - 2, 1) if heads_first else (1, rank - 2)
    moved = list(shape)
    moved.insert(src, moved.pop(dst))
    if layout == "permuted":
        return moved, lambda t: t.movedim(src, dst)
    if layout == "packed":
        packed = moved[:-2] + [3] + moved[-2:]
        return packed, lambda t: t.select(-3, 1).movedim(src, dst)
    raise ValueError(f"unknown layout {layout!r}")


def make_tensor(
    shape,
    dtype: torch.dtype,
    device: str = "cpu",
    layout: str = "contiguous",
    *,
    generator: torch.Generator | None = None,
    heads_first: bool = True,
    requires_grad: bool = False,
    std: float = 1.0,
) -> torch.Tensor:
    """A normal random tensor of logical ``shape``, laid out as ``layout`` (see LAYOUTS).

    Values are drawn in float64 on the CPU, so they do not depend on the device. The result is a
    leaf even when it is a view, so ``.grad`` works for every layout.
    """
    storage_shape, view = _storage_shape(shape, layout, heads_first)
    values = torch.randn(storage_shape, generator=generator, dtype=torch.float64) * std
    out = view(values.to(device=device, dtype=dtype))
    assert tuple(out.shape) == tuple(shape)
    return out.requires_grad_(requires_grad)


def make_inputs(
    *shapes,
    dtype: torch.dtype,
    device: str = "cpu",
    layout: str = "contiguous",
    seed: int = 0,
    heads_first: bool = True,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One ``make_tensor`` per shape, all from one generator seeded with ``seed``.

    Entries have variance ``1/sqrt(D)`` (D = last dim), so a dot product of two such vectors has
    variance 1: logits stay O(1) and softmax is neither flat nor saturated.
    """
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        make_tensor(
            shape,
            dtype,
            device,
            layout,
            generator=generator,
            heads_first=heads_first,
            requires_grad=requires_grad,
            std=math.sqrt(1.0 / math.sqrt(shape[-1])),
        )
        for shape in shapes
    )


def expanded_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a batch-1 tensor to ``batch`` with a stride-0 batch dimension (no copy)."""
    assert tensor.shape[0] == 1
    return tensor.expand(batch, *tensor.shape[1:])


@pytest.fixture(scope="session")
def dist_site(tmp_path_factory):
    """The ``natten`` distribution (compat/natten) pip-installed into a temporary directory,
    built from a copy so that no build output lands in the source tree."""
    import shutil
    import subprocess

    source = pathlib.Path(__file__).resolve().parents[1] / "compat" / "natten"
    tmp = tmp_path_factory.mktemp("natten_dist")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(source, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "--target", str(site), str(src)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"pip install of compat/natten failed:\n{proc.stdout}\n{proc.stderr}")
    return site
