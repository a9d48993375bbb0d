"""The CUDA path of the unfused ops against the CPU path and the dense oracle: every dtype,
ranks 1-3, dilation, causal, rpb, additional tokens, gradients, strided inputs; torch's
streams, other devices, CUDA graphs, tensors past 2^31 elements, deterministic d_rpb. The fused
forward against the CPU fused path and the oracle over every feature of test_fused.py's cases,
and the fused backward likewise. Skipped without a GPU (test_cuda_host.py runs the same checks on
the CPU through the host build of the kernels)."""

from __future__ import annotations

import contextlib
import logging
import math
import random

import natten_rs
import natten_rs.functional as F
import pytest
import reference
import torch
from conftest import DTYPE_PARAMS, LAYOUTS, assert_close, make_inputs
from natten_rs import _core, _cuda, _ops
from natten_rs._ops import dlpack
from test_fused import CASE_PARAMS as FUSED_CASE_PARAMS
from test_fused import Case as FusedCase
from test_fused import as_oracle, call, leaves, lse_tolerance, oracle, random_case, random_grad

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (spatial, kernel, dilation, causal, rpb, n_extra): every rank, dilation with uneven groups,
# causal per axis, bias and additional tokens.
CASES = [
    ((13,), (3,), (1,), (False,), True, 0),
    ((17,), (5,), (3,), (True,), False, 2),
    ((11, 12), (3, 5), (2, 1), (False, False), True, 3),
    ((9, 10), (7, 3), (1, 3), (False, True), False, 1),
    ((6, 7, 8), (3, 3, 5), (2, 2, 1), (False, False, False), True, 2),
    ((5, 7, 6), (3, 5, 3), (1, 1, 2), (True, False, True), False, 0),
]
CASE_IDS = [f"{len(c[0])}d-K{c[1]}-d{c[2]}-{'C' if any(c[3]) else 'n'}" for c in CASES]

BATCH, HEADS, DIM = 2, 3, 16
HALF_DTYPES = [torch.float16, torch.bfloat16]

# Problems whose window products (half types) take the tensor-core kernels: no additional
# tokens, head dims in eights. Each is (case as above, head dim): a 2-D tile whose key box spans
# several slabs, with rpb; dilation in uneven groups with causal rows; a 3-D causal problem at
# the widest head dim; a long dilated 1-D problem whose head dim pads to a whole step; a large
# window at a head dim of three eights.
TENSOR_CORE_UNFUSED_CASES = [
    (((20, 18), (7, 7), (1, 1), (False, False), True, 0), 32),
    (((23, 17), (5, 3), (2, 3), (True, False), False, 0), 64),
    (((6, 10, 9), (3, 5, 5), (1, 2, 1), (False, True, False), False, 0), 128),
    (((150,), (13,), (3,), (False,), True, 0), 8),
    (((15, 14), (11, 11), (1, 1), (False, False), False, 0), 24),
    # Rows a multiple of 8 long: whole slot rows move sixteen bytes at a time (but in the last
    # tile along axis 0, of four rows).
    (((12, 16), (5, 5), (1, 1), (False, True), False, 0), 32),
    # A bias table with no room beside the slot tile: its entries are read from the tensor.
    (((16, 20), (7, 15), (1, 1), (False, False), True, 0), 128),
    # Five tiles of 256 query rows per (batch, head): d_rpb's warps each add up several tile sums.
    (((1200,), (9,), (2,), (False,), True, 0), 16),
]  # fmt: skip
TENSOR_CORE_UNFUSED_PARAMS = [
    pytest.param(case, dim, id=f"{len(case[0])}d-K{case[1]}-d{case[2]}-D{dim}")
    for case, dim in TENSOR_CORE_UNFUSED_CASES
]


def _inputs(case, dtype, device, layout="contiguous", seed=0, dim=DIM):
    spatial, kernel, _, _, rpb, n_extra = case
    slots = math.prod(kernel) + n_extra
    shapes = [(BATCH, HEADS, *spatial, dim)] * 3 + [(BATCH, HEADS, *spatial, slots)]
    shapes += [(HEADS, *(2 * k - 1 for k in kernel))] if rpb else []
    shapes += [(BATCH, HEADS, n_extra, dim)] * 2 if n_extra else []
    tensors = list(make_inputs(*shapes, dtype=dtype, device=device, layout=layout, seed=seed,
                               requires_grad=True))  # fmt: skip
    q, k, v, attn = tensors[:4]
    rest = tensors[4:]
    bias = rest.pop(0) if rpb else None
    extra_k, extra_v = rest if n_extra else (None, None)
    names = ("q", "k", "v", "attn", "rpb", "extra_k", "extra_v")
    return dict(zip(names, (q, k, v, attn, bias, extra_k, extra_v)))


