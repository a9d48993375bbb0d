"""natten_rs under torch.compile (inductor), torch.export and autocast.

test_ops.py already checks a qk -> softmax -> av block under ``aot_eager``; here a whole
DiNAT-like block goes through the default (inductor) backend, forward and backward, on the
fused path (with and without rpb) and the unfused one (``use_fused_na(False)``, with rpb), plus
export, autocast and dynamic shapes.
"""

from __future__ import annotations

import contextlib
import copy

import natten_rs
import pytest
import torch
import torch._dynamo.testing
from natten_rs.functional import na2d_av, na2d_qk
from torch import nn

DIM, HEADS, KERNEL, DILATION = 16, 2, 3, 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    """DiNAT-like block: x + NA(LN(x)), then x + MLP(LN(x)); x ``[B, H, W, C]``."""

    def __init__(self, rel_pos_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = natten_rs.NeighborhoodAttention2D(
            DIM, HEADS, KERNEL, dilation=DILATION, rel_pos_bias=rel_pos_bias
        )
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def make_block(rel_pos_bias: bool) -> Block:
    torch.manual_seed(0)
    block = Block(rel_pos_bias)
    if rel_pos_bias:  # a bias large enough to matter in the comparison
        with torch.no_grad():
            block.attn.rpb.normal_(0, 0.5)
    return block


def make_input(*spatial, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *spatial, DIM, generator=gen)


def run_with_grads(model, x):
    """Forward + backward; returns the output, the input grad and every parameter grad."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def assert_same_run(actual, expected, atol=1e-4, rtol=1e-4):
    out, dx, grads = actual
    e_out, e_dx, e_grads = expected
    torch.testing.assert_close(out, e_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx, e_dx, atol=atol, rtol=rtol)
    assert grads.keys() == e_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], e_grads[name], atol=atol, rtol=rtol, msg=name)


# The module's paths: (rel_pos_bias, fused).
PATH_PARAMS = [
    pytest.param((False, True), id="fused"),
    pytest.param((True, True), id="rpb-fused"),
    pytest.param((True, False), id="rpb-unfused"),
]


@contextlib.contextmanager
def module_path(fused: bool):
    """Modules take the fused op (their default) or, with ``fused`` False, the unfused ops."""
    natten_rs.use_fused_na(fused)
    try:
        yield
    finally:
        natten_rs.use_fused_na(True)


# --- 1. inductor, fullgraph, forward + backward -------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_inductor_fullgraph_block_matches_eager(path):
    rel_pos_bias, fused = path
    block = make_block(rel_pos_bias)
    with module_path(fused):
        assert block.attn._use_fused() is fused
        x = make_input(9, 10)
        expected = run_with_grads(block, x)
        compiled = torch.compile(block, fullgraph=True)  # default backend: inductor
        assert_same_run(run_with_grads(compiled, x), expected)
        # A second call reuses the compiled graph and still agrees.
        assert_same_run(run_with_grads(compiled, x), expected)


# --- 2. no graph breaks in the functional API ---------------------------------------------------


def _explain(fn, *args):
    return torch._dynamo.explain(fn)(*args)


def test_na2d_return_lse_has_no_graph_break():
    q, k, v = (torch.randn(1, 7, 8, HEADS, 8, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        out, lse = natten_rs.na2d(q, k, v, 3, dilation=(2, 1), return_lse=True)
        return out * 2, lse.exp()

    explanation = _explain(fn, q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    counter = torch._dynamo.testing.CompileCounter()
    out, lse = torch.compile(fn, backend=counter, fullgraph=True)(q, k, v)
    assert counter.frame_count == 1
    e_out, e_lse = fn(q, k, v)
    torch.testing.assert_close(out, e_out)
    torch.testing.assert_close(lse, e_lse)


def test_dense_attention_has_no_graph_break():
    q = torch.randn(2, 6, HEADS, 8)
    kv = torch.randn(2, 5, HEADS, 8)

    def fn(q, k, v):
        return natten_rs.attention(q, k, v, return_lse=True)

    explanation = _explain(fn, q, kv, kv)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    counter = torch._dynamo.testing.CompileCounter()
    out, lse = torch.compile(fn, backend=counter, fullgraph=True)(q, kv, kv)
    assert counter.frame_count == 1
    e_out, e_lse = fn(q, kv, kv)
    torch.testing.assert_close(out, e_out)
    torch.testing.assert_close(lse, e_lse)


# --- 3. torch.export ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_export_module_matches_eager(path):
    rel_pos_bias, fused = path
    block = make_block(rel_pos_bias).eval()
    x = make_input(9, 10)
    with module_path(fused):
        exported = torch.export.export(block, (x,))
        targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        wanted = {"natten_rs.na_qk.default", "natten_rs.na_av.default"}
        if fused:
            wanted = {"natten_rs.na_fused.default"}
        assert wanted <= targets, targets
        with torch.no_grad():
            expected = block(x)
            torch.testing.assert_close(exported.module()(x), expected)
            # Fresh input, same shape: the program is not specialised on values.
            y = make_input(9, 10, seed=5)
            torch.testing.assert_close(exported.module()(y), block(y))


# --- 4. autocast --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_autocast_bf16_module_forward_backward(path):
    rel_pos_bias, fused = path
    block = make_block(rel_pos_bias)
    x = make_input(9, 10)
    expected = run_with_grads(block, x)
    with module_path(fused), torch.autocast("cpu", dtype=torch.bfloat16):
        x_ac = x.clone().requires_grad_(True)
        attn_out = block.attn(block.norm1(x_ac))
        assert attn_out.dtype == torch.bfloat16
        block.zero_grad(set_to_none=True)
        out = block(x_ac)
        out.float().square().sum().backward()
    torch.testing.assert_close(out.float(), expected[0], atol=0.1, rtol=0.05)
    assert x_ac.grad is not None and x_ac.grad.isfinite().all()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert p.grad.isfinite().all(), name
        scale = expected[2][name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            p.grad / scale, expected[2][name] / scale, atol=0.1, rtol=0.1, msg=name
        )


def test_autocast_bf16_compiled_block():
    block = make_block(True)
    x = make_input(9, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    assert compiled.dtype == eager.dtype
    torch.testing.assert_close(compiled.float(), eager.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("api", ["unfused", "fused"])
def test_autocast_functional_ops_accept_float32_rpb(api):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, 7, 8, 4, generator=gen) for _ in range(3))
    rpb = torch.randn(HEADS, 5, 5, generator=gen)

    def run(q, k, v):
        if api == "unfused":
            attn = na2d_qk(q, k, 3, rpb=rpb).softmax(-1)
            return na2d_av(attn, v, 3)
        heads_last = [t.movedim(1, -2) for t in (q, k, v)]
        return natten_rs.na2d(*heads_last, 3, rpb=rpb, scale=1.0).movedim(-2, 1)

    expected = run(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(*(t.bfloat16() for t in (q, k, v)))
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)


# --- 5. dynamic shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATH_PARAMS)
def test_dynamic_shapes_two_spatial_sizes(path):
    rel_pos_bias, fused = path
    block = make_block(rel_pos_bias)
    reference = copy.deepcopy(block)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    with module_path(fused):
        for spatial in [(9, 10), (12, 7)]:
            x = make_input(*spatial)
            assert_same_run(run_with_grads(compiled, x), run_with_grads(reference, x))
            frames.append(counter.frame_count)
    # The symbolic-shape graph compiled for the first size serves the second (no recompile).
    assert frames[0] >= 1 and frames[1] == frames[0], frames
