"""natten_rs's fused ops (na1d/na2d/na3d, attention, merge_attentions) against the dense oracle.

spec/API.md "fused ops" and spec/NEIGHBORHOOD.md "Fused ops". Every numeric test runs on every
device and dtype; the oracle computes in float64 on the very same (rounded) inputs, so tolerances
only cover the kernels' own rounding (see conftest). lse is float32 whatever the inputs, so values
derived from it (lse itself, merged outputs) are held to float32's tolerance at float64.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import subprocess
import sys

import natten_rs
import natten_rs.functional as F
import pytest
import reference
import torch
from conftest import (
    DEVICE_PARAMS,
    DTYPE_PARAMS,
    LAYOUTS,
    assert_close,
    expanded_batch,
    make_inputs,
    make_tensor,
)
from natten_rs import _core, _ops
from torch.nn.functional import scaled_dot_product_attention as sdpa


@dataclasses.dataclass(frozen=True)
class Case:
    """One fused problem. Per-axis fields are tuples; ``form`` says how they are passed."""

    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    batch: int = 1
    heads: int = 2
    heads_kv: int = 2
    dim: int = 8
    dim_v: int = 8
    rpb: bool = False
    n_extra: int = 0
    expanded_extras: bool = False  # extras given as a stride-0 expansion of a batch-1 tensor
    scale: float | None = None
    layout: str = "contiguous"
    form: str = "tuple"  # "scalar" (int/bool where uniform), "tuple" or "list"

    @property
    def rank(self) -> int:
        return len(self.spatial)

    def arg(self, values: tuple):
        """A per-axis argument in this case's form."""
        if self.form == "scalar" and len(set(values)) == 1:
            return values[0]
        return list(values) if self.form == "list" else tuple(values)

    def __str__(self) -> str:
        causal = "".join("C" if c else "n" for c in self.causal)
        extras = f"x{self.n_extra}{'e' if self.expanded_extras else ''}"
        scale = "" if self.scale is None else f"-sc{self.scale}"
        return (
            f"{self.rank}d-S{'x'.join(map(str, self.spatial))}-K{self.kernel}-s{self.stride}-"
            f"d{self.dilation}-{causal}-{'rpb-' if self.rpb else ''}{extras}{scale}-"
            f"{self.layout}-{self.form}-B{self.batch}H{self.heads}/{self.heads_kv}"
            f"D{self.dim}/{self.dim_v}"
        ).replace(" ", "")


# Positional fields: spatial, kernel, stride, dilation, causal, batch, heads, heads_kv, dim, dim_v.
# Between them: ranks 1-3, kernels 2..7 (odd and even), stride 1, 2, 3 and == kernel (blocked),
# dilation 1..3 with lengths not divisible by it, causal per axis, GQA and MQA, Dv != D, extras
# (some expanded), rpb (causal or not), custom scale, every layout and argument form.
FIXED_CASES = [
    Case((16,), (2,), (1,), (1,), (False,), 2, 2, 2, 8, 8),
    Case((17,), (5,), (2,), (3,), (False,), 1, 4, 2, 8, 8, layout="permuted"),
    Case((13,), (4,), (4,), (1,), (False,), 2, 2, 1, 4, 6, form="scalar"),
    Case((11,), (3,), (1,), (2,), (True,), 2, 3, 3, 5, 5, rpb=True, n_extra=3,
         expanded_extras=True, form="scalar"),
    Case((20,), (7,), (3,), (2,), (True,), 1, 3, 1, 16, 6, scale=0.3, layout="sliced"),
    Case((10,), (3,), (2,), (3,), (True,), 1, 2, 2, 4, 4, layout="packed", form="list"),
    Case((7, 9), (3, 5), (1, 1), (2, 1), (False, False), 2, 2, 2, 8, 8, rpb=True, n_extra=2,
         layout="permuted"),
    Case((8, 8), (4, 2), (2, 2), (1, 3), (True, False), 1, 4, 2, 8, 12, form="list"),
    Case((6, 9), (6, 3), (6, 3), (1, 1), (False, False), 2, 2, 2, 8, 8, layout="sliced"),
    Case((10, 7), (3, 3), (1, 1), (3, 2), (False, True), 2, 3, 1, 8, 8, rpb=True, n_extra=2,
         expanded_extras=True, scale=0.5),
    Case((9, 8), (5, 4), (3, 1), (1, 2), (True, True), 1, 2, 2, 5, 3, layout="packed"),
    Case((5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 2, 2), (False,) * 3, 1, 4, 2, 8, 8, rpb=True,
         n_extra=1, layout="permuted"),
    Case((4, 6, 8), (2, 3, 4), (2, 1, 4), (2, 1, 2), (True, False, True), 2, 2, 1, 4, 6,
         layout="sliced"),
    Case((6, 5, 7), (3, 5, 7), (3, 5, 1), (1, 1, 1), (False, True, False), 1, 2, 2, 8, 8,
         n_extra=2, expanded_extras=True, form="list"),
    Case((5, 5, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), (True,) * 3, 1, 2, 2, 8, 8, rpb=True,
         form="scalar"),
    # Longer axes, wide and odd head dims, a peaked softmax (large scale), many extras.
    Case((70,), (9,), (3,), (4,), (False,), 1, 2, 1, 65, 64, n_extra=4, scale=3.0),
    Case((12, 14), (5, 7), (1, 1), (2, 2), (False, True), 1, 2, 2, 128, 32, rpb=True,
         layout="permuted"),
    Case((6, 8, 9), (4, 5, 3), (4, 2, 3), (1, 1, 3), (True, False, False), 1, 6, 2, 33, 17,
         n_extra=9, expanded_extras=True, layout="sliced"),
]  # fmt: skip


def _params(cases):
    return [pytest.param(case, id=str(case)) for case in cases]


MAX_SHAPE = {1: (24,), 2: (10, 11), 3: (5, 6, 7)}
HEADS = ((1, 1), (2, 1), (2, 2), (3, 1), (4, 2), (3, 3))


def _random_axis(rng: random.Random, max_length: int, max_kernel: int) -> tuple[int, int, int, int]:
    kernel = rng.randint(2, min(max_kernel, max_length))
    dilation = rng.choice([d for d in (1, 2, 3) if kernel * d <= max_length])
    stride = rng.choice(sorted({1, 2, kernel}))
    return rng.randint(kernel * dilation, max_length), kernel, stride, dilation