def _run(case, t):
    """qk and av on the same leaves; returns (logits, out)."""
    _, kernel, dilation, causal, _, _ = case
    rank = len(kernel)
    qk, av = getattr(F, f"na{rank}d_qk"), getattr(F, f"na{rank}d_av")
    logits = qk(t["q"], t["k"], kernel, dilation, additional_keys=t["extra_k"],
                is_causal=causal, rpb=t["rpb"])  # fmt: skip
    out = av(t["attn"], t["v"], kernel, dilation, additional_values=t["extra_v"],
             is_causal=causal)  # fmt: skip
    return logits, out


def _oracle(case, t):
    _, kernel, dilation, causal, _, _ = case
    t = {n: None if x is None else x.detach().cpu().double().requires_grad_() for n, x in t.items()}
    logits = reference.qk(t["q"], t["k"], kernel, dilation, causal, rpb=t["rpb"],
                          additional_keys=t["extra_k"])  # fmt: skip
    out = reference.av(t["attn"], t["v"], kernel, dilation, causal,
                       additional_values=t["extra_v"])  # fmt: skip
    return t, logits, out


def _grads(leaves: dict) -> dict:
    return {n: x.grad for n, x in leaves.items() if x is not None}


def _backward(logits, out, seed=1):
    g = torch.Generator().manual_seed(seed)
    d_logits = torch.randn(logits.shape, generator=g, dtype=torch.float64)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    finite = logits.detach().isfinite()
    d_logits = torch.where(finite.cpu(), d_logits, 0).to(logits.device, logits.dtype)
    torch.autograd.backward([logits, out], [d_logits, d_out.to(out.device, out.dtype)])


def check_unfused(case, dtype, layout, device, kernels=contextlib.nullcontext, dim=DIM):
    """qk and av forward and backward on `device` (inside `kernels()`) against the CPU path and
    the oracle, with rows of `dim` channels."""
    on_device = _inputs(case, dtype, device, layout, dim=dim)
    on_cpu = _inputs(case, dtype, "cpu", layout, dim=dim)
    with kernels():
        results = _run(case, on_device)
    cpu = _run(case, on_cpu)
    oracle_leaves, *oracle = _oracle(case, on_cpu)
    for name, a, b, o in zip(("logits", "out"), results, cpu, oracle):
        assert a.device.type == torch.device(device).type and a.is_contiguous()
        assert_close(a, o, dtype, what=f"{name} vs oracle")
        assert_close(a, b.double(), dtype, what=f"{name} vs cpu")
    with kernels():
        _backward(*results)
    _backward(*cpu)
    _backward(*oracle)
    expected, from_cpu = _grads(oracle_leaves), _grads(on_cpu)
    for name, grad in _grads(on_device).items():
        assert_close(grad, expected[name], dtype, what=f"d_{name} vs oracle")
        assert_close(grad, from_cpu[name].double(), dtype, what=f"d_{name} vs cpu")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_backward_match_the_cpu_path_and_the_oracle(case, dtype, layout):
    check_unfused(case, dtype, layout, "cuda")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case, dim", TENSOR_CORE_UNFUSED_PARAMS)
def test_tensor_core_window_products_match_the_cpu_path_and_the_oracle(case, dim, dtype, layout):
    check_unfused(case, dtype, layout, "cuda", dim=dim)


@contextlib.contextmanager
def _without_tensor_core_products():
    natten_rs.use_gemm_na(False)
    try:
        yield
    finally:
        natten_rs.use_gemm_na(True)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case, dim", TENSOR_CORE_UNFUSED_PARAMS[:2])
def test_use_gemm_na_false_takes_the_thread_per_output_kernels(case, dim, dtype):
    # The way round the tensor-core window products gives the same results on the other kernels.
    check_unfused(case, dtype, "contiguous", "cuda", _without_tensor_core_products, dim=dim)


def _poisoned(*shape, like):
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)


