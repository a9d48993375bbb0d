"""Hierarchical NAT and DiNAT image classifiers built on ``NeighborhoodAttention2D``.

Written from the papers: "Neighborhood Attention Transformer" (Hassani et al., 2022) and
"Dilated Neighborhood Attention Transformer" (Hassani & Shi, 2022).

Architecture (rank 2, channels-last inside the levels):

* ``patch_embed``: two 3x3 stride-2 convolutions (overall patch size 4) and a LayerNorm.
* four ``levels`` of ``NATransformerLayer`` blocks; between levels a ``ConvDownsampler``
  (3x3 stride-2 convolution, channels doubled, LayerNorm).
* block: ``x + DropPath(NA(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``, optional layer scale.
* final LayerNorm, global average pool, linear head.

DiNAT is the same network with dilated neighborhood attention in every other layer: layer ``j``
of level ``i`` uses dilation 1 when ``j`` is even, else ``max(1, r_i // kernel_size)`` where
``r_i = img_size // (4 * 2**i)`` is the level's feature-map side (``[8, 4, 2, 1]`` at 224 px).

Module / parameter names follow the published NAT/DiNAT checkpoints (``patch_embed.proj.{0,1}``,
``levels.{i}.blocks.{j}.{norm1,attn,norm2,mlp.fc1,mlp.fc2,gamma1,gamma2}``,
``levels.{i}.downsample.{reduction,norm}``, ``norm``, ``head``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..modules import NeighborhoodAttention2D

__all__ = [
    "NAT",
    "ConvDownsampler",
    "ConvTokenizer",
    "DiNAT",
    "FeatureInfo",
    "NATransformerLayer",
    "dinat_base",
    "dinat_dilations",
    "dinat_large",
    "dinat_mini",
    "dinat_small",
    "dinat_tiny",
    "model_names",
    "nat_base",
    "nat_mini",
    "nat_small",
    "nat_tiny",
    "register_timm_models",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ConvTokenizer(nn.Module):
    """``[B, C_in, H, W]`` -> ``[B, H/4, W/4, dim]`` with two 3x3 stride-2 convolutions."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """``[B, H, W, dim]`` -> ``[B, ceil(H/2), ceil(W/2), 2*dim]`` (3x3 stride-2 conv + LN)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.norm(x)


