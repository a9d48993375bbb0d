"""NAT / DiNAT backbones in the real mmdet and mmseg (natten_rs.models.detection).

The package index has mmengine, mmdet, mmsegmentation and mmcv-lite (mmcv without its compiled
ops) as wheels, and the test extra installs them: ``mmdet.registry`` and ``mmseg.registry``
import, so ``import natten_rs.models`` registers ``NAT`` / ``DiNAT`` there, and the backbone is
built, initialised and run through mmengine's own machinery. ``mmdet.models`` and
``mmseg.models`` import ``mmcv.ops``, so building a whole detector or segmentor (and anything
by its registered name, which makes the registry import its models package first) needs mmcv
with its compiled ops; those tests skip where mmcv lacks them. Each test skips where its
framework is not installed. detectron2 is not on the package index: tests/test_detection.py
stands in for its registry.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from natten_rs import models

FRAMEWORKS = ("mmdet", "mmseg")
EMBED_DIM = 16
CHANNELS = [EMBED_DIM * 2**i for i in range(4)]  # levels 0..3
STRIDES = [4, 8, 16, 32]
H, W = 64, 96  # unequal sides: a swapped height and width shows in the shapes

# Small enough for a fast forward and backward on two CPU cores; DiNAT dilates the second layer
# of level 2.
BACKBONES = {
    "NAT": {
        "embed_dim": EMBED_DIM,
        "depths": [1, 1, 2, 1],
        "num_heads": [1, 2, 2, 4],
        "kernel_size": 3,
    },
    "DiNAT": {
        "embed_dim": EMBED_DIM,
        "depths": [1, 1, 2, 1],
        "num_heads": [1, 2, 2, 4],
        "kernel_size": 3,
        "dilations": [[1], [1], [1, 2], [1]],
        "drop_path_rate": 0.1,
    },
}


@pytest.fixture(params=FRAMEWORKS)
def framework(request) -> str:
    pytest.importorskip(f"{request.param}.registry", reason=f"{request.param} is not installed")
    return request.param


def _models(framework: str):
    return importlib.import_module(f"{framework}.registry").MODELS


def _needs_compiled_mmcv(framework: str) -> None:
    """Skip unless ``{framework}.models`` can import: it needs ``mmcv.ops``' compiled ops."""
    if importlib.util.find_spec("mmcv._ext") is None:
        pytest.skip(
            f"{framework}.models imports mmcv.ops, which needs mmcv's compiled ops; the "
            f"installed mmcv (mmcv-lite, the wheel on the package index) has none"
        )
    importlib.import_module(f"{framework}.models")


def _check_levels(feats, batch: int = 2) -> None:
    assert isinstance(feats, tuple) and len(feats) == 4
    for f, c, s in zip(feats, CHANNELS, STRIDES, strict=True):
        assert f.shape == (batch, c, H // s, W // s)
        assert torch.isfinite(f).all()


def test_registered_with_the_real_registries(framework):
    registry = _models(framework)
    assert registry.module_dict["NAT"] is models.MMBackbone
    assert registry.module_dict["DiNAT"] is models.MMBackbone
    # Registering again finds them there, without making the registry import its models
    # package (which raises where mmcv lacks its compiled ops).
    assert f"{framework}.registry" in models.register_mm()
    assert registry.module_dict["DiNAT"] is models.MMBackbone


@pytest.mark.parametrize("name", BACKBONES)
def test_built_by_the_registry_from_a_config(framework, name):
    """mmengine's build (pure-Python config style: the class is the type) from a ConfigDict."""
    from mmengine.config import ConfigDict

    registry = _models(framework)
    cfg = ConfigDict(type=registry.module_dict[name], out_indices=(0, 1, 2, 3), **BACKBONES[name])
    backbone = registry.build(cfg)
    assert isinstance(backbone, models.MMBackbone)
    assert backbone.out_indices == (0, 1, 2, 3)
    want = [[1], [1], [1, 2], [1]] if name == "DiNAT" else [[1], [1], [1, 1], [1]]
    assert backbone.dilations == want
    backbone.init_weights()  # no init_cfg: a no-op
    backbone.eval()
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, H, W))
    _check_levels(feats)


def test_backward_through_the_backbone(framework):
    registry = _models(framework)
    backbone = registry.build(dict(type=registry.module_dict["DiNAT"], **BACKBONES["DiNAT"]))
    backbone.train()
    x = torch.randn(2, 3, H, W, requires_grad=True)
    feats = backbone(x)
    _check_levels(feats)
    sum(f.square().mean() for f in feats).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in backbone.named_parameters():
        assert p.grad is not None, f"{pname}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname}: non-finite gradient"
    assert all(backbone.get_parameter(f"norm{i}.weight").grad.abs().sum() > 0 for i in range(4))


def test_init_cfg_pretrained_loads_through_a_parent_module(framework, tmp_path):
    """A detector is an mmengine ``BaseModule``: its ``init_weights`` calls the backbone's, which
    applies ``init_cfg``; ``Pretrained`` goes last, so it wins over other initialisers."""
    from mmengine.model import BaseModule

    registry = _models(framework)
    cls = registry.module_dict["DiNAT"]
    source = cls(**BACKBONES["DiNAT"])
    checkpoint = tmp_path / "detector.pth"
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["neck.weight"] = torch.zeros(1)  # not the backbone's: dropped by the prefix
    torch.save({"state_dict": state, "meta": {}}, checkpoint)

    detector = BaseModule()
    detector.backbone = registry.build(
        dict(
            type=cls,
            init_cfg=[
                {"type": "Pretrained", "checkpoint": str(checkpoint), "prefix": "backbone."},
                {"type": "Constant", "layer": "Linear", "val": 0.0, "bias": 0.0},
            ],
            **BACKBONES["DiNAT"],
        )
    )
    before = detector.backbone.state_dict()
    assert not torch.equal(
        before["levels.0.blocks.0.mlp.fc1.weight"], source.levels[0].blocks[0].mlp.fc1.weight
    )
    detector.init_weights()
    loaded = detector.backbone.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    for k, v in source.state_dict().items():
        assert torch.equal(loaded[k], v), k


