"""NAT / DiNAT classifiers (natten_rs.models): configs, parameter counts, forward, timm, training."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from natten_rs import NeighborhoodAttention2D, models

# Parameters (millions) from the papers' tables: NAT (Hassani et al. 2022) Table 1/2 and DiNAT
# (Hassani & Shi 2022) ImageNet tables; 224 px, 1000 classes.
PAPER_PARAMS_M = {
    "nat_mini": 20,
    "nat_tiny": 28,
    "nat_small": 51,
    "nat_base": 90,
    "dinat_mini": 20,
    "dinat_tiny": 28,
    "dinat_small": 51,
    "dinat_base": 90,
    "dinat_large": 200,
}
# DiNAT-s (Swin's macro-architecture with DiNA; DiNAT paper table: the Swin-T/S/B/L sizes) and the
# isotropic variants (ViT-S / ViT-B sizes).
VARIANT_PARAMS_M = {
    "dinat_s_tiny": 28,
    "dinat_s_small": 50,
    "dinat_s_base": 88,
    "dinat_s_large": 197,
    "nat_isotropic_small": 22,
    "dinat_isotropic_small": 22,
    "nat_isotropic_base": 86,
    "dinat_isotropic_base": 86,
}
ALL_PARAMS_M = {**PAPER_PARAMS_M, **VARIANT_PARAMS_M}

# (embed_dim, depths, heads, mlp_ratio, layer_scale) from the papers.
PAPER_CONFIGS = {
    "mini": (64, [3, 4, 6, 5], [2, 4, 8, 16], 3.0, False),
    "tiny": (64, [3, 4, 18, 5], [2, 4, 8, 16], 3.0, False),
    "small": (96, [3, 4, 18, 5], [3, 6, 12, 24], 2.0, True),
    "base": (128, [3, 4, 18, 5], [4, 8, 16, 32], 2.0, True),
    "large": (192, [3, 4, 18, 5], [6, 12, 24, 48], 2.0, False),
}

# A test-only tiny config through the same constructors.
TINY = {"embed_dim": 16, "depths": (2, 1, 2, 1), "num_heads": (1, 2, 2, 4), "drop_path_rate": 0.0}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build_meta(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):  # no memory, no init cost: shapes only
        return getattr(models, name)(**kwargs)


def test_exports():
    assert set(models.model_names) == set(ALL_PARAMS_M)
    for name in ALL_PARAMS_M:
        assert callable(getattr(models, name))
        assert name in models.__all__


@pytest.mark.parametrize("name", sorted(ALL_PARAMS_M))
def test_param_count_matches_paper(name):
    count = _count(_build_meta(name, num_classes=1000))
    paper = ALL_PARAMS_M[name] * 1e6
    assert abs(count - paper) / paper < 0.02, (name, count)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_config_matches_paper(name):
    model = _build_meta(name)
    dim, depths, heads, mlp_ratio, layer_scale = PAPER_CONFIGS[name.split("_")[1]]
    assert model.embed_dim == dim and model.depths == depths and model.mlp_ratio == mlp_ratio
    assert model.num_features == dim * 8
    for i, level in enumerate(model.levels):
        assert len(level.blocks) == depths[i]
        for block in level.blocks:
            attn = block.attn
            assert isinstance(attn, NeighborhoodAttention2D)
            assert attn.num_heads == heads[i] and attn.dim == dim * 2**i
            assert attn.kernel_size == (7, 7) and attn.rpb is not None
            assert block.mlp.fc1.out_features == int(dim * 2**i * mlp_ratio)
            assert (block.gamma1 is not None) == layer_scale
        assert (level.downsample is None) == (i == 3)


def test_dilations():
    nat = _build_meta("nat_tiny")
    assert all(d == 1 for level in nat.dilations for d in level)
    dinat = _build_meta("dinat_tiny")
    assert dinat.dilations[0] == [1, 8, 1]
    assert dinat.dilations[1] == [1, 4, 1, 4]
    assert dinat.dilations[2] == [1, 2] * 9
    assert dinat.dilations[3] == [1] * 5
    for i, level in enumerate(dinat.levels):
        side = 224 // (4 * 2**i)
        for j, block in enumerate(level.blocks):
            assert block.attn.dilation == (dinat.dilations[i][j],) * 2
            assert 7 * dinat.dilations[i][j] <= side
    # At 384 px (DiNAT-L fine-tuning) the dilations grow with the feature maps.
    assert models.dinat_dilations([2, 2, 2, 2], img_size=384) == [[1, 13], [1, 6], [1, 3], [1, 1]]


def test_variant_configs():
    model = _build_meta("dinat_s_tiny")
    assert isinstance(model, models.DiNATs) and model.depths == [2, 2, 6, 2]
    assert model.dilations == [[1, 8], [1, 4], [1, 2, 1, 2, 1, 2], [1, 1]]
    assert model.levels[0].blocks[0].mlp.fc1.out_features == 4 * 96
    assert model.levels[0].downsample.reduction.weight.shape == (192, 384)
    iso = _build_meta("dinat_isotropic_small")
    assert isinstance(iso, models.IsotropicNAT) and iso.num_features == 384
    assert iso.dilations == [[1, 2] * 6]
    assert _build_meta("nat_isotropic_base").dilations == [[1] * 12]


def test_pretrained_not_implemented():
    for name in models.model_names:
        with pytest.raises(NotImplementedError, match=name):
            getattr(models, name)(pretrained=True)


def test_state_dict_names():
    keys = set(models.nat_mini(num_classes=10, **TINY).state_dict())
    for key in (
        "patch_embed.proj.0.weight",
        "patch_embed.proj.1.weight",
        "patch_embed.norm.weight",
        "levels.0.blocks.0.norm1.weight",
        "levels.0.blocks.0.attn.qkv.weight",
        "levels.0.blocks.0.attn.rpb",
        "levels.0.blocks.0.attn.proj.bias",
        "levels.0.blocks.0.mlp.fc1.weight",
        "levels.0.blocks.0.mlp.fc2.weight",
        "levels.0.downsample.reduction.weight",
        "levels.0.downsample.norm.weight",
        "norm.weight",
        "head.weight",
    ):
        assert key in keys, key
    assert "levels.0.downsample.reduction.bias" not in keys
    small = models.nat_small(num_classes=10, **TINY).state_dict()
    assert "levels.0.blocks.0.gamma1" in small and "levels.0.blocks.0.gamma2" in small


@pytest.mark.parametrize("name", ["nat_mini", "dinat_mini"])
def test_forward_shape(name):
    torch.manual_seed(0)
    model = getattr(models, name)(num_classes=10, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert feats.shape == (2, 2, 2, 16 * 8)
    assert pooled.shape == (2, 16 * 8)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, 16 * 8)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("dinat_s_tiny", TINY),
        ("dinat_isotropic_small", {"embed_dim": 16, "depths": (2,), "num_heads": 2}),
    ],
)
def test_variant_forward_backward(name, overrides):
    torch.manual_seed(0)
    model = getattr(models, name)(num_classes=10, img_size=64, **overrides)
    x = torch.randn(2, 3, 50, 64)  # odd-ish size: exercises patch-merging / NA padding
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_forward_odd_size_and_default_dilations():
    # 224-px DiNAT dilations on a 48x40 input: the attention pads to kernel*dilation and crops.
    torch.manual_seed(0)
    model = models.dinat_tiny(num_classes=5, **TINY).eval()
    assert model.dilations[0] == [1, 8]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 40))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_import_without_timm():
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "import natten_rs.models as m\n"
        "assert m.register_timm_models() is False\n"
        "print(m.dinat_mini(embed_dim=8, depths=(1,1,1,1), num_heads=1, num_classes=3)"
        ".head.out_features)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"


def test_timm_registration():
    timm = pytest.importorskip("timm", reason="timm is optional; registration needs it")
    for name in ALL_PARAMS_M:
        assert timm.is_model(name), name
        assert timm.models.model_entrypoint(name) is getattr(models, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # re-registering must not warn about overwriting
        assert models.register_timm_models() is True
    model = timm.create_model("dinat_tiny", pretrained=False, num_classes=10, **TINY)
    assert isinstance(model, models.NAT) and model.num_classes == 10
    with pytest.raises(NotImplementedError, match="dinat_tiny"):
        timm.create_model("dinat_tiny", pretrained=True)


def test_timm_dinat_trains():
    timm = pytest.importorskip("timm", reason="timm is optional; training test builds via timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "dinat_tiny", pretrained=False, num_classes=10, img_size=64, **TINY
    ).train()
    assert any(d > 1 for level in model.dilations for d in level)  # dilated layers exercised
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([3, 7])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(grads) == len(list(model.parameters()))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        assert torch.isfinite(norm)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses


@pytest.mark.parametrize("name", ["nat_mini", "dinat_mini"])
def test_backbone_features_match_the_classifier_path(name):
    torch.manual_seed(0)
    classifier = getattr(models, name)(num_classes=0, img_size=64, **TINY).eval()
    backbone = getattr(models, name)(features_only=True, img_size=64, **TINY).eval()
    keys = set(backbone.state_dict())
    assert {"norm0.weight", "norm3.weight"} <= keys and not any(
        k.startswith(("norm.", "head.")) for k in keys
    )
    shared = {k: v for k, v in classifier.state_dict().items() if k in keys}
    missing = backbone.load_state_dict(shared, strict=False).missing_keys
    assert sorted(missing) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    # With the classifier's final norm as the last level's norm, the last features agree.
    backbone.norm3.load_state_dict(classifier.norm.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
        last = classifier.forward_features(x)
    assert [f.shape for f in feats] == [
        (2, 16 * 2**i, 64 // 2 ** (i + 2), 64 // 2 ** (i + 2)) for i in range(4)
    ]
    torch.testing.assert_close(feats[3], last.permute(0, 3, 1, 2))
    info = backbone.feature_info
    assert info.channels() == [16, 32, 64, 128] and info.reduction() == [4, 8, 16, 32]
    assert info.module_name(2) == "levels.2"


def test_backbone_out_indices_and_gradients():
    torch.manual_seed(0)
    backbone = models.nat_mini(out_indices=(-1, 1), **TINY)
    assert backbone.out_indices == (1, 3)
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [32, 128]
    sum(f.square().mean() for f in feats).backward()
    assert backbone.levels[0].blocks[0].attn.qkv.weight.grad is not None
    early = models.nat_mini(out_indices=(0,), **TINY)
    assert [f.shape[1] for f in early(torch.randn(1, 3, 64, 64))] == [16]


@pytest.mark.parametrize(
    ("out_indices", "match"),
    [((4,), r"out_indices.*\[-4, 4\).*\[4\]"), ((), r"out_indices"), ((1, -3), "distinct")],
)
def test_backbone_rejects_bad_out_indices(out_indices, match):
    with pytest.raises(ValueError, match=match):
        models.nat_mini(out_indices=out_indices, **TINY)


def test_backbone_errors():
    with pytest.raises(RuntimeError, match="out_indices"):
        models.nat_mini(**TINY).forward_levels(torch.randn(1, 3, 64, 64))
    with pytest.raises(NotImplementedError, match="dinat_s_tiny"):
        models.dinat_s_tiny(features_only=True, **TINY)


def test_timm_features_only():
    timm = pytest.importorskip("timm", reason="timm is optional; features_only goes through it")
    backbone = timm.create_model("dinat_mini", features_only=True, out_indices=(1, 2), **TINY)
    feats = backbone(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8), (2, 64, 4, 4)]
    assert backbone.feature_info.channels() == [32, 64]