def check_every_output_element_is_written(device):
    """The core writes into outputs that start as NaN: any element left unwritten shows."""
    _, kernel, dilation, causal, _, _ = case = CASES[2]
    t = {
        n: None if x is None else x.detach()
        for n, x in _inputs(case, torch.float32, device).items()
    }
    params = (list(kernel), list(dilation), list(causal))
    q, k, v, attn, rpb, ek, ev = (
        t[n] for n in ("q", "k", "v", "attn", "rpb", "extra_k", "extra_v")
    )
    stream = _cuda.launch_stream(q)
    logits = _poisoned(*attn.shape, like=q)
    _core.na_qk(dlpack(q), dlpack(k), dlpack(rpb), dlpack(ek), dlpack(logits), *params, stream)
    out = _poisoned(*v.shape, like=v)
    _core.na_av(dlpack(attn), dlpack(v), dlpack(ev), dlpack(out), *params, stream)
    grads = [_poisoned(*x.shape, like=x) for x in (q, k, rpb, ek)]
    _core.na_qk_backward(dlpack(attn), dlpack(q), dlpack(k), dlpack(ek),
                         *(dlpack(g) for g in grads), *params, stream)  # fmt: skip
    av_grads = [_poisoned(*x.shape, like=x) for x in (attn, v, ev)]
    _core.na_av_backward(dlpack(q), dlpack(attn), dlpack(v), dlpack(ev),
                         *(dlpack(g) for g in av_grads), *params, stream)  # fmt: skip
    for result in (logits, out, *grads, *av_grads):
        assert not result.isnan().any()


def test_every_output_element_is_written():
    check_every_output_element_is_written("cuda")


def test_a_non_default_stream_is_used_and_ordered():
    case = CASES[3]
    t = _inputs(case, torch.float32, "cuda")
    expected = _run(case, t)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Queue a slow op first: the kernels must run after it, on this stream.
        torch.cuda._sleep(10_000_000)
        q = t["q"] * 1.0
        params = (list(case[1]), list(case[2]), list(case[3]))
        logits = _ops.na_qk(q, t["k"], t["rpb"], t["extra_k"], *params)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(logits, expected[0])


