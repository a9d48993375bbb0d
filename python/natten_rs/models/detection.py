"""NAT / DiNAT backbones for detection and segmentation frameworks, registered when they import.

* detectron2 (Mask2Former and friends): ``D2DiNAT`` in ``BACKBONE_REGISTRY``, built from
  ``cfg.MODEL.DINAT`` (``EMBED_DIM``, ``DEPTHS``, ``NUM_HEADS``, ``KERNEL_SIZE``, ``DILATIONS``,
  ``MLP_RATIO``, ``QKV_BIAS``, ``QK_SCALE``, ``DROP_RATE``, ``ATTN_DROP_RATE``,
  ``DROP_PATH_RATE``, ``OUT_FEATURES``), the keys published DiNAT configs set; it returns
  ``{"res2": ..., "res5": ...}`` and answers ``output_shape()``.
* mmdet / mmseg (mmengine registries): ``NAT`` and ``DiNAT`` in their ``MODELS`` registries,
  taking ``NAT``'s keyword arguments (``out_indices`` included) and returning a tuple of
  feature maps.

Both are ``NAT`` backbones (``out_indices``), so parameter names match published detection and
segmentation checkpoints (``levels.*``, ``norm{i}``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from torch import Tensor

from .nat import NAT

__all__ = ["MMBackbone", "register_detectron2", "register_mm"]

# cfg.MODEL.DINAT key -> NAT keyword.
_D2_KEYS = {
    "EMBED_DIM": "embed_dim",
    "DEPTHS": "depths",
    "NUM_HEADS": "num_heads",
    "KERNEL_SIZE": "kernel_size",
    "DILATIONS": "dilations",
    "MLP_RATIO": "mlp_ratio",
    "QKV_BIAS": "qkv_bias",
    "QK_SCALE": "qk_scale",
    "DROP_RATE": "drop_rate",
    "ATTN_DROP_RATE": "attn_drop_rate",
    "DROP_PATH_RATE": "drop_path_rate",
    "LAYER_SCALE": "layer_scale",
}


def _level_of(feature: str) -> int:
    """``"res2"`` -> level 0, ..., ``"res5"`` -> level 3."""
    if not (feature.startswith("res") and feature[3:].isdigit() and int(feature[3:]) >= 2):
        raise ValueError(f"OUT_FEATURES: expected names res2, res3, ..., got {feature!r}")
    return int(feature[3:]) - 2


def d2_kwargs(node, in_chans: int) -> tuple[dict, list[str]]:
    """``NAT`` keyword arguments from a ``cfg.MODEL.DINAT`` node, and the output names."""
    kwargs = {name: node[key] for key, name in _D2_KEYS.items() if key in node}
    default = ["res2", "res3", "res4", "res5"]
    features = list(node["OUT_FEATURES"]) if "OUT_FEATURES" in node else default
    kwargs["out_indices"] = [_level_of(f) for f in features]
    kwargs["in_chans"] = in_chans
    return kwargs, features


def register_detectron2() -> bool:
    """Register ``D2DiNAT`` with detectron2's backbone registry; returns whether it could."""
    try:
        from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
    except Exception:  # noqa: BLE001 - detectron2 absent or broken: nothing to register
        return False
    if "D2DiNAT" in BACKBONE_REGISTRY:
        return True

    class D2DiNAT(NAT, Backbone):
        """A NAT / DiNAT backbone built from ``cfg.MODEL.DINAT``."""

        def __init__(self, cfg, input_shape):
            kwargs, features = d2_kwargs(cfg.MODEL.DINAT, input_shape.channels)
            super().__init__(**kwargs)
            by_level = {_level_of(f): f for f in features}
            self._out_features = [by_level[i] for i in self.out_indices]
            self._out_feature_channels = {
                by_level[i]: self.level_channels(i) for i in self.out_indices
            }
            self._out_feature_strides = {by_level[i]: 4 * 2**i for i in self.out_indices}

        def forward(self, x: Tensor) -> dict:
            return dict(zip(self._out_features, self.forward_levels(x), strict=True))

        def output_shape(self) -> dict:
            return {
                name: ShapeSpec(
                    channels=self._out_feature_channels[name],
                    stride=self._out_feature_strides[name],
                )
                for name in self._out_features
            }

        @property
        def size_divisibility(self) -> int:
            return 32

    BACKBONE_REGISTRY.register(D2DiNAT)
    return True


class MMBackbone(NAT):
    """``NAT`` as an mmdet / mmseg backbone: a tuple of feature maps, all levels by default.

    ``init_cfg`` is applied by ``init_weights`` through mmengine, as ``BaseModule`` applies it
    (``dict(type="Pretrained", checkpoint=..., prefix="backbone.")`` loads a checkpoint, other
    initialisers re-initialise layers); ``pretrained`` (the older hook) is refused: natten_rs
    ships no weights, so a checkpoint is loaded through ``init_cfg``, the framework's
    ``load_from`` or ``load_state_dict``.
    """

    def __init__(self, out_indices: Sequence[int] = (0, 1, 2, 3), init_cfg=None, **kwargs):
        pretrained = kwargs.pop("pretrained", None)
        if pretrained is not None:
            raise NotImplementedError(
                f"pretrained: natten_rs backbones load no weights themselves (got "
                f"{pretrained!r}); set load_from in the config, or call load_state_dict"
            )
        frozen_stages = kwargs.pop("frozen_stages", -1)
        if frozen_stages != -1:
            raise NotImplementedError(
                f"frozen_stages: only -1 (nothing frozen) is supported, got {frozen_stages}; "
                f"freeze parameters with requires_grad_(False) instead"
            )
        super().__init__(out_indices=out_indices, **kwargs)
        self.init_cfg = init_cfg

    def forward(self, x: Tensor) -> tuple:
        return tuple(self.forward_levels(x))

    def init_weights(self) -> None:
        """mmengine's initialisation hook (a detector's ``init_weights`` calls it): weights are
        initialised at construction, then ``init_cfg`` is applied, a ``Pretrained`` checkpoint
        last, as ``BaseModule.init_weights`` orders them."""
        if not self.init_cfg:
            return
        from mmengine.model import PretrainedInit, initialize

        cfgs = [self.init_cfg] if isinstance(self.init_cfg, dict) else list(self.init_cfg)
        initialize(self, sorted(cfgs, key=lambda c: c["type"] in ("Pretrained", PretrainedInit)))


def _registry(module: str):
    """``module.MODELS``, or None where the framework is absent or does not import."""
    try:
        return importlib.import_module(module).MODELS
    except Exception:  # noqa: BLE001 - absent or broken: nothing to register with
        return None


def register_mm() -> list[str]:
    """Register ``NAT`` and ``DiNAT`` with every mmengine ``MODELS`` registry that imports
    (``mmdet.registry``, ``mmseg.registry``); returns the registries' modules."""
    registered = []
    for module in ("mmdet.registry", "mmseg.registry"):
        models = _registry(module)
        if models is None:
            continue
        for name in ("NAT", "DiNAT"):
            # module_dict, not get() or `in`: those first import the framework's models
            # package (mmdet.models), which raises where mmcv lacks its compiled ops (mmcv-lite).
            if name not in models.module_dict:
                models.register_module(name=name, module=MMBackbone)
        registered.append(module)
    return registered
