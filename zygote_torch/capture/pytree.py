"""Flattening arguments into leaves and rebuilding structures that mirror them.

Containers are torch's pytree nodes (``torch.utils._pytree``): tuple, list, dict, namedtuple,
OrderedDict, defaultdict, deque, torch's return types, and every class a user registered with
``torch.utils._pytree.register_pytree_node`` (or ``register_dataclass``). On top of them:

- ``nn.Module``: its leaves are its parameters, rebuilt as a dict keyed by ``named_parameters()``
  names (the structural gradient of a module), or as the module itself (the shape of an argument);
- ``zt.Grads``: its gradients, in the order of its parameters;
- a dataclass (registered or not): its fields, rebuilt as a copy of the same type;
- a dict, list or tuple subclass torch does not know: as its base type, rebuilt as the subclass;
- any other object whose attributes hold tensors: those attributes. As an argument it is rebuilt
  as a shallow copy holding the new values (the object itself when nothing changed); as a
  gradient, as a dict keyed by attribute name (Zygote's NamedTuple of a struct's fields).

Anything else is one leaf. A structure is flattened into a spec (nested tuples) once, and rebuilt
by walking it; there are no per-leaf closures.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import types
from typing import Any, Callable

import torch
import torch.utils._pytree as _torch_pytree

_Tensor = torch.Tensor
_SUPPORTED = _torch_pytree.SUPPORTED_NODES
_is_namedtuple = _torch_pytree.is_namedtuple_instance

# Node kinds of a spec: (kind, context, child specs); a leaf's spec is None.
_TUPLE, _LIST, _DICT, _TORCH, _NAMEDTUPLE, _MODULE, _GRADS, _DATACLASS, _SUBCLASS, _OBJECT = range(10)

# Types that are never looked into: their values are leaves (or constants) as they are.
_ATOMS = (_Tensor, int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device,
          torch.memory_format, torch.layout, type, types.FunctionType, types.BuiltinFunctionType,
          types.MethodType, types.ModuleType, slice, range, type(Ellipsis))


# The exact types of the values most calls pass besides tensors: a set lookup tells them apart
# before any isinstance (the recorder and the tape ask it of every argument of every call).
PLAIN_TYPES = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device, slice, type(Ellipsis),
                         torch.memory_format, torch.layout))


def flatten(obj, modules_as_dicts: bool = True) -> tuple[list, Callable[[list], Any]]:
    """(leaves, rebuild): ``rebuild(leaves)`` gives back a structure of the same shape.

    ``modules_as_dicts`` (default) rebuilds the structure of a gradient: a module as a dict of its
    parameters, a plain object as a dict of its tensor attributes. With ``modules_as_dicts=False``
    the structure of an argument is rebuilt: the module itself (its parameters left in place), a
    copy of the plain object.
    """
    leaves, shape = structure(obj)
    return leaves, shape.gradient if modules_as_dicts else shape.argument


class Structure:
    """The shape of a flattened structure: rebuilds it as a gradient or as an argument."""

    __slots__ = ("spec",)

    def __init__(self, spec):
        self.spec = spec

    def gradient(self, leaves):
        """The structure of a gradient: modules and plain objects as dicts (see :func:`flatten`)."""
        return leaves[0] if self.spec is None else _build(self.spec, iter(leaves), True)

    def argument(self, leaves):
        """The structure of an argument: modules themselves, copies of plain objects."""
        return leaves[0] if self.spec is None else _build(self.spec, iter(leaves), False)


def structure(obj) -> tuple[list, Structure]:
    """(leaves, Structure) of ``obj``: :func:`flatten` with both ways of rebuilding."""
    leaves: list = []
    return leaves, Structure(_spec(obj, leaves, set()))


def _spec(obj, leaves: list, active: set):
    """Append ``obj``'s leaves to ``leaves`` and return its spec."""
    cls = type(obj)
    if cls is _Tensor or isinstance(obj, _ATOMS):
        leaves.append(obj)
        return None
    if cls is tuple or cls is list:
        return (_TUPLE if cls is tuple else _LIST, len(obj), [_spec(v, leaves, active) for v in obj])
    if cls is dict:
        keys = list(obj)
        return _DICT, keys, [_spec(obj[k], leaves, active) for k in keys]
    if id(obj) in active:  # a cycle: the object is a constant here
        leaves.append(obj)
        return None
    active.add(id(obj))
    try:
        return _spec_of_object(obj, cls, leaves, active)
    finally:
        active.discard(id(obj))


