"""The ``natten`` name: ``natten_rs.compat.install()`` and the ``compat/natten`` distribution.

Everything that imports ``natten`` runs in a fresh subprocess, so this process's
``sys.modules`` and ``sys.meta_path`` stay clean.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DIST_SRC = REPO / "compat" / "natten"

# Public names NATTEN exports from `natten`, read from NATTEN's `src/natten/__init__.py`:
# 0.15.x (capability functions, then kept in natten.functional) ...
NATTEN_015_TOP = [
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "disable_gemm_na",
    "disable_tf32",
    "disable_tiled_na",
    "enable_gemm_na",
    "enable_tf32",
    "enable_tiled_na",
    "has_bfloat",
    "has_cuda",
    "has_fp32_gemm",
    "has_fp64_gemm",
    "has_gemm",
    "has_half",
    "has_tf32_gemm",
]
# ... 0.17.x (natten/__init__.py imports these from natten.context) ...
NATTEN_0175_TOP = [
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "are_deterministic_algorithms_enabled",
    "disable_autotuner",
    "disable_gemm_na",
    "disable_tf32",
    "disable_tiled_na",
    "enable_gemm_na",
    "enable_tf32",
    "enable_tiled_na",
    "get_memory_usage_preference",
    "has_bfloat",
    "has_cuda",
    "has_fna",
    "has_fp32_gemm",
    "has_fp64_gemm",
    "has_fused_na",
    "has_gemm",
    "has_half",
    "has_tf32_gemm",
    "is_autotuner_enabled",
    "is_autotuner_enabled_for_backward",
    "is_autotuner_enabled_for_forward",
    "is_autotuner_thorough_for_backward",
    "is_autotuner_thorough_for_forward",
    "is_fna_enabled",
    "is_fused_na_enabled",
    "is_gemm_na_enabled",
    "is_kv_parallelism_in_fused_na_enabled",
    "is_memory_usage_default",
    "is_memory_usage_strict",
    "is_memory_usage_unrestricted",
    "is_tf32_in_gemm_na_enabled",
    "is_tiled_na_enabled",
    "set_memory_usage_preference",
    "use_autotuner",
    "use_deterministic_algorithms",
    "use_fna",
    "use_fused_na",
    "use_gemm_na",
    "use_kv_parallelism_in_fused_na",
    "use_tf32_in_gemm_na",
    "use_tiled_na",
    "__version__",
]
# ... and 0.21 (its __all__).
NATTEN_021_TOP = [
    "__version__",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "are_deterministic_algorithms_enabled",
    "use_deterministic_algorithms",
    "use_kv_parallelism_in_fused_na",
    "is_kv_parallelism_in_fused_na_enabled",
    "set_memory_usage_preference",
    "get_memory_usage_preference",
    "is_memory_usage_default",
    "is_memory_usage_strict",
    "is_memory_usage_unrestricted",
    "is_flex_compile_allowed",
    "is_flex_compile_backprop_allowed",
    "allow_flex_compile",
    "allow_flex_compile_backprop",
    "disable_flex_compile",
    "disable_flex_compile_backprop",
    "get_bwd_configs_for_cutlass_fmha",
    "get_bwd_configs_for_cutlass_fna",
    "get_configs_for_cutlass_fmha",
    "get_configs_for_cutlass_fna",
    "get_configs_for_cutlass_hopper_fmha",
    "get_bwd_configs_for_cutlass_hopper_fmha",
    "get_configs_for_cutlass_hopper_fna",
    "get_bwd_configs_for_cutlass_hopper_fna",
    "get_bwd_configs_for_cutlass_blackwell_fmha",
    "get_bwd_configs_for_cutlass_blackwell_fna",
    "get_configs_for_cutlass_blackwell_fmha",
    "get_configs_for_cutlass_blackwell_fna",
    "get_configs_for_flex_fmha",
    "get_configs_for_flex_fna",
    "HAS_LIBNATTEN",
    "na1d",
    "na2d",
    "na3d",
    "attention",
    "merge_attentions",
]
# `from natten.functional import ...` names: the 0.14 - 0.17 unfused ops, 0.15's *_with_bias,
# 0.17's fused ops, 0.20+'s attention / merge_attentions.
NATTEN_FUNCTIONAL = [
    f"{prefix}{rank}d{suffix}"
    for rank in (1, 2, 3)
    for prefix, suffix in [
        ("natten", "qkrpb"),
        ("natten", "qk"),
        ("natten", "av"),
        ("na", "_qk"),
        ("na", "_av"),
        ("na", "_qk_with_bias"),
        ("na", ""),
    ]
] + ["attention", "merge_attentions"]
# Module paths: 0.14 - 0.16 natten.natten{1,2,3}d, 0.17 natten.na{1,2,3}d, 0.20+ natten.modules.
NATTEN_MODULES = [
    "natten.functional",
    "natten.context",
    "natten.utils",
    "natten.modules",
    "natten.backends",
    *(f"natten.natten{r}d" for r in (1, 2, 3)),
    *(f"natten.na{r}d" for r in (1, 2, 3)),
]

# Run in a subprocess after `SETUP`: everything third-party code does with `natten`, checked
# against natten_rs in the same process.
CHECK = """
import importlib, importlib.metadata, importlib.util, sys
import torch
import natten_rs
import natten
from natten import NeighborhoodAttention2D
from natten.functional import natten2dqkrpb, natten2dav, na2d, na2d_qk
from natten.na2d import NeighborhoodAttention2D as NA2D_017
from natten.natten2d import NeighborhoodAttention2D as NA2D_014
from natten.modules import NeighborhoodAttention2D as NA2D_020

