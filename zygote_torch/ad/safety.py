"""The safety net under the recorder: no tensor being differentiated is read unseen.

The recorder sees torch calls at the torch-function level. Code that reaches aten kernels some
other way (a TorchScript function, a C++ extension, an op run with torch functions disabled, a
tensor hidden in an object the recorder does not look into) would compute from a tracked tensor
with no entry on the tape: its output would silently get no gradient. :class:`UnseenReads` is a
``TorchDispatchMode`` active while a dynamic call records. Every aten kernel passes through it; one
that reads a tracked tensor while no recorded call is running is a ``ZygoteError`` naming the
kernel and the user's line.

Tensors are matched by identity (the objects the tape tracks), not by storage: a ``.detach()``ed
alias is a constant on purpose and may be read freely. The check costs a Python call per aten
kernel; it is on where :func:`enabled` says (``ZYGOTE_TORCH_CHECK_UNSEEN``), always in the tests.
"""
from __future__ import annotations

import os

import torch
from torch.utils import _python_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ZygoteError, describe_frame, user_frame


def enabled() -> bool:
    """Whether dynamic calls run under :class:`UnseenReads`: ``ZYGOTE_TORCH_CHECK_UNSEEN=1`` (on)
    or ``0`` (off); off by default (see docs/semantics.md for its measured cost)."""
    return os.environ.get("ZYGOTE_TORCH_CHECK_UNSEEN", "0") == "1"


class UnseenReads(TorchDispatchMode):
    """Refuses aten kernels that read one of ``tracked``'s tensors outside a recorded call.
    ``seen`` counts the recorded calls running now (the tape increments it)."""

    def __init__(self, tracked: dict):
        super().__init__()
        self.tracked = tracked
        self.seen = 0
        self.refused = None  # the error raised, kept: C++ callers (TorchScript) rewrap exceptions

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.seen and (self._reads_tracked(args) or kwargs and self._reads_tracked(kwargs.values())):
            self.refused = ZygoteError(
                f"{func} at {describe_frame(user_frame())} reads a tensor being differentiated outside "
                "any call zygote_torch records (TorchScript, a C++ extension, torch functions disabled, "
                "or a tensor inside an object passed to a torch function): its gradient would be lost. "
                "Call it with the tensor as an argument, or give the function a rule (zt.rrule)")
            raise self.refused
        return func(*args, **kwargs)

    def reraise(self, exc) -> None:
        """After the recording is closed: raise the refusal itself rather than ``exc``, the
        RuntimeError a C++ caller (TorchScript) made of it."""
        if self.refused is not None and exc is not None and exc is not self.refused:
            raise self.refused from exc

    def seeing(self):
        """Context of a recorded call: its kernels run with this mode off the dispatch stack when it
        is on top (no cost, and values exactly as without the mode: under any Python dispatch mode,
        torch 2.13 computes ``linalg.pinv`` of a complex matrix wrongly), else merely let through."""
        return _Seeing(self)

    def _reads_tracked(self, values) -> bool:
        tracked = self.tracked
        for v in values:
            if isinstance(v, torch.Tensor):
                if id(v) in tracked:
                    return True
            elif isinstance(v, (list, tuple)) and self._reads_tracked(v):
                return True
        return False


class _Seeing:
    __slots__ = ("mode", "popped")

    def __init__(self, mode: UnseenReads):
        self.mode = mode

    def __enter__(self):
        self.popped = _python_dispatch._get_current_dispatch_mode() is self.mode
        if self.popped:
            _python_dispatch._pop_mode()
        else:
            self.mode.seen += 1

    def __exit__(self, *exc):
        if self.popped:
            _python_dispatch._push_mode(self.mode)
        else:
            self.mode.seen -= 1
        return False