class NATransformerLayer(nn.Module):
    """Pre-norm NA block: ``x + DropPath(NA(LN(x)))``, ``x + DropPath(MLP(LN(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        rel_pos_bias: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention2D(
            dim,
            num_heads,
            kernel_size,
            dilation=dilation,
            rel_pos_bias=rel_pos_bias,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        if layer_scale is not None and layer_scale > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: Tensor) -> Tensor:
        a = self.attn(self.norm1(x))
        if self.gamma1 is not None:
            a = self.gamma1 * a
        x = x + self.drop_path(a)
        m = self.mlp(self.norm2(x))
        if self.gamma2 is not None:
            m = self.gamma2 * m
        return x + self.drop_path(m)


class NATLevel(nn.Module):
    """A stack of ``NATransformerLayer`` blocks, optionally followed by a downsampler."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        kernel_size: int,
        dilations: Sequence[int],
        downsample: nn.Module | None,
        drop_path: Sequence[float],
        **block_kwargs,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            NATransformerLayer(
                dim,
                num_heads,
                kernel_size,
                dilation=dilations[j],
                drop_path=drop_path[j],
                **block_kwargs,
            )
            for j in range(depth)
        )
        self.downsample = downsample

    def forward_pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output of the blocks, input of the next level)``: the first is what a backbone
        returns for this level."""
        for block in self.blocks:
            x = block(x)
        return x, (x if self.downsample is None else self.downsample(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_pair(x)[1]


def build_levels(
    embed_dim: int,
    depths: Sequence[int],
    num_heads,
    kernel_size,
    dilations: Sequence[Sequence[int]] | None,
    drop_path_rate: float,
    downsampler,
    **block_kwargs,
) -> tuple[nn.ModuleList, list[list[int]]]:
    """The levels of a hierarchical model (width doubling per level, drop path rising linearly
    over all layers), each but the last closed by ``downsampler(dim)``; and the checked
    per-layer dilations (``None``: all 1)."""
    depths = list(depths)
    n = len(depths)
    num_heads = _per_level("num_heads", num_heads, n)
    kernel_sizes = _per_level("kernel_size", kernel_size, n)
    dilations = [[1] * d for d in depths] if dilations is None else [list(d) for d in dilations]
    if len(dilations) != n or any(len(d) != k for d, k in zip(dilations, depths, strict=True)):
        raise ValueError(
            f"dilations: expected one list per level with one value per layer "
            f"(depths {depths}), got {dilations}"
        )
    total = sum(depths)
    dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    levels = nn.ModuleList()
    for i, depth in enumerate(depths):
        dim, start = int(embed_dim * 2**i), sum(depths[:i])
        levels.append(
            NATLevel(
                dim,
                depth,
                num_heads[i],
                kernel_sizes[i],
                dilations[i],
                downsample=downsampler(dim) if i < n - 1 else None,
                drop_path=dpr[start : start + depth],
                **block_kwargs,
            )
        )
    return levels, dilations


def _per_level(name: str, value, n: int) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{name}: expected {n} values (one per level), got {len(value)}")
        return list(value)
    return [value] * n


class NAT(nn.Module):
    """Hierarchical Neighborhood Attention Transformer classifier.

    Args:
        embed_dim: channels of level 0 (doubled at every level).
        depths: blocks per level.
        num_heads: heads per level.
        mlp_ratio: MLP hidden width / dim.
        kernel_size: neighborhood size (int or one per level).
        dilations: per-level list of per-layer dilations; ``None`` means 1 everywhere (NAT).
        num_classes: classes of the head; 0 gives an ``nn.Identity`` head (pooled features).
        in_chans: input image channels.
        drop_rate, attn_drop_rate, drop_path_rate: dropout / attention dropout / stochastic depth
            (linearly increasing over all blocks up to ``drop_path_rate``).
        layer_scale: initial layer-scale value, ``None`` to disable.
        qkv_bias, qk_scale, rel_pos_bias: passed to ``NeighborhoodAttention2D``.
        out_indices: build a backbone instead of a classifier: the levels whose features
            ``forward`` returns, each through its own LayerNorm ``norm{i}`` (the layout of
            published NAT/DiNAT detection and segmentation checkpoints); no final ``norm``, no
            head.

    Shapes:
        x: ``[B, in_chans, H, W]`` -> ``[B, num_classes]``; as a backbone, a list with
        ``[B, embed_dim * 2**i, H / 2**(i+2), W / 2**(i+2)]`` per level ``i`` in ``out_indices``.
    """

    def __init__(
        self,
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float = 3.0,
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
        out_indices: Sequence[int] | None = None,
    ):
        super().__init__()
        depths = list(depths)
        n = len(depths)
        if out_indices is not None:
            out_indices = _level_indices(out_indices, n)
            num_classes = 0
        self.out_indices = out_indices
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool: expected 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_levels = n
        self.embed_dim = embed_dim
        self.num_features = int(embed_dim * 2 ** (n - 1))
        self.depths = depths
        self.mlp_ratio = mlp_ratio

        self.patch_embed = ConvTokenizer(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        self.levels, self.dilations = build_levels(
            embed_dim,
            depths,
            num_heads,
            kernel_size,
            dilations,
            drop_path_rate,
            ConvDownsampler,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
            layer_scale=layer_scale,
            rel_pos_bias=rel_pos_bias,
        )
        if out_indices is None:
            self.norm = nn.LayerNorm(self.num_features)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        else:
            for i in out_indices:
                self.add_module(f"norm{i}", nn.LayerNorm(self.level_channels(i)))
        self.apply(self._init_weights)

    def level_channels(self, i: int) -> int:
        """Channels of level ``i``'s features."""
        return int(self.embed_dim * 2**i)

    @property
    def feature_info(self) -> FeatureInfo:
        """Per returned level (backbone): channels, reduction from the input and module name."""
        return FeatureInfo(
            {"num_chs": self.level_channels(i), "reduction": 4 * 2**i, "module": f"levels.{i}"}
            for i in self.out_indices or ()
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"rpb"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool: expected 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> normalised last-level features ``[B, H/32, W/32, num_features]``."""
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward_levels(self, x: Tensor) -> list[Tensor]:
        """Backbone features: ``norm{i}`` of level ``i``'s blocks' output, channels-first, for
        each ``i`` in ``out_indices``."""
        if self.out_indices is None:
            raise RuntimeError(
                "forward_levels: this model is a classifier; build it with out_indices "
                "(or timm's features_only=True) to get per-level features"
            )
        x = self.pos_drop(self.patch_embed(x))
        features = []
        for i, level in enumerate(self.levels):
            out, x = level.forward_pair(x)
            if i in self.out_indices:
                features.append(getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous())
            if i == self.out_indices[-1]:
                break
        return features

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.out_indices is not None:
            return self.forward_levels(x)
        return self.forward_head(self.forward_features(x))


class FeatureInfo(list):
    """One dict per backbone output (``num_chs``, ``reduction``, ``module``), with the
    accessors of timm's ``FeatureInfo`` so that detection and segmentation heads can read it."""

    def get(self, key: str, idx: int | None = None):
        return [info[key] for info in self] if idx is None else self[idx][key]

    def channels(self, idx: int | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | None = None):
        return self.get("module", idx)


def _level_indices(out_indices: Sequence[int], n: int) -> tuple[int, ...]:
    """``out_indices`` as sorted distinct levels in ``0..n`` (negative ones count from the end)."""
    try:
        indices = [int(i) for i in out_indices]
    except TypeError:
        raise ValueError(
            f"out_indices: expected a sequence of level indices, got {out_indices!r}"
        ) from None
    if not indices or any(not -n <= i < n for i in indices):
        raise ValueError(
            f"out_indices: expected level indices in [-{n}, {n}) for {n} levels, "
            f"got {list(out_indices)}"
        )
    resolved = sorted({i % n for i in indices})
    if len(resolved) != len(indices):
        raise ValueError(f"out_indices: expected distinct levels, got {list(out_indices)}")
    return tuple(resolved)


DiNAT = NAT  # DiNAT is NAT with per-layer dilations; kept as a name for readability.


def dinat_dilations(
    depths: Sequence[int], img_size: int = 224, kernel_size=7, patch_size: int = 4
) -> list[list[int]]:
    """DiNAT's per-layer dilations: even layers 1, odd layers the largest dilation ``d`` with
    ``kernel_size * d`` no larger than the level's feature map (``[8, 4, 2, 1]`` at 224 px)."""
    kernels = _per_level("kernel_size", kernel_size, len(depths))
    out = []
    for i, (depth, k) in enumerate(zip(depths, kernels, strict=True)):
        side = img_size // (patch_size * 2**i)
        d = max(1, side // k)
        out.append([1 if j % 2 == 0 else d for j in range(depth)])
    return out


# name -> keyword arguments of NAT, from the papers' tables (ImageNet-1k, 224 px).
_CONFIGS: dict[str, dict] = {
    "nat_mini": {
        "embed_dim": 64,
        "depths": (3, 4, 6, 5),
        "num_heads": (2, 4, 8, 16),
        "mlp_ratio": 3.0,
        "drop_path_rate": 0.2,
    },
    "nat_tiny": {
        "embed_dim": 64,
        "depths": (3, 4, 18, 5),
        "num_heads": (2, 4, 8, 16),
        "mlp_ratio": 3.0,
        "drop_path_rate": 0.2,
    },
    "nat_small": {
        "embed_dim": 96,
        "depths": (3, 4, 18, 5),
        "num_heads": (3, 6, 12, 24),
        "mlp_ratio": 2.0,
        "drop_path_rate": 0.3,
        "layer_scale": 1e-5,
    },
    "nat_base": {
        "embed_dim": 128,
        "depths": (3, 4, 18, 5),
        "num_heads": (4, 8, 16, 32),
        "mlp_ratio": 2.0,
        "drop_path_rate": 0.5,
        "layer_scale": 1e-5,
    },
    "dinat_large": {
        "embed_dim": 192,
        "depths": (3, 4, 18, 5),
        "num_heads": (6, 12, 24, 48),
        "mlp_ratio": 2.0,
        "drop_path_rate": 0.35,
    },
}
for _size in ("mini", "tiny", "small", "base"):
    _CONFIGS[f"dinat_{_size}"] = dict(_CONFIGS[f"nat_{_size}"])

# name -> (model class, config, patch size); ``variants`` adds DiNAT-s and isotropic entries.
_REGISTRY: dict[str, tuple[type[nn.Module], dict, int]] = {
    name: (NAT, cfg, 4) for name, cfg in _CONFIGS.items()
}
_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {}
model_names = tuple(sorted(_CONFIGS))  # this module's; ``natten_rs.models.model_names`` has all

# timm passes these to every entrypoint; they mean nothing without pretrained weights.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _build(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    if pretrained:
        raise NotImplementedError(
            f"{name}: pretrained=True is not supported (natten_rs ships and downloads no "
            f"weights); build with pretrained=False and load a checkpoint with load_state_dict"
        )
    for key in _TIMM_ONLY:
        kwargs.pop(key, None)
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    img_size = kwargs.pop("img_size", 224)
    if isinstance(img_size, Sequence):
        img_size = min(img_size)
    cls, cfg, patch_size = _REGISTRY[name]
    cfg = dict(cfg)
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    if features_only or out_indices is not None:
        if cls is not NAT:
            raise NotImplementedError(
                f"{name}: features_only / out_indices are supported by the hierarchical NAT and "
                f"DiNAT models only"
            )
        levels = len(cfg["depths"] if "depths" not in kwargs else kwargs["depths"])
        kwargs["out_indices"] = tuple(range(levels)) if out_indices is None else out_indices
    cfg.update(kwargs)
    if name.startswith("dinat_") and cfg.get("dilations") is None:
        cfg["dilations"] = dinat_dilations(
            cfg["depths"], img_size, cfg.get("kernel_size", 7), cfg.get("patch_size", patch_size)
        )
    model = cls(**cfg)
    model.pretrained_cfg = model.default_cfg = {
        "architecture": name,
        "num_classes": model.num_classes,
        "input_size": (cfg.get("in_chans", 3), img_size, img_size),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": "patch_embed.proj.0" if cls is NAT else "patch_embed.proj",
        "classifier": "head",
    }
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def _constructor(
    name: str, paper: str | None = None, module: str = __name__
) -> Callable[..., nn.Module]:
    def make(pretrained: bool = False, num_classes: int = 1000, **kwargs) -> nn.Module:
        return _build(name, pretrained, dict(kwargs, num_classes=num_classes))

    make.__name__ = make.__qualname__ = name
    make.__module__ = module  # timm files the entrypoint under this module
    paper = paper or ("DiNAT" if name.startswith("dinat") else "NAT")
    make.__doc__ = (
        f"Build {name} (config from the {paper} paper)."
        "\n\n    ``pretrained=True`` raises NotImplementedError. Keyword arguments override the"
        "\n    config (see the model class); ``img_size`` (default 224) picks DiNAT's dilations."
    )
    _CONSTRUCTORS[name] = make
    return make


nat_mini = _constructor("nat_mini")
nat_tiny = _constructor("nat_tiny")
nat_small = _constructor("nat_small")
nat_base = _constructor("nat_base")
dinat_mini = _constructor("dinat_mini")
dinat_tiny = _constructor("dinat_tiny")
dinat_small = _constructor("dinat_small")
dinat_base = _constructor("dinat_base")
dinat_large = _constructor("dinat_large")


def register_timm_models() -> bool:
    """Register every model with timm's registry when timm imports; returns whether it did.

    Idempotent: names already registered by natten_rs are skipped, and names that timm itself
    ships are never overwritten.
    """
    try:
        from timm.models import is_model, register_model
    except Exception:  # noqa: BLE001 - timm absent or broken: the models work without it
        return False
    for name, fn in sorted(_CONSTRUCTORS.items()):
        if is_model(name):
            continue  # ours already, or timm's own model of that name (never overwritten)
        register_model(fn)
    return True
