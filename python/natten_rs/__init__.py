"""natten_rs: neighborhood attention for PyTorch with a Rust core, a drop-in for NATTEN."""

from . import context, functional
from ._core import KernelError
from ._cuda import precompile
from .context import *  # NATTEN's context and capability functions
from .functional import attention, merge_attentions, na1d, na2d, na3d
from .modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

__all__ = [
    "KernelError",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "attention",
    "context",
    "functional",
    "merge_attentions",
    "na1d",
    "na2d",
    "na3d",
    "precompile",
]
__all__ += context.__all__
__version__ = "0.1.0"
