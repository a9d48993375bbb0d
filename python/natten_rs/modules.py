"""``torch.nn`` modules for 1-D, 2-D and 3-D neighborhood attention, drop-ins for NATTEN's.

``NeighborhoodAttention{1,2,3}D`` take channels-last input ``x`` ``[B, *spatial, C]`` (``spatial``
is ``L``, ``H, W`` or ``T, H, W``) and return a tensor of the same shape. Parameter names, shapes
and the qkv channel order ``[3][heads][head_dim]`` are NATTEN's, so published NAT/DiNAT
checkpoints load with ``strict=True``:

* ``qkv.weight`` ``[3 * dim, dim]`` (+ ``qkv.bias`` ``[3 * dim]`` with ``qkv_bias``)
* ``proj.weight`` ``[dim, dim]``, ``proj.bias`` ``[dim]``
* ``rpb`` ``[num_heads, 2*K0-1 (, 2*K1-1 (, 2*K2-1))]`` only with ``rel_pos_bias``
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import context
from . import functional as _na
from ._forms import per_axis

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


def _positive(name: str, values: list) -> tuple:
    if any(v < 1 for v in values):
        raise ValueError(f"{name}: expected positive values, got {tuple(values)!r}")
    return tuple(values)


# Devices the fused op has kernels for; elsewhere modules compose the unfused ops.
_FUSED_DEVICES = ("cpu", "cuda")


class _NeighborhoodAttention(nn.Module):
    """Rank-generic neighborhood attention module; subclasses fix ``rank``.

    Args:
        dim: channels ``C`` of the input and output; must be divisible by ``num_heads``.
        num_heads: attention heads; ``head_dim = dim // num_heads``.
        kernel_size: neighborhood size, an int (every axis) or one int per axis.
        dilation: dilation, an int or one int per axis.
        is_causal: causal masking, a bool or one bool per axis.
        rel_pos_bias: learn a relative positional bias ``rpb`` (odd kernel sizes, stride 1).
        qkv_bias: give the ``qkv`` projection a bias.
        qk_scale: logit scale; ``None`` (or 0) means ``head_dim ** -0.5``.
        attn_drop: dropout probability on the attention weights.
        proj_drop: dropout probability on the output projection.
        stride: query stride, an int or one int per axis (fused path only, no ``rpb``).
        bias: NATTEN 0.14's name for ``rel_pos_bias``; when given it wins.

    Shapes:
        x: ``[B, *spatial, dim]`` -> ``[B, *spatial, dim]``.
    """

    rank: int = 0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size,
        dilation=1,
        is_causal=False,
        rel_pos_bias: bool = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        stride=1,
        bias: bool | None = None,
    ):
        super().__init__()
        rank = self.rank
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}: expected an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if dim % num_heads != 0:
            raise ValueError(
                f"dim: expected a multiple of num_heads ({num_heads}), got {dim} "
                f"(dim % num_heads = {dim % num_heads})"
            )
        if bias is not None:
            rel_pos_bias = bias
        self.kernel_size = _positive("kernel_size", per_axis("kernel_size", kernel_size, rank, int))
        self.dilation = _positive(
            "dilation", per_axis("dilation", 1 if dilation is None else dilation, rank, int)
        )
        self.stride = _positive(
            "stride", per_axis("stride", 1 if stride is None else stride, rank, int)
        )
        self.is_causal = tuple(
            per_axis("is_causal", False if is_causal is None else is_causal, rank, bool)
        )
        if rel_pos_bias and any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(
                f"kernel_size: rel_pos_bias needs odd kernel sizes, got {self.kernel_size!r}"
            )

        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias:
            shape = (num_heads, *(2 * k - 1 for k in self.kernel_size))
            self.rpb = nn.Parameter(torch.zeros(shape))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _use_fused(self, device: torch.device | None = None) -> bool:
        """The fused op serves (rpb included: it takes the bias and its gradient) unless active
        attention dropout needs the unfused qk/softmax/av composition, ``use_fused_na(False)``
        asked for it, or ``device`` has no fused kernels. Strided modules always take
        the fused op, which alone supports stride; causal masking and even kernels are fused-op
        features too."""
        if any(s != 1 for s in self.stride):
            return True
        dropout = self.training and self.attn_drop.p > 0
        no_kernels = device is not None and device.type not in _FUSED_DEVICES
        return not (dropout or no_kernels or context.fused_na_refused())

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, *spatial, dim]`` -> ``[B, *spatial, dim]``."""
        device = x.device if isinstance(x, Tensor) else None
        return self._forward(x, fused=self._use_fused(device))

    def _forward(self, x: Tensor, fused: bool) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
        if x.dim() != self.rank + 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x: expected shape [B, {self.rank} spatial axes, {self.dim}], got {list(x.shape)}"
            )
        spatial = tuple(x.shape[1:-1])
        # NATTEN 0.14: axes shorter than the window are zero-padded at the end, then cropped.
        padded = tuple(
            max(n, k * d) for n, k, d in zip(spatial, self.kernel_size, self.dilation, strict=True)
        )
        if padded != spatial:
            pad = [0, 0]  # channels
            for n, p in reversed(list(zip(spatial, padded, strict=True))):
                pad += [0, p - n]
            x = F.pad(x, pad)
        batch = x.shape[0]
        qkv = self.qkv(x).reshape(batch, *padded, 3, self.num_heads, self.head_dim)
        if fused:
            out = self._attend_fused(qkv)
        else:
            out = self._attend_unfused(qkv)
        out = out.reshape(batch, *padded, self.dim)
        if padded != spatial:
            out = out[(slice(None), *(slice(0, n) for n in spatial))]
        return self.proj_drop(self.proj(out))

    def _attend_fused(self, qkv: Tensor) -> Tensor:
        """qkv ``[B, *spatial, 3, heads, head_dim]`` -> ``[B, *spatial, heads, head_dim]``."""
        fused = (_na.na1d, _na.na2d, _na.na3d)[self.rank - 1]
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        return fused(
            q,
            k,
            v,
            self.kernel_size,
            stride=self.stride,
            dilation=self.dilation,
            is_causal=self.is_causal,
            scale=self.scale,
            rpb=self._rpb(q.dtype),
        )

    def _attend_unfused(self, qkv: Tensor) -> Tensor:
        """qkv ``[B, *spatial, 3, heads, head_dim]`` -> ``[B, *spatial, heads, head_dim]``."""
        qk_op = (_na.na1d_qk, _na.na2d_qk, _na.na3d_qk)[self.rank - 1]
        av_op = (_na.na1d_av, _na.na2d_av, _na.na3d_av)[self.rank - 1]
        # Heads-first views [B, heads, *spatial, head_dim] of the projection; no copies.
        q, k, v = (qkv[..., i, :, :].movedim(-2, 1) for i in range(3))
        q = q * self.scale
        rpb = self._rpb(q.dtype)
        attn = qk_op(q, k, self.kernel_size, self.dilation, is_causal=self.is_causal, rpb=rpb)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = av_op(attn, v, self.kernel_size, self.dilation, is_causal=self.is_causal)
        return out.movedim(1, -2)

    def _rpb(self, dtype: torch.dtype) -> Tensor | None:
        # Under autocast the projections run in half precision while rpb stays float32; the
        # ops take one dtype, so the bias follows the queries (a differentiable cast).
        return None if self.rpb is None else self.rpb.to(dtype)

    def extra_repr(self) -> str:
        text = (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
            f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"is_causal={self.is_causal}, rel_pos_bias={self.rpb is not None}"
        )
        if any(s != 1 for s in self.stride):
            text += f", stride={self.stride}"
        return text


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention: ``x`` ``[B, L, dim]`` -> ``[B, L, dim]``.

    See ``_NeighborhoodAttention`` for the arguments; ``rpb`` is ``[num_heads, 2*K-1]``.
    """

    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention: ``x`` ``[B, H, W, dim]`` -> ``[B, H, W, dim]``.

    See ``_NeighborhoodAttention`` for the arguments; ``rpb`` is ``[num_heads, 2*K0-1, 2*K1-1]``.
    """

    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention: ``x`` ``[B, T, H, W, dim]`` -> ``[B, T, H, W, dim]``.

    See ``_NeighborhoodAttention`` for the arguments; ``rpb`` is
    ``[num_heads, 2*K0-1, 2*K1-1, 2*K2-1]``.
    """

    rank = 3
