"""NeighborhoodAttention{1,2,3}D against the dense oracle composed with the module's own weights."""

from __future__ import annotations

import natten_rs
import pytest
import reference
import torch
from conftest import assert_close
from natten_rs import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from torch.nn import functional as F

MODULES = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}
SPATIAL = {1: (11,), 2: (6, 7), 3: (5, 4, 6)}

# (rank, kernel_size, dilation, is_causal, rel_pos_bias)
CASES = [
    (1, 3, 1, False, False),
    (1, 5, 2, False, True),
    (1, 4, 1, True, False),
    (1, 3, 2, True, True),
    (2, 3, 1, False, False),
    (2, 3, 2, False, True),
    (2, (3, 5), 1, (True, False), False),
    (2, 3, (1, 2), (False, True), True),
    (3, 3, 1, False, False),
    (3, 3, (1, 1, 2), False, True),
    (3, (2, 3, 3), 1, (True, False, True), False),
    (3, 3, 1, (False, True, False), True),
]
CASE_IDS = [f"{r}d-k{k}-d{d}-c{c}-rpb{int(b)}".replace(" ", "") for r, k, d, c, b in CASES]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]


def make(rank, kernel, dilation, causal, rpb, dtype=torch.float64, dim=12, heads=3, **kw):
    torch.manual_seed(0)
    module = MODULES[rank](dim, heads, kernel, dilation, causal, rel_pos_bias=rpb, **kw)
    if rpb:  # trunc_normal(0.02) is too small to notice; make the bias matter.
        with torch.no_grad():
            module.rpb.normal_()
    return module.to(dtype)


