"""``torch.func.vmap`` inside captured code: one call with every input explicit.

vmap's runner, ``vmap_impl(func, in_dims, out_dims, randomness, chunk_size, *args)``, becomes a
leaf of capture (see :mod:`.leaves`), so a vmapped call reaches the recorder, and its rule, as one
call. Tensors the vmapped function reaches through its closure or the globals it names (a tensor,
or a module's parameters and buffers) are made explicit: the call is rewritten to pass them as
extra unbatched arguments (``in_dims=None``) to a function that puts them back in place while it
runs, so they are differentiated like any argument. Tensors reached any other way (an attribute of
a plain object, a function it calls) are not seen: pass them as arguments.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch._functorch import vmap as _vmap
from torch.nn.utils.stateless import _reparametrize_module

from .leaves import REWRITES, TORCH_LEAVES

vmap_impl = _vmap.vmap_impl


class _GlobalSlot:
    """A global variable of ``func``'s module, read and written like a closure cell."""

    def __init__(self, namespace: dict, name: str):
        self.namespace, self.name = namespace, name

    @property
    def cell_contents(self):
        return self.namespace[self.name]

    @cell_contents.setter
    def cell_contents(self, value):
        self.namespace[self.name] = value


def _closure_inputs(func):
    """(slots holding tensors, (module, names) pairs) among ``func``'s closure cells and the globals
    its code names, and those of the functions found there (a vmap or grad of a lambda, a helper
    it calls), a few levels deep."""
    cells, modules, seen = [], [], set()
    _collect_closure(func, cells, modules, seen, depth=4)
    return cells, modules


def _slots_of(func) -> list:
    func = getattr(func, "func", func) if isinstance(func, functools.partial) else func
    slots = list(getattr(func, "__closure__", None) or ())
    namespace = getattr(func, "__globals__", {})
    code = getattr(func, "__code__", None)
    slots += [_GlobalSlot(namespace, n) for n in (code.co_names if code else ()) if n in namespace]
    return slots


def _collect_closure(func, cells: list, modules: list, seen: set, depth: int) -> None:
    if depth == 0 or id(func) in seen:
        return
    seen.add(id(func))
    for slot in _slots_of(func):
        try:
            value = slot.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, torch.Tensor):
            if all(_slot_key(slot) != _slot_key(c) for c in cells):  # each slot once (a value may be in two)
                cells.append(slot)
        elif isinstance(value, torch.nn.Module):
            if all(value is not m for m, _ in modules):
                names = [n for n, _ in value.named_parameters()] + [n for n, _ in value.named_buffers()]
                modules.append((value, names))
        elif isinstance(value, (types.FunctionType, functools.partial)) and not _is_library(value):
            _collect_closure(value, cells, modules, seen, depth - 1)
    wrapped = getattr(func, "__wrapped__", None)
    if wrapped is not None:
        _collect_closure(wrapped, cells, modules, seen, depth - 1)


def _slot_key(slot):
    return (id(slot.namespace), slot.name) if isinstance(slot, _GlobalSlot) else id(slot)


def _is_library(func) -> bool:
    module = getattr(getattr(func, "func", func), "__module__", "") or ""
    return module == "torch" or module.startswith(("torch.", "zygote_torch"))


def _with_explicit_inputs(func, cells, modules, n_args: int, keywords=(), name: str = "vmapped"):
    """``func`` taking, after its own ``n_args`` arguments, the tensors of its closure, then the
    values of its keyword arguments ``keywords`` (passed to it by name)."""
    keys = list(keywords)

    def call(*args):
        own, extra = args[:n_args], iter(args[n_args:])
        saved = [cell.cell_contents for cell in cells]
        try:
            for cell in cells:
                cell.cell_contents = next(extra)
            with contextlib.ExitStack() as stack:
                for module, names in modules:
                    stack.enter_context(_reparametrize_module(module, {n: next(extra) for n in names}))
                values = {k: next(extra) for k in keys}
                return func(*own, **values)
        finally:
            for cell, value in zip(cells, saved):
                cell.cell_contents = value

    call.__name__ = call.__qualname__ = getattr(func, "__name__", name)
    return call


def explicit_inputs(args: tuple, kwargs: dict):
    """vmap_impl's arguments with the vmapped function's closure tensors passed explicitly."""
    func, in_dims, out_dims, randomness, chunk_size, *rest = args
    cells, modules = _closure_inputs(func)
    if not cells and not modules:
        return args, kwargs
    captured = [cell.cell_contents for cell in cells]
    for module, names in modules:
        state = dict(module.named_parameters())
        state.update(module.named_buffers())
        captured += [state[n] for n in names]
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(rest)
    lifted = _with_explicit_inputs(func, cells, modules, len(rest))
    return (lifted, tuple(dims) + (None,) * len(captured), out_dims, randomness, chunk_size, *rest, *captured), kwargs


TORCH_LEAVES.add(vmap_impl)
REWRITES[vmap_impl] = explicit_inputs
