"""natten_rs.functional's unfused ops against the dense oracle (spec/API.md, spec/NEIGHBORHOOD.md).

Every numeric test runs on every device and dtype; the oracle computes in float64 on the very
same (rounded) inputs, so tolerances only cover the kernels' own rounding (see conftest).
"""

from __future__ import annotations

import dataclasses
import math
import random

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


@dataclasses.dataclass(frozen=True)
class Case:
    """One unfused problem. Per-axis fields are tuples; ``form`` says how they are passed."""

    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    batch: int = 1
    heads: int = 2
    dim: int = 8
    rpb: bool = False
    n_extra: int = 0
    expanded_extras: bool = False  # extras given as a stride-0 expansion of a batch-1 tensor
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
        return (
            f"{self.rank}d-S{'x'.join(map(str, self.spatial))}-K{self.kernel}-d{self.dilation}-"
            f"{causal}-{'rpb-' if self.rpb else ''}{extras}-{self.layout}-{self.form}-"
            f"B{self.batch}H{self.heads}D{self.dim}"
        ).replace(" ", "")


# Fixed cases first: lengths not divisible by the dilation, causal per axis, rpb, extras (some
# expanded), every layout and argument form. Positional fields: spatial, kernel, dilation,
# causal, batch, heads, dim.
FIXED_CASES = [
    Case((17,), (5,), (3,), (False,), 2, 3, 5, rpb=True, n_extra=2, layout="permuted"),
    Case((11,), (3,), (2,), (True,), 2, 2, 4, n_extra=3, expanded_extras=True, form="scalar"),
    Case((40,), (9,), (4,), (False,), 1, 2, 16, rpb=True, layout="packed", form="list"),
    Case((12, 13), (3, 5), (4, 2), (True, False), 2, 2, 8, n_extra=1, layout="sliced"),
    Case((9, 10), (7, 3), (1, 3), (False,) * 2, 2, 3, 32, rpb=True, n_extra=2,
         expanded_extras=True, layout="packed"),
    Case((7, 8), (3, 3), (2, 2), (False, True), 1, 2, 5, form="scalar"),
    Case((6, 7, 8), (3, 3, 5), (2, 2, 1), (False,) * 3, 1, 2, 8, rpb=True, n_extra=1,
         layout="permuted"),
    Case((5, 7, 8), (3, 5, 3), (1, 1, 2), (True, False, True), 2, 2, 4, n_extra=2,
         expanded_extras=True, form="list"),
]  # fmt: skip

MAX_SHAPE = {1: (40,), 2: (12, 13), 3: (6, 7, 8)}
DIMS = (4, 5, 8, 16, 32)


def _random_axis(rng: random.Random, max_length: int) -> tuple[int, int, int]:
    kernel = rng.choice([k for k in (3, 5, 7, 9) if k <= max_length])
    dilation = rng.choice([d for d in (1, 2, 3, 4) if kernel * d <= max_length])
    return rng.randint(kernel * dilation, max_length), kernel, dilation


def random_case(rng: random.Random, rank: int) -> Case:
    spatial, kernel, dilation = zip(*(_random_axis(rng, n) for n in MAX_SHAPE[rank]))
    causal = tuple(rng.random() < 0.3 for _ in range(rank))
    n_extra = rng.choice((0, 0, 1, 3))
    return Case(
        spatial, kernel, dilation, causal,
        batch=rng.randint(1, 2), heads=rng.randint(1, 3), dim=rng.choice(DIMS),
        rpb=not any(causal) and rng.random() < 0.5,  # rpb is defined for non-causal windows
        n_extra=n_extra, expanded_extras=n_extra > 0 and rng.random() < 0.3,
        layout=rng.choice(LAYOUTS), form=rng.choice(("scalar", "tuple", "list")),
    )  # fmt: skip


_RNG = random.Random(2024)
CASES = FIXED_CASES + [random_case(_RNG, rank) for rank in (1, 2, 3) for _ in range(6)]
CASE_PARAMS = [pytest.param(case, id=str(case)) for case in CASES]


# ---------------------------------------------------------------------------------------------
# Inputs and calls
# ---------------------------------------------------------------------------------------------


