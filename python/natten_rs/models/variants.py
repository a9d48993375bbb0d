"""DiNAT-s (Swin-like) and isotropic (ViT-like) NAT / DiNAT variants from the DiNAT paper.

* ``dinat_s_{tiny,small,base,large}``: Swin's macro-architecture (non-overlapping 4x4 patch
  embedding, patch merging with a linear reduction, MLP ratio 4, Swin-T/S/B/L depths, widths and
  heads) with every window attention replaced by neighborhood attention (kernel 7), dilated in
  every other layer as in DiNAT.
* ``{nat,dinat}_isotropic_{small,base}``: a single-resolution stack on 16x16 patches with ViT-S
  and ViT-B widths, depths and heads (no class token; global average pooling); the DiNAT one
  alternates dilation 1 and 2 (14x14 tokens at 224 px).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .nat import _REGISTRY, NAT, _constructor, build_levels

__all__ = [
    "DiNATs",
    "IsotropicNAT",
    "PatchEmbed",
    "PatchMerging",
    "dinat_isotropic_base",
    "dinat_isotropic_small",
    "dinat_s_base",
    "dinat_s_large",
    "dinat_s_small",
    "dinat_s_tiny",
    "nat_isotropic_base",
    "nat_isotropic_small",
]


class PatchEmbed(nn.Module):
    """``[B, C_in, H, W]`` -> ``[B, H/p, W/p, dim]``: non-overlapping ``p x p`` conv + LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin's downsampler: ``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), 2C]`` (2x2 concat,
    LayerNorm, bias-free linear)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = [x[:, i::2, j::2] for j in (0, 1) for i in (0, 1)]
        return self.reduction(self.norm(torch.cat(x, dim=-1)))


class _Classifier(nn.Module):
    """Shared head logic: final LayerNorm, average pool, linear head, timm helpers."""

    num_features: int
    out_indices = None  # classifiers only: no backbone mode

    def _make_head(self, num_classes: int, global_pool: str) -> None:
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool: expected 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    no_weight_decay_keywords = NAT.no_weight_decay_keywords
    get_classifier = NAT.get_classifier
    reset_classifier = NAT.reset_classifier
    forward_head = NAT.forward_head
    forward = NAT.forward
    _init_weights = staticmethod(NAT._init_weights)


class DiNATs(_Classifier):
    """Swin-like hierarchical (Di)NAT: ``PatchEmbed`` (p=4), levels of NA blocks separated by
    ``PatchMerging``; arguments as ``NAT`` (``mlp_ratio`` defaults to Swin's 4)."""

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratio: float = 4.0,
        kernel_size=7,
        dilations: Sequence[Sequence[int]] | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        layer_scale: float | None = None,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        rel_pos_bias: bool = True,
        global_pool: str = "avg",
    ):
        super().__init__()
        depths = list(depths)
        n = len(depths)
        self.embed_dim, self.depths, self.mlp_ratio = embed_dim, depths, mlp_ratio
        self.num_levels = n
        self.num_features = int(embed_dim * 2 ** (n - 1))
        self.patch_embed = PatchEmbed(in_chans, embed_dim, 4)
        self.pos_drop = nn.Dropout(drop_rate)
        self.levels, self.dilations = build_levels(
            embed_dim,
            depths,
            num_heads,
            kernel_size,
            dilations,
            drop_path_rate,
            PatchMerging,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
            layer_scale=layer_scale,
            rel_pos_bias=rel_pos_bias,
        )
        self._make_head(num_classes, global_pool)
        self.apply(self._init_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        return self.norm(x)


class IsotropicNAT(_Classifier):
    """Isotropic (ViT-like) (Di)NAT: ``PatchEmbed`` (p=16) and ``depth`` NA blocks at one
    resolution; ``dilations`` is one value per layer (``None``: all 1)."""

    def __init__(
        self,
        embed_dim: int = 384,
        depths: Sequence[int] = (12,),
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        kernel_size=7,
        dilations: Sequence[Sequence[int]] | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        patch_size: int = 16,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        layer_scale: float | None = None,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        rel_pos_bias: bool = True,
        global_pool: str = "avg",
    ):
        super().__init__()
        depths = list(depths)
        if len(depths) != 1:
            raise ValueError(f"depths: an isotropic model has one level, got {depths}")
        (depth,) = depths
        dilations = [[1] * depth] if dilations is None else [list(d) for d in dilations]
        if len(dilations) != 1 or len(dilations[0]) != depth:
            raise ValueError(f"dilations: expected [[one value per layer]], got {dilations}")
        if isinstance(num_heads, Sequence):
            (num_heads,) = num_heads
        self.embed_dim, self.depths, self.dilations, self.mlp_ratio = (
            embed_dim, depths, dilations, mlp_ratio,
        )  # fmt: skip
        self.num_levels = 1
        self.num_features = embed_dim
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        # One level, so no downsampler is ever made.
        self.levels, _ = build_levels(
            embed_dim,
            depths,
            num_heads,
            kernel_size,
            dilations,
            drop_path_rate,
            None,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
            layer_scale=layer_scale,
            rel_pos_bias=rel_pos_bias,
        )
        self._make_head(num_classes, global_pool)
        self.apply(self._init_weights)

    forward_features = DiNATs.forward_features


_SWIN = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
    "small": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)},
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
    "large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)},
}
_SWIN_DROP_PATH = {"tiny": 0.2, "small": 0.3, "base": 0.5, "large": 0.2}
for _size, _cfg in _SWIN.items():
    _REGISTRY[f"dinat_s_{_size}"] = (
        DiNATs,
        {**_cfg, "mlp_ratio": 4.0, "drop_path_rate": _SWIN_DROP_PATH[_size]},
        4,
    )
_VIT = {
    "small": {"embed_dim": 384, "depths": (12,), "num_heads": 6, "drop_path_rate": 0.1},
    "base": {"embed_dim": 768, "depths": (12,), "num_heads": 12, "drop_path_rate": 0.1},
}
for _size, _cfg in _VIT.items():
    for _kind in ("nat", "dinat"):
        _REGISTRY[f"{_kind}_isotropic_{_size}"] = (IsotropicNAT, dict(_cfg), 16)

model_names = tuple(sorted(n for n in _REGISTRY if "_s_" in n or "isotropic" in n))

dinat_s_tiny = _constructor("dinat_s_tiny", "DiNAT (DiNAT-s)", __name__)
dinat_s_small = _constructor("dinat_s_small", "DiNAT (DiNAT-s)", __name__)
dinat_s_base = _constructor("dinat_s_base", "DiNAT (DiNAT-s)", __name__)
dinat_s_large = _constructor("dinat_s_large", "DiNAT (DiNAT-s)", __name__)
nat_isotropic_small = _constructor("nat_isotropic_small", "DiNAT (isotropic)", __name__)
nat_isotropic_base = _constructor("nat_isotropic_base", "DiNAT (isotropic)", __name__)
dinat_isotropic_small = _constructor("dinat_isotropic_small", "DiNAT (isotropic)", __name__)
dinat_isotropic_base = _constructor("dinat_isotropic_base", "DiNAT (isotropic)", __name__)
