"""The dense oracle, importable from tests as ``reference``.

The oracle ships in the package (natten_rs.reference). When the package cannot be imported (its
Rust extension is not built yet), the oracle's file is loaded directly from the source tree: it
depends on torch alone, and the oracle's own tests must not wait for the kernels.
"""

import importlib.util
import pathlib
import sys

try:
    from natten_rs import reference as _oracle
except ImportError:
    _path = pathlib.Path(__file__).resolve().parents[1] / "python" / "natten_rs" / "reference.py"
    _spec = importlib.util.spec_from_file_location("natten_rs_reference_source", _path)
    _oracle = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _oracle
    _spec.loader.exec_module(_oracle)

attention = _oracle.attention
av = _oracle.av
axis_keys = _oracle.axis_keys
axis_slots = _oracle.axis_slots
na = _oracle.na
neighborhood_mask = _oracle.neighborhood_mask
qk = _oracle.qk
rpb_bias = _oracle.rpb_bias
slot_index = _oracle.slot_index

__all__ = list(_oracle.__all__)
