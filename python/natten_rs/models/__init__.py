"""NAT and DiNAT image classifiers built on ``natten_rs.NeighborhoodAttention2D``.

Constructors ``nat_{mini,tiny,small,base}``, ``dinat_{mini,tiny,small,base,large}``, the Swin-like
``dinat_s_{tiny,small,base,large}`` and the isotropic ``{nat,dinat}_isotropic_{small,base}`` take
``pretrained=False`` (True raises NotImplementedError), ``num_classes`` and any ``NAT`` keyword
argument. When timm imports, they are also registered as timm models, so
``timm.create_model("dinat_tiny", num_classes=10)`` works after ``import natten_rs.models``; when
detectron2, mmdet or mmseg import, the backbones of ``detection`` are registered with them.
"""

from .detection import MMBackbone, register_detectron2, register_mm
from .nat import (
    NAT,
    ConvDownsampler,
    ConvTokenizer,
    DiNAT,
    NATransformerLayer,
    dinat_base,
    dinat_dilations,
    dinat_large,
    dinat_mini,
    dinat_small,
    dinat_tiny,
    nat_base,
    nat_mini,
    nat_small,
    nat_tiny,
    register_timm_models,
)
from .nat import model_names as _hierarchical_names
from .variants import (
    DiNATs,
    IsotropicNAT,
    dinat_isotropic_base,
    dinat_isotropic_small,
    dinat_s_base,
    dinat_s_large,
    dinat_s_small,
    dinat_s_tiny,
    nat_isotropic_base,
    nat_isotropic_small,
)
from .variants import model_names as _variant_names

model_names = tuple(sorted(_hierarchical_names + _variant_names))

__all__ = [
    "NAT",
    "ConvDownsampler",
    "ConvTokenizer",
    "DiNAT",
    "DiNATs",
    "IsotropicNAT",
    "MMBackbone",
    "NATransformerLayer",
    "dinat_base",
    "dinat_dilations",
    "dinat_isotropic_base",
    "dinat_isotropic_small",
    "dinat_large",
    "dinat_mini",
    "dinat_s_base",
    "dinat_s_large",
    "dinat_s_small",
    "dinat_s_tiny",
    "dinat_small",
    "dinat_tiny",
    "model_names",
    "nat_base",
    "nat_isotropic_base",
    "nat_isotropic_small",
    "nat_mini",
    "nat_small",
    "nat_tiny",
    "register_detectron2",
    "register_mm",
    "register_timm_models",
]

register_timm_models()
register_detectron2()
register_mm()
