"""TorchScript inside captured code: each call of a scripted (or traced) function or of a scripted
module's method (its ``forward`` when the module is called) is one call.

A ``torch.jit.ScriptFunction`` or ``ScriptMethod`` runs in TorchScript's interpreter, out of sight
of a torch-function mode: without this its ops would run unrecorded and its module's parameters get
no gradient. While capture runs, calling one is a call of :func:`script_function` or
:func:`script_method`, with the module's parameters passed explicitly (set back into it while it
runs), so they are differentiated like any argument. Neither has a rule: the fallback runs the call
under ``torch.autograd``, which differentiates TorchScript's graph, and lists it in
``zt.fallbacks``.
"""
from __future__ import annotations

import contextlib

import torch

from .leaves import ANNOUNCED_CALLS, announces


@announces
def script_function(function, *args, **kwargs):
    """``function(*args, **kwargs)`` for a ``torch.jit.ScriptFunction``."""
    return function(*args, **kwargs)


@announces
def script_method(method, n_args: int, *args, **kwargs):
    """``method(*args[:n_args], **kwargs)`` for a method of a ``torch.jit.ScriptModule`` (its
    ``forward`` too), its module's parameters set to ``args[n_args:]`` (in ``named_parameters()``
    order) while it runs."""
    with _parameters_set(_module_of(method), args[n_args:]):
        return method(*args[:n_args], **kwargs)


def _module_of(method) -> torch.jit.ScriptModule:
    return torch.jit._recursive.wrap_cpp_module(method.owner)


@contextlib.contextmanager
def _parameters_set(module, tensors):
    """``module``'s parameters replaced by ``tensors`` in its TorchScript object itself (its Python
    attributes untouched), then restored."""
    slots = []
    try:
        for (name, _), t in zip(module.named_parameters(), tensors):
            *path, leaf = name.split(".")
            owner = module._c
            for part in path:
                owner = owner.getattr(part)
            slots.append((owner, leaf, owner.getattr(leaf)))
            owner.setattr(leaf, t)
        yield
    finally:
        for owner, leaf, old in reversed(slots):
            owner.setattr(leaf, old)


def _announce_method_call(method, *args, **kwargs):
    return script_method(method, len(args), *args, *_module_of(method).parameters(), **kwargs)


ANNOUNCED_CALLS[torch.jit.ScriptFunction] = script_function
ANNOUNCED_CALLS[torch.ScriptMethod] = _announce_method_call
