"""The CUDA kernels, run on the CPU: kernels/host.h lets the host's C++ compiler build the very
sources NVRTC compiles, and while ``_core.run_cuda_kernels_on_host`` is on, ops on CPU tensors
plan their CUDA launches as for a GPU and run them there. Against the CPU kernels and the oracle,
this checks the kernels' logic (indexing, windows, dilation, causal masks, strides, reductions,
warp shuffles, block barriers) where there is no GPU. Speed, the memory model, streams and the
driver are test_cuda.py's, on a GPU."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import natten_rs
import natten_rs.functional as F
import pytest
import torch
from conftest import DTYPE_PARAMS, LAYOUTS
from natten_rs import KernelError, _core
from natten_rs import context as ctx
from natten_rs._ops import dlpack
from test_cuda import (
    CASE_IDS,
    CASES,
    HALF_DTYPES,
    HOPPER_VARIANTS,
    TENSOR_CORE_BACKWARD_CASE_PARAMS,
    TENSOR_CORE_BACKWARD_CASES,
    TENSOR_CORE_CASE_PARAMS,
    TENSOR_CORE_CASES,
    TENSOR_CORE_UNFUSED_CASES,
    TENSOR_CORE_UNFUSED_PARAMS,
    TENSOR_CORE_VARIANTS,
    TUNED_CASE_PARAMS,
    TUNED_UNFUSED_CASE,
    TUNINGS,
    check_dense_attention,
    check_every_output_element_is_written,
    check_fused_backward,
    check_fused_forward,
    check_fused_forward_writes_every_output_element,
    check_unfused,
    use_tensor_core_variant,
)
from test_fused import CASE_PARAMS as FUSED_CASE_PARAMS

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")


def _on_host(directory, **options):
    """A context in which CPU tensors run the CUDA kernels built in `directory`."""

    @contextlib.contextmanager
    def on_host():
        _core.run_cuda_kernels_on_host(str(directory), **options)
        try:
            yield
        finally:
            _core.run_cuda_kernels_on_host(None)

    return on_host


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    """One folder for the run's host builds. The contexts below differ in how launches run, not
    in what is built, and a library's name hashes all that goes into it, so they share their
    builds; so do pytest-xdist's workers (each build is renamed into place once complete)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    directory = base / "host_kernels"
    directory.mkdir(exist_ok=True)
    return directory


@pytest.fixture(scope="session")
def kernels(build_dir):
    """A context in which CPU tensors run the CUDA kernels."""
    return _on_host(build_dir)


@pytest.fixture(scope="session")
def reversed_turns(build_dir):
    """As `kernels`, a block's threads taking their turns last first: a read of shared memory
    that lacks the barrier after another thread's write sees the write in one order and not in
    the other, so a race that changes a result fails under one of the two fixtures."""
    return _on_host(build_dir, reversed_threads=True)