def random_case(
    rng: random.Random,
    rank: int,
    max_shape: tuple[int, ...] | None = None,
    max_kernel: int = 7,
    dims: tuple[int, ...] = (4, 8, 16),
    dims_v: tuple[int, ...] = (6,),
) -> Case:
    """A problem with every feature drawn at random: axes up to `max_shape` (MAX_SHAPE's by
    default), kernels up to `max_kernel`, head dims from `dims` and value head dims the same or
    from `dims_v`."""
    axes = max_shape or MAX_SHAPE[rank]
    spatial, kernel, stride, dilation = zip(*(_random_axis(rng, n, max_kernel) for n in axes))
    heads, heads_kv = rng.choice(HEADS)
    dim = rng.choice(dims)
    n_extra = rng.choice((0, 0, 1, 3))
    rpb_ok = all(k % 2 for k in kernel) and all(s == 1 for s in stride)
    return Case(
        spatial, kernel, stride, dilation, tuple(rng.random() < 0.3 for _ in range(rank)),
        batch=rng.randint(1, 2), heads=heads, heads_kv=heads_kv, dim=dim,
        dim_v=rng.choice((dim, *dims_v)), rpb=rpb_ok and rng.random() < 0.6, n_extra=n_extra,
        expanded_extras=n_extra > 0 and rng.random() < 0.3, scale=rng.choice((None, None, 0.25)),
        layout=rng.choice(LAYOUTS), form=rng.choice(("scalar", "tuple", "list")),
    )  # fmt: skip


_RNG = random.Random(2025)
CASES = FIXED_CASES + [random_case(_RNG, rank) for rank in (1, 2, 3) for _ in range(3)]
CASE_PARAMS = _params(CASES)


# ---------------------------------------------------------------------------------------------
# Inputs and calls
# ---------------------------------------------------------------------------------------------


def leaves(case: Case, dtype, device, requires_grad=False, seed=0) -> dict:
    """Leaf tensors, heads-last (extras at batch 1 when they will be expanded)."""
    b, s, h, hk, d, dv = case.batch, case.spatial, case.heads, case.heads_kv, case.dim, case.dim_v
    shapes = {"query": (b, *s, h, d), "key": (b, *s, hk, d), "value": (b, *s, hk, dv)}
    if case.n_extra:
        extra_batch = 1 if case.expanded_extras else b
        shapes["additional_keys"] = (extra_batch, case.n_extra, hk, d)
        shapes["additional_values"] = (extra_batch, case.n_extra, hk, dv)
    if case.rpb:
        shapes["rpb"] = (h, *(2 * k - 1 for k in case.kernel))
    tensors = make_inputs(*shapes.values(), dtype=dtype, device=device, layout=case.layout,
                          seed=seed, heads_first=False, requires_grad=requires_grad)  # fmt: skip
    return dict(zip(shapes, tensors))


def _extra(case: Case, t: dict, name: str):
    x = t.get(name)
    return expanded_batch(x, case.batch) if x is not None and case.expanded_extras else x


def call(case: Case, t: dict, op=None, **kwargs):
    """natten_rs.na{rank}d on the leaves, every argument by keyword past kernel_size."""
    op = op or getattr(natten_rs, f"na{case.rank}d")
    return op(
        t["query"], t["key"], t["value"], case.arg(case.kernel),
        stride=case.arg(case.stride), dilation=case.arg(case.dilation),
        is_causal=case.arg(case.causal), scale=case.scale,
        additional_keys=_extra(case, t, "additional_keys"),
        additional_values=_extra(case, t, "additional_values"), rpb=t.get("rpb"), **kwargs,
    )  # fmt: skip


def oracle(case: Case, t: dict, return_lse=False):
    return reference.na(
        t["query"], t["key"], t["value"], case.kernel, case.stride, case.dilation, case.causal,
        case.scale, additional_keys=_extra(case, t, "additional_keys"),
        additional_values=_extra(case, t, "additional_values"), rpb=t.get("rpb"),
        return_lse=return_lse,
    )  # fmt: skip


def as_oracle(t: dict) -> dict:
    """float64 CPU copies of the leaves, as new leaves (requiring grad where the originals do)."""
    return {
        name: x.detach().to("cpu", torch.float64).requires_grad_(x.requires_grad)
        for name, x in t.items()
    }


def guarded(device: str, dtype, fn):
    """Run ``fn``; float64 on CUDA may be declared unsupported (NotImplementedError), nothing else."""
    try:
        return fn()
    except NotImplementedError as error:
        if device == "cuda" and dtype == torch.float64:
            pytest.skip(f"float64 on CUDA not supported: {error}")
        raise


def lse_tolerance(dtype):
    """lse is float32 by contract: what derives from it is float32-accurate at best."""
    return torch.float32 if dtype == torch.float64 else dtype


def random_grad(shape, dtype, device, seed=7) -> torch.Tensor:
    """A random upstream gradient, rounded to ``dtype`` (the oracle receives the same values)."""
    grad = make_tensor(shape, torch.float64, generator=torch.Generator().manual_seed(seed))
    return grad.to(device=device, dtype=dtype)


