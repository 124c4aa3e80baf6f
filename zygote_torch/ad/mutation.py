"""In-place ops, beyond Zygote: mutation differentiates as ``torch.autograd`` does, views included.

An in-place op ``t.op_(...)`` touching a tracked tensor is differentiated as its out-of-place form,
whose value is then written into ``t``:

    y = op(t, ...);  t.copy_(y)                  # t's slot takes y's key: t@old -> y -> t@new

Aliasing is the tape's model of views (see :mod:`.tape`): a view and its base share one version
counter. When ``t`` is a view of ``base``, the base's new value is written out of place too,

    base@new = view_scatter(base@old, y, view_index(base, t))

and ``t``, like any other view of ``base``, is stale: its version changed, so it is read afresh from the base
(``view_gather``) the next time it is used. This is view replay, as functionalization does it, in
terms of element indices, so any chain of views (slices, ``select``, ``diagonal``, ``t()``,
``unbind``, ``split``, expanded views) replays the same way.

Pullbacks recorded earlier may hold a tensor living in the storage about to be overwritten (a rule
saved its input or output, or a view of it). Before the write, each such tensor in their closures is
replaced by a copy of its current value (:func:`snapshot`); the tape indexes entries by storage,
so each in-place op looks only at the entries that touched its storage. Mutating a tensor being
differentiated with respect to (an argument, a parameter) or a view of one is an error naming the op
and the line, as ``torch.autograd`` refuses it for a leaf that requires grad.
"""
from __future__ import annotations

import functools
import types

import torch

from ..capture.leaves import announces
from ..capture.op_classes import INPLACE_DUNDERS
from ..capture.pytree import tensors_in
from ..errors import ZygoteError, describe_frame, op_name, user_frame


def storage_id(t: torch.Tensor):
    """The identity of ``t``'s storage (shared by all its views), or None for a tensor without one."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, functorch-wrapped
        return None


@announces
def index_assign(input, index, value):
    """The out-of-place form of ``input[index] = value``: a copy of ``input`` with the entries at
    ``index`` replaced by (broadcast) ``value``."""
    out = input.clone()
    out[index] = value
    return out


@announces
def copy_into(input, src):
    """The out-of-place form of ``input.copy_(src)``: ``src`` (a tensor or a number) broadcast to
    ``input``'s shape and converted to its dtype."""
    if not isinstance(src, torch.Tensor):
        return torch.full_like(input, src)
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
    base = INPLACE_DUNDERS.get(name) or name[:-1]
    for owner in (torch.Tensor, torch, torch.nn.functional):  # F.hardtanh_ -> F.hardtanh
        if hasattr(owner, base):
            return getattr(owner, base)
    raise ZygoteError(f"{op_name(func)} at {describe_frame(user_frame())}: in-place op with no "
                      "out-of-place form to differentiate; write it out of place")


# In-place ops that change a tensor's shape or strides rather than its values.
_METADATA_INPLACE = {"t_", "transpose_", "swapdims_", "swapaxes_", "squeeze_", "unsqueeze_", "as_strided_",
                     "resize_", "resize_as_", "set_"}


def record_inplace(tape, func, args: tuple, kwargs: dict, functional=None):
    """Run in-place ``func`` under ``tape``: see the module docstring. ``functional`` computes the
    new value out of place from the same arguments (default: ``out_of_place(func)``)."""
    target = args[0]
    if not isinstance(target, torch.Tensor):
        return func(*args, **kwargs)
    base = target._base
    root = target if base is None else base
    if base is not None and tape.tracks(base) and not tape.tracks(target):
        replay_view(tape, target, base)  # a view made outside the tape's sight: read it from its base
    differentiated = any(tape.tracks(t) for t in tensors_in((args, kwargs)))
    if not differentiated:  # nothing tracked is read or written; some pullback may hold the storage
        tape.protect(target)
        result = func(*args, **kwargs)
        return target if result is None else result  # __setitem__'s None: replays read the target
    where = tape.where or user_frame()
    _check_mutable(tape, func, target, root, where)
    new = tape.apply(functional or out_of_place(func), args, kwargs)
    new_root = None if base is None else tape.apply(view_scatter, (base, new, view_index(base, target)), {})
    tape.protect(target)
    with torch.no_grad():
        target.copy_(new)
    if new_root is None:
        tape.bind(target, new)
    else:  # the view is read from its base's new value, as torch's views are after CopySlices
        tape.bind(base, new_root)
    return target  # also for __setitem__, whose result Python ignores: replays read it