assert importlib.metadata.version("natten") == "0.17.5" == natten.__version__
assert importlib.util.find_spec("natten") is not None
assert NeighborhoodAttention2D is NA2D_017 is NA2D_014 is NA2D_020
assert NeighborhoodAttention2D is natten_rs.NeighborhoodAttention2D

for name in TOP:
    assert hasattr(natten, name), name
for name in FUNCTIONAL:
    assert hasattr(natten.functional, name), name
for name in MODULES:
    importlib.import_module(name)

torch.manual_seed(0)
B, h, H, W, D, K = 2, 3, 9, 8, 16, 5
q, k, v = (torch.randn(B, h, H, W, D) for _ in range(3))
rpb = torch.randn(h, 2 * K - 1, 2 * K - 1)
attn = natten2dqkrpb(q, k, rpb, K, 1)
assert torch.equal(attn, natten_rs.functional.natten2dqkrpb(q, k, rpb, K, 1))
assert torch.equal(attn, na2d_qk(q, k, K, 1, rpb=rpb))
out = natten2dav(attn.softmax(-1), v, K, 1)
assert torch.equal(out, natten_rs.functional.na2d_av(attn.softmax(-1), v, K, 1))

# natten.functional.na2d: NATTEN 0.17.5's positional order (q, k, v, K, dilation, is_causal, rpb).
ql, kl, vl = (t.transpose(1, -2).contiguous() for t in (q, k, v))  # heads last
got = na2d(ql, kl, vl, K, 1, False, rpb)
assert torch.equal(got, natten_rs.na2d(ql, kl, vl, K, dilation=1, is_causal=False, rpb=rpb))
got = na2d(ql, kl, vl, (3, 5), (2, 1), (True, False), xformers_kwargs={})
assert torch.equal(got, natten_rs.na2d(ql, kl, vl, (3, 5), dilation=(2, 1), is_causal=(True, False)))
# natten.na2d(...): NATTEN 0.20+'s top-level op (q, k, v, K, stride, dilation).
got = natten.na2d(ql, kl, vl, 4, 2, 1)
assert torch.equal(got, natten_rs.na2d(ql, kl, vl, 4, stride=2, dilation=1))

