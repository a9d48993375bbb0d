"""The torch surface: custom ops pass torch.library.opcheck, trace under torch.compile, and
report errors with the right exception classes."""

import natten_rs
import pytest
import torch
from natten_rs import _ops
from natten_rs.functional import na1d_qk, na2d_av, na2d_qk


def tensors(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


def qk_cases():
    q, k = tensors(2, 2, 7, 6, 4), tensors(2, 2, 7, 6, 4)
    rpb, extra = tensors(2, 5, 5), tensors(2, 2, 3, 4)
    yield "plain", (q, k, None, None, [3, 3], [2, 1], [False, False])
    yield "rpb+extra", (q, k, rpb, extra, [3, 3], [1, 2], [False, False])
    yield "causal", (q, k, None, None, [3, 3], [1, 1], [True, False])


def av_cases():
    v, extra = tensors(2, 2, 7, 6, 4), tensors(2, 2, 3, 4)
    yield "plain", (tensors(2, 2, 7, 6, 9).softmax(-1), v, None, [3, 3], [2, 1], [False, False])
    yield "extra", (tensors(2, 2, 7, 6, 12), v, extra, [3, 3], [1, 1], [False, True])


@pytest.mark.parametrize(
    "name,args", list(qk_cases()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_opcheck_qk(name, args):
    torch.library.opcheck(_ops.na_qk, args)


@pytest.mark.parametrize(
    "name,args", list(av_cases()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_opcheck_av(name, args):
    torch.library.opcheck(_ops.na_av, args)


def test_opcheck_backward_ops():
    # The backward ops have no autograd formula of their own (no double backward).
    q, k = tensors(1, 2, 6, 5, 4, grad=False), tensors(1, 2, 6, 5, 4, grad=False)
    extra = tensors(1, 2, 2, 4, grad=False)
    params = ([3, 3], [1, 1], [False, True])
    d_attn = tensors(1, 2, 6, 5, 11, grad=False)
    torch.library.opcheck(_ops.na_qk_backward, (d_attn, q, k, extra, True, *params))
    attn, v = tensors(1, 2, 6, 5, 11, grad=False), tensors(1, 2, 6, 5, 4, grad=False)
    d_out = tensors(1, 2, 6, 5, 4, grad=False)
    torch.library.opcheck(_ops.na_av_backward, (d_out, attn, v, extra, *params))


def block(q, k, v, rpb):
    attn = na2d_qk(q * q.shape[-1] ** -0.5, k, 3, (1, 2), rpb=rpb).softmax(-1)
    return na2d_av(attn, v, 3, (1, 2))


def test_compile_fullgraph_matches_eager_forward_and_backward():
    inputs = [tensors(2, 2, 8, 9, 4, dtype=torch.float32) for _ in range(3)]
    inputs.append(tensors(2, 5, 5, dtype=torch.float32))
    eager_out = block(*inputs)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), inputs)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    torch.testing.assert_close(out, eager_out)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_kernel_error_is_a_runtime_error():
    assert issubclass(natten_rs.KernelError, RuntimeError)


def test_errors_raised_inside_the_op_keep_their_class():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="kernel_size"):
        na1d_qk(q, q, 4)
    with pytest.raises(TypeError, match="kernel_size"):
        na1d_qk(q, q, "3")


def fused_cases():
    q = tensors(2, 6, 5, 4, 8)
    k, v = tensors(2, 6, 5, 2, 8), tensors(2, 6, 5, 2, 6)
    ek, ev = tensors(2, 3, 2, 8), tensors(2, 3, 2, 6)
    rpb = tensors(4, 5, 5)
    params = ([3, 3], [1, 1], [2, 1], [False, True], 0.3)
    yield "gqa+extras+rpb", (q, k, v, ek, ev, rpb, *params)
    yield "stride+even", (q, k, v, None, None, None, [2, 4], [2, 3], [1, 1], [True, False], 0.5)
    yield "dense", (tensors(2, 7, 4, 8), None, None, ek, ev, None, [], [], [], [], 0.3)


@pytest.mark.parametrize(
    "name,args", list(fused_cases()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_opcheck_fused(name, args):
    torch.library.opcheck(_ops.na_fused, args)


def test_opcheck_fused_backward():
    # The backward op has no autograd formula of its own (no double backward).
    for _, args in fused_cases():
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        out, lse = _ops.na_fused(*args)
        d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
        torch.library.opcheck(_ops.na_fused_backward, (d_out, d_lse, out, lse, *args))


@pytest.mark.parametrize(
    "bad_lse, message",
    [
        (lambda lse: lse[..., :1], r"lse: expected shape \[2, 6, 5, 4\], got shape \[2, 6, 5, 1\]"),
        (lambda lse: lse.double(), "lse: expected float32, got float64"),
    ],
    ids=["shape", "dtype"],
)
def test_the_backward_checks_the_saved_lse_naming_it(bad_lse, message):
    _, args = next(fused_cases())
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, lse = _ops.na_fused(*args)
    with pytest.raises(ValueError, match=message):
        _ops.na_fused_backward(torch.ones_like(out), None, out, bad_lse(lse), *args)


def test_concurrent_calls_from_python_threads_are_correct():
    # The GIL is released while kernels run; each calling thread leads its own thread team.
    import threading

    from natten_rs import reference

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 20, 21, 2, 16, generator=gen) for _ in range(4)]
    expected = [reference.na(q, q, q, 5) for q in inputs]
    errors = []

    def work(i):
        for _ in range(5):
            out = natten_rs.na2d(inputs[i], inputs[i], inputs[i], 5)
            errors.append((out - expected[i]).abs().max().item())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 20
    assert max(errors) < 1e-4