@pytest.fixture(scope="session")
def few_blocks(build_dir):
    """As `kernels`, each launch on at most two blocks: every block loops over several tasks
    (tiles, rows, bias entries), as on a GPU for a problem past its grid limit."""
    return _on_host(build_dir, max_grid=2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unfused_kernels_match_the_cpu_path_and_the_oracle(case, dtype, layout, kernels):
    check_unfused(case, dtype, layout, "cpu", kernels)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case, dim", TENSOR_CORE_UNFUSED_PARAMS)
def test_tensor_core_window_products_match_the_cpu_path_and_the_oracle(
    case, dim, dtype, layout, kernels
):
    check_unfused(case, dtype, layout, "cpu", kernels, dim=dim)


def test_unfused_kernels_write_every_output_element(kernels):
    with kernels():
        check_every_output_element_is_written("cpu")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", FUSED_CASE_PARAMS)
def test_fused_forward_kernel_matches_the_cpu_path_and_the_oracle(case, dtype, kernels):
    check_fused_forward(case, dtype, "cpu", kernels)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", FUSED_CASE_PARAMS)
def test_fused_backward_kernels_match_the_cpu_path_and_the_oracle(case, dtype, kernels):
    check_fused_backward(case, dtype, "cpu", kernels)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_dense_attention_on_the_fused_kernel(dtype, kernels):
    check_dense_attention(dtype, "cpu", kernels)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_fused_forward_kernel_writes_every_output_element(dtype, kernels):
    with kernels():
        check_fused_forward_writes_every_output_element("cpu", dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", TENSOR_CORE_CASE_PARAMS)
def test_tensor_core_forward_matches_the_cpu_path_and_the_oracle(case, dtype, kernels):
    check_fused_forward(case, dtype, "cpu", kernels)


def _with_bulk_copies(monkeypatch):
    """The bulk copies variant (test_cuda.TENSOR_CORE_VARIANTS): the warpgroup forward and the
    backward's d_query kernel stage their key and value slabs by bulk tensor copies, and the
    backward's key kernel its query and output gradient slabs (emulated here as the driver
    documents them, landing on their barriers as late as a GPU allows), where tensor maps
    describe those tensors."""
    use_tensor_core_variant("bulk copies", monkeypatch)


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", TENSOR_CORE_CASE_PARAMS)
def test_hopper_forward_variants_match_the_cpu_path_and_the_oracle(
    case, dtype, variant, kernels, monkeypatch
):
    # Warpgroup products (and bulk copies) emulated as the PTX ISA defines them, reading slabs
    # staged in core matrices, for head dims up to 128.
    use_tensor_core_variant(variant, monkeypatch)
    check_fused_forward(case, dtype, "cpu", kernels)


@pytest.mark.parametrize("variant", HOPPER_VARIANTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", TENSOR_CORE_BACKWARD_CASE_PARAMS)
def test_hopper_backward_variants_match_the_cpu_path_and_the_oracle(
    case, dtype, variant, kernels, monkeypatch
):
    # The d_query and key-row kernels' products, both factors of their logits and dP from
    # shared memory.
    use_tensor_core_variant(variant, monkeypatch)
    check_fused_backward(case, dtype, "cpu", kernels)


@pytest.mark.parametrize("tuning", TUNINGS)
@pytest.mark.parametrize("case", TUNED_CASE_PARAMS)
def test_tuned_forward_variants_match_the_cpu_path_and_the_oracle(
    case, tuning, kernels, monkeypatch
):
    monkeypatch.setenv("NATTEN_RS_TUNE", tuning)
    check_fused_forward(case, torch.bfloat16, "cpu", kernels)


def test_tuned_window_products_match_the_cpu_path_and_the_oracle(kernels, monkeypatch):
    monkeypatch.setenv("NATTEN_RS_TUNE", TUNINGS[0])
    case, dim = TUNED_UNFUSED_CASE
    check_unfused(case, torch.bfloat16, "contiguous", "cpu", kernels, dim=dim)


@pytest.mark.parametrize(
    "tuning, message",
    [
        ("NA_TC_KEYS", "got NA_TC_KEYS"),
        ("NA_TC_KEYS=48", r"NA_TC_KEYS takes \[16, 32, 64\]"),
        ("NA_TC_STAGES=2", "unknown name NA_TC_STAGES"),
    ],
)
def test_a_bad_tuning_is_refused_naming_it(tuning, message, kernels, monkeypatch):
    monkeypatch.setenv("NATTEN_RS_TUNE", tuning)
    q = torch.randn(1, 10, 2, 16).to(torch.bfloat16)
    with kernels(), pytest.raises(ValueError, match=f"NATTEN_RS_TUNE.*{message}"):
        natten_rs.na1d(q, q, q, kernel_size=3)


def _tensor_copies(directory) -> int:
    """Bulk tensor copies the host libraries built in `directory` have issued (read while they
    are loaded: turning the host build off closes them)."""
    libraries = (ctypes.CDLL(str(library)) for library in directory.glob("*.so"))
    return sum(ctypes.c_ulonglong.in_dll(h, "na_host_tensor_copies").value for h in libraries)


@pytest.mark.parametrize(
    "heads_first, dilation, takes",
    [
        (False, 1, True),
        (False, 4, True),  # boxes of 64 keys x 4 = 256 elements, the most the driver takes
        (False, 5, False),  # 320
        (True, 1, False),  # heads apart from their channels: no map describes them
    ],
)
def test_bulk_copies_are_taken_where_tensor_maps_describe_the_keys(
    heads_first, dilation, takes, tmp_path, monkeypatch
):
    _with_bulk_copies(monkeypatch)
    shape = (2, 4, 200, 32) if heads_first else (2, 200, 4, 32)
    q, k, v = (torch.randn(shape).to(torch.bfloat16) for _ in range(3))
    if heads_first:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    with _on_host(tmp_path)():
        out = natten_rs.na1d(q, k, v, kernel_size=9, dilation=dilation)
        assert (_tensor_copies(tmp_path) > 0) == takes
    expected = natten_rs.na1d(q, k, v, kernel_size=9, dilation=dilation)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_slabs_of_other_sizes_give_up_the_bulk_copies(tmp_path, monkeypatch):
    # The tensor maps are the host's, shaped for the default slab of 64 keys.
    _with_bulk_copies(monkeypatch)
    monkeypatch.setenv("NATTEN_RS_TUNE", "NA_TC_KEYS=32")
    q, k, v = (torch.randn(2, 200, 4, 32).to(torch.bfloat16) for _ in range(3))
    with _on_host(tmp_path)():
        out = natten_rs.na1d(q, k, v, kernel_size=9)
        assert _tensor_copies(tmp_path) == 0
    expected = natten_rs.na1d(q, k, v, kernel_size=9)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("heads_apart", [False, True])
def test_backward_bulk_copies_are_taken_where_tensor_maps_describe_the_output_gradient(
    heads_apart, tmp_path, monkeypatch
):
    # The key kernel stages query and output gradient slabs by bulk copies: an output gradient
    # whose heads lie apart from their channels (the gradient of a transposed output) leaves the
    # whole backward on cp.async, with the same gradients.
    _with_bulk_copies(monkeypatch)
    q, k, v = (torch.randn(2, 200, 4, 32).to(torch.bfloat16).requires_grad_() for _ in range(3))
    d_out = torch.randn(2, 200, 4, 32).to(torch.bfloat16)
    if heads_apart:
        d_out = d_out.transpose(1, 2).contiguous().transpose(1, 2)
    with _on_host(tmp_path)():
        out = natten_rs.na1d(q, k, v, kernel_size=9, dilation=2)
        forward_copies = _tensor_copies(tmp_path)
        grads = torch.autograd.grad(out, (q, k, v), d_out)
        assert (_tensor_copies(tmp_path) > forward_copies) != heads_apart
    out = natten_rs.na1d(q, k, v, kernel_size=9, dilation=2)
    for got, expected in zip(grads, torch.autograd.grad(out, (q, k, v), d_out)):
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", TENSOR_CORE_BACKWARD_CASE_PARAMS)
def test_tensor_core_backward_matches_the_cpu_path_and_the_oracle(case, dtype, kernels):
    check_fused_backward(case, dtype, "cpu", kernels)


@pytest.mark.parametrize("variant", TENSOR_CORE_VARIANTS)
@pytest.mark.parametrize("case", TENSOR_CORE_CASE_PARAMS)
def test_tensor_core_forward_in_reversed_turns(case, variant, reversed_turns, monkeypatch):
    use_tensor_core_variant(variant, monkeypatch)
    check_fused_forward(case, torch.bfloat16, "cpu", reversed_turns)


@pytest.mark.parametrize("variant", TENSOR_CORE_VARIANTS)
@pytest.mark.parametrize("case", TENSOR_CORE_BACKWARD_CASE_PARAMS)
def test_tensor_core_backward_in_reversed_turns(case, variant, reversed_turns, monkeypatch):
    use_tensor_core_variant(variant, monkeypatch)
    check_fused_backward(case, torch.bfloat16, "cpu", reversed_turns)


@pytest.mark.parametrize("case, dim", TENSOR_CORE_UNFUSED_PARAMS)
def test_tensor_core_window_products_in_reversed_turns(case, dim, reversed_turns):
    check_unfused(case, torch.bfloat16, "contiguous", "cpu", reversed_turns, dim=dim)


@pytest.mark.parametrize("case", FUSED_CASE_PARAMS)
def test_fused_warp_kernels_in_reversed_turns(case, reversed_turns):
    check_fused_forward(case, torch.float32, "cpu", reversed_turns)
    check_fused_backward(case, torch.float32, "cpu", reversed_turns)


# The -D constants common.cuh asks of every kernel (values the checks below do not depend on).
HOST_CONSTANTS = {
    "NA_DTYPE": 3, "NA_K0": 1, "NA_K1": 7, "NA_K2": 7, "NA_C0": 0, "NA_C1": 0, "NA_C2": 0,
    "NA_S0": 1, "NA_S1": 1, "NA_S2": 1, "NA_BLOCK": 128, "NA_REDUCE_THREADS": 256,
    "NA_EXTRA_ROWS": 4, "NA_DIM": 32, "NA_DIM_V": 32,
}  # fmt: skip


def _run_kernel_check(tmp_path, name: str, constants: dict) -> str:
    """Build tests/kernels/<name>.cpp (kernels/host.h's build of kernel code, with `constants`
    defined), run it, and return what it printed: it checks code against its definition and
    ends with a count of differences, which must be none."""
    root = Path(__file__).resolve().parent
    binary = tmp_path / name
    defines = [f"-D{key}={value}" for key, value in constants.items()]
    subprocess.run(
        ["c++", "-std=c++17", "-O2", f"-I{root.parent / 'kernels'}", *defines,
         str(root / "kernels" / f"{name}.cpp"), "-o", str(binary)],
        check=True, capture_output=True,
    )  # fmt: skip
    run = subprocess.run([str(binary)], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith(" 0 differences"), run.stdout
    return run.stdout


# Kernel sizes for the cut's rule: no slab of 32 or 64 columns fits inside a 7x7 window (or a
# window of 7), and some fit inside a 5x9x13 one. Kernels of 1 make unit axes, which the masks
# and the slab walk skip (planar and linear problems).
@pytest.mark.parametrize(
    ("kernel", "fits"), [((1, 7, 7), False), ((1, 1, 7), False), ((5, 9, 13), True)]
)
def test_slab_masks_match_their_column_by_column_definition(tmp_path, kernel, fits):
    # The tensor-core kernels cut their boxes into sub-box slabs and build each slab's mask from
    # word operations; tests/kernels/slab_masks.cpp checks the cut (fewest slabs, the preferred
    # shape of those, every column once) and the masks against their definition, column by
    # column, over random boxes, slabs and ranges, and that a slab the shortcut takes whole is
    # seen whole.
    sizes = {f"NA_K{a}": k for a, k in enumerate(kernel)}
    printed = _run_kernel_check(tmp_path, "slab_masks", {**HOST_CONSTANTS, **sizes})
    # Both branches of the rule are taken where they can be.
    fitting = int(re.search(r"(\d+) cuts of a shape that fits a window", printed).group(1))
    assert (fitting > 0) == fits, printed


def test_window_runs_match_a_scan_of_every_window(tmp_path):
    # The backward kernels find the queries whose windows hold a key (or a tile's keys) in
    # closed form; tests/kernels/window_runs.cpp checks it against a scan of every query's
    # window, over every group length up to 24, kernel, stride and key range, and random larger
    # ones, in 32- and 64-bit indices.
    _run_kernel_check(tmp_path, "window_runs", HOST_CONSTANTS)


# GQA with rpb in 2-D and 3-D (the second causal, dilated), additional tokens past a tile.
LOOPING_CASES = [TENSOR_CORE_CASES[1], TENSOR_CORE_BACKWARD_CASES[2], TENSOR_CORE_CASES[3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [pytest.param(c, id=str(c)) for c in LOOPING_CASES])
def test_kernels_loop_over_what_a_small_grid_leaves(case, dtype, few_blocks):
    # Each block takes many tasks in turn: nothing of one task (staged rows, copies in flight,
    # partial sums) may leak into the next.
    check_fused_forward(case, dtype, "cpu", few_blocks)
    check_fused_backward(case, dtype, "cpu", few_blocks)


@pytest.mark.parametrize("case", [pytest.param(c, id=str(c)) for c in LOOPING_CASES[::2]])
def test_the_warpgroup_kernels_loop_over_what_a_small_grid_leaves(case, few_blocks, monkeypatch):
    # (With bulk copies, their barriers keep their phases from tile to tile.)
    for variant in HOPPER_VARIANTS:
        use_tensor_core_variant(variant, monkeypatch)
        check_fused_forward(case, torch.bfloat16, "cpu", few_blocks)
        check_fused_backward(case, torch.bfloat16, "cpu", few_blocks)


@pytest.mark.parametrize("case, dim", TENSOR_CORE_UNFUSED_CASES[:2])
def test_tensor_core_window_products_loop_over_what_a_small_grid_leaves(case, dim, few_blocks):
    # Each block takes many tiles in turn: no slot row of one may leak into the next.
    check_unfused(case, torch.bfloat16, "permuted", "cpu", few_blocks, dim=dim)


def test_the_host_grid_limit_is_checked_naming_it(tmp_path):
    with pytest.raises(ValueError, match="max_grid"):
        _core.run_cuda_kernels_on_host(str(tmp_path), max_grid=0)


def test_the_order_of_turns_is_checked_naming_it(tmp_path):
    with pytest.raises(TypeError, match="reversed_threads"):
        _core.run_cuda_kernels_on_host(str(tmp_path), reversed_threads="yes")
    assert not _core.run_cuda_kernels_on_host(None)  # the failed call left it off
    assert not _core.run_cuda_kernels_on_host(None)


def _built_kernels(directory, names) -> set:
    """Which of the kernel entry points `names` the host libraries built in `directory` have."""
    found = set()
    for library in directory.glob("*.so"):
        handle = ctypes.CDLL(str(library))
        found |= {name for name in names if hasattr(handle, name)}
    return found


@pytest.mark.parametrize(
    "dtype, dim, kernel",
    [
        (torch.float16, 16, "na_host_na_fused_forward_tc"),
        (torch.bfloat16, 8, "na_host_na_fused_forward_tc"),
        (torch.float32, 16, "na_host_na_fused_forward"),
        (torch.float16, 12, "na_host_na_fused_forward"),  # not a multiple of 8
    ],
)
def test_half_types_with_head_dims_in_eights_take_the_tensor_core_forward(
    dtype, dim, kernel, tmp_path
):
    q = torch.randn(1, 10, 2, dim).to(dtype)
    _core.run_cuda_kernels_on_host(str(tmp_path))
    try:
        natten_rs.na1d(q, q, q, kernel_size=3)
    finally:
        _core.run_cuda_kernels_on_host(None)
    names = ("na_host_na_fused_forward", "na_host_na_fused_forward_tc")
    assert _built_kernels(tmp_path, names) == {kernel}


@pytest.mark.parametrize(
    "dtype, dim, extra, kernel",
    [
        (torch.bfloat16, 16, 0, "na_host_na_pairwise_tc"),
        (torch.float16, 8, 0, "na_host_na_pairwise_tc"),
        (torch.bfloat16, 16, 2, "na_host_na_pairwise"),  # additional tokens
        (torch.float16, 12, 0, "na_host_na_pairwise"),  # not a multiple of 8
        (torch.float16, 136, 0, "na_host_na_pairwise"),  # past 128
        (torch.float32, 16, 0, "na_host_na_pairwise"),
    ],
)
def test_half_types_without_additional_tokens_take_the_tensor_core_window_products(
    dtype, dim, extra, kernel, tmp_path
):
    q = torch.randn(1, 2, 10, dim).to(dtype)
    keys = torch.randn(1, 2, extra, dim).to(dtype) if extra else None
    _core.run_cuda_kernels_on_host(str(tmp_path))
    try:
        F.na1d_qk(q, q, 3, 1, additional_keys=keys)
    finally:
        _core.run_cuda_kernels_on_host(None)
    names = ("na_host_na_pairwise", "na_host_na_pairwise_tc")
    assert _built_kernels(tmp_path, names) == {kernel}


def test_use_gemm_na_false_keeps_the_unfused_ops_off_tensor_cores(tmp_path):
    # NATTEN's flag for its GEMM-based kernels turns natten_rs's counterpart off and on again;
    # the fused ops keep theirs.
    q = torch.randn(1, 2, 10, 16).to(torch.bfloat16)
    names = ("na_host_na_pairwise", "na_host_na_pairwise_tc", "na_host_na_gather",
             "na_host_na_gather_tc", "na_host_na_fused_forward_tc")  # fmt: skip
    built = {}
    _core.run_cuda_kernels_on_host(str(tmp_path))
    try:
        for gemm_na in (False, True):
            ctx.use_gemm_na(gemm_na)
            assert ctx.is_gemm_na_enabled() is gemm_na
            attn = F.na1d_qk(q, q, 3, 1).softmax(-1)
            F.na1d_av(attn, q, 3, 1)
            tokens = q.transpose(1, 2)  # the fused ops are heads-last
            F.na1d(tokens, tokens, tokens, 3)
            built[gemm_na] = _built_kernels(tmp_path, names)
    finally:
        ctx._reset()
        _core.run_cuda_kernels_on_host(None)
    assert built[False] == {"na_host_na_pairwise", "na_host_na_gather",
                            "na_host_na_fused_forward_tc"}  # fmt: skip
    assert built[True] == set(names)


@pytest.mark.parametrize(
    "dtype, dims, rpb, tensor_cores",
    [
        (torch.float16, (16, 16), None, True),
        (torch.bfloat16, (128, 8), 3, True),  # a small bias table: summed on tensor cores too
        (torch.bfloat16, (128, 8), 9, True),  # a large one (17 x 17): plus the warp d_rpb
        (torch.float16, (136, 136), None, False),  # past the tensor-core backward's 128
        (torch.float32, (16, 16), None, False),
        (torch.bfloat16, (16, 12), None, False),  # not a multiple of 8
    ],
)
def test_half_types_with_head_dims_in_eights_up_to_128_take_the_tensor_core_backward(
    dtype, dims, rpb, tensor_cores, tmp_path
):
    # 9 x 9 queries, kernel `rpb` (3 without a bias).
    kernel = rpb or 3
    q = torch.randn(1, 9, 9, 2, dims[0]).to(dtype).requires_grad_()
    v = torch.randn(1, 9, 9, 2, dims[1]).to(dtype).requires_grad_()
    bias = None
    if rpb:
        bias = torch.randn(2, 2 * kernel - 1, 2 * kernel - 1).to(dtype).requires_grad_()
    _core.run_cuda_kernels_on_host(str(tmp_path))
    try:
        natten_rs.na2d(q, q, v, kernel_size=kernel, rpb=bias).sum().backward()
    finally:
        _core.run_cuda_kernels_on_host(None)
    tc = {"na_host_na_fused_backward_query_tc", "na_host_na_fused_backward_keys_tc"}
    warp = {"na_host_na_fused_backward_query", "na_host_na_fused_backward_keys"}
    expected = tc if tensor_cores else warp
    # The warp kernels' module holds the d_rpb of large tables: a tensor-core backward with one
    # loads it as well.
    if rpb == 9:
        expected = expected | warp
    assert _built_kernels(tmp_path, (*tc, *warp)) == expected


def test_the_tensor_core_backward_takes_the_additional_tokens_too(tmp_path):
    q = torch.randn(1, 10, 2, 16).to(torch.float16).requires_grad_()
    extra = torch.randn(1, 3, 2, 16).to(torch.float16).requires_grad_()
    _core.run_cuda_kernels_on_host(str(tmp_path))
    try:
        natten_rs.na1d(q, q, q, 3, additional_keys=extra, additional_values=extra).sum().backward()
    finally:
        _core.run_cuda_kernels_on_host(None)
    kernels = ("na_host_na_fused_backward_extras_tc", "na_host_na_fused_backward_extras")
    assert _built_kernels(tmp_path, kernels) == {kernels[0]}


def test_ops_take_the_cuda_kernels_while_it_is_on(tmp_path):
    # With a compiler that cannot run, an op that took the CUDA path fails naming it; once off,
    # the same call takes the CPU kernels again.
    q = torch.randn(1, 2, 9, 4)
    was = _core.run_cuda_kernels_on_host(str(tmp_path), "/nonexistent/c++")
    try:
        assert not was
        with pytest.raises(KernelError, match="/nonexistent/c"):
            F.na1d_qk(q, q, 3, 1)
        with pytest.raises(KernelError, match="/nonexistent/c"):
            natten_rs.na1d(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), 3)
    finally:
        assert _core.run_cuda_kernels_on_host(None)
    assert F.na1d_qk(q, q, 3, 1).shape == (1, 2, 9, 3)


def test_a_compile_error_carries_the_compiler_log(tmp_path):
    # A compiler that rejects every unit ("false" exits 1): the KernelError names the variant.
    if shutil.which("false") is None:
        pytest.skip("no `false` command")
    q = torch.randn(1, 2, 9, 4)
    _core.run_cuda_kernels_on_host(str(tmp_path), shutil.which("false"))
    try:
        with pytest.raises(KernelError, match=r"failed \(na_qk\[float32, kernel 1x1x3"):
            F.na1d_qk(q, q, 3, 1)
    finally:
        _core.run_cuda_kernels_on_host(None)


def test_fused_backward_head_dims_past_its_limit_are_refused_naming_them(kernels):
    q = torch.randn(1, 8, 2, 264, requires_grad=True)
    with kernels():
        out = natten_rs.na1d(q, q, q, kernel_size=3)  # the forward takes up to 512
        with pytest.raises(NotImplementedError, match="backward on CUDA with a head dim above 256"):
            out.sum().backward()


@pytest.mark.parametrize(
    "stats, message",
    [
        (lambda n: torch.empty(n - 1), r"stats: expected shape \[\d+\], got shape \[\d+\]"),
        (lambda n: torch.empty(n, dtype=torch.float64), "stats: expected float32, got float64"),
        (lambda n: torch.empty(2 * n)[::2], "stats: expected a contiguous output"),
    ],
    ids=["short", "wrong-dtype", "strided"],
)
def test_the_backward_scratch_is_checked_naming_it(stats, message, kernels):
    q, d_out, lse = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2)
    inputs = tuple(dlpack(t) for t in (q, q, q, None, None, None))
    nbhd = ([3], [1], [1], [False])
    length, _ = _core.fused_stats_shape(inputs, nbhd, 0.25)
    grads = (dlpack(torch.empty_like(q)),) * 3 + (None, None, None)
    saved = (dlpack(d_out), dlpack(lse), dlpack(d_out), None)
    with kernels(), pytest.raises(ValueError, match=message):
        _core.na_fused_backward(inputs, nbhd, 0.25, saved, grads, dlpack(stats(length)), 0)


@pytest.mark.parametrize(
    "scratch, message",
    [
        (lambda n, _: torch.empty(n + 1), r"bias_scratch: expected shape \[\d+\], got shape"),
        (lambda n, _: torch.empty(n, dtype=torch.float16), "bias_scratch: expected float32"),
        (lambda n, _: torch.empty(2 * n)[::2], "bias_scratch: expected a contiguous output"),
        (lambda n, d_rpb: d_rpb.view(-1)[:n], "bias_scratch: .*overlap"),
    ],
    ids=["long", "wrong-dtype", "strided", "on-d_rpb"],
)
def test_the_bias_gradient_scratch_is_checked_naming_it(scratch, message, kernels):
    # 2 x 5 x 5 tokens, kernel 3 x 3: a 5 x 5 table per tile of each of the 4 (batch, head)s.
    q, d_attn = torch.randn(2, 2, 5, 5, 8), torch.randn(2, 2, 5, 5, 9)
    params = ([3, 3], [1, 1], [False, False])
    d_rpb = torch.empty(2 * 25 * 4)
    with kernels():
        length, dtype = _core.qk_bias_scratch_shape(dlpack(q), dlpack(q), *params)
        assert (length, dtype) == (4 * 25, "float32")
        grads = [torch.empty_like(q), torch.empty_like(q)]
        given = scratch(length, d_rpb)
        with pytest.raises(ValueError, match=message):
            _core.na_qk_backward(dlpack(d_attn), dlpack(q), dlpack(q), None,
                                 *(dlpack(g) for g in grads), dlpack(d_rpb[:50].view(2, 5, 5)),
                                 None, *params, 0, dlpack(given))  # fmt: skip
    # The CPU kernels take none.
    assert _core.qk_bias_scratch_shape(dlpack(q), dlpack(q), *params) == (0, "float32")


def test_the_sanitizer_workload_runs_on_the_cuda_kernels(kernels):
    # The script a GPU session runs under compute-sanitizer, through the same kernels here.
    import cuda_workload

    with kernels():
        ran = cuda_workload.run(torch.device("cpu"))
    assert ran == cuda_workload.RUNS


def _compiler_library(name: str) -> str | None:
    """The path of the C++ compiler's runtime library `name`, where it has one."""
    found = subprocess.run(
        ["c++", f"-print-file-name={name}"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return found if Path(found).is_absolute() and Path(found).exists() else None


# The AddressSanitizer runtime, then the C++ runtime (loaded with it, so that the sanitizer
# finds the exception machinery that torch throws through).
ASAN_PRELOAD = [_compiler_library("libasan.so"), _compiler_library("libstdc++.so")]


# What the workload's process runs: the kernels built by `compiler`, on CPU tensors.
ASAN_WORKLOAD = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
import cuda_workload
from natten_rs import _core
_core.run_cuda_kernels_on_host(sys.argv[2], compiler=sys.argv[3])
print(cuda_workload.run(torch.device("cpu")))
"""


@pytest.mark.skipif(None in ASAN_PRELOAD, reason="needs the compiler's libasan")
def test_the_sanitizer_workload_reads_and_writes_only_its_memory(tmp_path):
    # The memory check of the GPU's compute-sanitizer, on the host: the workload's kernels built
    # with AddressSanitizer, which stops at the first read or write past a tensor (heap), past a
    # shared array (the kernels' statics) or of freed memory, and names the kernel (stack checks
    # are off: the host's threads are fibers on stacks of their own); and with the alignment
    # check, which stops at a typed read or write of an address its type's alignment does not
    # divide (a GPU faults there; the host's CPU would not).
    compiler = tmp_path / "asan-c++"
    flags = "-fsanitize=address,alignment -fno-sanitize-recover=alignment -fno-omit-frame-pointer"
    compiler.write_text(f'#!/bin/sh\nexec c++ {flags} --param asan-stack=0 "$@"\n')
    compiler.chmod(0o755)
    env = {
        **os.environ,
        "LD_PRELOAD": " ".join(ASAN_PRELOAD),
        "ASAN_OPTIONS": "detect_leaks=0:verify_asan_link_order=0:detect_stack_use_after_return=0",
    }
    tests = Path(__file__).resolve().parent
    run = subprocess.run(
        [sys.executable, "-c", ASAN_WORKLOAD, str(tests), str(tmp_path / "kernels"), str(compiler)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "AddressSanitizer" not in run.stderr, run.stderr[-6000:]
    assert "runtime error" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0, run.stderr[-6000:]
    import cuda_workload

    assert run.stdout.split()[-1] == str(cuda_workload.RUNS)
