"""Hugging Face transformers' DiNAT running on natten_rs through the ``natten`` distribution.

transformers (4.x) gates its DiNAT models on ``is_natten_available()`` and calls
``natten.functional.natten2dqkrpb`` / ``natten2dav``. The ``compat/natten`` distribution is
pip-installed into a temporary directory and put on PYTHONPATH of a fresh interpreter (this
process's ``sys.modules`` stays clean); there a small random DiNAT runs forward and backward,
and its outputs and gradients are compared with the same weights run on the dense oracle
(``tests/reference.py``) monkeypatched into transformers' DiNAT module.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

REPO = pathlib.Path(__file__).resolve().parent.parent
DIST_SRC = REPO / "compat" / "natten"

# Where transformers keeps DiNAT (4.x: models.dinat; later releases move deprecated models).
DINAT_MODULES = (
    "transformers.models.dinat.modeling_dinat",
    "transformers.models.deprecated.dinat.modeling_dinat",
)


def _dinat_module() -> str | None:
    for name in DINAT_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ModuleNotFoundError:
            continue
    return None


DINAT = _dinat_module()
if DINAT is None:
    pytest.skip(
        f"transformers {transformers.__version__} has no DiNAT code (looked for {DINAT_MODULES})",
        allow_module_level=True,
    )


SCRIPT = """
import importlib.metadata
import sys

import torch

import natten_rs.compat

DINAT, MODE = sys.argv[1:3]
if MODE == "install":  # run-time install(), before transformers probes for natten
    assert natten_rs.compat.install() is True

import natten
import reference
import transformers
from transformers.utils import is_natten_available

dinat = __import__(DINAT, fromlist=["_"])

# transformers found `natten` (find_spec + distribution metadata) and bound natten_rs's ops.
assert is_natten_available(), "transformers does not see natten"
assert importlib.metadata.version("natten") == "0.17.5", importlib.metadata.version("natten")
assert natten_rs.compat.is_installed()
assert dinat.natten2dqkrpb is natten.functional.natten2dqkrpb
assert dinat.natten2dav is natten.functional.natten2dav
assert dinat.natten2dqkrpb.__module__.startswith("natten_rs"), dinat.natten2dqkrpb.__module__

torch.manual_seed(0)
config = transformers.DinatConfig(
    image_size=32,
    patch_size=4,
    num_channels=3,
    embed_dim=16,
    depths=[1, 2],
    num_heads=[2, 4],
    kernel_size=5,
    dilations=[[2], [1, 2]],
    mlp_ratio=2.0,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
    num_labels=5,
)
pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
labels = torch.tensor([1, 3])


def oracle_qkrpb(query, key, rpb, kernel_size, dilation):
    return reference.qk(query, key, kernel_size, dilation, rpb=rpb)


def oracle_av(attn, value, kernel_size, dilation):
    return reference.av(attn, value, kernel_size, dilation)


def run(model, oracle, **kwargs):
    saved = dinat.natten2dqkrpb, dinat.natten2dav
    if oracle:
        dinat.natten2dqkrpb, dinat.natten2dav = oracle_qkrpb, oracle_av
    try:
        model.zero_grad(set_to_none=True)
        out = model(pixel_values=pixels, **kwargs)
    finally:
        dinat.natten2dqkrpb, dinat.natten2dav = saved
    return out


def check(name, got, want, tol=1e-4):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.isfinite(got).all(), name
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert scale > 0, f"{name}: all zero"
    # float32 tolerance, relative to the tensor's scale (some gradients are tiny).
    assert err <= tol * max(scale, 1e-3), f"{name}: max abs err {err:.3e} (scale {scale:.3e})"
    print(f"{name}: max abs err {err:.3e} (scale {scale:.3e})")


# DinatModel: last_hidden_state, pooler_output, and d(sum of hidden)/d(params).
model = transformers.DinatModel(config).eval()
twin = transformers.DinatModel(config).eval()
twin.load_state_dict(model.state_dict())
outs = []
for m, oracle in ((model, False), (twin, True)):
    out = run(m, oracle)
    weight = torch.linspace(-1, 1, out.last_hidden_state.numel()).view_as(out.last_hidden_state)
    ((out.last_hidden_state * weight).sum() + out.pooler_output.square().sum()).backward()
    outs.append(out)
check("last_hidden_state", outs[0].last_hidden_state, outs[1].last_hidden_state)
check("pooler_output", outs[0].pooler_output, outs[1].pooler_output)
grads = [dict((n, p.grad) for n, p in m.named_parameters()) for m in (model, twin)]
rpb = [n for n in grads[0] if n.endswith(".rpb")]
assert len(rpb) == 3, rpb
for n in rpb + ["embeddings.patch_embeddings.projection.0.weight",
                "encoder.levels.1.layers.1.attention.self.query.weight"]:
    assert grads[0][n] is not None and grads[1][n] is not None, n
    check(f"grad {n}", grads[0][n], grads[1][n])
for n in grads[0]:
    if grads[1][n] is not None:
        check(f"grad {n}", grads[0][n], grads[1][n])

# DinatForImageClassification: logits, loss and gradients.
clf = transformers.DinatForImageClassification(config).eval()
clf_twin = transformers.DinatForImageClassification(config).eval()
clf_twin.load_state_dict(clf.state_dict())
outs = []
for m, oracle in ((clf, False), (clf_twin, True)):
    out = run(m, oracle, labels=labels)
    out.loss.backward()
    outs.append(out)
assert outs[0].logits.shape == (2, 5)
check("logits", outs[0].logits, outs[1].logits)
check("loss", outs[0].loss, outs[1].loss)
for (n, p), (n2, p2) in zip(clf.named_parameters(), clf_twin.named_parameters()):
    assert n == n2 and p.grad is not None and p2.grad is not None, n
    check(f"clf grad {n}", p.grad, p2.grad)
print("DINAT-OK")
"""


@pytest.mark.parametrize("mode", ["distribution", "install"])
def test_dinat_on_natten_rs_matches_oracle(mode, request):
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('natten'))"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.stdout.strip() != "None":
        pytest.skip(f"a `natten` package is importable here: {probe.stdout.strip()}")
    # "distribution": the compat/natten distribution on PYTHONPATH; "install": no `natten`
    # anywhere, natten_rs.compat.install() builds it at run time.
    site = [str(request.getfixturevalue("dist_site"))] if mode == "distribution" else []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*site, str(REPO / "tests")] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), DINAT, mode],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO / "tests",
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "DINAT-OK" in proc.stdout, proc.stdout