def _leaves(case: Case, shapes: dict, dtype, device, requires_grad: bool, seed: int) -> dict:
    tensors = make_inputs(*shapes.values(), dtype=dtype, device=device, layout=case.layout,
                          seed=seed, requires_grad=requires_grad)  # fmt: skip
    return dict(zip(shapes, tensors))


def qk_leaves(case: Case, dtype, device, requires_grad=False, seed=0) -> dict:
    """Leaf tensors of a qk problem (extras at batch 1 when they will be expanded)."""
    b, h, s, d = case.batch, case.heads, case.spatial, case.dim
    shapes = {"query": (b, h, *s, d), "key": (b, h, *s, d)}
    if case.rpb:
        shapes["rpb"] = (h, *(2 * k - 1 for k in case.kernel))
    if case.n_extra:
        shapes["additional_keys"] = (1 if case.expanded_extras else b, h, case.n_extra, d)
    return _leaves(case, shapes, dtype, device, requires_grad, seed)


def av_leaves(case: Case, dtype, device, requires_grad=False, seed=0) -> dict:
    """Leaf tensors of an av problem; attn is random in every slot, invalid ones included."""
    b, h, s, d = case.batch, case.heads, case.spatial, case.dim
    shapes = {"attn": (b, h, *s, math.prod(case.kernel) + case.n_extra), "value": (b, h, *s, d)}
    if case.n_extra:
        shapes["additional_values"] = (1 if case.expanded_extras else b, h, case.n_extra, d)
    return _leaves(case, shapes, dtype, device, requires_grad, seed)


def _extra(case: Case, leaves: dict, name: str):
    t = leaves.get(name)
    return expanded_batch(t, case.batch) if t is not None and case.expanded_extras else t


def call_qk(case: Case, t: dict) -> torch.Tensor:
    op = getattr(F, f"na{case.rank}d_qk")
    return op(t["query"], t["key"], case.arg(case.kernel), case.arg(case.dilation),
              additional_keys=_extra(case, t, "additional_keys"),
              is_causal=case.arg(case.causal), rpb=t.get("rpb"))  # fmt: skip


def call_av(case: Case, t: dict) -> torch.Tensor:
    op = getattr(F, f"na{case.rank}d_av")
    return op(t["attn"], t["value"], case.arg(case.kernel), case.arg(case.dilation),
              additional_values=_extra(case, t, "additional_values"),
              is_causal=case.arg(case.causal))  # fmt: skip


def oracle_qk(case: Case, t: dict) -> torch.Tensor:
    return reference.qk(t["query"], t["key"], case.kernel, case.dilation, case.causal,
                        rpb=t.get("rpb"), additional_keys=_extra(case, t, "additional_keys"))  # fmt: skip


def oracle_av(case: Case, t: dict) -> torch.Tensor:
    return reference.av(t["attn"], t["value"], case.kernel, case.dilation, case.causal,
                        additional_values=_extra(case, t, "additional_values"))  # fmt: skip


def as_oracle(leaves: dict) -> dict:
    """float64 CPU copies of the leaves, as new leaves (requiring grad where the originals do)."""
    return {
        name: t.detach().to("cpu", torch.float64).requires_grad_(t.requires_grad)
        for name, t in leaves.items()
    }


def guarded(device: str, dtype, fn):
    """Run ``fn``; float64 on CUDA may be declared unsupported (NotImplementedError), nothing else."""
    try:
        return fn()
    except NotImplementedError as error:
        if device == "cuda" and dtype == torch.float64:
            pytest.skip(f"float64 on CUDA not supported: {error}")
        raise


OPS = {"qk": (qk_leaves, call_qk, oracle_qk), "av": (av_leaves, call_av, oracle_av)}


# ---------------------------------------------------------------------------------------------
# Forward and backward sweeps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_forward(case, device, dtype, op):
    make, call, oracle = OPS[op]
    leaves = make(case, dtype, device)
    out = guarded(device, dtype, lambda: call(case, leaves))
    assert out.dtype == dtype and out.device.type == device
    assert_close(out, oracle(case, as_oracle(leaves)), dtype, what=op)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_backward(case, device, dtype, op):
    make, call, oracle = OPS[op]
    leaves = make(case, dtype, device, requires_grad=True)
    out = guarded(device, dtype, lambda: call(case, leaves))
    # Random everywhere, -inf (constant) causal slots included: their gradient must be ignored.
    grad = make_tensor(out.shape, torch.float64, generator=torch.Generator().manual_seed(7))
    out.backward(grad.to(device=out.device, dtype=dtype))
    expected = as_oracle(leaves)
    oracle(case, expected).backward(grad.to(dtype).double())
    for name, leaf in leaves.items():
        assert leaf.grad is not None, f"no gradient for {name}"
        assert_close(leaf.grad, expected[name].grad, dtype, what=f"{op} d{name}")