mod = NeighborhoodAttention2D(dim=12, num_heads=3, kernel_size=3, dilation=2, rel_pos_bias=True)
x = torch.randn(2, 7, 6, 12)
ref = natten_rs.NeighborhoodAttention2D(12, 3, 3, dilation=2, rel_pos_bias=True)
ref.load_state_dict(mod.state_dict(), strict=True)
assert torch.equal(mod(x), ref(x))

natten.use_fused_na(True, kv_parallel=False)
assert natten.is_fused_na_enabled() and natten_rs.is_fused_na_enabled()
assert natten.context.is_fused_na_enabled is natten_rs.is_fused_na_enabled
assert natten.has_cuda() is torch.cuda.is_available() and natten.HAS_LIBNATTEN is False
assert natten.utils.get_device_cc() == natten_rs.get_device_cc()
print("CHECK-OK", getattr(natten, "__file__", None))
"""


def _run(code: str, pythonpath: list[pathlib.Path] = (), *, check: bool = False) -> str:
    """Run ``code`` (then ``CHECK`` if ``check``) in a fresh interpreter; return its stdout."""
    code = textwrap.dedent(code) + (CHECK if check else "")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(p) for p in pythonpath] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    names = f"TOP = {sorted(set(NATTEN_015_TOP + NATTEN_0175_TOP + NATTEN_021_TOP))!r}\n"
    names += f"FUNCTIONAL = {NATTEN_FUNCTIONAL!r}\nMODULES = {NATTEN_MODULES!r}\n"
    proc = subprocess.run(
        [sys.executable, "-c", names + code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO / "tests",
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def no_real_natten():
    out = _run("import importlib.util; print(importlib.util.find_spec('natten'))")
    if out.strip() != "None":
        pytest.skip(f"a `natten` package is importable here: {out.strip()}")


def test_install_builds_natten(no_real_natten):
    out = _run(
        """
        import importlib.metadata, sys
        import natten_rs.compat as compat
        assert "natten" not in sys.modules and not compat.is_installed()
        try:
            importlib.metadata.version("natten")
            raise AssertionError("natten metadata before install()")
        except importlib.metadata.PackageNotFoundError:
            pass
        assert compat.install() is True
        finders = len(sys.meta_path)
        assert compat.install() is True and len(sys.meta_path) == finders  # idempotent
        assert compat.is_installed()
        """,
        check=True,
    )
    assert "CHECK-OK" in out


def test_install_never_shadows_real_natten(tmp_path):
    real = tmp_path / "site" / "natten"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = True\n__version__ = '0.17.5'\n")
    _run(
        """
        import sys
        import natten_rs.compat as compat
        assert compat.install() is False  # importable, not yet imported
        assert "natten" not in sys.modules
        import natten
        assert natten.REAL
        assert compat.install() is False  # imported
        assert sys.modules["natten"] is natten and not compat.is_installed()
        assert "natten.functional" not in sys.modules
        """,
        [tmp_path / "site"],
    )


def test_distribution_metadata():
    text = (DIST_SRC / "pyproject.toml").read_text()
    assert 'name = "natten"' in text and 'version = "0.17.5"' in text
    assert '"natten_rs"' in text
    import natten_rs.compat

    assert natten_rs.compat.NATTEN_VERSION == "0.17.5"


def test_distribution_works(no_real_natten, dist_site):
    out = _run(
        """
        import natten_rs.compat as compat
        import natten
        assert compat.is_installed() and compat.install() is True  # ours: kept
        """,
        [dist_site],
        check=True,
    )
    assert f"CHECK-OK {dist_site / 'natten' / '__init__.py'}" in out


def test_install_uses_installed_distribution(no_real_natten, dist_site):
    out = _run(
        """
        import sys
        import natten_rs.compat as compat
        assert compat.install() is True
        assert sys.modules["natten"].__file__.endswith("__init__.py")
        """,
        [dist_site],
        check=True,
    )
    assert "CHECK-OK" in out
