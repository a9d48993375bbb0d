"""natten_rs: neighborhood attention for PyTorch with a Rust core, a drop-in for NATTEN."""

import os

from . import _core, context, functional
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


def _cap_cpu_isa_from_environment() -> None:
    """``NATTEN_RS_CPU_ISA=avx2`` (or ``portable``) keeps the CPU kernels below the best tier
    the CPU has, for machines where that tier does not pay."""
    name = os.environ.get("NATTEN_RS_CPU_ISA")
    if name is None:
        return
    try:
        _core.set_cpu_isa(name.strip().lower())
    except ValueError as e:
        raise ValueError(str(e).replace("isa:", "NATTEN_RS_CPU_ISA:", 1)) from None


_cap_cpu_isa_from_environment()