def _heads_last(t):
    return None if t is None else t.movedim(1, -2)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_qk_softmax_av_composes_to_fused_na(case, device, dtype):
    scale = case.dim**-0.5
    leaves = qk_leaves(case, dtype, device)
    values = av_leaves(case, dtype, device, seed=5)

    def unfused():
        attn = call_qk(case, {**leaves, "query": leaves["query"] * scale})
        return call_av(case, {**values, "attn": attn.softmax(-1)})

    out = guarded(device, dtype, unfused)
    ref = as_oracle({**leaves, **values})
    q, k, v = (_heads_last(ref[name]) for name in ("query", "key", "value"))
    expected = reference.na(
        q, k, v, case.kernel, 1, case.dilation, case.causal, scale,
        additional_keys=_heads_last(_extra(case, ref, "additional_keys")),
        additional_values=_heads_last(_extra(case, ref, "additional_values")),
        rpb=ref.get("rpb"),
    )  # fmt: skip
    assert_close(_heads_last(out), expected, dtype)


# ---------------------------------------------------------------------------------------------
# Legacy and NATTEN 0.15 names
# ---------------------------------------------------------------------------------------------

LEGACY_CASES = [
    Case((13,), (5,), (2,), (False,), 2, 3, 8, rpb=True, layout="permuted"),
    Case((9, 11), (3, 3), (3, 3), (False,) * 2, 1, 2, 8, rpb=True, layout="packed"),
    Case((6, 7, 8), (3, 5, 5), (2, 1, 1), (False,) * 3, 1, 2, 8, rpb=True, layout="sliced"),
]
LEGACY_PARAMS = [pytest.param(c, id=str(c)) for c in LEGACY_CASES]


def _legacy_geometry(case: Case) -> tuple:
    """Positional kernel/dilation of the NATTEN 0.14-0.17.4 names (3-D: depth given apart)."""
    if case.rank == 3:
        return case.kernel[0], case.kernel[1], case.dilation[0], case.dilation[1]
    return case.kernel[0], case.dilation[0]


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", LEGACY_PARAMS)
def test_legacy_names(case, device, dtype):
    r, geometry = case.rank, _legacy_geometry(case)
    qkrpb, qk, av = (getattr(F, f"natten{r}d{op}") for op in ("qkrpb", "qk", "av"))
    leaves = qk_leaves(case, dtype, device)
    q, k, rpb = leaves["query"], leaves["key"], leaves["rpb"]
    ref = as_oracle(leaves)
    with_rpb = guarded(device, dtype, lambda: qkrpb(q, k, rpb, *geometry))
    assert_close(with_rpb, oracle_qk(case, ref), dtype, what="qkrpb")
    del ref["rpb"]
    expected = oracle_qk(case, ref)
    assert_close(qkrpb(q, k, None, *geometry), expected, dtype, what="qkrpb(None)")
    assert_close(qk(q, k, *geometry), expected, dtype, what="qk")
    values = av_leaves(case, dtype, device, seed=3)
    out = av(values["attn"], values["value"], *geometry)
    assert_close(out, oracle_av(case, as_oracle(values)), dtype, what="av")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", LEGACY_PARAMS)
def test_qk_with_bias_names(case, device, dtype):
    case = dataclasses.replace(case, n_extra=2)
    t = qk_leaves(case, dtype, device)
    op = getattr(F, f"na{case.rank}d_qk_with_bias")
    args = (t["query"], t["key"], t["rpb"], case.kernel, case.dilation, t["additional_keys"])
    out = guarded(device, dtype, lambda: op(*args))
    assert_close(out, oracle_qk(case, as_oracle(t)), dtype)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, CPU)
