"""natten_rs under NATTEN's module paths: the ``natten`` name.

``install()`` builds the ``natten`` module tree at run time in ``sys.modules`` (for users who
cannot install the ``natten`` distribution shipped in this repository's ``compat/natten``) and
registers a metadata entry so that ``importlib.metadata.version("natten")`` answers
``NATTEN_VERSION``. It never shadows a real NATTEN: if one is imported or importable, it does
nothing and returns False.

The ``natten`` distribution builds the same tree from ``populate`` (one source of truth).

Module tree (NATTEN 0.14 - 0.21 paths):
  * ``natten``: the context / capability functions, ``NeighborhoodAttention1D/2D/3D``,
    ``na1d/na2d/na3d``, ``attention``, ``merge_attentions``, NATTEN 0.20+'s backend config
    queries, ``HAS_LIBNATTEN``, ``__version__``
  * ``natten.functional``: every op under NATTEN's names; ``na1d/na2d/na3d`` take NATTEN
    0.17.5's positional order ``(q, k, v, kernel_size, dilation, is_causal, rpb, scale,
    additional_keys, additional_values, xformers_kwargs)``, and 0.20+'s ``stride``,
    ``return_lse``, ``backend`` and tuning arguments by keyword
  * ``natten.context``, ``natten.utils`` (+ ``.log``, ``.misc``), ``natten.backends``,
    ``natten.version``
  * ``natten.natten1d/2d/3d`` (0.14 - 0.16), ``natten.na1d/na2d/na3d`` (0.17; these modules
    are also callable as 0.20+'s ``natten.na1d(...)`` functions), ``natten.modules`` (0.20+)
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import pathlib
import sys
import types

import natten_rs
from natten_rs import context as _context
from natten_rs import functional as _functional
from natten_rs.modules import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)

__all__ = ["NATTEN_VERSION", "install", "is_installed", "populate"]

NATTEN_VERSION = "0.17.5"
_MARKER = "__natten_rs_compat__"
_ROOT = "natten"
_MODULES = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}


class _CallableModule(types.ModuleType):
    """A module that is also a function: NATTEN 0.17's ``natten.na2d`` module (holding
    ``NeighborhoodAttention2D``) and NATTEN 0.20+'s ``natten.na2d(...)`` op share one name."""

    def __call__(self, *args, **kwargs):
        return self.__natten_call__(*args, **kwargs)


def _fused_0175(rank: int):
    fused = getattr(natten_rs, f"na{rank}d")

    def na(
        query,
        key,
        value,
        kernel_size,
        dilation=1,
        is_causal=False,
        rpb=None,
        scale=None,
        additional_keys=None,
        additional_values=None,
        xformers_kwargs=None,
        *,
        stride=1,
        return_lse=False,
        backend=None,
        **tuning,
    ):
        # xformers_kwargs tuned NATTEN 0.17's dense attention over additional keys: ignored.
        return fused(
            query,
            key,
            value,
            kernel_size,
            stride=stride,
            dilation=dilation,
            is_causal=is_causal,
            scale=scale,
            additional_keys=additional_keys,
            additional_values=additional_values,
            rpb=rpb,
            return_lse=return_lse,
            backend=backend,
            **tuning,
        )

    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = (
        f"``natten_rs.na{rank}d`` with NATTEN 0.17.5's positional order (query, key, value, "
        "kernel_size, dilation, is_causal, rpb, scale, additional_keys, additional_values, "
        "xformers_kwargs); stride, return_lse, backend and tuning arguments by keyword."
    )
    return na


def _no_configs(backend: str):
    def get_configs(*args, **kwargs) -> list:
        return []

    get_configs.__doc__ = f"NATTEN's {backend} backend does not exist in natten_rs: no configs."
    return get_configs


_BACKEND_QUERIES = {
    f"get_{bwd}configs_for_{backend}": backend
    for bwd in ("", "bwd_")
    for backend in (
        "cutlass_fmha",
        "cutlass_fna",
        "cutlass_hopper_fmha",
        "cutlass_hopper_fna",
        "cutlass_blackwell_fmha",
        "cutlass_blackwell_fna",
        "flex_fmha",
        "flex_fna",
    )
}


def _module(name: str, attrs: dict, *, package: bool = False, cls=types.ModuleType):
    module = cls(name, f"natten_rs's stand-in for NATTEN's ``{name}`` (see natten_rs.compat).")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
        module.__spec__.submodule_search_locations = []
    module.__package__ = name if package else name.rpartition(".")[0]
    setattr(module, _MARKER, True)
    module.__dict__.update(attrs)
    module.__all__ = sorted(k for k in attrs if not k.startswith("_"))
    return module