def test_cuda_graph_capture_and_replay():
    case = CASES[2]
    t = _inputs(case, torch.float16, "cuda")
    static = {n: None if x is None else x.detach().clone() for n, x in t.items()}
    _run(case, static)  # compile and load outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _run(case, static)
        torch.cuda.current_stream().synchronize()
        with torch.cuda.graph(graph):
            logits, out = _run(case, static)
    for seed in (3, 4):
        fresh = _inputs(case, torch.float16, "cuda", seed=seed)
        for name, x in fresh.items():
            if x is not None:
                static[name].copy_(x.detach())
        graph.replay()
        expected = _run(case, fresh)
        assert torch.equal(logits, expected[0]) and torch.equal(out, expected[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_tensors_on_a_second_device_run_there():
    case = CASES[4]
    t0 = _inputs(case, torch.float32, "cuda:0")
    t1 = {n: None if x is None else x.detach().to("cuda:1") for n, x in t0.items()}
    r0, r1 = _run(case, t0), _run(case, t1)
    for a, b in zip(r0, r1):
        assert b.device == torch.device("cuda:1")
        assert torch.equal(a.cpu(), b.cpu())


def test_rpb_gradient_is_deterministic():
    q, k = make_inputs((4, 2, 24, 24, 16), (4, 2, 24, 24, 16), dtype=torch.float32, device="cuda")
    rpb = torch.randn(2, 13, 13, device="cuda", requires_grad=True)
    d_attn = torch.randn(4, 2, 24, 24, 49, device="cuda")
    grads = []
    for _ in range(3):
        rpb.grad = None
        F.na2d_qk(q, k, 7, 2, rpb=rpb).backward(d_attn)
        grads.append(rpb.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_is_deterministic(dtype):
    # Every gradient of the fused op (tensor-core kernels in bfloat16; GQA, rpb, extras: each
    # key row summed over several query heads and tiles) has the same bits on every run.
    q, k, v = make_inputs((2, 20, 20, 4, 32), (2, 20, 20, 2, 32), (2, 20, 20, 2, 32),
                          dtype=dtype, device="cuda")  # fmt: skip
    ek, ev = make_inputs((2, 9, 2, 32), (2, 9, 2, 32), dtype=dtype, device="cuda")
    rpb = torch.randn(4, 13, 13, device="cuda", dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v, ek, ev, rpb)]
    out = natten_rs.na2d(q, k, v, 7, dilation=2, additional_keys=ek, additional_values=ev, rpb=rpb)
    d_out = torch.randn_like(out)
    runs = [torch.autograd.grad(out, leaves, d_out, retain_graph=True) for _ in range(3)]
    for first, *others in zip(*runs):
        assert all(torch.equal(first, other) for other in others)


def test_first_use_compile_is_logged(caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("NATTEN_RS_CACHE_DIR", str(tmp_path))
    caplog.set_level(logging.INFO, logger="natten_rs")
    q = torch.randn(1, 1, 11, 11, 11, 8, device="cuda")
    F.na3d_qk(q, q, 11, 1)  # a kernel size no other test uses: a fresh variant
    messages = [r.getMessage() for r in caplog.records if r.name == "natten_rs"]
    assert any("preparing CUDA kernels" in m for m in messages), messages
    assert any("compiled with NVRTC" in m or "disk cache" in m for m in messages), messages


def test_precompile_defaults_to_the_device_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("NATTEN_RS_CACHE_DIR", str(tmp_path))
    # Another test in this process may have compiled the variants: from memory, a row has no
    # resource report.
    _core.forget_compiled()
    rows = natten_rs.precompile([(3, 3)], dtypes=[torch.bfloat16])
    sources = {name.split("[")[0] for name, *_ in rows}
    assert sources == {"na_qk", "na_av"}, rows
    assert all("[bfloat16, kernel 1x3x3, causal 000]/" in row[0] for row in rows), rows
    assert all(row[1] is not None and row[1] > 0 for row in rows), rows


def check_fused_forward(case, dtype, device, kernels=contextlib.nullcontext):
    """The fused forward on `device` (inside `kernels()`) against the CPU path and the
    oracle."""
    on_device, on_cpu = leaves(case, dtype, device), leaves(case, dtype, "cpu")
    with kernels():
        out, lse = call(case, on_device, return_lse=True)
    cpu_out, cpu_lse = call(case, on_cpu, return_lse=True)
    expected, expected_lse = oracle(case, as_oracle(on_cpu), return_lse=True)
    assert out.device.type == torch.device(device).type
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, expected, dtype, what="out vs oracle")
    assert_close(out, cpu_out.double(), dtype, what="out vs cpu")
    assert_close(lse, expected_lse, lse_tolerance(dtype), what="lse vs oracle")
    assert_close(lse, cpu_lse.double(), lse_tolerance(dtype), what="lse vs cpu")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", FUSED_CASE_PARAMS)
def test_fused_forward_matches_the_cpu_path_and_the_oracle(case, dtype):
    # Ranks 1-3, odd and even kernels, stride, dilation, causal per axis, GQA/MQA, Dv != D,
    # (expanded) additional tokens, rpb, custom scale, every layout.
    check_fused_forward(case, dtype, "cuda")


# Problems for the tensor-core forward (half types, head dims multiples of 8) beyond the shared
# fused cases: windows spanning several key slabs, dilation with rpb and GQA, head dims past 128
# (output passes, query fragments read per step) with MQA, more additional tokens than a slab,
# a strided causal 3-D problem, scales the kernels cannot fold into their exponentials (a
# negative one, on rows aligned to their element alone, and 0), and windows wide enough that whole slabs lie inside every query's of a
# warp (no mask built). Positional fields as in test_fused.FIXED_CASES.
TENSOR_CORE_CASES = [
    FusedCase((100,), (33,), (1,), (1,), (False,), 1, 2, 2, 32, 32),
    FusedCase((20, 18), (7, 5), (1, 1), (2, 3), (False, False), 2, 4, 2, 64, 64, rpb=True),
    FusedCase((9,), (3,), (1,), (1,), (False,), 1, 2, 1, 256, 200, n_extra=3),
    FusedCase((6, 7), (3, 3), (2, 1), (1, 1), (True, False), 1, 2, 2, 16, 24, n_extra=70,
              layout="permuted"),
    FusedCase((6, 9, 10), (3, 4, 5), (1, 2, 1), (2, 1, 1), (True, False, True), 1, 2, 2, 40, 8,
              layout="sliced"),
    FusedCase((13, 15), (5, 7), (1, 1), (1, 2), (False, False), 1, 2, 1, 32, 32, scale=-0.4,
              layout="shifted"),
    FusedCase((30,), (9,), (1,), (1,), (True,), 1, 2, 2, 16, 16, n_extra=3, scale=0.0),
    FusedCase((36, 40), (17, 23), (1, 1), (1, 1), (False, False), 1, 1, 1, 32, 32),
]  # fmt: skip
# Random problems for the tensor-core kernels (test_fused.random_case: every feature drawn) with
# head dims in eights, over longer axes and wider windows than the shared fused cases, so that
# tiles and slabs come several to an axis: the forward's here (head dims up to 256), the
# backward's below (up to 128).
_TENSOR_CORE_RNG = random.Random(2026)
_TENSOR_CORE_SHAPES = {1: ((90,), 33), 2: ((20, 22), 11), 3: ((7, 8, 9), 5)}


def _random_tensor_core_case(rank: int, dims: tuple[int, ...]) -> FusedCase:
    shape, kernel = _TENSOR_CORE_SHAPES[rank]
    return random_case(_TENSOR_CORE_RNG, rank, shape, kernel, dims, dims_v=(16, 40, 128))


TENSOR_CORE_CASES += [
    _random_tensor_core_case(rank, (8, 24, 32, 64, 96, 128, 256)) for rank in (1, 2, 2, 3)
]
TENSOR_CORE_CASE_PARAMS = [pytest.param(case, id=str(case)) for case in TENSOR_CORE_CASES]

# Problems for the tensor-core backward (half types, head dims multiples of 8 up to 128; wider
# ones take the warp kernels) beyond the tensor-core forward's: key tiles whose box of queries
# spans several slabs, in every slab width (on mma.sync 32 queries up to head dim 64, 16 past
# it; on warpgroup products 64 up to head dim 32, 32 past it); stride
# with causal and GQA at head dims 128/96; a 1-D problem with dilation, stride and MQA at head
# dims 64/128 with extras; dilation with rpb on a causal 3-D problem; a bias table the mma.sync
# backward kernels have no room to stage (they read its entries from the tensor).
TENSOR_CORE_BACKWARD_CASES = [
    FusedCase((12, 20), (5, 7), (1, 2), (1, 1), (False, True), 1, 4, 2, 128, 96),
    FusedCase((40,), (13,), (4,), (2,), (False,), 2, 2, 1, 64, 128, n_extra=5, layout="permuted"),
    FusedCase((6, 7, 8), (3, 3, 5), (1, 1, 1), (2, 1, 1), (False, True, False), 1, 2, 2, 32, 32,
              rpb=True, layout="sliced"),
    FusedCase((20, 19), (19, 19), (1, 1), (1, 1), (False, False), 1, 1, 1, 128, 128, rpb=True),
]  # fmt: skip
TENSOR_CORE_BACKWARD_CASES += [
    _random_tensor_core_case(rank, (8, 16, 32, 48, 64, 128)) for rank in (1, 2, 3)
]
TENSOR_CORE_BACKWARD_CASE_PARAMS = [
    pytest.param(case, id=str(case)) for case in TENSOR_CORE_CASES + TENSOR_CORE_BACKWARD_CASES
]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", TENSOR_CORE_CASE_PARAMS)
def test_tensor_core_forward_matches_the_cpu_path_and_the_oracle(case, dtype):
    check_fused_forward(case, dtype, "cuda")


# The variants of the tensor-core kernels, name -> (NATTEN_RS_WGMMA, NATTEN_RS_TMA): mma.sync and
# cp.async everywhere; on sm_90a (other devices keep the first) warpgroup products; and those
# with slabs staged by bulk tensor copies where tensor maps describe what they stage (the
# forward's and the d_query kernel's keys and values, the key kernel's queries and output
# gradients; the cases' other layouts keep cp.async).
TENSOR_CORE_VARIANTS = {"mma": ("0", "0"), "warpgroup": ("1", "0"), "bulk copies": ("1", "1")}
HOPPER_VARIANTS = ["warpgroup", "bulk copies"]


def use_tensor_core_variant(variant, monkeypatch):
    wgmma, tma = TENSOR_CORE_VARIANTS[variant]
    monkeypatch.setenv("NATTEN_RS_WGMMA", wgmma)
    monkeypatch.setenv("NATTEN_RS_TMA", tma)


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", TENSOR_CORE_CASE_PARAMS)
def test_hopper_forward_variants_match_the_cpu_path_and_the_oracle(
    case, dtype, variant, monkeypatch
):
    use_tensor_core_variant(variant, monkeypatch)
    check_fused_forward(case, dtype, "cuda")


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", TENSOR_CORE_BACKWARD_CASE_PARAMS)
def test_hopper_backward_variants_match_the_cpu_path_and_the_oracle(
    case, dtype, variant, monkeypatch
):
    use_tensor_core_variant(variant, monkeypatch)
    check_fused_backward(case, dtype, "cuda")


# Settings of the tensor-core kernels that benchmarks may change (NATTEN_RS_TUNE,
# rust/src/cuda/tuning.rs), each value at least once beside the defaults: register bounds, rings
# of two and four buffers, slabs of 16 and 32 keys, tree-shaped softmax reductions. The forward's
# over problems of every rank, a bias with dilation, a strided causal 3-D problem, additional
# tokens past a slab and slabs inside every query's window; the window products' over a 2-D
# problem with a bias.
TUNINGS = [
    "NA_TC_FORWARD_MIN_BLOCKS=4 NA_TC_FORWARD_STAGES=2 NA_TC_UNFUSED_MIN_BLOCKS=4",
    "NA_TC_KEYS=32 NA_TC_FORWARD_STAGES=4",
    "NA_TC_KEYS=16,NA_TC_TREE_SOFTMAX=1",
]
TUNED_CASE_PARAMS = [TENSOR_CORE_CASE_PARAMS[i] for i in (0, 1, 3, 4, 7)]
TUNED_UNFUSED_CASE = TENSOR_CORE_UNFUSED_CASES[0]


@pytest.mark.parametrize("tuning", TUNINGS)
@pytest.mark.parametrize("case", TUNED_CASE_PARAMS)
def test_tuned_forward_variants_match_the_cpu_path_and_the_oracle(case, tuning, monkeypatch):
    monkeypatch.setenv("NATTEN_RS_TUNE", tuning)
    check_fused_forward(case, torch.bfloat16, "cuda")


def test_tuned_window_products_match_the_cpu_path_and_the_oracle(monkeypatch):
    monkeypatch.setenv("NATTEN_RS_TUNE", TUNINGS[0])
    case, dim = TUNED_UNFUSED_CASE
    check_unfused(case, torch.bfloat16, "contiguous", "cuda", dim=dim)


def check_dense_attention(dtype, device, kernels=contextlib.nullcontext):
    """Dense attention (the fused kernel with only additional tokens) against the CPU path."""
    q, k, v = make_inputs((2, 7, 4, 16), (2, 13, 2, 16), (2, 13, 2, 8), dtype=dtype,
                          device=device, seed=5)  # fmt: skip
    with kernels():
        out, lse = natten_rs.attention(q, k, v, scale=0.3, return_lse=True)
    cpu = natten_rs.attention(q.cpu(), k.cpu(), v.cpu(), scale=0.3, return_lse=True)
    assert_close(out, cpu[0].double(), dtype, what="out vs cpu")
    assert_close(lse, cpu[1].double(), lse_tolerance(dtype), what="lse vs cpu")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_dense_attention_runs_on_the_fused_kernel(dtype):
    check_dense_attention(dtype, "cuda")


def check_fused_forward_writes_every_output_element(device, dtype=torch.float32):
    """Outputs start as NaN: any element left unwritten shows (half types take the tensor-core
    kernel)."""
    q, k, v = make_inputs((2, 9, 8, 4, 24), (2, 9, 8, 2, 24), (2, 9, 8, 2, 40),
                          dtype=dtype, device=device)  # fmt: skip
    ek, ev = make_inputs((2, 3, 2, 24), (2, 3, 2, 40), dtype=dtype, device=device)
    out = _poisoned(2, 9, 8, 4, 40, like=q)
    lse = _poisoned(2, 9, 8, 4, like=q.float())
    nbhd = ([3, 4], [1, 2], [2, 1], [True, False])
    inputs = tuple(dlpack(t) for t in (q, k, v, ek, ev, None))
    _core.na_fused(inputs, nbhd, 0.5, dlpack(out), dlpack(lse), _cuda.launch_stream(q))
    assert not out.isnan().any() and not lse.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_fused_forward_writes_every_output_element(dtype):
    check_fused_forward_writes_every_output_element("cuda", dtype)


def test_fused_head_dims_past_the_limit_are_refused_naming_them():
    q = torch.randn(1, 8, 2, 520, device="cuda")
    with pytest.raises(NotImplementedError, match="forward on CUDA with a head dim above 512"):
        natten_rs.na1d(q, q, q, kernel_size=3)
    q = torch.randn(1, 8, 2, 264, device="cuda", requires_grad=True)
    out = natten_rs.na1d(q, q, q, kernel_size=3)
    with pytest.raises(NotImplementedError, match="backward on CUDA with a head dim above 256"):
        out.sum().backward()


def check_fused_backward(case, dtype, device, kernels=contextlib.nullcontext):
    """Gradients of the fused op through out and lse on `device` (inside `kernels()`) against
    the CPU path and the oracle."""
    on_device = leaves(case, dtype, device, requires_grad=True)
    on_cpu = leaves(case, dtype, "cpu", requires_grad=True)
    cpu_out, cpu_lse = call(case, on_cpu, return_lse=True)
    g_out = random_grad(cpu_out.shape, dtype, "cpu")
    g_lse = random_grad(cpu_lse.shape, torch.float32, "cpu", 8)
    torch.autograd.backward((cpu_out, cpu_lse), (g_out, g_lse))
    with kernels():
        out, lse = call(case, on_device, return_lse=True)
        torch.autograd.backward((out, lse), (g_out.to(device), g_lse.to(device)))
    expected = as_oracle(on_cpu)
    torch.autograd.backward(
        oracle(case, expected, return_lse=True), (g_out.double(), g_lse.double())
    )
    for name, leaf in on_device.items():
        assert leaf.grad is not None and leaf.grad.device.type == torch.device(device).type
        what = f"d{name}"
        assert_close(leaf.grad, expected[name].grad, lse_tolerance(dtype), what=what + " vs oracle")
        assert_close(
            leaf.grad, on_cpu[name].grad.double(), lse_tolerance(dtype), what=what + " vs cpu"
        )


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", FUSED_CASE_PARAMS)
def test_fused_backward_matches_the_cpu_path_and_the_oracle(case, dtype):
    check_fused_backward(case, dtype, "cuda")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", TENSOR_CORE_BACKWARD_CASE_PARAMS)
def test_tensor_core_backward_matches_the_cpu_path_and_the_oracle(case, dtype):
    check_fused_backward(case, dtype, "cuda")


@pytest.mark.parametrize("op", ["qk", "av"])
def test_opcheck_on_cuda(op):
    case = CASES[2]
    t = _inputs(case, torch.float32, "cuda")
    _, kernel, dilation, causal, _, _ = case
    params = (list(kernel), list(dilation), list(causal))
    if op == "qk":
        torch.library.opcheck(_ops.na_qk, (t["q"], t["k"], t["rpb"], t["extra_k"], *params))
    else:
        torch.library.opcheck(_ops.na_av, (t["attn"], t["v"], t["extra_v"], *params))


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available() or _free_bytes() < 24 << 30,
    reason="needs 24 GiB of free GPU memory",
)
def test_tensors_past_two_to_the_31_elements():
    # attn [1, 1, 3600, 3600, 169] holds 2.19e9 elements (> 2^31): the last rows sit past
    # 32-bit offsets. Rows of the last K are checked against the same op on a crop of the
    # input's last 2K rows, whose windows are the same (shifted).
    side, kernel = 3600, 13
    q, k, v = (torch.randn(1, 1, side, side, 4, device="cuda", dtype=torch.float16)
               for _ in range(3))  # fmt: skip
    attn = F.na2d_qk(q, k, kernel)
    assert attn.numel() > 2**31
    crop = slice(side - 2 * kernel, side)
    small = F.na2d_qk(q[:, :, crop], k[:, :, crop], kernel)
    assert torch.equal(attn[:, :, -kernel:], small[:, :, -kernel:])
    weights = attn.softmax(-1)
    out = F.na2d_av(weights, v, kernel)
    small_out = F.na2d_av(weights[:, :, crop].contiguous(), v[:, :, crop], kernel)
    assert torch.equal(out[:, :, -kernel:], small_out[:, :, -kernel:])
