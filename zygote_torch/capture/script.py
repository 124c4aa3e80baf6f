"""TorchScript inside captured code: each call of a scripted (or traced) function or module is one
call.

A ``torch.jit.ScriptFunction`` or ``ScriptModule`` runs in TorchScript's interpreter, out of sight
of a torch-function mode: without this its ops would run unrecorded and its parameters get no
gradient. While capture runs, calling one is a call of :func:`script_function` or
:func:`script_module`, with the module's parameters passed explicitly (set back into it while it
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
def script_module(module, n_args: int, *args, **kwargs):
    """``module(*args[:n_args], **kwargs)`` for a ``torch.jit.ScriptModule``, its parameters set
    to ``args[n_args:]`` (in ``named_parameters()`` order) while it runs."""
    with _parameters_set(module, args[n_args:]):
        return module(*args[:n_args], **kwargs)


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


def _announce_module_call(module, *args, **kwargs):
    return script_module(module, len(args), *args, *module.parameters(), **kwargs)


ANNOUNCED_CALLS[torch.jit.ScriptFunction] = script_function
ANNOUNCED_CALLS[torch.jit.ScriptModule] = _announce_module_call