def heads_first_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, *spatial, heads, D]`` -> float64 CPU ``[B, heads, N, D]`` (SDPA's layout)."""
    return x.detach().to("cpu", torch.float64).flatten(1, -3).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Forward and backward sweeps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_forward(case, device, dtype):
    t = leaves(case, dtype, device)
    out, lse = guarded(device, dtype, lambda: call(case, t, return_lse=True))
    assert out.dtype == dtype and out.device.type == device
    assert lse.dtype == torch.float32 and lse.device.type == device
    expected, expected_lse = oracle(case, as_oracle(t), return_lse=True)
    assert_close(out, expected, dtype, what="out")
    assert_close(lse, expected_lse, lse_tolerance(dtype), what="lse")
    assert_close(call(case, t), expected, dtype, what="out (return_lse=False)")


# Windows large enough that the CPU forward cuts each problem into many slabs (runs of queries
# whose key and value rows it stages together), across dilation groups, strides, causal axes;
# and outputs of 2 MiB and more, which the CPU forward writes with streaming stores where its
# rows are whole cache lines (256 channels) and with plain ones where not (40 channels, float32).
SLAB_CASES = [
    Case((1100,), (129,), (3,), (3,), (True,), 1, 4, 2, 16, 8, n_extra=2),
    Case((40, 46), (15, 13), (1, 1), (2, 3), (False, True), 1, 4, 2, 16, 24, rpb=True,
         layout="permuted"),
    Case((6, 20, 21), (5, 7, 7), (2, 1, 1), (1, 2, 3), (True, False, False), 2, 2, 1, 8, 8),
    Case((256,), (31,), (1,), (2,), (False,), 4, 4, 2, 32, 256),
    Case((256,), (17,), (1,), (1,), (True,), 16, 4, 4, 16, 40, rpb=True),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", _params(SLAB_CASES))
def test_forward_over_many_slabs(case, dtype):
    t = leaves(case, dtype, "cpu")
    out, lse = call(case, t, return_lse=True)
    expected, expected_lse = oracle(case, as_oracle(t), return_lse=True)
    assert_close(out, expected, dtype, what="out")
    assert_close(lse, expected_lse, lse_tolerance(dtype), what="lse")


CPU_TIERS = ["portable", "avx2", "avx512", "amx"]


@pytest.fixture(params=CPU_TIERS)
def cpu_tier(request):
    """Run the test with the CPU kernels capped at a tier (skipped where the CPU lacks it)."""
    tier = request.param
    best = _core.cpu_isa()[1]
    if CPU_TIERS.index(tier) > CPU_TIERS.index(best):
        pytest.skip(f"this CPU's best tier is {best}, not {tier}")
    previous = _core.set_cpu_isa(tier)
    assert _core.cpu_isa()[0] == tier
    yield tier
    _core.set_cpu_isa(previous)


# Problems the AMX tier's bfloat16 tile forward takes (key channels a multiple of 32 up to 128,
# value channels a multiple of 32, no rpb or extras): windows of at most eight keys per run (two
# runs share a vector in its softmax) and wider ones; blocks cut short by line ends, dilation
# groups, strides and causal windows; value rows wider than one pass of four output tiles; GQA;
# heads-first views of heads-last memory; and key rows too wide for it (160 channels).
TILE_CASES = [
    Case((19, 37), (7, 7), (1, 1), (1, 1), (False, False), 2, 2, 2, 32, 32),
    Case((12, 40), (5, 7), (2, 3), (2, 1), (True, False), 1, 4, 2, 64, 96),
    Case((150,), (31,), (1,), (3,), (False,), 1, 2, 1, 128, 160),
    Case((9, 70), (3, 9), (1, 1), (1, 4), (False, True), 1, 2, 2, 96, 32, layout="permuted"),
    Case((5, 7, 20), (3, 5, 7), (1, 1, 7), (1, 1, 2), (False, False, False), 1, 2, 2, 64, 64),
    Case((8, 18), (3, 3), (1, 1), (1, 1), (False, False), 1, 2, 2, 160, 32),
    # Peaked softmaxes whose exponentials leave the range taken without subtracting the max.
    Case((10, 37), (7, 7), (1, 1), (1, 1), (False, False), 1, 2, 2, 32, 32, scale=60.0),
    Case((90,), (31,), (1,), (1,), (False,), 1, 2, 1, 64, 32, scale=60.0),
]  # fmt: skip

# Head dims around the SIMD widths (tails of 8 and 16 lanes) and past what the AVX-512 pair
# kernel keeps in registers (264 channels: it hands those rows to the AVX2 one); and the widths
# the AVX-512 pair kernel has unrolled versions of (16, 32, 64 channels, keys and values alike,
# no extras), with rpb, causal and dilated windows, against the same width with extras; and
# windows wider than eight keys (that kernel pairs their queries over unions of 8-key groups).
TIER_CASES = [
    *FIXED_CASES,
    *SLAB_CASES,
    Case((9, 11), (5, 7), (1, 1), (1, 1), (False, False), 1, 2, 1, 264, 40, n_extra=3),
    Case((6, 13), (3, 5), (1, 1), (2, 1), (False, True), 1, 2, 2, 24, 72, rpb=True),
    Case((9, 20), (3, 7), (1, 1), (1, 2), (False, True), 1, 2, 1, 32, 32, rpb=True),
    Case((13, 12), (5, 5), (1, 1), (2, 1), (False, False), 2, 2, 2, 64, 64, rpb=True,
         layout="permuted"),
    Case((40,), (7,), (1,), (3,), (False,), 1, 2, 2, 16, 16),
    Case((5, 6, 9), (3, 3, 5), (1, 1, 1), (1, 1, 1), (True, False, False), 1, 2, 2, 32, 32,
         n_extra=2),
    Case((60,), (13,), (1,), (2,), (True,), 1, 2, 1, 32, 32, rpb=True),
    Case((7, 30), (3, 11), (1, 1), (1, 2), (False, False), 2, 2, 2, 64, 64, rpb=True),
    Case((10, 24), (3, 6), (1, 3), (1, 1), (False, False), 1, 2, 2, 16, 16, layout="sliced"),
    Case((4, 5, 21), (3, 3, 9), (1, 1, 1), (1, 1, 2), (False, False, True), 1, 2, 1, 32, 32),
    *TILE_CASES,
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", _params(TIER_CASES))
def test_forward_on_every_cpu_tier(case, dtype, cpu_tier):
    t = leaves(case, dtype, "cpu")
    out, lse = call(case, t, return_lse=True)
    expected, expected_lse = oracle(case, as_oracle(t), return_lse=True)
    assert_close(out, expected, dtype, what=f"out ({cpu_tier})")
    assert_close(lse, expected_lse, lse_tolerance(dtype), what=f"lse ({cpu_tier})")


def test_cpu_tier_rejects_unknown_names():
    with pytest.raises(
        ValueError, match=r"isa: expected one of 'portable', 'avx2', 'avx512', 'amx', got 'sse4'"
    ):
        _core.set_cpu_isa("sse4")
    assert _core.cpu_isa()[0] in CPU_TIERS


def test_cpu_tier_environment_variable_is_checked_at_import():
    def run(value):
        code = "import natten_rs; print(natten_rs._core.cpu_isa()[0])"
        env = {**os.environ, "NATTEN_RS_CPU_ISA": value}
        args = [sys.executable, "-c", code]
        return subprocess.run(args, check=False, env=env, capture_output=True, text=True)

    capped = run("portable")
    assert capped.returncode == 0 and capped.stdout.strip() == "portable", capped.stderr
    bad = run("avx1024")
    assert bad.returncode != 0
    assert (
        "NATTEN_RS_CPU_ISA: expected one of 'portable', 'avx2', 'avx512', 'amx', got 'avx1024'"
        in bad.stderr
    )


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_backward(case, device, dtype):
    t = leaves(case, dtype, device, requires_grad=True)
    out = guarded(device, dtype, lambda: call(case, t))
    grad = random_grad(out.shape, dtype, device)
    out.backward(grad)
    expected = as_oracle(t)
    oracle(case, expected).backward(grad.cpu().double())
    for name, leaf in t.items():
        assert leaf.grad is not None, f"no gradient for {name}"
        assert_close(leaf.grad, expected[name].grad, dtype, what=f"d{name}")


def test_backward_is_the_same_on_any_number_of_threads():
    """Key and value gradients are summed chunk by chunk in an order fixed by the problem alone:
    one thread and several give the same bits, and match the oracle, on a problem split into
    many chunks (long dilated axes, GQA, rpb, extras)."""
    case = Case((48, 20), (5, 3), (1, 1), (2, 1), (False, True), 2, 4, 2, 16, 8, rpb=True,
                n_extra=2)  # fmt: skip
    grads = []
    threads = torch.get_num_threads()
    for n in (1, max(threads, 3)):
        torch.set_num_threads(n)
        try:
            t = leaves(case, torch.float32, "cpu", requires_grad=True)
            out = call(case, t)
            out.backward(random_grad(out.shape, torch.float32, "cpu"))
        finally:
            torch.set_num_threads(threads)
        grads.append({name: leaf.grad for name, leaf in t.items()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), f"d{name} depends on the threads"
    expected = as_oracle(t)
    oracle(case, expected).backward(random_grad(out.shape, torch.float32, "cpu").double())
    for name, leaf in t.items():
        assert_close(leaf.grad, expected[name].grad, torch.float32, what=f"d{name}")


# Problems whose backward takes neighboring queries in pairs where the CPU has AVX-512 (head dims
# of 16, 32 or 64 for both keys and values, no additional tokens, dense rows; the pair kernels
# widen half-precision rows as they load them), at every rank: even kernels, dilation, causal,
# stride, rpb, GQA/MQA, Dv != D, and pairs broken by causal window edges.
PAIR_CASES = [
    Case((24,), (5,), (1,), (1,), (False,), 2, 4, 2, 32, 32, rpb=True),
    Case((40,), (13,), (1,), (1,), (False,), 1, 2, 2, 16, 16, rpb=True),  # unions over 8 rows
    Case((19,), (6,), (1,), (2,), (True,), 1, 2, 2, 16, 64),
    Case((9, 13), (3, 5), (1, 1), (2, 1), (False, False), 1, 2, 1, 64, 16, rpb=True),
    Case((8, 12), (4, 4), (1, 1), (1, 2), (False, True), 2, 2, 2, 32, 32, layout="permuted"),
    Case((10, 14), (3, 5), (1, 2), (1, 1), (True, False), 1, 3, 3, 16, 32),
    Case((4, 5, 11), (3, 3, 5), (1, 1, 1), (1, 1, 2), (False,) * 3, 1, 2, 2, 16, 16, rpb=True),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", _params(PAIR_CASES))
def test_backward_of_query_pairs(case, dtype):
    t = leaves(case, dtype, "cpu", requires_grad=True)
    out = call(case, t)
    grad = random_grad(out.shape, dtype, "cpu")
    out.backward(grad)
    expected = as_oracle(t)
    oracle(case, expected).backward(grad.double())
    for name, leaf in t.items():
        assert_close(leaf.grad, expected[name].grad, dtype, what=f"d{name}")


LSE_GRAD_PARAMS = _params([FIXED_CASES[3], FIXED_CASES[7], FIXED_CASES[11]])


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", LSE_GRAD_PARAMS)
def test_backward_through_out_and_lse(case, device, dtype):
    t = leaves(case, dtype, device, requires_grad=True)
    out, lse = guarded(device, dtype, lambda: call(case, t, return_lse=True))
    grads = random_grad(out.shape, dtype, device), random_grad(lse.shape, torch.float32, device, 8)
    torch.autograd.backward((out, lse), grads)
    expected = as_oracle(t)
    torch.autograd.backward(
        oracle(case, expected, return_lse=True), tuple(g.cpu().double() for g in grads)
    )
    for name, leaf in t.items():
        assert_close(leaf.grad, expected[name].grad, lse_tolerance(dtype), what=f"d{name}")


def upstream_loss(upstream: str, out, lse, g_out, g_lse):
    """A scalar whose gradient wrt ``(out, lse)`` reaches the op in the form ``upstream`` names."""
    g_out, g_lse = g_out.to(out), g_lse.to(lse)
    if upstream == "strided":  # d_out is a permuted view of a heads-first buffer
        return (out.movedim(-2, 1) * g_out.movedim(-2, 1).contiguous()).sum()
    if upstream == "expanded":  # d_out is a stride-0 expansion of a scalar
        return out.sum()
    if upstream == "lse_only":  # no d_out at all
        return (lse * g_lse).sum()
    return (out * g_out).sum()  # out_only: lse returned, but no d_lse


@pytest.mark.parametrize("dtype", DTYPE_PARAMS[:2])
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("upstream", ["strided", "expanded", "lse_only", "out_only"])
def test_backward_with_any_upstream_gradient(upstream, device, dtype):
    case = FIXED_CASES[9]
    t = leaves(case, dtype, device, requires_grad=True)
    out, lse = guarded(device, dtype, lambda: call(case, t, return_lse=True))
    grads = random_grad(out.shape, dtype, device), random_grad(lse.shape, torch.float32, device, 8)
    upstream_loss(upstream, out, lse, *grads).backward()
    ref = as_oracle(t)
    upstream_loss(upstream, *oracle(case, ref, return_lse=True), *grads).backward()
    for name, leaf in t.items():
        if upstream == "lse_only" and name in ("value", "additional_values"):
            assert leaf.grad is None or not leaf.grad.any(), f"d{name} should be zero"
        else:
            assert_close(leaf.grad, ref[name].grad, lse_tolerance(dtype), what=f"d{name}")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_lse_is_logsumexp_of_masked_scaled_logits(device):
    case = Case((6, 7), (3, 3), (1, 1), (2, 1), (True, False), 2, 4, 2, 8, 8, rpb=True,
                n_extra=2, scale=0.4)  # fmt: skip
    t = leaves(case, torch.float64, device)
    _, lse = guarded(device, torch.float64, lambda: call(case, t, return_lse=True))
    ref = as_oracle(t)
    q = ref["query"].flatten(1, -3)  # [B, N, heads, D]
    k = ref["key"].flatten(1, -3).repeat_interleave(2, dim=-2)
    logits = case.scale * torch.einsum("bnhd,bmhd->bhnm", q, k)
    logits = logits + reference.rpb_bias(case.spatial, case.kernel, case.dilation, ref["rpb"])
    mask = reference.neighborhood_mask(case.spatial, case.kernel, 1, case.dilation, case.causal)
    logits = logits.masked_fill(~mask, -math.inf)
    extra_k = ref["additional_keys"].repeat_interleave(2, dim=-2)
    extra = case.scale * torch.einsum("bnhd,behd->bhne", q, extra_k)
    expected = torch.logsumexp(torch.cat([logits, extra], dim=-1), dim=-1).transpose(1, 2)
    assert_close(lse, expected.reshape(lse.shape), torch.float32)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, CPU). lse is float32, too coarse for finite differences: its gradient is
# checked against the oracle in test_backward_through_out_and_lse instead.
# ---------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    Case((9,), (3,), (2,), (2,), (True,), 1, 2, 2, 3, 3, layout="permuted"),
    Case((8,), (3,), (1,), (2,), (True,), 1, 2, 1, 3, 2, rpb=True, n_extra=1),
    Case((4, 6), (3, 3), (1, 1), (1, 2), (False, True), 1, 2, 2, 2, 2, rpb=True,
         layout="sliced"),
    Case((3, 3, 4), (2, 3, 3), (1, 2, 1), (1, 1, 1), (False,) * 3, 1, 2, 1, 2, 3, n_extra=2,
         expanded_extras=True),
]  # fmt: skip


@pytest.fixture
def one_thread():
    """gradcheck makes thousands of tiny calls, whose cost on a busy machine is the wake-up of
    the thread team rather than the math it checks: run them on the calling thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", _params(GRADCHECK_CASES))
def test_gradcheck(case, one_thread):
    t = leaves(case, torch.float64, "cpu", requires_grad=True)
    names = list(t)

    def by_position(*tensors):
        return call(case, dict(zip(names, tensors)))

    assert torch.autograd.gradcheck(by_position, tuple(t.values()))


# ---------------------------------------------------------------------------------------------
# Equivalences: GQA, self-attention, the unfused ops
# ---------------------------------------------------------------------------------------------

GQA_PARAMS = _params([FIXED_CASES[1], FIXED_CASES[4], FIXED_CASES[9], FIXED_CASES[11]])


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", GQA_PARAMS)
def test_gqa_matches_repeated_kv(case, device, dtype):
    group = case.heads // case.heads_kv
    t = leaves(case, dtype, device, requires_grad=True)
    r = leaves(case, dtype, device, requires_grad=True)
    repeated = {
        name: x.repeat_interleave(group, dim=-2)
        for name, x in r.items()
        if name in ("key", "value", "additional_keys", "additional_values")
    }
    out = guarded(device, dtype, lambda: call(case, t))
    expected = call(case, {**r, **repeated})
    assert_close(out, expected, dtype, what="out")
    grad = random_grad(out.shape, dtype, device)
    out.backward(grad)
    expected.backward(grad)
    for name, leaf in t.items():
        assert_close(leaf.grad, r[name].grad, dtype, what=f"d{name}")


# (spatial, stride, causal): K == L on every axis is self-attention (causal too, in 1-D).
FULL_WINDOW = [((12,), 1, False), ((12,), 1, True), ((4, 5), (4, 5), False), ((3, 4, 5), 1, False)]


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("spatial, stride, causal", FULL_WINDOW, ids=str)
def test_full_window_is_sdpa(spatial, stride, causal, device, dtype):
    q, k, v = make_inputs((2, *spatial, 4, 8), (2, *spatial, 2, 8), (2, *spatial, 2, 6),
                          dtype=dtype, device=device, seed=3)  # fmt: skip
    op = getattr(natten_rs, f"na{len(spatial)}d")
    out = guarded(device, dtype, lambda: op(q, k, v, spatial, stride=stride, is_causal=causal))
    kv = [heads_first_tokens(x).repeat_interleave(2, dim=1) for x in (k, v)]
    expected = sdpa(heads_first_tokens(q), *kv, is_causal=causal)
    assert_close(out, expected.transpose(1, 2).reshape(out.shape), dtype)


def _heads_first(x):
    return None if x is None else x.movedim(-2, 1)


COMPOSE_PARAMS = _params([
    Case((7, 9), (3, 5), (1, 1), (2, 1), (False, True), 2, 2, 2, 8, 8, rpb=True,
         layout="permuted"),
    Case((8, 7), (3, 3), (1, 1), (1, 2), (False, False), 1, 3, 3, 8, 8, rpb=True, n_extra=2,
         expanded_extras=True, scale=0.7),
])  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", COMPOSE_PARAMS)
def test_unfused_qk_softmax_av_matches_fused(case, device, dtype):
    t = leaves(case, dtype, device)
    scale = case.dim**-0.5 if case.scale is None else case.scale
    kernel, dilation, causal = case.kernel, case.dilation, case.causal

    def unfused():
        q, k, v = (_heads_first(t[name]) for name in ("query", "key", "value"))
        extra_k, extra_v = (
            _heads_first(_extra(case, t, f"additional_{n}")) for n in ("keys", "values")
        )
        attn = F.na2d_qk(q * scale, k, kernel, dilation, extra_k, causal, t.get("rpb"))
        return F.na2d_av(attn.softmax(-1), v, kernel, dilation, extra_v, causal)

    expected = guarded(device, dtype, unfused).movedim(1, -2)
    assert_close(call(case, t), expected, dtype)


# ---------------------------------------------------------------------------------------------
# Dense attention and merging
# ---------------------------------------------------------------------------------------------

# (query tokens (spatial), key tokens, heads, heads_kv, dim, dim_v, causal, scale)
ATTENTION_CASES = [
    ((10,), 10, 2, 2, 8, 8, False, None),
    ((7,), 13, 4, 2, 8, 6, False, 0.3),
    ((12,), 12, 3, 1, 16, 16, True, None),
    ((3, 4), 9, 2, 2, 8, 8, False, None),
]


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("q_tokens, kv_tokens, heads, heads_kv, dim, dim_v, causal, scale",
                         ATTENTION_CASES, ids=str)  # fmt: skip
def test_attention(q_tokens, kv_tokens, heads, heads_kv, dim, dim_v, causal, scale, device, dtype):
    t = dict(zip("qkv", make_inputs(
        (2, *q_tokens, heads, dim), (2, kv_tokens, heads_kv, dim), (2, kv_tokens, heads_kv, dim_v),
        dtype=dtype, device=device, seed=4, requires_grad=True)))  # fmt: skip
    run = natten_rs.attention
    out, lse = guarded(device, dtype, lambda: run(*t.values(), causal, scale, return_lse=True))
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert tuple(lse.shape) == (2, *q_tokens, heads)
    ref = as_oracle(t)
    expected = reference.attention(*ref.values(), causal, scale, return_lse=True)
    assert_close(out, expected[0], dtype, what="out")
    assert_close(lse, expected[1], lse_tolerance(dtype), what="lse")
    group = heads // heads_kv
    kv = [heads_first_tokens(t[name]).repeat_interleave(group, dim=1) for name in "kv"]
    by_sdpa = sdpa(heads_first_tokens(t["q"]), *kv, is_causal=causal, scale=scale)
    assert_close(out, by_sdpa.transpose(1, 2).reshape(out.shape), dtype, what="out vs sdpa")
    no_lse = run(*t.values(), is_causal=causal, scale=scale)
    assert_close(no_lse, expected[0], dtype, what="out (return_lse=False)")
    grads = random_grad(out.shape, dtype, device), random_grad(lse.shape, torch.float32, device, 8)
    torch.autograd.backward((out, lse), grads)
    torch.autograd.backward(expected, tuple(g.cpu().double() for g in grads))
    for name, leaf in t.items():
        assert_close(leaf.grad, ref[name].grad, lse_tolerance(dtype), what=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("bounds", [(0, 6, 14), (0, 5, 6, 14)], ids=["2-way", "3-way"])
def test_merge_of_key_splits_is_attention_over_all_keys(bounds, device, dtype):
    t = dict(zip(("query", "key", "value"), make_inputs(
        (2, 9, 4, 8), (2, 14, 2, 8), (2, 14, 2, 6), dtype=dtype, device=device, seed=5,
        requires_grad=True)))  # fmt: skip
    q, k, v = t.values()
    parts = [
        guarded(device, dtype, lambda a=a, b=b: natten_rs.attention(
            q, k[:, a:b], v[:, a:b], return_lse=True))
        for a, b in itertools.pairwise(bounds)
    ]  # fmt: skip
    out, lse = natten_rs.merge_attentions([p[0] for p in parts], [p[1] for p in parts])
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref = as_oracle(t)
    expected = reference.attention(*ref.values(), return_lse=True)
    tolerance = lse_tolerance(dtype)
    assert_close(out, expected[0], tolerance, what="out")
    assert_close(lse, expected[1], tolerance, what="lse")
    grads = random_grad(out.shape, dtype, device), random_grad(lse.shape, torch.float32, device, 8)
    torch.autograd.backward((out, lse), grads)
    torch.autograd.backward(expected, tuple(g.cpu().double() for g in grads))
    for name, leaf in t.items():
        assert_close(leaf.grad, ref[name].grad, tolerance, what=f"d{name}")


def _merge_oracle(outputs, lses):
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(torch.exp(x - lse)[..., None] * o for o, x in zip(outputs, lses))
    return out, lse


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_merge_attentions_gradients(device, dtype):
    shape = (2, 3, 4, 3, 5)  # [B, *spatial, heads, Dv]
    outputs = list(make_inputs(shape, shape, dtype=dtype, device=device, seed=6,
                               requires_grad=True))  # fmt: skip
    # Spread lses so that neither side dominates nor vanishes.
    lses = [make_tensor(shape[:-1], torch.float32, device, std=2.0,
                        generator=torch.Generator().manual_seed(s)).requires_grad_()
            for s in (1, 2)]  # fmt: skip
    out, lse = guarded(device, dtype, lambda: natten_rs.merge_attentions(outputs, lses))
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref = as_oracle(dict(enumerate(outputs + lses)))
    expected = _merge_oracle([ref[0], ref[1]], [ref[2], ref[3]])
    tolerance = lse_tolerance(dtype)
    assert_close(out, expected[0], tolerance, what="out")
    assert_close(lse, expected[1], torch.float32, what="lse")
    grads = random_grad(out.shape, dtype, device), random_grad(lse.shape, torch.float32, device, 8)
    torch.autograd.backward((out, lse), grads)
    torch.autograd.backward(expected, tuple(g.cpu().double() for g in grads))
    for i, leaf in enumerate(outputs + lses):
        assert_close(leaf.grad, ref[i].grad, tolerance, what=f"d input {i}")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_na_with_extras_is_merge_of_na_and_attention(device, dtype):
    case = Case((6, 7), (3, 4), (1, 2), (2, 1), (False, True), 2, 4, 2, 8, 6, n_extra=3)
    t = leaves(case, dtype, device)
    with_extras = guarded(device, dtype, lambda: call(case, t, return_lse=True))
    plain = call(case, {k: v for k, v in t.items() if not k.startswith("additional")},
                 return_lse=True)  # fmt: skip
    extra = natten_rs.attention(t["query"], t["additional_keys"], t["additional_values"],
                                return_lse=True)  # fmt: skip
    merged = natten_rs.merge_attentions([plain[0], extra[0]], [plain[1], extra[1]])
    assert_close(merged[0], with_extras[0].double(), lse_tolerance(dtype), what="out")
    assert_close(merged[1], with_extras[1].double(), torch.float32, what="lse")


def test_compile_fullgraph_matches_eager():
    case = FIXED_CASES[9]
    t = leaves(case, torch.float32, "cpu", requires_grad=True)
    names = list(t)

    def block(*tensors):
        out, lse = call(case, dict(zip(names, tensors)), return_lse=True)
        return out.square().sum() + lse.sum()

    eager = block(*t.values())
    expected = torch.autograd.grad(eager, tuple(t.values()))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*t.values())
    torch.testing.assert_close(compiled, eager)
    for name, grad, want in zip(names, torch.autograd.grad(compiled, tuple(t.values())), expected):
        torch.testing.assert_close(grad, want, msg=lambda m, name=name: f"d{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Argument forms: positional order, module paths, NATTEN's tuning keywords
# ---------------------------------------------------------------------------------------------


def test_positional_order_and_functional_path():
    case = Case((12,), (4,), (2,), (2,), (True,), 1, 2, 2, 8, 8, scale=0.5)
    t = leaves(case, torch.float32, "cpu")
    expected = call(case, t)
    # NATTEN 0.20+ order: kernel_size, stride, dilation, is_causal, scale.
    positional = natten_rs.na1d(t["query"], t["key"], t["value"], 4, 2, 2, True, 0.5)
    torch.testing.assert_close(positional, expected, rtol=0, atol=0)
    torch.testing.assert_close(call(case, t, op=F.na1d), expected, rtol=0, atol=0)
    assert callable(F.na2d) and callable(F.na3d)


NA_TUNING = {
    "backend": "cutlass-fna",
    "q_tile_shape": (4, 4),
    "kv_tile_shape": (4, 8),
    "backward_q_tile_shape": (4, 4),
    "backward_kv_tile_shape": (4, 8),
    "backward_kv_splits": (1, 1),
    "backward_use_pt_reduction": False,
    "run_persistent_kernel": True,
    "kernel_schedule": "coop",
    "torch_compile": False,
    "attention_kwargs": {"backend": "cutlass-fmha"},
}
ATTENTION_TUNING = {
    "backend": "cutlass-fmha",
    "q_tile_size": 64,
    "kv_tile_size": 64,
    "backward_q_tile_size": 64,
    "backward_kv_tile_size": 64,
    "backward_kv_splits": 1,
    "backward_use_pt_reduction": False,
    "run_persistent_kernel": True,
    "kernel_schedule": None,
    "torch_compile": False,
}


def test_natten_tuning_keywords_are_accepted():
    case = Case((7, 9), (3, 5), (1, 2), (2, 1), (False, True), 1, 2, 2, 8, 8, n_extra=2)
    t = leaves(case, torch.float32, "cpu", requires_grad=True)
    plain = call(case, t)
    for op in (natten_rs.na2d, F.na2d):
        tuned = call(case, t, op=op, **NA_TUNING)
        torch.testing.assert_close(tuned, plain, rtol=0, atol=0)
    tuned.sum().backward()  # the backward pass ignores them too
    q, k, v = t["query"], t["additional_keys"], t["additional_values"]
    tuned = natten_rs.attention(q, k, v, **ATTENTION_TUNING)
    torch.testing.assert_close(tuned, natten_rs.attention(q, k, v), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Errors: one row per rule of spec/API.md "Errors" (type, and a message naming the argument)
# ---------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _int():
    return torch.ones(SHAPES[1], dtype=torch.int32)


SHAPES = {1: (1, 9, 2, 4), 2: (1, 7, 8, 2, 4), 3: (1, 5, 6, 7, 2, 4)}
F64 = torch.float64


def _na(rank=1, kernel=3, q=None, k=None, v=None, **kwargs):
    """na{rank}d on small valid tensors, with the given ones (and keywords) replaced."""
    shape = SHAPES[rank]
    q, k, v = (_t(*shape) if x is None else x for x in (q, k, v))
    return getattr(natten_rs, f"na{rank}d")(q, k, v, kernel, **kwargs)


def _attn(q=(1, 9, 2, 4), k=(1, 9, 2, 4), v=(1, 9, 2, 4), **kwargs):
    return natten_rs.attention(_t(*q), _t(*k), _t(*v), **kwargs)


def _merge(shapes=((1, 9, 2, 4), (1, 9, 2, 4)), lse_shapes=((1, 9, 2), (1, 9, 2))):
    return natten_rs.merge_attentions([_t(*s) for s in shapes], [_t(*s) for s in lse_shapes])


# name: (regex the message must match, call)
VALUE_ERRORS = {
    "stride_above_kernel": ("stride", lambda: _na(stride=4)),
    "stride_0": ("stride", lambda: _na(stride=0)),
    "stride_negative": ("stride", lambda: _na(2, stride=(1, -1))),
    "kernel_1": ("kernel_size", lambda: _na(2, kernel=(1, 3))),
    "kernel_0": ("kernel_size", lambda: _na(kernel=0)),
    "dilation_0": ("dilation", lambda: _na(dilation=0)),
    "window_too_long": ("kernel_size|dilation", lambda: _na(kernel=5, dilation=2)),
    "window_too_long_3d": ("kernel_size|dilation", lambda: _na(3, kernel=(3, 7, 3))),
    "query_rank_for_na2d": ("query", lambda: _na(2, q=_t(*SHAPES[1]), k=_t(*SHAPES[1]),
                                                 v=_t(*SHAPES[1]))),
    "heads_not_divisible": ("head|key", lambda: _na(q=_t(1, 9, 3, 4))),
    "key_spatial_mismatch": ("key", lambda: _na(k=_t(1, 10, 2, 4), v=_t(1, 10, 2, 4))),
    "key_batch_mismatch": ("key", lambda: _na(k=_t(2, 9, 2, 4), v=_t(2, 9, 2, 4))),
    "key_dim_mismatch": ("key", lambda: _na(k=_t(1, 9, 2, 5))),
    "value_spatial_mismatch": ("value", lambda: _na(2, v=_t(1, 7, 9, 2, 4))),
    "value_heads_mismatch": ("value", lambda: _na(v=_t(1, 9, 1, 4))),
    "additional_keys_alone": ("additional_keys|additional_values",
                              lambda: _na(additional_keys=_t(1, 3, 2, 4))),
    "additional_values_alone": ("additional_keys|additional_values",
                                lambda: _na(additional_values=_t(1, 3, 2, 4))),
    "additional_keys_heads": ("additional_keys", lambda: _na(
        additional_keys=_t(1, 3, 3, 4), additional_values=_t(1, 3, 2, 4))),
    "additional_keys_dim": ("additional_keys", lambda: _na(
        additional_keys=_t(1, 3, 2, 5), additional_values=_t(1, 3, 2, 4))),
    "additional_values_dim": ("additional_values", lambda: _na(
        additional_keys=_t(1, 3, 2, 4), additional_values=_t(1, 3, 2, 5))),
    "additional_count_mismatch": ("additional_keys|additional_values", lambda: _na(
        additional_keys=_t(1, 3, 2, 4), additional_values=_t(1, 2, 2, 4))),
    "additional_keys_batch": ("additional_keys", lambda: _na(
        additional_keys=_t(2, 3, 2, 4), additional_values=_t(2, 3, 2, 4))),
    "additional_keys_rank": ("additional_keys", lambda: _na(
        additional_keys=_t(3, 2, 4), additional_values=_t(3, 2, 4))),
    "rpb_wrong_kernel": ("rpb", lambda: _na(rpb=_t(2, 7))),
    "rpb_wrong_heads": ("rpb", lambda: _na(2, rpb=_t(3, 5, 5))),
    "rpb_wrong_rank": ("rpb", lambda: _na(2, rpb=_t(2, 5))),
    "key_dtype": ("key", lambda: _na(k=_t(*SHAPES[1], dtype=F64))),
    "value_dtype": ("value", lambda: _na(v=_t(*SHAPES[1], dtype=F64))),
    "rpb_dtype": ("rpb", lambda: _na(rpb=_t(2, 5, dtype=F64))),
    "additional_keys_dtype": ("additional_keys", lambda: _na(
        additional_keys=_t(1, 3, 2, 4, dtype=F64), additional_values=_t(1, 3, 2, 4))),
    "int_tensors": ("query", lambda: _na(q=_int(), k=_int(), v=_int())),
    "stride_beyond_int64": ("stride", lambda: _na(stride=2**70)),
    "head_dim_0": ("query|scale|dim", lambda: _na(q=_t(1, 9, 2, 0), k=_t(1, 9, 2, 0))),
    "kernel_tuple_length": ("kernel_size", lambda: _na(2, kernel=(3, 3, 3))),
    "stride_tuple_length": ("stride", lambda: _na(2, stride=(1,))),
    "dilation_tuple_length": ("dilation", lambda: _na(3, dilation=(1, 1))),
    "is_causal_tuple_length": ("is_causal", lambda: _na(3, is_causal=(True,))),
    "attention_query_rank": ("query", lambda: _attn(q=(9, 2, 4))),
    "attention_key_dim": ("key", lambda: _attn(k=(1, 9, 2, 5))),
    "attention_heads": ("head|key", lambda: _attn(q=(1, 9, 3, 4))),
    "attention_value_tokens": ("value", lambda: _attn(v=(1, 8, 2, 4))),
    "merge_lse_shape": ("lse|output", lambda: _merge(lse_shapes=((1, 9, 2), (1, 8, 2)))),
    "merge_output_shape": ("lse|output", lambda: _merge(shapes=((1, 9, 2, 4), (1, 9, 2, 5)))),
    "merge_count_mismatch": ("lse|output", lambda: _merge(lse_shapes=((1, 9, 2),))),
}  # fmt: skip

NOT_IMPLEMENTED = {
    "rpb_even_kernel": ("rpb|kernel", lambda: _na(kernel=4, rpb=_t(2, 7))),
    "rpb_stride_2": ("rpb|stride", lambda: _na(stride=2, rpb=_t(2, 5))),
    "causal_attention_n_ne_m": ("caus|key|token", lambda: _attn(k=(1, 7, 2, 4), v=(1, 7, 2, 4),
                                                                 is_causal=True)),
}  # fmt: skip

TYPE_ERRORS = {
    "kernel_size_str": ("kernel_size", lambda: _na(kernel="3")),
    "kernel_size_float": ("kernel_size", lambda: _na(kernel=3.0)),
    "kernel_size_bool": ("kernel_size", lambda: _na(kernel=True)),
    "stride_float": ("stride", lambda: _na(stride=2.0)),
    "dilation_float": ("dilation", lambda: _na(2, dilation=(1, 1.5))),
    "is_causal_str": ("is_causal", lambda: _na(is_causal="yes")),
    "query_list": ("query", lambda: _na(q=_t(*SHAPES[1]).tolist())),
    "query_sparse": ("query: expected a strided", lambda: _na(q=_t(*SHAPES[1]).to_sparse())),
    "key_list": ("key", lambda: _na(k=_t(*SHAPES[1]).tolist())),
    "value_none": ("value", lambda: natten_rs.na1d(_t(*SHAPES[1]), _t(*SHAPES[1]), None, 3)),
    "rpb_list": ("rpb", lambda: _na(rpb=[[0.0] * 5] * 2)),
    "additional_keys_list": ("additional_keys", lambda: _na(
        additional_keys=_t(1, 3, 2, 4).tolist(), additional_values=_t(1, 3, 2, 4))),
    "scale_str": ("scale", lambda: _na(scale="0.5")),
    "attention_query_list": ("query", lambda: natten_rs.attention(
        _t(1, 9, 2, 4).tolist(), _t(1, 9, 2, 4), _t(1, 9, 2, 4))),
    "merge_output_list": ("output", lambda: natten_rs.merge_attentions(
        [_t(1, 9, 2, 4).tolist(), _t(1, 9, 2, 4)], [_t(1, 9, 2), _t(1, 9, 2)])),
}  # fmt: skip

CUDA_VALUE_ERRORS = {
    "key_on_other_device": ("key|query", lambda: _na(q=_t(*SHAPES[1], device="cuda"))),
    "rpb_on_other_device": ("rpb", lambda: _na(rpb=_t(2, 5, device="cuda"))),
}


def _error_params():
    rows = [(ValueError, VALUE_ERRORS), (NotImplementedError, NOT_IMPLEMENTED),
            (TypeError, TYPE_ERRORS)]  # fmt: skip
    params = [
        pytest.param(error, *row, id=name) for error, table in rows for name, row in table.items()
    ]
    if torch.cuda.is_available():
        params += [
            pytest.param(ValueError, *row, id=name, marks=pytest.mark.cuda)
            for name, row in CUDA_VALUE_ERRORS.items()
        ]
    return params


@pytest.mark.parametrize("error, match, call", _error_params())
def test_bad_arguments_raise(error, match, call):
    with pytest.raises(error, match=match):
        call()


def test_plain_cpu_tensors_skip_the_python_export_wrapper():
    # torch's versioned export is called directly on the CPU (about 2 us a tensor less than
    # `Tensor.__dlpack__`); a torch that has it under its usual name must keep the fast path.
    if hasattr(torch._C, "_to_dlpack_versioned"):
        assert _ops._VERSIONED_EXPORT is not None


def test_subclassed_and_grad_requiring_inputs_export_like_plain_ones():
    q, k, v = (_t(*SHAPES[2]) for _ in range(3))
    expected = natten_rs.na2d(q, k, v, 3)
    # A Parameter is a Tensor subclass: it goes through the public protocol.
    with torch.no_grad():
        got = natten_rs.na2d(torch.nn.Parameter(q), k, v, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got = natten_rs.na2d(q.clone().requires_grad_(), k, v, 3)
    torch.testing.assert_close(got.detach(), expected, rtol=0, atol=0)


def test_merging_parts_that_attend_nothing_gives_zero_not_nan():
    q = torch.randn(1, 3, 2, 4)
    empty = torch.randn(1, 0, 2, 4)
    out, lse = natten_rs.attention(q, empty, empty, return_lse=True)
    merged, merged_lse = natten_rs.merge_attentions([out, out], [lse, lse])
    assert torch.equal(merged, torch.zeros_like(merged))
    assert torch.isneginf(merged_lse).all()


def test_dense_attention_names_the_ranks_it_takes():
    t = torch.randn(9, 2, 4)
    with pytest.raises(ValueError, match=r"query: expected a 4-D to 6-D tensor"):
        natten_rs.attention(t, t, t)
