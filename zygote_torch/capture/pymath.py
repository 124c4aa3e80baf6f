"""Python's ``math`` module on differentiated numbers.

``zt.gradient(lambda x: math.sin(x) * x, 1.0)``: ``f`` sees ``x`` as a 0-d float64 tensor, which
``math.sin`` would convert with ``float()``, cutting it from the tape. While a call with number
arguments is recorded (:func:`intercepting_math`), the ``math`` module's differentiable functions
are replaced by ones that compute on tensors with torch's functions (one recorded call, one rule)
and on plain numbers as ``math`` does, keeping the mark of a number cut from the tape
(:class:`~zygote_torch.capture.cuts.CutFloat`). A function taken from the module beforehand
(``from math import sin``) still converts: the tape sees that cut, and refuses an output that
depends on it, naming the line.
"""
from __future__ import annotations

import functools
import math
import threading

import torch

from .cuts import CutFloat


def _tensors(*args):
    """``args`` as tensors of one dtype and device (that of the first tensor among them)."""
    like = next(a for a in args if isinstance(a, torch.Tensor))
    return [a if isinstance(a, torch.Tensor) else torch.tensor(float(a), dtype=like.dtype, device=like.device)
            for a in args]


def _log(x, base=math.e):
    return torch.log(x) / (torch.log(base) if isinstance(base, torch.Tensor) else math.log(base))


def _hypot(*coordinates):
    if not coordinates:
        return 0.0
    result, *rest = _tensors(*coordinates)
    result = result.abs()
    for c in rest:
        result = torch.hypot(result, c)
    return result


# math function -> its torch counterpart for tensor arguments (the same value and derivative).
TORCH_COUNTERPARTS = {
    "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "asin": torch.asin, "acos": torch.acos,
    "atan": torch.atan, "sinh": torch.sinh, "cosh": torch.cosh, "tanh": torch.tanh, "asinh": torch.asinh,
    "acosh": torch.acosh, "atanh": torch.atanh, "exp": torch.exp, "expm1": torch.expm1, "log1p": torch.log1p,
    "log2": torch.log2, "log10": torch.log10, "sqrt": torch.sqrt, "erf": torch.erf, "erfc": torch.erfc,
    "lgamma": torch.lgamma, "fabs": torch.abs, "degrees": torch.rad2deg, "radians": torch.deg2rad,
    "exp2": torch.exp2, "log": _log, "hypot": _hypot,
    "pow": lambda x, y: torch.pow(*_tensors(x, y)) if not isinstance(y, (int, float)) else torch.pow(x, y),
    "atan2": lambda y, x: torch.atan2(*_tensors(y, x)),
}
TORCH_COUNTERPARTS = {name: fn for name, fn in TORCH_COUNTERPARTS.items() if hasattr(math, name)}


def _differentiable(name: str, original, counterpart):
    @functools.wraps(original)
    def math_function(*args):
        if any(isinstance(a, torch.Tensor) for a in args):
            return counterpart(*args)
        result = original(*args)
        cut = next((a for a in args if type(a) is CutFloat), None)
        return CutFloat(result, cut.origin, cut.tape) if cut is not None and isinstance(result, float) else result
    return math_function


_ORIGINALS = {name: getattr(math, name) for name in TORCH_COUNTERPARTS}
_REPLACEMENTS = {name: _differentiable(name, _ORIGINALS[name], fn) for name, fn in TORCH_COUNTERPARTS.items()}
_lock = threading.Lock()
_depth = 0


class intercepting_math:
    """Context: ``math``'s differentiable functions accept tensors (see the module docs)."""

    def __enter__(self):
        global _depth
        with _lock:
            if _depth == 0:
                for name, fn in _REPLACEMENTS.items():
                    setattr(math, name, fn)
            _depth += 1
        return self

    def __exit__(self, *exc):
        global _depth
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name, fn in _ORIGINALS.items():
                    setattr(math, name, fn)
        return False