# ---------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    Case((9,), (3,), (2,), (False,), 2, 2, 3, rpb=True, n_extra=2, expanded_extras=True),
    Case((9,), (5,), (1,), (True,), 1, 2, 3, n_extra=1, layout="permuted"),
    Case((5, 6), (3, 3), (1, 2), (False,) * 2, 1, 2, 3, rpb=True, n_extra=1, layout="sliced"),
    Case((5, 6), (3, 3), (1, 2), (True, False), 2, 2, 2, n_extra=2, expanded_extras=True),
    Case((3, 4, 5), (3, 3, 3), (1, 1, 1), (False,) * 3, 1, 1, 2, rpb=True, n_extra=1),
    Case((3, 4, 5), (3, 3, 3), (1, 1, 1), (True, False, True), 1, 1, 2, n_extra=1,
         layout="packed"),
]  # fmt: skip
GRADCHECK_PARAMS = [pytest.param(c, id=str(c)) for c in GRADCHECK_CASES]


def _gradcheck(fn, leaves: dict, fast_mode: bool = False) -> None:
    names = list(leaves)

    def by_position(*tensors):
        return fn(dict(zip(names, tensors)))

    assert torch.autograd.gradcheck(by_position, tuple(leaves.values()), fast_mode=fast_mode)


@pytest.mark.parametrize("case", GRADCHECK_PARAMS)
def test_gradcheck_qk(case):
    leaves = qk_leaves(case, torch.float64, "cpu", requires_grad=True)
    # Causal slots past a short window hold the constant -inf: check the finite part only.
    index = reference.slot_index(case.spatial, case.kernel, case.dilation, case.causal)
    invalid = torch.cat([index < 0, torch.zeros(len(index), case.n_extra, dtype=torch.bool)], 1)
    invalid = invalid.view(*case.spatial, -1)
    _gradcheck(lambda t: call_qk(case, t).masked_fill(invalid, 0.0), leaves)


@pytest.mark.parametrize("case", GRADCHECK_PARAMS)
def test_gradcheck_av(case):
    # attn is random in invalid slots too: gradcheck proves the op ignores them both ways.
    _gradcheck(lambda t: call_av(case, t), av_leaves(case, torch.float64, "cpu", True))