def _spec_of_object(obj, cls, leaves: list, active: set):
    grads_type, params_type = _param_types()
    if cls is grads_type:
        leaves.extend(obj.values())
        return _GRADS, obj.params, [None] * len(obj.params)
    if cls is params_type:  # an identity-set of tensors is not a structure to differentiate
        leaves.append(obj)
        return None
    if isinstance(obj, torch.nn.Module):
        named = list(obj.named_parameters())
        leaves.extend(p for _, p in named)
        return _MODULE, (obj, [n for n, _ in named]), [None] * len(named)
    if _is_namedtuple(obj) and cls not in _SUPPORTED:
        return _NAMEDTUPLE, cls, [_spec(v, leaves, active) for v in obj]
    if cls in _SUPPORTED:
        children, context = _SUPPORTED[cls].flatten_fn(obj)
        return _TORCH, (cls, context), [_spec(v, leaves, active) for v in children]
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
        return _DATACLASS, (obj, names), [_spec(getattr(obj, n), leaves, active) for n in names]
    if isinstance(obj, (dict, list, tuple)):  # a subclass torch does not know
        if isinstance(obj, dict):
            keys = list(obj)
            return _SUBCLASS, (cls, keys), [_spec(obj[k], leaves, active) for k in keys]
        return _SUBCLASS, (cls, None), [_spec(v, leaves, active) for v in obj]
    names = _tensor_attributes(obj)
    if names:
        return _OBJECT, (obj, names), [_spec(getattr(obj, n), leaves, active) for n in names]
    leaves.append(obj)
    return None


def _tensor_attributes(obj) -> list:
    """The names of ``obj``'s instance attributes that hold a tensor (directly or in a container)."""
    try:
        attributes = vars(obj)
    except TypeError:  # no __dict__ (a C type, __slots__)
        return []
    return [name for name, value in attributes.items() if _holds_tensor(value, 3)]


def _holds_tensor(value, depth: int) -> bool:
    if isinstance(value, _Tensor):
        return True
    if depth == 0 or isinstance(value, _ATOMS):
        return False
    if isinstance(value, dict):
        return any(_holds_tensor(v, depth - 1) for v in value.values())
    if isinstance(value, (list, tuple, collections.deque)):
        return any(_holds_tensor(v, depth - 1) for v in value)
    if isinstance(value, torch.nn.Module):
        return True
    return dataclasses.is_dataclass(value) or type(value) in _SUPPORTED


def _build(spec, it, as_gradient: bool):
    if spec is None:
        return next(it)
    kind, context, children = spec
    if kind is _TUPLE:
        return tuple([next(it) if c is None else _build(c, it, as_gradient) for c in children])
    if kind is _LIST:
        return [next(it) if c is None else _build(c, it, as_gradient) for c in children]
    if kind is _DICT:
        return {k: next(it) if c is None else _build(c, it, as_gradient) for k, c in zip(context, children)}
    values = [next(it) if c is None else _build(c, it, as_gradient) for c in children]
    if kind is _TORCH:
        cls, torch_context = context
        return _SUPPORTED[cls].unflatten_fn(values, torch_context)
    if kind is _NAMEDTUPLE:
        return context(*values)
    if kind is _GRADS:
        return _param_types()[0](context, {id(p): v for p, v in zip(context, values)})
    if kind is _MODULE:
        module, names = context
        return dict(zip(names, values)) if as_gradient else module
    if kind is _DATACLASS:
        obj, names = context
        return _replaced(obj, names, values, always_copy=as_gradient)
    if kind is _SUBCLASS:
        cls, keys = context
        return _make_mapping(cls, zip(keys, values)) if keys is not None else _make_sequence(cls, values)
    obj, names = context  # _OBJECT
    if as_gradient:
        return dict(zip(names, values))
    return _replaced(obj, names, values, always_copy=False)


