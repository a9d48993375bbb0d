"""natten_rs.context: NATTEN's context flags round-trip and check their arguments; capability
queries tell the truth about this machine and build."""

from __future__ import annotations

import natten_rs
import pytest
import torch
from natten_rs import context as ctx


@pytest.fixture(autouse=True)
def _fresh_context():
    ctx._reset()
    yield
    ctx._reset()


# (setter, getter, default) for every plain bool flag set by `setter(mode)`.
BOOL_FLAGS = [
    (ctx.use_deterministic_algorithms, ctx.are_deterministic_algorithms_enabled, False),
    (ctx.use_kv_parallelism_in_fused_na, ctx.is_kv_parallelism_in_fused_na_enabled, True),
    (ctx.use_fused_na, ctx.is_fused_na_enabled, False),
    (ctx.use_fna, ctx.is_fna_enabled, False),
    (ctx.use_tiled_na, ctx.is_tiled_na_enabled, True),
    (ctx.use_gemm_na, ctx.is_gemm_na_enabled, True),
    (ctx.use_tf32_in_gemm_na, ctx.is_tf32_in_gemm_na_enabled, True),
    (ctx.allow_flex_compile, ctx.is_flex_compile_allowed, False),
]
BOOL_IDS = [setter.__name__ for setter, _, _ in BOOL_FLAGS]


@pytest.mark.parametrize(("setter", "getter", "default"), BOOL_FLAGS, ids=BOOL_IDS)
def test_bool_flag_round_trips(setter, getter, default):
    assert getter() is default
    setter(not default)
    assert getter() is (not default)
    setter(default)
    assert getter() is default
    setter()  # mode defaults to True
    assert getter() is True


@pytest.mark.parametrize(("setter", "getter", "default"), BOOL_FLAGS, ids=BOOL_IDS)
@pytest.mark.parametrize("bad", [1, "yes", None])
def test_bool_flag_rejects_non_bool(setter, getter, default, bad):
    with pytest.raises(TypeError, match="mode"):
        setter(bad)
    assert getter() is default


def test_use_fused_na_options():
    ctx.use_fused_na(True, kv_parallel=False)
    assert ctx.is_fused_na_enabled() and not ctx.is_kv_parallelism_in_fused_na_enabled()
    ctx.use_fused_na(True, kv_parallel=True, use_flex_attention=True)
    assert ctx.is_kv_parallelism_in_fused_na_enabled()
    ctx.use_fused_na(False)
    assert not ctx.is_fused_na_enabled() and not ctx.is_kv_parallelism_in_fused_na_enabled()
    with pytest.raises(TypeError, match="kv_parallel"):
        ctx.use_fused_na(True, kv_parallel="no")
    with pytest.raises(TypeError, match="use_flex_attention"):
        ctx.use_fused_na(True, use_flex_attention=0)


def test_deterministic_mode_excludes_kv_parallelism_and_autotuner():
    ctx.use_kv_parallelism_in_fused_na(False)
    ctx.use_deterministic_algorithms(True)
    with pytest.raises(RuntimeError, match="mode"):
        ctx.use_kv_parallelism_in_fused_na(True)
    with pytest.raises(RuntimeError, match="forward_pass"):
        ctx.use_autotuner(forward_pass=True)
    assert not ctx.is_kv_parallelism_in_fused_na_enabled()
    assert not ctx.is_autotuner_enabled()
    ctx.use_fused_na(True, kv_parallel=False)  # allowed
    assert ctx.is_fused_na_enabled()


@pytest.mark.parametrize("pref", ["default", "strict", "unrestricted"])
def test_memory_usage_preference_round_trips(pref):
    ctx.set_memory_usage_preference(pref)
    got = ctx.get_memory_usage_preference()
    assert got == pref and got is ctx.MemoryUsagePreference(pref)
    answers = {
        "default": ctx.is_memory_usage_default(),
        "strict": ctx.is_memory_usage_strict(),
        "unrestricted": ctx.is_memory_usage_unrestricted(),
    }
    assert answers == {name: name == pref for name in answers}


def test_memory_usage_preference_default_and_errors():
    assert ctx.is_memory_usage_default()
    ctx.set_memory_usage_preference("strict")
    ctx.set_memory_usage_preference()
    assert ctx.get_memory_usage_preference() is ctx.MemoryUsagePreference.Default
    with pytest.raises(ValueError, match="pref.*'lenient'"):
        ctx.set_memory_usage_preference("lenient")
    with pytest.raises(TypeError, match="pref"):
        ctx.set_memory_usage_preference(1)
    assert ctx.is_memory_usage_default()