@pytest.mark.parametrize("case", [p for p in GRADCHECK_PARAMS if any(p.values[0].causal)])
def test_gradcheck_causal_chain(case):
    leaves = qk_leaves(case, torch.float64, "cpu", requires_grad=True)
    values = av_leaves(case, torch.float64, "cpu", requires_grad=True, seed=4)
    del values["attn"]

    def chain(t):
        attn = call_qk(case, t).softmax(-1)
        return call_av(case, {**t, "attn": attn})

    # Each op's full Jacobian is checked above; random projections suffice for the chain.
    _gradcheck(chain, {**leaves, **values}, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Errors: one row per rule of spec/API.md "Errors" (type, and a message naming the argument)
# ---------------------------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


Q1, A1 = (1, 2, 9, 4), (1, 2, 9, 3)  # 1-D tokens, and attn for kernel 3
Q2, A2 = (1, 2, 7, 8, 4), (1, 2, 7, 8, 9)  # 2-D, kernel 3
Q3 = (1, 2, 5, 6, 7, 4)
F64 = torch.float64

# name: (regex the message must match, call)
VALUE_ERRORS = {
    "qk_even_kernel": ("kernel_size", lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 4)),
    "av_even_kernel": ("kernel_size", lambda: F.na1d_av(_t(1, 2, 9, 4), _t(*Q1), 4)),
    "kernel_1": ("kernel_size", lambda: F.na2d_qk(_t(*Q2), _t(*Q2), (1, 3))),
    "dilation_0": ("dilation", lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 3, 0)),
    "dilation_negative": ("dilation", lambda: F.na1d_av(_t(*A1), _t(*Q1), 3, -1)),
    "window_too_long": ("kernel_size|dilation", lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 5, 2)),
    "window_too_long_3d": ("kernel_size|dilation", lambda: F.na3d_qk(_t(*Q3), _t(*Q3), 7)),
    "qk_rank_mismatch": ("query", lambda: F.na1d_qk(_t(*Q2), _t(*Q2), 3)),
    "av_rank_mismatch": ("attn|value", lambda: F.na2d_av(_t(*A1), _t(*Q1), 3)),
    "key_length_mismatch": ("key", lambda: F.na1d_qk(_t(*Q1), _t(1, 2, 10, 4), 3)),
    "key_dim_mismatch": ("key", lambda: F.na2d_qk(_t(*Q2), _t(1, 2, 7, 8, 5), 3)),
    "value_shape_mismatch": ("attn|value", lambda: F.na1d_av(_t(*A1), _t(1, 2, 8, 4), 3)),
    "rpb_wrong_kernel": ("rpb", lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 3, rpb=_t(2, 7))),
    "rpb_wrong_heads": ("rpb", lambda: F.na2d_qk(_t(*Q2), _t(*Q2), 3, rpb=_t(3, 5, 5))),
    "rpb_wrong_rank": ("rpb", lambda: F.na2d_qk(_t(*Q2), _t(*Q2), 3, rpb=_t(2, 5))),
    "attn_last_dim": ("attn", lambda: F.na1d_av(_t(1, 2, 9, 5), _t(*Q1), 3)),
    "attn_extras_count": ("attn|additional_values",
                          lambda: F.na1d_av(_t(*A1), _t(*Q1), 3, 1, _t(1, 2, 3, 4))),
    "qk_dtype_mismatch": ("key", lambda: F.na1d_qk(_t(*Q1), _t(*Q1, dtype=F64), 3)),
    "av_dtype_mismatch": ("attn|value", lambda: F.na1d_av(_t(*A1), _t(*Q1, dtype=F64), 3)),
    "rpb_dtype_mismatch": ("rpb",
                           lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 3, rpb=_t(2, 5, dtype=F64))),
    "unsupported_dtype": ("query", lambda: F.na1d_qk(torch.ones(Q1, dtype=torch.int32),
                                                     torch.ones(Q1, dtype=torch.int32), 3)),
    "kernel_tuple_length": ("kernel_size", lambda: F.na2d_qk(_t(*Q2), _t(*Q2), (3, 3, 3))),
    "dilation_tuple_length": ("dilation", lambda: F.na2d_av(_t(*A2), _t(*Q2), 3, (1,))),
    "is_causal_tuple_length": ("is_causal",
                               lambda: F.na3d_qk(_t(*Q3), _t(*Q3), 3, is_causal=(True,))),
    "additional_keys_dim": ("additional_keys",
                            lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 3, 1, _t(1, 2, 3, 5))),
    "additional_keys_batch": ("additional_keys",
                              lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 3, 1, _t(2, 2, 3, 4))),
    "additional_keys_rank": ("additional_keys",
                             lambda: F.na2d_qk(_t(*Q2), _t(*Q2), 3, 1, _t(1, 2, 4))),
    "additional_values_dim": ("additional_values",
                              lambda: F.na1d_av(_t(1, 2, 9, 5), _t(*Q1), 3, 1, _t(1, 2, 2, 3))),
}  # fmt: skip

TYPE_ERRORS = {
    "kernel_size_str": ("kernel_size", lambda: F.na1d_qk(_t(*Q1), _t(*Q1), "3")),
    "kernel_size_float": ("kernel_size", lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 3.0)),
    "dilation_float": ("dilation", lambda: F.na1d_av(_t(*A1), _t(*Q1), 3, 1.5)),
    "is_causal_str": ("is_causal", lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 3, is_causal="yes")),
    "query_list": ("query", lambda: F.na1d_qk(_t(*Q1).tolist(), _t(*Q1), 3)),
    "value_sparse": (
        "value: expected a strided",
        lambda: F.na1d_av(_t(*A1), _t(*Q1).to_sparse(), 3),
    ),
    "value_list": ("value", lambda: F.na1d_av(_t(*A1), _t(*Q1).tolist(), 3)),
    "rpb_list": ("rpb", lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 3, rpb=[[0.0] * 5] * 2)),
    "unfused_has_no_stride": ("stride", lambda: F.na1d_qk(_t(*Q1), _t(*Q1), 3, stride=2)),
}

CUDA_VALUE_ERRORS = {
    "key_on_other_device": ("key", lambda: F.na1d_qk(_t(*Q1, device="cuda"), _t(*Q1), 3)),
    "value_on_other_device": ("attn|value",
                              lambda: F.na1d_av(_t(*A1), _t(*Q1, device="cuda"), 3)),
}  # fmt: skip


def _error_params():
    params = [pytest.param(ValueError, *row, id=name) for name, row in VALUE_ERRORS.items()]
    params += [pytest.param(TypeError, *row, id=name) for name, row in TYPE_ERRORS.items()]
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