_PARAM_TYPES: list = [None, None]  # (Grads, Params), registered by params.py


def register_parameter_types(grads_type: type, params_type: type) -> None:
    """Make ``grads_type`` (``zt.Grads``) a structure of its gradients and ``params_type``
    (``zt.Params``) one leaf: params.py, which builds on this module, registers them."""
    _PARAM_TYPES[:] = [grads_type, params_type]


def _param_types() -> tuple:
    """(Grads, Params); (None, None) until params.py registered them."""
    return _PARAM_TYPES[0], _PARAM_TYPES[1]


def _make_mapping(kind, items):
    try:
        return kind(items)
    except TypeError:  # e.g. a subclass whose constructor wants other arguments first
        obj = kind.__new__(kind)
        dict.update(obj, items)
        return obj


def _make_sequence(kind, values):
    try:
        return kind(values)
    except TypeError:
        return list(values) if issubclass(kind, list) else tuple(values)


def _replaced(obj, names, values, always_copy: bool):
    """A shallow copy of ``obj`` with its attributes set to ``values`` (frozen dataclasses too); or
    ``obj`` itself when no value changed, unless ``always_copy``."""
    if not always_copy and all(getattr(obj, n) is v for n, v in zip(names, values)):
        return obj
    new = copy.copy(obj)
    for name, value in zip(names, values):
        object.__setattr__(new, name, value)
    return new


def cotangent_leaves(arg, g) -> list:
    """The cotangent ``g`` of structured argument ``arg`` as one cotangent per leaf of
    ``structure(arg)`` (None where there is none): ``g`` may have ``arg``'s own structure (a
    dataclass, a registered node, a namedtuple...), be a dict keyed by field or attribute name (the
    gradient structure of a plain object or a module), or be None for a zero. For a tape to hand a
    rule's structured cotangents back to the leaves they belong to."""
    leaves, _ = structure(arg)
    if g is None:
        return [None] * len(leaves)
    if isinstance(g, dict) and not isinstance(arg, dict):
        names = _field_names(arg)
        unknown = set(g) - set(names)
        if unknown:
            raise ValueError(f"a cotangent names {sorted(unknown)}, which {type(arg).__name__} does not have")
        return [x for n in names for x in cotangent_leaves(_field(arg, n), g.get(n))]
    g_leaves, _ = structure(g)
    if len(g_leaves) != len(leaves):
        raise ValueError(f"a cotangent with {len(g_leaves)} leaves for a {type(arg).__name__} with {len(leaves)}")
    return g_leaves


def _field_names(obj) -> list:
    if isinstance(obj, torch.nn.Module):
        return [n for n, _ in obj.named_parameters()]
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    if _is_namedtuple(obj):
        return list(type(obj)._fields)
    spec = _spec(obj, [], set())
    if spec is not None and spec[0] is _OBJECT:
        return list(spec[1][1])
    raise ValueError(f"a cotangent given as a dict for a {type(obj).__name__}, which has no named fields")


def _field(obj, name):
    if isinstance(obj, torch.nn.Module):
        return obj.get_parameter(name)
    return getattr(obj, name)


def structured_leaves(obj):
    """The leaves of ``obj`` when it is a structure other than a tuple or a list (a dict, a
    dataclass, a registered node, a module, an object with tensor attributes) that holds a tensor;
    None otherwise. What the tape and the recorder look into beyond sequences."""
    if type(obj) in PLAIN_TYPES or isinstance(obj, _ATOMS) or isinstance(obj, (tuple, list)):
        return None
    leaves, _ = structure(obj)
    return leaves if any(isinstance(x, _Tensor) for x in leaves) else None


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