def _check_mutable(tape, func, target, root, where) -> None:
    if id(target) in tape.inputs or id(root) in tape.inputs:
        raise ZygoteError(f"{op_name(func)} at {describe_frame(where)} mutates a tensor being "
                          "differentiated (an argument of f, or one of its Params), or a view of one; this "
                          "would make the gradient refer to a value that no longer exists (torch.autograd "
                          "refuses it for a leaf that requires grad too). Use an out-of-place op "
                          "(x = x + 1 rather than x += 1), or clone it first.")
    if getattr(func, "__name__", "") in _METADATA_INPLACE:
        raise ZygoteError(f"{op_name(func)} at {describe_frame(where)} changes the shape or strides of a tracked "
                          "tensor in place; use its out-of-place form (x = x.t() rather than x.t_())")


def view_index(base: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The flat (row-major) index into ``base`` of each element of ``view``, a view of it: a
    LongTensor shaped like ``view``, so that ``view == base.flatten()[index]``."""
    size, stride, offset = view.size(), view.stride(), view.storage_offset() - base.storage_offset()
    device = base.device
    if base.is_contiguous():
        return torch.arange(base.numel(), device=device).as_strided(size, stride, offset)
    if torch._debug_has_internal_overlap(base) == 1:
        raise ZygoteError("an in-place op writes through a view of a tensor whose elements overlap in memory "
                          f"(shape {tuple(base.shape)}, strides {base.stride()}); clone it first")
    span = 1 + sum((n - 1) * s for n, s in zip(base.shape, base.stride()))
    positions = torch.arange(span, device=device).as_strided(base.size(), base.stride(), 0)
    inverse = torch.full((span,), -1, dtype=torch.long, device=device)
    inverse.index_put_((positions.reshape(-1),), torch.arange(base.numel(), device=device))
    return inverse.as_strided(size, stride, offset)


@announces
def view_gather(base, index):
    """The current value of a view of ``base``, read afresh: ``base.flatten()[index]`` for the
    ``index`` of :func:`view_index`."""
    return torch.take(base, index)


@announces
def view_scatter(base, src, index):
    """``base`` with the elements of one of its views (given by ``index``, see :func:`view_index`)
    replaced by ``src``: what writing into the view does to its base, out of place."""
    return base.put(index, src.to(base.dtype))


def replay_view(tape, view: torch.Tensor, base: torch.Tensor) -> None:
    """Give ``view`` the value it has now as a function of ``base``'s current value."""
    value = tape.apply(view_gather, (base, view_index(base, view)), {})
    tape.bind(view, value)


def snapshot(tape, entries, storage) -> None:
    """Before ``storage`` is overwritten: in the pullbacks of ``entries``, each tensor living in it
    is replaced by a copy of its current value (one copy per tensor); a fallback entry, whose
    values live inside ``torch.func.vjp``, is run again on copies."""
    copies: dict = {}

    def copy(value):
        if isinstance(value, torch.Tensor) and storage_id(value) == storage:
            if id(value) not in copies:
                copies[id(value)] = (value, value.clone())
            return copies[id(value)][1]
        return value

    seen: set[int] = set()
    for entry in entries:
        if entry.fallback and entry.call is not None:
            _redo_fallback(tape, entry, copy)
        else:
            _replace_in_function(entry.pullback, copy, seen)


def _redo_fallback(tape, entry, copy) -> None:
    from .fallback import fallback_rule
    from ..capture.recorder import map_tensors
    func, args, kwargs = entry.call
    originals = tensors_in((args, kwargs))
    args, kwargs = map_tensors(args, copy), map_tensors(kwargs, copy)
    differentiated = {id(new) for old, new in zip(originals, tensors_in((args, kwargs))) if tape.tracks(old)}
    entry.pullback = fallback_rule(func, args, kwargs, tape.staged, lambda t: id(t) in differentiated)[1]
    entry.call = (func, args, kwargs)


def _replace_in_function(fn, copy, seen: set) -> None:
    """Apply ``copy`` to every value ``fn``'s closure holds (looking into containers and the
    closures of functions it holds)."""
    if id(fn) in seen:
        return
    seen.add(id(fn))
    if isinstance(fn, functools.partial):
        _replace_in_function(fn.func, copy, seen)
        return
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        new = _replaced(value, copy, seen)
        if new is not value:
            cell.cell_contents = new


def _replaced(value, copy, seen: set):
    if isinstance(value, torch.Tensor):
        return copy(value)
    if isinstance(value, (tuple, list)) and not hasattr(type(value), "_fields"):
        items = [_replaced(v, copy, seen) for v in value]
        if any(a is not b for a, b in zip(items, value)):
            return type(value)(items)
        return value
    if isinstance(value, dict):
        for k, v in list(value.items()):
            value[k] = _replaced(v, copy, seen)
        return value
    if callable(value) and (hasattr(value, "__closure__") or isinstance(value, (functools.partial, types.MethodType))):
        _replace_in_function(value, copy, seen)
    return value
