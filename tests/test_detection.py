"""Detection / segmentation backbones (natten_rs.models.detection).

detectron2 is not on the package index, so its registry is stood in for by a minimal module
with the same entry points (``BACKBONE_REGISTRY.register`` / ``get``, ``Backbone`` /
``ShapeSpec``), put in ``sys.modules`` for one test. mmdet's and mmseg's are stood in for the
same way (mmengine's ``MODELS.register_module`` / ``module_dict``), so registration is tested
whether or not they are installed; tests/test_frameworks.py runs the real ones.
"""

from __future__ import annotations

import abc
import sys
import types
from collections import namedtuple

import pytest
import torch
from natten_rs import models
from natten_rs.models import detection
from torch import nn

TINY = {"EMBED_DIM": 16, "DEPTHS": [1, 1, 2, 1], "NUM_HEADS": [1, 2, 2, 4], "KERNEL_SIZE": 3}


class _Registry(dict):
    """Name -> class, with detectron2's and mmengine's registration calls."""

    def register(self, obj):  # detectron2 / fvcore
        assert obj.__name__ not in self, f"{obj.__name__} registered twice"
        self[obj.__name__] = obj
        return obj

    @property
    def module_dict(self):  # mmengine
        return self

    def register_module(self, name=None, module=None, force=False):  # mmengine
        name = name or module.__name__
        if name in self and not force:
            raise KeyError(f"{name} is already registered")
        self[name] = module
        return module


@pytest.fixture
def detectron2(monkeypatch):
    class Backbone(nn.Module, metaclass=abc.ABCMeta):
        @abc.abstractmethod
        def forward(self, x): ...

    modeling = types.ModuleType("detectron2.modeling")
    modeling.BACKBONE_REGISTRY = _Registry()
    modeling.Backbone = Backbone
    modeling.ShapeSpec = namedtuple(
        "ShapeSpec", "channels height width stride", defaults=[None] * 4
    )
    root = types.ModuleType("detectron2")
    root.modeling = modeling
    monkeypatch.setitem(sys.modules, "detectron2", root)
    monkeypatch.setitem(sys.modules, "detectron2.modeling", modeling)
    return modeling


def _cfg(**dinat):
    node = dict(TINY, **dinat)
    return types.SimpleNamespace(MODEL=types.SimpleNamespace(DINAT=node))


def test_detectron2_backbone(detectron2):
    assert models.register_detectron2() is True
    assert models.register_detectron2() is True  # idempotent
    build = detectron2.BACKBONE_REGISTRY["D2DiNAT"]
    cfg = _cfg(DILATIONS=[[1], [1], [1, 2], [1]], OUT_FEATURES=["res3", "res5"])
    backbone = build(cfg, detectron2.ShapeSpec(channels=3))
    assert isinstance(backbone, detectron2.Backbone) and isinstance(backbone, models.NAT)
    assert backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res3": (32, 8),
        "res5": (128, 32),
    }
    out = backbone(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res3", "res5"]
    assert out["res3"].shape == (1, 32, 8, 8) and out["res5"].shape == (1, 128, 2, 2)
    assert backbone.dilations[2] == [1, 2]
    keys = set(backbone.state_dict())
    assert {"norm1.weight", "norm3.weight"} <= keys and "norm0.weight" not in keys


def test_detectron2_rejects_bad_feature_names(detectron2):
    models.register_detectron2()
    build = detectron2.BACKBONE_REGISTRY["D2DiNAT"]
    with pytest.raises(ValueError, match="OUT_FEATURES.*'p3'"):
        build(_cfg(OUT_FEATURES=["p3"]), detectron2.ShapeSpec(channels=3))


def test_without_frameworks_nothing_is_registered(monkeypatch):
    for name in ("detectron2", "detectron2.modeling", "mmdet.registry", "mmseg.registry"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert models.register_detectron2() is False
    assert models.register_mm() == []


@pytest.fixture
def mm_registries(monkeypatch):
    registries = {}
    for package in ("mmdet", "mmseg"):
        module = types.ModuleType(f"{package}.registry")
        module.MODELS = registries[package] = _Registry()
        monkeypatch.setitem(sys.modules, f"{package}.registry", module)
    return registries


def test_mm_backbones(mm_registries):
    assert models.register_mm() == ["mmdet.registry", "mmseg.registry"]
    assert models.register_mm() == ["mmdet.registry", "mmseg.registry"]  # idempotent
    for registry in mm_registries.values():
        assert registry["NAT"] is registry["DiNAT"] is models.MMBackbone
    cls = mm_registries["mmdet"]["DiNAT"]
    backbone = cls(
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 4),
        kernel_size=3,
        dilations=[[1], [1], [1, 2], [1]],
        out_indices=(1, 2, 3),
        init_cfg=None,
    )
    backbone.init_weights()
    feats = backbone(torch.randn(2, 3, 64, 64))
    assert isinstance(feats, tuple)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]


def test_mm_backbone_refuses_what_it_cannot_do():
    with pytest.raises(NotImplementedError, match="pretrained"):
        models.MMBackbone(embed_dim=16, depths=(1, 1), num_heads=(1, 2), pretrained="x.pth")
    with pytest.raises(NotImplementedError, match="frozen_stages"):
        models.MMBackbone(embed_dim=16, depths=(1, 1), num_heads=(1, 2), frozen_stages=1)


def test_d2_kwargs_maps_every_config_key():
    node = dict(TINY, DILATIONS=None, MLP_RATIO=2.0, QKV_BIAS=False, QK_SCALE=0.5, DROP_RATE=0.1)
    node.update(ATTN_DROP_RATE=0.2, DROP_PATH_RATE=0.3, LAYER_SCALE=1e-5)
    kwargs, features = detection.d2_kwargs(node, in_chans=4)
    assert features == ["res2", "res3", "res4", "res5"]
    assert kwargs == {
        "embed_dim": 16,
        "depths": [1, 1, 2, 1],
        "num_heads": [1, 2, 2, 4],
        "kernel_size": 3,
        "dilations": None,
        "mlp_ratio": 2.0,
        "qkv_bias": False,
        "qk_scale": 0.5,
        "drop_rate": 0.1,
        "attn_drop_rate": 0.2,
        "drop_path_rate": 0.3,
        "layer_scale": 1e-5,
        "out_indices": [0, 1, 2, 3],
        "in_chans": 4,
    }
    models.NAT(**kwargs)  # every key is a NAT argument
