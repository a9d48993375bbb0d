"""natten_rs: neighborhood attention for PyTorch with a Rust core, a drop-in for NATTEN."""

from . import functional
from ._core import KernelError

__all__ = ["KernelError", "functional"]
__version__ = "0.1.0"
