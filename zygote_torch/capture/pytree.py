"""Flattening arguments into leaves and rebuilding structures that mirror them.

Containers: tuple, list, dict (any Mapping subclass constructible from items), namedtuple,
dataclass, and ``nn.Module`` (its leaves are its parameters, rebuilt as a dict keyed by
``named_parameters()`` names, the structural gradient of a module). Anything else is one leaf.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def flatten(obj, modules_as_dicts: bool = True) -> tuple[list, Callable[[list], Any]]:
    """(leaves, rebuild): ``rebuild(leaves)`` gives back a structure of the same shape.

    A module rebuilds as a dict of its parameters (the shape of its gradient); with
    ``modules_as_dicts=False`` it rebuilds as the module itself, its parameters left in place (the
    shape of an argument).
    """
    leaves: list = []
    rebuild = _flatten_into(obj, leaves, modules_as_dicts)
    return leaves, lambda new: rebuild(iter(new))


def _flatten_into(obj, leaves: list, as_dict: bool):
    grads_type = _grads_type()
    if isinstance(obj, grads_type):
        params = obj.params
        leaves.extend(obj.values())
        return lambda it: grads_type(params, {id(p): next(it) for p in params})
    if isinstance(obj, torch.nn.Module):
        names = [name for name, _ in obj.named_parameters()]
        leaves.extend(p for _, p in obj.named_parameters())
        if not as_dict:
            def module_itself(it):
                for _ in names:
                    next(it)
                return obj
            return module_itself
        return lambda it: {name: next(it) for name in names}
    if _is_namedtuple(obj):
        parts = [_flatten_into(v, leaves, as_dict) for v in obj]
        return lambda it: type(obj)(*[p(it) for p in parts])
    if isinstance(obj, (tuple, list)):
        parts = [_flatten_into(v, leaves, as_dict) for v in obj]
        return lambda it: type(obj)(p(it) for p in parts)
    if isinstance(obj, dict):
        keys = list(obj.keys())
        parts = [_flatten_into(obj[k], leaves, as_dict) for k in keys]
        kind = type(obj)
        return lambda it: _make_mapping(kind, [(k, p(it)) for k, p in zip(keys, parts)])
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)]
        parts = [_flatten_into(getattr(obj, n), leaves, as_dict) for n in names]
        return lambda it: _replace_fields(obj, {n: p(it) for n, p in zip(names, parts)})
    leaves.append(obj)
    return lambda it: next(it)


def _grads_type():
    from ..params import Grads
    return Grads


def _make_mapping(kind, items):
    if kind is dict:
        return dict(items)
    try:
        return kind(items)
    except TypeError:  # e.g. defaultdict, whose constructor wants its factory first
        obj = kind.__new__(kind)
        dict.update(obj, items)
        return obj


def _replace_fields(obj, values: dict):
    """A shallow copy of dataclass ``obj`` with its fields set to ``values`` (frozen ones too)."""
    new = copy.copy(obj)
    for name, value in values.items():
        object.__setattr__(new, name, value)
    return new




def tensors_in(obj) -> list:
    """The tensors in an argument structure (looking into tuples, lists and dict values), in order."""
    out: list = []
    _collect(obj, out)
    return out


def _collect(obj, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _collect(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _collect(x, out)
