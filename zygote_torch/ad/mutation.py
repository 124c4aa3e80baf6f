"""In-place ops, beyond Zygote: mutation of intermediates differentiates correctly.

An in-place op ``t.op_(...)`` on a tracked tensor is differentiated as its out-of-place form on a
copy of ``t``'s old value, written back into ``t``:

    old = t.clone();  y = op(old, ...);  t.copy_(y)        # keys: t@v0 -> old -> y -> t@v1

Pullbacks recorded earlier may hold ``t`` itself (a rule saved it, or produced it): they are
retargeted to ``old`` (their closure cells are rewritten), so they still see the value they were
given. Mutating a tensor being differentiated with respect to (an argument, a parameter) is an
error naming the op and the line, as is an in-place op on a view of a tracked tensor.
"""
from __future__ import annotations

import functools
import types

import torch

from ..capture.leaves import announces
from ..capture.pytree import tensors_in
from ..errors import ZygoteError, describe_frame, op_name, user_frame

_DUNDER = {"__iadd__": "add", "__isub__": "sub", "__imul__": "mul", "__itruediv__": "div",
           "__ipow__": "pow", "__setitem__": None}


def is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    if name in _DUNDER:
        return True
    return name.endswith("_") and not name.startswith("_") and not name.endswith("__")


@announces
def index_assign(input, index, value):
    """The out-of-place form of ``input[index] = value``: a copy of ``input`` with the entries at
    ``index`` replaced by (broadcast) ``value``."""
    out = input.clone()
    out[index] = value
    return out


@announces
def copy_into(input, src):
    """The out-of-place form of ``input.copy_(src)``: ``src`` broadcast to ``input``'s shape and
    converted to its dtype."""
    return src.to(input.dtype).expand(input.shape).clone()


@announces
def fill(input, value):
    """The out-of-place form of ``input.fill_(value)``."""
    if isinstance(value, torch.Tensor):
        return value.to(input.dtype).expand(input.shape).clone()
    return torch.full_like(input, value)


@announces
def zero(input):
    """The out-of-place form of ``input.zero_()``."""
    return torch.zeros_like(input)


_SPECIAL = {"__setitem__": index_assign, "copy_": copy_into, "fill_": fill, "zero_": zero}


def out_of_place(func):
    """The out-of-place function computing what in-place ``func`` writes."""
    name = func.__name__
    if name in _SPECIAL:
        return _SPECIAL[name]
    base = _DUNDER.get(name) or name[:-1]
    for owner in (torch.Tensor, torch):
        if hasattr(owner, base):
            return getattr(owner, base)
    raise ZygoteError(f"{op_name(func)} at {describe_frame(user_frame())}: in-place op with no "
                      "out-of-place form to differentiate; write it out of place")


def record_inplace(tape, func, args: tuple, kwargs: dict, functional=None):
    """Run in-place ``func`` under ``tape``: see the module docstring. ``functional`` computes the
    new value out of place from the same arguments (default: ``out_of_place(func)``)."""
    target = args[0]
    touches_tracked = any(tape.tracks(t) for t in tensors_in((args, kwargs)))
    if not isinstance(target, torch.Tensor) or not (touches_tracked or tape.holds(target)):
        return func(*args, **kwargs)
    where = tape.where or user_frame()
    if id(target) in tape.inputs:
        raise ZygoteError(f"{op_name(func)} at {describe_frame(where)} mutates a tensor being "
                          "differentiated (an argument of f, or one of its Params); this would make the "
                          "gradient refer to a value that no longer exists. Use an out-of-place op "
                          "(x = x + 1 rather than x += 1), or clone it first.")
    if tape.tracks(target) and target._base is not None and tape.tracks(target._base):
        raise ZygoteError(f"{op_name(func)} at {describe_frame(where)} mutates a view of a tracked "
                          "tensor; write it out of place (for example with torch.where or index_put)")
    old = target.clone()
    _retarget(tape, target, old)
    if not touches_tracked:  # an untracked tensor some pullback holds: protect it and run the op
        return func(*args, **kwargs)
    new = tape.apply(functional or out_of_place(func), (old,) + tuple(args[1:]), kwargs,
                     first_key=tape._keys(target))
    with torch.no_grad():
        target.copy_(new)
    if tape.tracks(new):
        tape.push_identity(new, target, func)
    return target  # also for __setitem__, whose result Python ignores: replays read it


def _retarget(tape, target: torch.Tensor, old: torch.Tensor) -> None:
    """Make every recorded pullback that holds ``target`` hold ``old`` instead."""
    seen: set[int] = set()
    for entry in tape.entries:
        if entry is not None:
            _retarget_function(entry.pullback, target, old, seen)


def _retarget_function(fn, target, old, seen: set) -> None:
    if id(fn) in seen:
        return
    seen.add(id(fn))
    if isinstance(fn, functools.partial):
        _retarget_function(fn.func, target, old, seen)
        return
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        new = _retargeted(value, target, old, seen)
        if new is not value:
            cell.cell_contents = new


def _retargeted(value, target, old, seen: set):
    if value is target:
        return old
    if isinstance(value, (tuple, list)) and not hasattr(type(value), "_fields"):
        items = [_retargeted(v, target, old, seen) for v in value]
        if any(a is not b for a, b in zip(items, value)):
            return type(value)(items)
        return value
    if isinstance(value, dict):
        for k, v in list(value.items()):
            value[k] = _retargeted(v, target, old, seen)
        return value
    if callable(value) and (hasattr(value, "__closure__") or isinstance(value, (functools.partial, types.MethodType))):
        _retarget_function(value, target, old, seen)
    return value