def test_autotuner_round_trips():
    assert not ctx.is_autotuner_enabled()
    ctx.use_autotuner(
        forward_pass=True,
        thorough_mode_forward=True,
        warmup_steps_forward=3,
        warmup_steps_backward=4,
        steps_forward=7,
        steps_backward=8,
    )
    assert ctx.is_autotuner_enabled() and ctx.is_autotuner_enabled_for_forward()
    assert not ctx.is_autotuner_enabled_for_backward()
    assert ctx.is_autotuner_thorough_for_forward() and not ctx.is_autotuner_thorough_for_backward()
    state = ctx._STATE
    assert (state.autotune_warmup_steps_forward, state.autotune_warmup_steps_backward) == (3, 4)
    assert (state.autotune_steps_forward, state.autotune_steps_backward) == (7, 8)
    ctx.use_autotuner(backward_pass=True, thorough_mode_backward=True)  # None: unchanged
    assert ctx.is_autotuner_enabled_for_forward() and ctx.is_autotuner_enabled_for_backward()
    assert ctx.is_autotuner_thorough_for_backward()
    ctx.use_autotuner(forward_pass=False, backward_pass=False)
    assert not ctx.is_autotuner_enabled()
    ctx.use_autotuner(True, True, True, True)
    ctx.disable_autotuner()
    assert not ctx.is_autotuner_enabled()
    assert not ctx.is_autotuner_thorough_for_forward()


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"forward_pass": 1}, TypeError, "forward_pass"),
        ({"backward_pass": "y"}, TypeError, "backward_pass"),
        ({"thorough_mode_forward": 1}, TypeError, "thorough_mode_forward"),
        ({"thorough_mode_backward": 1}, TypeError, "thorough_mode_backward"),
        ({"warmup_steps_forward": 1.5}, TypeError, "warmup_steps_forward"),
        ({"warmup_steps_backward": True}, TypeError, "warmup_steps_backward"),
        ({"steps_forward": -1}, ValueError, "steps_forward"),
        ({"steps_backward": "5"}, TypeError, "steps_backward"),
    ],
)
def test_autotuner_rejects_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        ctx.use_autotuner(forward_pass=True, **kwargs)
    assert not ctx.is_autotuner_enabled()  # nothing half-applied


@pytest.mark.parametrize(
    ("enable", "disable", "getter"),
    [
        (ctx.enable_tf32, ctx.disable_tf32, ctx.is_tf32_in_gemm_na_enabled),
        (ctx.enable_gemm_na, ctx.disable_gemm_na, ctx.is_gemm_na_enabled),
        (ctx.enable_tiled_na, ctx.disable_tiled_na, ctx.is_tiled_na_enabled),
    ],
)
def test_enable_disable_return_new_setting(enable, disable, getter):
    assert disable() is False and getter() is False
    assert enable() is True and getter() is True


def test_flex_compile_round_trips():
    assert not ctx.is_flex_compile_allowed() and not ctx.is_flex_compile_backprop_allowed()
    ctx.allow_flex_compile(True, backprop=True)
    assert ctx.is_flex_compile_allowed() and ctx.is_flex_compile_backprop_allowed()
    ctx.disable_flex_compile_backprop()
    assert ctx.is_flex_compile_allowed() and not ctx.is_flex_compile_backprop_allowed()
    ctx.allow_flex_compile_backprop()
    assert ctx.is_flex_compile_backprop_allowed()
    ctx.disable_flex_compile()
    assert not ctx.is_flex_compile_allowed() and not ctx.is_flex_compile_backprop_allowed()
    ctx.allow_flex_compile_backprop(True)  # backprop needs forward compilation allowed
    assert not ctx.is_flex_compile_backprop_allowed()
    with pytest.raises(TypeError, match="backprop"):
        ctx.allow_flex_compile(True, backprop=1)


def test_capabilities_are_truthful():
    # CUDA kernels are there wherever torch sees a device; the fused ops run on the CPU and on
    # every CUDA device; the unfused ops' tensor-core products (NATTEN's "GEMM NA") on devices
    # of compute capability 8.0 on, in half types only (no TF32 or float64 products).
    cuda = torch.cuda.is_available()
    assert ctx.has_cuda() is cuda
    assert ctx.HAS_LIBNATTEN is False
    for query in (ctx.has_tf32_gemm, ctx.has_fp32_gemm, ctx.has_fp64_gemm):
        assert query() is False
        assert query("cpu") is False
        assert query(0) is False
    for query in (ctx.has_fna, ctx.has_fused_na):
        assert query() is True
        assert query("cpu") is True
        assert query(torch.device("cpu")) is True
        assert query(0) is cuda
    assert ctx.has_gemm("cpu") is False
    assert ctx.has_gemm(0) is (cuda and ctx.get_device_cc(0) >= 80)
    assert ctx.has_gemm() is (cuda and ctx.get_device_cc() >= 80)
    # Our CPU kernels take float16 and bfloat16.
    for query in (ctx.has_half, ctx.has_bfloat):
        assert query("cpu") is True
        assert query(torch.device("cpu")) is True
        assert query(0) is torch.cuda.is_available()  # a CUDA device index
        assert query() is True
    assert ctx.get_device_cc("cpu") == 0
    if not torch.cuda.is_available():
        assert ctx.get_device_cc() == 0 and ctx.get_device_cc(0) == 0
    else:
        major, minor = torch.cuda.get_device_capability(0)
        assert ctx.get_device_cc(0) == 10 * major + minor


@pytest.mark.parametrize("bad", [1.0, [0], True])
def test_capabilities_check_device_argument(bad):
    with pytest.raises(TypeError, match="device_index"):
        ctx.has_half(bad)
    with pytest.raises(TypeError, match="device_index"):
        ctx.get_device_cc(bad)
    with pytest.raises(ValueError, match="device_index"):
        ctx.has_gemm("not-a-device")


def test_reexported_from_natten_rs():
    for name in ctx.__all__:
        assert getattr(natten_rs, name) is getattr(ctx, name), name
        assert name in natten_rs.__all__
