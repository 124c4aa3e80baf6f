"""Loading the compiled extension of csrc/ (each op family's module registers its ops' fake kernels).

The build (setup.py) produces ``zygote_torch._C`` (CPU kernels) and, on a CUDA build of torch
with a CUDA toolkit, ``zygote_torch._C_cuda`` (the same CPU kernels plus the CUDA ones). Exactly
one is loaded: the CUDA one when torch is a CUDA build and it imports, else the CPU one. Importing
it runs the ``TORCH_LIBRARY(zygote_torch, m)`` registrations, after which
``torch.ops.zygote_torch.*`` exist. Nothing here ever raises: a missing or broken extension leaves
``LOADED`` all False and the pure-torch implementations take over.

A package without its CPU kernels (a pure-Python wheel: ``pip install .`` with build isolation)
says so once, at import, with a :class:`KernelsNotBuiltWarning` naming how to build them; a
missing CUDA extension says so at the first op on a CUDA tensor (:func:`has_kernels`).
``ZYGOTE_TORCH_NO_EXT=1`` skips loading, and warns of nothing. ``ZYGOTE_TORCH_BUILD=1`` compiles
a missing extension at import (once: ``torch.utils.cpp_extension.load`` caches it; see
``_build.py``).
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

import torch

from . import _build

LOADED = {"cpu": False, "cuda": False}
MODULE: str | None = None
ERRORS: dict = {}
_WARNED: set = set()


class KernelsNotBuiltWarning(UserWarning):
    """The compiled kernels of zygote_torch are missing: the pure-torch implementations run."""


def _use(name: str, module) -> bool:
    """Take the imported extension ``name`` if it registered the ops."""
    global MODULE
    if not hasattr(torch.ops.zygote_torch, "cross_entropy_fwd"):
        ERRORS[name] = "imported, but registered no ops"
        return False
    sys.modules.setdefault(name, module)
    MODULE = name
    LOADED["cpu"] = True
    LOADED["cuda"] = name.endswith("_cuda")
    return True


def _import_built() -> None:
    names = (["zygote_torch._C_cuda"] if torch.version.cuda else []) + ["zygote_torch._C"]
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # ImportError, OSError (missing libcudart, ABI mismatch)
            ERRORS[name] = f"{type(e).__name__}: {e}"
            continue
        if _use(name, module):
            return


def _build_now() -> None:
    """ZYGOTE_TORCH_BUILD=1: compile the missing extension (CUDA too where torch is a CUDA build
    and a toolkit is found; else CPU only)."""
    for cuda in ([True] if torch.version.cuda else []) + [False]:
        kind = "CPU and CUDA" if cuda else "CPU"
        print(f"zygote_torch: ZYGOTE_TORCH_BUILD=1: building the {kind} kernels with torch.utils.cpp_extension "
              "(the CPU ones take about half a minute the first time; later imports load them from its cache)",
              file=sys.stderr, flush=True)
        try:
            name, module = _build.build_at_first_use(cuda=cuda)
        except Exception as e:  # noqa: BLE001  (no compiler, no ninja, no toolkit, a compile error)
            ERRORS[f"build {kind}"] = f"{type(e).__name__}: {e}".splitlines()[0]
            continue
        if _use(name, module):
            return


def _why(names) -> str:
    return "; ".join(f"{k}: {ERRORS[k]}" for k in names if k in ERRORS) or "not built"


def load() -> None:
    if os.environ.get("ZYGOTE_TORCH_NO_EXT") == "1":
        ERRORS["env"] = "ZYGOTE_TORCH_NO_EXT=1"
        return
    _import_built()
    if MODULE is None and os.environ.get("ZYGOTE_TORCH_BUILD") == "1":
        _build_now()
    if MODULE is None:
        _warn_once("cpu", _why(["zygote_torch._C", "build CPU"]), stacklevel=3)


def _warn_once(device: str, why: str, stacklevel: int) -> None:
    if device in _WARNED:
        return
    _WARNED.add(device)
    warnings.warn(f"zygote_torch: the compiled {device.upper()} kernels are not there ({why}), so the "
                  f"pure-torch implementations run (same results, slower); to build them, {_build.HOW_TO_BUILD}",
                  KernelsNotBuiltWarning, stacklevel=stacklevel)


def has_kernels(device: str) -> bool:
    """Whether the compiled kernels for ``device`` ("cpu", "cuda") are loaded; the first "no" for
    a CUDA tensor warns (once), as the import does for the CPU."""
    if LOADED.get(device, False):
        return True
    if device == "cuda" and torch.version.cuda and "env" not in ERRORS:
        _warn_once("cuda", _why(["zygote_torch._C_cuda", "build CPU and CUDA"]), stacklevel=4)
    return False
