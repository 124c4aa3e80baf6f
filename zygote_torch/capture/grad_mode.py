"""``torch.no_grad()`` inside a recorded function, as torch.autograd honours it.

While a call records, torch.autograd is really off (no graph is built beside the tape), so torch's
own grad mode cannot tell what the user's code asked for. Each recording keeps a *user grad mode*
instead: it starts on (``zt.gradient`` differentiates ``f`` whatever the caller's mode, as
``torch.func.grad`` does), ``torch.no_grad()``, ``torch.enable_grad()``, ``torch.set_grad_enabled``
and the decorator forms switch it, and ``torch.is_grad_enabled()`` reads it: while a recording is
active on this thread, those two functions of torch (``torch._C._set_grad_enabled`` and
``torch.is_grad_enabled``, which all the context managers call) are replaced by ones that act on the
user grad mode. Calls made while it is off are not differentiated (their outputs are constants),
and in-place ops made then change values without being differentiated, as under torch.autograd.
Other threads, code outside recordings and zygote_torch's own code (which means torch's mode: the
tape's pullbacks run with torch.autograd off) see torch's real functions.
"""
from __future__ import annotations

import sys
import threading

import torch

real_is_grad_enabled = torch._C.is_grad_enabled
real_set_grad_enabled = torch._C._set_grad_enabled

_state = threading.local()  # .modes: the user grad mode stack of this thread's recordings
_lock = threading.Lock()
_installed = 0


def _modes() -> list:
    try:
        return _state.modes
    except AttributeError:
        _state.modes = []
        return _state.modes


def _from_zygote_torch(depth: int) -> bool:
    """Whether the caller ``depth`` frames up is zygote_torch's own code (it means torch's mode).
    torch's own frames are looked through: ``with torch.no_grad():`` written in zygote_torch reaches
    here from torch's context manager, and means torch's mode too."""
    frame = sys._getframe(depth)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("torch"):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("zygote_torch")


def _is_grad_enabled() -> bool:
    modes = _modes()
    if not modes or _from_zygote_torch(2):
        return real_is_grad_enabled()
    return modes[-1]


def _set_grad_enabled(mode: bool) -> None:
    modes = _modes()
    if not modes or _from_zygote_torch(2):
        real_set_grad_enabled(mode)
    else:
        modes[-1] = bool(mode)


def _install() -> None:
    global _installed
    with _lock:
        if _installed == 0:
            torch._C._set_grad_enabled = _set_grad_enabled
            torch.is_grad_enabled = _is_grad_enabled
        _installed += 1


def _uninstall() -> None:
    global _installed
    with _lock:
        _installed -= 1
        if _installed == 0:
            torch._C._set_grad_enabled = real_set_grad_enabled
            torch.is_grad_enabled = real_is_grad_enabled


def push() -> int:
    """Start the user grad mode of a new recording (on); return its slot."""
    _install()
    modes = _modes()
    modes.append(True)
    return len(modes) - 1


def pop() -> None:
    _modes().pop()
    _uninstall()


def stack() -> list:
    """This thread's user grad modes, innermost recording last (the list itself, kept up to date)."""
    return _modes()


def enabled_from(slot: int, modes: list | None = None) -> bool:
    """Whether the recording at ``slot`` differentiates a call made now: its user grad mode and
    that of every recording started inside it are on (``no_grad`` in an inner function stops the
    outer differentiation too, as torch.autograd's nested graphs do). ``modes``: this thread's
    :func:`stack`, where the caller has it."""
    if modes is None:
        modes = _modes()
    if len(modes) == slot + 1:  # the innermost recording: the usual case
        return modes[slot]
    for i in range(slot, len(modes)):
        if not modes[i]:
            return False
    return True