def oracle(module, x):
    """The module's math on the dense oracle, in float64, with the module's own parameters."""
    batch, *spatial, dim = x.shape
    heads, head_dim = module.num_heads, module.head_dim
    params = {n: p.double() for n, p in module.named_parameters()}
    qkv = F.linear(x.double(), params["qkv.weight"], params.get("qkv.bias"))
    qkv = qkv.reshape(batch, *spatial, 3, heads, head_dim)
    q, k, v = (qkv[..., i, :, :].movedim(-2, 1) for i in range(3))
    ks, dil, causal = module.kernel_size, module.dilation, module.is_causal
    logits = reference.qk(q * module.scale, k, ks, dil, causal, rpb=params.get("rpb"))
    out = reference.av(logits.softmax(-1), v, ks, dil, causal)
    out = out.movedim(1, -2).reshape(batch, *spatial, dim)
    return F.linear(out, params["proj.weight"], params["proj.bias"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rank", "kernel", "dilation", "causal", "rpb"), CASES, ids=CASE_IDS)
def test_forward_matches_oracle(rank, kernel, dilation, causal, rpb, dtype):
    module = make(rank, kernel, dilation, causal, rpb, dtype)
    x = torch.randn(2, *SPATIAL[rank], module.dim, dtype=dtype)
    out = module(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, oracle(module, x))


@pytest.mark.parametrize(("rank", "kernel", "dilation", "causal", "rpb"), CASES, ids=CASE_IDS)
def test_gradients_match_oracle(rank, kernel, dilation, causal, rpb):
    module = make(rank, kernel, dilation, causal, rpb)
    x = torch.randn(1, *SPATIAL[rank], module.dim, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn_like(x)
    leaves = [x, *module.parameters()]
    got = torch.autograd.grad(module(x), leaves, grad_out)
    want = torch.autograd.grad(oracle(module, x), leaves, grad_out)
    names = ["x", *(n for n, _ in module.named_parameters())]
    assert ("rpb" in names) == rpb
    for name, g, w in zip(names, got, want, strict=True):
        assert_close(g, w, what=f"grad {name}")


def assert_fused_path_agrees(module, x, dtype):
    """The module's output (the fused op) against its unfused composition and the float64
    oracle, and every gradient, rpb's among them, against the unfused composition's."""
    fused = module(x)
    unfused = module._forward(x, fused=False)
    assert_close(fused, unfused.double(), dtype)
    assert_close(fused, oracle(module, x), dtype)
    leaves = [x, *module.parameters()]
    grad_out = torch.randn_like(fused)
    got = torch.autograd.grad(fused, leaves, grad_out)
    want = torch.autograd.grad(unfused, leaves, grad_out)
    for name, g, w in zip(["x", *dict(module.named_parameters())], got, want, strict=True):
        assert_close(g, w.double(), dtype, what=f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rank", "kernel", "dilation", "causal", "rpb"),
    [
        (1, 5, 2, False, False),
        (1, 3, 1, True, False),
        (2, (3, 5), (2, 1), False, False),
        (2, 3, 1, (True, False), False),
        (3, 3, 1, False, False),
        (3, 3, (1, 1, 2), (False, True, True), False),
        (1, 5, 2, False, True),
        (2, (3, 5), (2, 1), False, True),
        (3, 3, (1, 1, 2), False, True),
    ],
    ids=str,
)
def test_fused_path_equals_unfused_path(rank, kernel, dilation, causal, rpb, dtype):
    module = make(rank, kernel, dilation, causal, rpb, dtype)
    assert module._use_fused()
    x = torch.randn(2, *SPATIAL[rank], module.dim, dtype=dtype, requires_grad=True)
    assert_fused_path_agrees(module, x, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("rank", "kernel", "dilation", "rpb", "spatial"),
    [
        (1, 7, 3, True, (40,)),
        (2, 7, 1, True, (14, 15)),
        (2, 5, 2, False, (13, 12)),
        (3, 3, (1, 2, 1), True, (5, 7, 6)),
    ],
    ids=str,
)
def test_cuda_modules_take_the_fused_op(rank, kernel, dilation, rpb, spatial, dtype):
    """On a GPU a module runs the fused kernels (tensor cores in bfloat16: head dim 32), and they
    agree with the unfused ops and the float64 oracle, forward and every gradient."""
    module = make(rank, kernel, dilation, False, rpb, torch.float32, dim=64, heads=2)
    module = module.to("cuda", dtype)
    assert module._use_fused(torch.device("cuda"))
    x = torch.randn(2, *spatial, module.dim, device="cuda", dtype=dtype, requires_grad=True)
    assert_fused_path_agrees(module, x, dtype)


def test_path_selection():
    assert make(2, 3, 1, False, True)._use_fused()  # rpb: the fused op takes it too
    assert make(2, 3, 1, (False, True), False)._use_fused()  # causal: fused (even kernels too)
    module = make(2, 3, 1, False, False, attn_drop=0.5)
    assert not module._use_fused()
    assert module.eval()._use_fused()  # dropout inactive in eval
    assert make(1, 3, 1, False, False, stride=2)._use_fused()
    # CPU and CUDA have fused kernels; other devices compose the unfused ops, stride still fused.
    assert make(2, 3, 1, False, False)._use_fused(torch.device("cuda", 0))
    assert make(2, 3, 1, False, False)._use_fused(torch.device("cpu"))
    assert not make(2, 3, 1, False, False)._use_fused(torch.device("meta"))
    assert make(1, 3, 1, False, False, stride=2)._use_fused(torch.device("meta"))


def test_stride_matches_oracle():
    module = make(2, 5, 1, False, False, stride=(2, 3))
    x = torch.randn(1, 9, 10, module.dim, dtype=torch.float64)
    batch, *spatial, dim = x.shape
    qkv = module.qkv(x).reshape(batch, *spatial, 3, module.num_heads, module.head_dim)
    out = reference.na(
        *(qkv[..., i, :, :] for i in range(3)), (5, 5), stride=(2, 3), scale=module.scale
    )
    want = module.proj(out.reshape(batch, *spatial, dim))
    assert_close(module(x), want)


def test_state_dict_keys_and_shapes():
    module = NeighborhoodAttention2D(32, 4, (7, 5))
    state = module.state_dict()
    assert set(state) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert state["qkv.weight"].shape == (96, 32) and state["qkv.bias"].shape == (96,)
    assert state["proj.weight"].shape == (32, 32) and state["proj.bias"].shape == (32,)
    assert module.rpb is None

    with_rpb = NeighborhoodAttention2D(32, 4, (7, 5), rel_pos_bias=True)
    assert set(with_rpb.state_dict()) == set(state) | {"rpb"}
    assert with_rpb.state_dict()["rpb"].shape == (4, 13, 9)
    assert with_rpb.rpb.abs().max() <= 2.0 and 0 < with_rpb.rpb.std() < 0.05

    rpb_3d = NeighborhoodAttention3D(8, 2, 3, rel_pos_bias=True).state_dict()["rpb"]
    assert rpb_3d.shape == (2, 5, 5, 5)
    assert NeighborhoodAttention1D(8, 2, 5, rel_pos_bias=True).rpb.shape == (2, 9)

    no_qkv_bias = NeighborhoodAttention1D(8, 2, 3, qkv_bias=False).state_dict()
    assert set(no_qkv_bias) == {"qkv.weight", "proj.weight", "proj.bias"}

    # NATTEN 0.14's bias= keyword; it wins over rel_pos_bias.
    assert "rpb" in NeighborhoodAttention1D(8, 2, 3, bias=True).state_dict()
    assert NeighborhoodAttention1D(8, 2, 3, rel_pos_bias=True, bias=False).rpb is None


@pytest.mark.parametrize("rpb", [False, True])
def test_state_dict_round_trip(rpb):
    source = make(2, 3, 2, False, rpb, torch.float32, qkv_bias=not rpb)
    target = NeighborhoodAttention2D(12, 3, 3, 2, rel_pos_bias=rpb, qkv_bias=not rpb)
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 6, 7, 12)
    assert torch.equal(source(x), target(x))
    with pytest.raises(RuntimeError):  # an rpb-less module refuses an rpb checkpoint, and back
        NeighborhoodAttention2D(12, 3, 3, 2, rel_pos_bias=not rpb).load_state_dict(
            source.state_dict(), strict=True
        )


@pytest.mark.parametrize("rpb", [False, True])
def test_small_input_padding(rpb):
    module = make(2, 7, 1, False, rpb)
    x = torch.randn(2, 5, 6, module.dim, dtype=torch.float64)
    out = module(x)
    assert out.shape == x.shape
    padded = F.pad(x, (0, 0, 0, 1, 0, 2))  # to 7x7, zeros at the end of H and W
    assert_close(out, module(padded)[:, :5, :6])
    assert_close(out, oracle(module, padded)[:, :5, :6])


def test_small_input_padding_with_dilation_3d():
    module = make(3, 3, (1, 2, 1), (True, False, False), False)
    x = torch.randn(1, 2, 5, 4, module.dim, dtype=torch.float64)  # needs 3 x 6 x 3
    out = module(x)
    assert out.shape == x.shape
    padded = F.pad(x, (0, 0, 0, 0, 0, 1, 0, 1))
    assert_close(out, oracle(module, padded)[:, :2, :5, :4])


def test_extra_repr():
    text = repr(NeighborhoodAttention2D(32, 4, (7, 5), (2, 1), (True, False), rel_pos_bias=True))
    for field in (
        "head_dim=8",
        "num_heads=4",
        "kernel_size=(7, 5)",
        "dilation=(2, 1)",
        "is_causal=(True, False)",
        "rel_pos_bias=True",
    ):
        assert field in text
    assert "stride" not in text
    assert "stride=(2,)" in repr(NeighborhoodAttention1D(8, 2, 5, stride=2))
    assert "rel_pos_bias=False" in repr(NeighborhoodAttention1D(8, 2, 5))


def test_scale():
    assert NeighborhoodAttention1D(32, 4, 3).scale == 8**-0.5
    assert NeighborhoodAttention1D(32, 4, 3, qk_scale=0.25).scale == 0.25


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"dim": 10, "num_heads": 3}, ValueError, "dim"),
        ({"dim": 8.0}, TypeError, "dim"),
        ({"num_heads": 0}, ValueError, "num_heads"),
        ({"kernel_size": 3.0}, TypeError, "kernel_size"),
        ({"kernel_size": (3, 3, 3)}, ValueError, "kernel_size"),
        ({"kernel_size": 0}, ValueError, "kernel_size"),
        ({"dilation": "1"}, TypeError, "dilation"),
        ({"dilation": (1,)}, ValueError, "dilation"),
        ({"dilation": 0}, ValueError, "dilation"),
        ({"stride": (1, 1, 1)}, ValueError, "stride"),
        ({"stride": -1}, ValueError, "stride"),
        ({"is_causal": 1}, TypeError, "is_causal"),
        ({"kernel_size": 4, "rel_pos_bias": True}, ValueError, "kernel_size"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, name):
    args = {"dim": 8, "num_heads": 2, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=name):
        NeighborhoodAttention2D(**args)


