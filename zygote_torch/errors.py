"""Errors that name the op and the user's line."""
from __future__ import annotations

import functools
import linecache
import os
import sys

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(sys.modules["torch"].__file__)) if "torch" in sys.modules else None


class ZygoteError(Exception):
    """Base class of zygote_torch errors."""


class RuleError(ZygoteError):
    """A rule or pullback broke the rrule contract."""


class TraceError(ZygoteError):
    """A function could not be captured (for example: data-dependent control flow when staged)."""


@functools.lru_cache(maxsize=4096)
def _is_library_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR + os.sep) and os.sep + "tests" + os.sep not in path:
        return True
    if _TORCH_DIR and path.startswith(_TORCH_DIR + os.sep):
        return True
    return filename.startswith(("<frozen", "<zygote_torch")) or "contextlib" in filename


_library_code: dict = {}  # code object -> whether it belongs to zygote_torch or torch


def user_frame(skip: int = 1):
    """(filename, lineno) of the innermost frame outside zygote_torch and torch, or None."""
    frame = sys._getframe(skip)
    while frame is not None:
        code = frame.f_code
        library = _library_code.get(code)
        if library is None:
            library = _library_code[code] = _is_library_file(code.co_filename)
        if not library:
            return code.co_filename, frame.f_lineno
        frame = frame.f_back
    return None


def describe_frame(where) -> str:
    """'file.py:12: source line' for a frame from :func:`user_frame`."""
    if where is None:
        return "<unknown location>"
    filename, lineno = where
    source = linecache.getline(filename, lineno).strip()
    return f"{filename}:{lineno}" + (f": {source}" if source else "")


def op_name(func) -> str:
    """A readable name for a torch function, Tensor method or Python callable."""
    if isinstance(func, str):
        return func
    if type(func).__name__ in ("OpOverloadPacket", "OpOverload"):
        return str(func)
    self_obj = getattr(func, "__self__", None)
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__" and self_obj is not None:  # a Tensor attribute such as .T
        return f"Tensor.{self_obj.__name__}"
    qual = getattr(func, "__qualname__", name)
    module = getattr(func, "__module__", None) or ""
    if qual.startswith("TensorBase.") or qual.startswith("Tensor."):
        return "Tensor." + qual.split(".", 1)[1]
    if qual.startswith("_VariableFunctionsClass."):
        return "torch." + name
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return "F." + name
    if module.startswith("torch"):
        return f"{module}.{qual}"
    return qual