def _build(root: str) -> dict[str, types.ModuleType]:
    """The submodules of the ``natten`` tree (root excluded), by full name."""
    context = {name: getattr(_context, name) for name in _context.__all__}
    functional = {name: getattr(_functional, name) for name in _functional.__all__}
    functional.update({f"na{r}d": _fused_0175(r) for r in (1, 2, 3)})
    # NATTEN 0.15 - 0.16 kept the capability functions in natten.functional.
    functional.update(context)
    modules = {cls.__name__: cls for cls in _MODULES.values()}
    backends = {name: _no_configs(backend) for name, backend in _BACKEND_QUERIES.items()}

    log = _module(f"{root}.utils.log", {"get_logger": logging.getLogger})
    misc = _module(f"{root}.utils.misc", {"get_device_cc": _context.get_device_cc})
    tree = {
        "functional": _module(f"{root}.functional", functional),
        "context": _module(f"{root}.context", context),
        "utils": _module(
            f"{root}.utils",
            {"get_device_cc": _context.get_device_cc, "log": log, "misc": misc},
            package=True,
        ),
        "utils.log": log,
        "utils.misc": misc,
        "backends": _module(f"{root}.backends", backends),
        "modules": _module(f"{root}.modules", modules),
        "version": _module(f"{root}.version", {"__version__": NATTEN_VERSION}),
    }
    for rank, cls in _MODULES.items():
        tree[f"natten{rank}d"] = _module(f"{root}.natten{rank}d", {cls.__name__: cls})
        na = _module(f"{root}.na{rank}d", {cls.__name__: cls}, cls=_CallableModule)
        na.__natten_call__ = getattr(natten_rs, f"na{rank}d")
        tree[f"na{rank}d"] = na
    return {f"{root}.{key}": module for key, module in tree.items()}


def populate(namespace: dict, root: str = _ROOT) -> None:
    """Fill the ``natten`` package's namespace (its ``globals()``) and put its submodules in
    ``sys.modules``. Used by ``install`` and by the ``natten`` distribution's ``__init__``."""
    tree = _build(root)
    namespace.update({name: getattr(_context, name) for name in _context.__all__})
    namespace.update({cls.__name__: cls for cls in _MODULES.values()})
    namespace.update(
        attention=_functional.attention,
        merge_attentions=_functional.merge_attentions,
        __version__=NATTEN_VERSION,
        **{name: getattr(tree[f"{root}.backends"], name) for name in _BACKEND_QUERIES},
    )
    namespace[_MARKER] = True
    for full, module in tree.items():
        sys.modules[full] = module
        if full.count(".") == 1:
            namespace[full.rpartition(".")[2]] = module
    namespace["__all__"] = sorted(
        k for k in namespace if not k.startswith("_") and k not in ("utils", "version")
    )


# ---------------------------------------------------------------------------------------------
# importlib.metadata entry for the run-time tree
# ---------------------------------------------------------------------------------------------


class _Distribution(importlib.metadata.Distribution):
    _METADATA = (
        "Metadata-Version: 2.1\n"
        f"Name: {_ROOT}\n"
        f"Version: {NATTEN_VERSION}\n"
        "Summary: natten_rs under NATTEN's module paths (natten_rs.compat.install())\n"
        "Requires-Dist: natten_rs\n"
    )

    def read_text(self, filename):
        if filename == "top_level.txt":
            return f"{_ROOT}\n"
        return self._METADATA if filename in ("METADATA", "PKG-INFO") else None

    def locate_file(self, path):
        return pathlib.Path(natten_rs.__file__).parent / "compat" / path


class _DistributionFinder(importlib.metadata.DistributionFinder):
    """Answers metadata queries for ``natten`` (finds no modules)."""

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)
        if name is None or name.lower().replace("_", "-") == _ROOT:
            return iter([_Distribution()])
        return iter(())


def is_installed() -> bool:
    """Whether ``natten`` currently names natten_rs's stand-in (run-time or distribution)."""
    return getattr(sys.modules.get(_ROOT), _MARKER, False) is True


def _is_ours(spec) -> bool:
    """Whether a found ``natten`` package is the ``natten`` distribution from this repo."""
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith("__init__.py"):
        return False
    try:
        return "natten_rs.compat" in pathlib.Path(origin).read_text(encoding="utf-8")
    except OSError:
        return False


def install() -> bool:
    """Make ``import natten`` (and its submodules, and ``importlib.metadata.version("natten")``)
    resolve to natten_rs. Idempotent. Returns True when ``natten`` names natten_rs afterwards,
    False (changing nothing) when a real NATTEN is imported or importable."""
    if _ROOT in sys.modules:
        return is_installed()
    spec = importlib.util.find_spec(_ROOT)
    if spec is not None:
        if not _is_ours(spec):
            return False
        importlib.import_module(_ROOT)  # the natten distribution from this repo
        return is_installed()
    root = _module(_ROOT, {}, package=True)
    populate(root.__dict__)
    sys.modules[_ROOT] = root
    if not any(isinstance(f, _DistributionFinder) for f in sys.meta_path):
        sys.meta_path.append(_DistributionFinder())
    return True
