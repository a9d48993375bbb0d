"""The DLPack bridge: tensors cross into Rust as they are, strides and all, with no copy."""

import pytest
import torch
from natten_rs import _core
from natten_rs._ops import dlpack
from natten_rs.functional import na2d_av, na2d_qk
from torch.profiler import ProfilerActivity, profile

COPY_OPS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy"}


def heads_first_view(batch=2, heads=3, size=(9, 10), dim=8, dtype=torch.float32):
    """A heads-first view of heads-last memory, as Hugging Face's DiNAT builds q/k/v."""
    return torch.randn(batch, *size, heads, dim, dtype=dtype).movedim(-2, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_rust_sees_the_tensors_own_memory_and_strides(dtype):
    q = heads_first_view(dtype=dtype)
    assert not q.is_contiguous()
    address, shape, strides, dtype_name, device = _core.dlpack_info(dlpack(q))
    assert address == q.data_ptr()
    assert shape == list(q.shape)
    assert strides == list(q.stride())
    assert dtype_name == str(dtype).removeprefix("torch.")
    assert device == "cpu"


def test_offset_views_keep_their_offset():
    base = torch.randn(4, 2, 8, 6)
    view = base[1:3, :, :, 1:5]
    address, shape, strides, _, _ = _core.dlpack_info(dlpack(view))
    assert address == view.data_ptr() == base.data_ptr() + view.storage_offset() * 4
    assert (shape, strides) == (list(view.shape), list(view.stride()))


def test_tensors_that_require_grad_are_lent_without_copy():
    q = heads_first_view().requires_grad_()
    assert _core.dlpack_info(dlpack(q))[0] == q.data_ptr()


def allocations(fn):
    """Bytes allocated by each allocating event and the names of every op run inside ``fn``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = prof.events()
    allocated = [e.cpu_memory_usage for e in events if e.name.startswith("aten::empty")]
    return result, allocated, {e.name for e in events}


def test_qk_on_permuted_views_allocates_only_its_output():
    q, k = heads_first_view(), heads_first_view()
    na2d_qk(q, k, 3)  # warm-up: first calls may allocate lazily-initialised state
    attn, allocated, names = allocations(lambda: na2d_qk(q, k, 3))
    assert allocated == [attn.numel() * attn.element_size()]
    assert not names & COPY_OPS, names & COPY_OPS


def test_av_on_permuted_views_allocates_only_its_output():
    v = heads_first_view()
    attn = torch.randn(*v.shape[:-1], 9).softmax(-1).movedim(-1, 2).contiguous().movedim(2, -1)
    assert not attn.is_contiguous()
    na2d_av(attn, v, 3)
    out, allocated, names = allocations(lambda: na2d_av(attn, v, 3))
    assert allocated == [out.numel() * out.element_size()]
    assert not names & COPY_OPS, names & COPY_OPS


def test_outputs_are_written_in_place_not_copied_back():
    q, k = heads_first_view(), heads_first_view()
    attn = na2d_qk(q, k, 3)
    assert attn.is_contiguous()
    assert attn.data_ptr() == attn.untyped_storage().data_ptr()


def test_core_rejects_objects_that_are_not_capsules():
    q = heads_first_view()
    with pytest.raises(TypeError, match="query"):
        _core.qk_output_shape(q, dlpack(q), None, None, [3, 3], [1, 1], [False, False])


def test_core_rejects_outputs_that_alias_inputs():
    q, k = heads_first_view(), heads_first_view()
    shape = _core.qk_output_shape(dlpack(q), dlpack(k), None, None, [3, 3], [1, 1], [False] * 2)
    storage = torch.empty(q.numel() * 2)
    q_alias = storage[: q.numel()].view(q.shape)
    q_alias.copy_(q)
    out = storage[: torch.Size(shape).numel()].view(shape)
    with pytest.raises(ValueError, match="attn"):
        _core.na_qk(
            dlpack(q_alias), dlpack(k), None, None, dlpack(out), [3, 3], [1, 1], [False] * 2, 0
        )


def test_core_rejects_non_contiguous_outputs():
    q, k = heads_first_view(), heads_first_view()
    shape = _core.qk_output_shape(dlpack(q), dlpack(k), None, None, [3, 3], [1, 1], [False] * 2)
    out = torch.empty(*shape[:-1], 2 * shape[-1])[..., ::2]
    with pytest.raises(ValueError, match="attn"):
        _core.na_qk(dlpack(q), dlpack(k), None, None, dlpack(out), [3, 3], [1, 1], [False] * 2, 0)


def test_versioned_and_legacy_capsules_are_both_read():
    q = heads_first_view()
    legacy = q.__dlpack__()
    assert "dltensor" in repr(legacy)
    assert _core.dlpack_info(legacy)[0] == q.data_ptr()
    capsule = dlpack(q)
    try:
        q.__dlpack__(max_version=(1, 0))
    except TypeError:
        pytest.skip("this torch exports only unversioned DLPack")
    assert "dltensor_versioned" in repr(capsule)
    assert _core.dlpack_info(capsule)[0] == q.data_ptr()


def test_a_consumed_capsule_is_refused():
    q = heads_first_view()
    capsule = q.__dlpack__()
    torch.from_dlpack(capsule)  # consumes it (renames it "used_dltensor")
    with pytest.raises(ValueError, match="capsule"):
        _core.dlpack_info(capsule)