# ---- whole detectors and segmentors, built by name (need mmcv's compiled ops) ----

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _backbone_cfg(name: str, out_indices=(0, 1, 2, 3)) -> dict:
    return dict(type=name, out_indices=out_indices, **BACKBONES[name])


def _retinanet(name: str) -> dict:
    """RetinaNet set up as mmdet's Swin configs set it: levels 1..3 into an FPN that adds two
    levels from its input (strides 8..128)."""
    return {
        "type": "RetinaNet",
        "data_preprocessor": {
            "type": "DetDataPreprocessor",
            "mean": MEAN,
            "std": STD,
            "bgr_to_rgb": True,
        },
        "backbone": _backbone_cfg(name, out_indices=(1, 2, 3)),
        "neck": {
            "type": "FPN",
            "in_channels": CHANNELS[1:],
            "out_channels": 32,
            "start_level": 0,
            "add_extra_convs": "on_input",
            "num_outs": 5,
        },
        "bbox_head": {
            "type": "RetinaHead",
            "num_classes": 3,
            "in_channels": 32,
            "stacked_convs": 1,
            "feat_channels": 32,
            "anchor_generator": {
                "type": "AnchorGenerator",
                "octave_base_scale": 4,
                "scales_per_octave": 3,
                "ratios": [0.5, 1.0, 2.0],
                "strides": [8, 16, 32, 64, 128],
            },
            "bbox_coder": {
                "type": "DeltaXYWHBBoxCoder",
                "target_means": [0.0] * 4,
                "target_stds": [1.0] * 4,
            },
            "loss_cls": {"type": "FocalLoss", "use_sigmoid": True, "gamma": 2.0, "alpha": 0.25},
            "loss_bbox": {"type": "L1Loss"},
        },
    }


def _uper_encoder_decoder(name: str) -> dict:
    return {
        "type": "EncoderDecoder",
        "data_preprocessor": {
            "type": "SegDataPreProcessor",
            "mean": MEAN,
            "std": STD,
            "bgr_to_rgb": True,
        },
        "backbone": _backbone_cfg(name),
        "decode_head": {
            "type": "UPerHead",
            "in_channels": CHANNELS,
            "in_index": [0, 1, 2, 3],
            "pool_scales": (1, 2, 3, 6),
            "channels": 32,
            "num_classes": 5,
            "norm_cfg": {"type": "BN", "requires_grad": True},
            "align_corners": False,
            "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0},
        },
        "train_cfg": {},
        "test_cfg": {"mode": "whole"},
    }


@pytest.mark.parametrize("name", BACKBONES)
def test_built_by_name(framework, name):
    _needs_compiled_mmcv(framework)
    registry = _models(framework)
    backbone = registry.build(_backbone_cfg(name))
    assert type(backbone) is models.MMBackbone
    with torch.no_grad():
        _check_levels(backbone(torch.randn(2, 3, H, W)))


def _build_in_scope(framework: str, cfg: dict):
    """Build under the framework's default scope, as its runner does (the data preprocessor is
    built through mmengine's root registry, which looks there)."""
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope(framework):
        return _models(framework).build(cfg)


def _check_backbone_grads(model) -> None:
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("name", BACKBONES)
def test_mmdet_retinanet_with_fpn(name):
    pytest.importorskip("mmdet.registry", reason="mmdet is not installed")
    _needs_compiled_mmcv("mmdet")
    model = _build_in_scope("mmdet", _retinanet(name))
    assert isinstance(model.backbone, models.MMBackbone)
    model.init_weights()
    model.train()
    x = torch.randn(2, 3, H, W)
    neck = model.extract_feat(x)
    assert [tuple(f.shape) for f in neck] == [
        (2, 32, 8, 12),
        (2, 32, 4, 6),
        (2, 32, 2, 3),
        (2, 32, 1, 2),
        (2, 32, 1, 1),
    ]
    cls_scores, bbox_preds = model(x, mode="tensor")
    assert [tuple(c.shape[1:]) for c in cls_scores] == [(27,) + f.shape[2:] for f in neck]
    assert [b.shape[1] for b in bbox_preds] == [36] * 5
    sum(c.mean() for c in cls_scores + bbox_preds).backward()
    _check_backbone_grads(model)


@pytest.mark.parametrize("name", BACKBONES)
def test_mmseg_encoder_decoder_with_uperhead(name):
    pytest.importorskip("mmseg.registry", reason="mmseg is not installed")
    _needs_compiled_mmcv("mmseg")
    model = _build_in_scope("mmseg", _uper_encoder_decoder(name))
    assert isinstance(model.backbone, models.MMBackbone)
    model.init_weights()
    model.train()
    x = torch.randn(2, 3, H, W)
    _check_levels(model.extract_feat(x))
    logits = model(x, mode="tensor")
    assert logits.shape == (2, 5, H // 4, W // 4)
    logits.square().mean().backward()
    _check_backbone_grads(model)