def test_bad_input():
    module = NeighborhoodAttention2D(8, 2, 3)
    with pytest.raises(ValueError, match="x"):
        module(torch.randn(1, 5, 5, 4))
    with pytest.raises(ValueError, match="x"):
        module(torch.randn(1, 5, 8))


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("rpb", [False, True])
def test_backward(rank, rpb):
    module = make(rank, 3, 1, False, rpb, torch.float32, attn_drop=0.1, proj_drop=0.1)
    x = torch.randn(2, *SPATIAL[rank], module.dim, requires_grad=True)
    loss = module(x).square().mean()
    loss.backward()
    assert x.grad is not None and x.grad.isfinite().all()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all(), name
    if rpb:
        assert module.rpb.grad.abs().max() > 0


@pytest.mark.parametrize("rel_pos_bias", [False, True])
def test_autocast_bf16_runs_with_a_float32_rpb(rel_pos_bias):
    torch.manual_seed(0)
    module = natten_rs.NeighborhoodAttention2D(32, 2, 5, rel_pos_bias=rel_pos_bias)
    x = torch.randn(1, 12, 12, 32)
    expected = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max().item() < 5e-2 * expected.abs().max().item()
    out.float().sum().backward()
    if rel_pos_bias:
        assert module.rpb.grad.abs().sum() > 0


def test_use_fused_na_false_keeps_modules_on_the_unfused_ops():
    module = NeighborhoodAttention2D(16, 2, 3)
    assert module._use_fused()
    try:
        natten_rs.use_fused_na(False)
        assert not module._use_fused()
        natten_rs.use_fused_na(True)
        assert module._use_fused()
    finally:
        natten_rs.context._reset()
    assert module._use_fused()
