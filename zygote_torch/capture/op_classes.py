"""What kind of op a call, or a graph node, is: the one place that decides it.

Capture asks it of every call it sees (:func:`call_kind`: the call only reads metadata, writes in
place, or neither; :func:`is_data_dependent`: it needs tensor data, which staged capture does not
have), and writes the class of every node it creates into ``node.meta['op_class']``
(:func:`classify_node`: :class:`~.recorder.GraphBuilder`, which the reverse transform uses for the
backward's nodes too). Every pass reads it back with :func:`op_class`; a node created elsewhere (by
a pass, by a rule) is classified by the same function the first time it is asked.

The classes of a node (:class:`OpClass`), and who reads them:

- ``random``: it draws random numbers (its name says so: ``rand*``, ``dropout``, ``bernoulli``,
  ``normal_``..., and the fallback's ``random_state``). Never folded (``constant_fold``), merged
  (``cse``), or recomputed under a memory budget (``mincut``); a ``zt.compile(module)`` program
  with one saves the generators' state for its backward (``runtime/module.py``).
- ``effectful``: the call as made writes an argument in place (``t.add_(x)``, ``t += x``,
  ``t[i] = v``), decided from the callable capture saw (``meta['func']``). Never removed (``dce``,
  ``cse``), recomputed (``recompute``, ``mincut``) or simplified away (``simplify``); it writes its
  first argument (``aliasing``).
- ``inplace``: its target has an in-place op's name (``add_``, ``_foreach_add_``): it writes its
  first argument (``aliasing``, and from it every pass).
- ``view``: a shape op (``reshape``, ``view``, ``transpose``, ``permute``, ``expand``...), an
  element or attribute read (``x[i]``, ``x.T``): cheap to compute again (``mincut``).
- ``activation``: a memory-bound elementwise activation or cast (``relu``, ``gelu``, ``float``...):
  recomputed where it is needed late rather than kept (``recompute``), and cheap (``mincut``).
- ``transcendental``: an activation computing ``erf``/``tanh``/``exp`` per element, which costs more
  than the memory it frees on the CPU (``recompute`` keeps it there).
- ``cheap``: activations, views, arithmetic, ``exp``, ``where``: what the minimum cut recomputes in
  the backward from kept values (``mincut``).

A call (rather than a node) is ``data_dependent`` when its answer depends on tensor data rather
than metadata (``.item()``, ``bool(t)``...): staged capture refuses it, so it never becomes a node.
Memory that a node writes by other means (``out=``, ``inplace=True``, a schema's ``Tensor(a!)``,
batch norm's running statistics) depends on its arguments, and is :mod:`..passes.aliasing`'s.
"""
from __future__ import annotations

import operator
import re
import types
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor
OP_CLASS = "op_class"  # the node.meta key


def canonical_key(func) -> Any:
    """The registry key of a callable: a Tensor attribute's getter keys on the attribute itself,
    a bound method of a user object on its function."""
    name = getattr(func, "__name__", None)
    if name == "__get__" and type(func).__name__ == "method-wrapper":
        return func.__self__
    if isinstance(func, types.MethodType):
        return func.__func__
    return func


# -- calls -----------------------------------------------------------------------------------------

# In-place dunders -> the name of their out-of-place op (None: ``t[i] = v``, see ad/mutation.py).
INPLACE_DUNDERS = {"__iadd__": "add", "__isub__": "sub", "__imul__": "mul", "__itruediv__": "div",
                   "__ipow__": "pow", "__setitem__": None}


def is_inplace(func) -> bool:
    """Whether calling ``func`` writes its first argument (``add_``, ``__iadd__``, ``__setitem__``)."""
    name = getattr(func, "__name__", "")
    if name in INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.startswith("_") and not name.endswith("__")


# Calls whose answer depends on tensor data rather than metadata: they cannot be staged.
DATA_DEPENDENT = {canonical_key(f) for f in (
    Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.__index__,
    Tensor.numpy, Tensor.__complex__)}


# Calls that only read metadata (shape, dtype, layout): never recorded, in either way of running.
METADATA = {canonical_key(f) for f in (
    Tensor.shape, Tensor.dtype, Tensor.device, Tensor.ndim, Tensor.layout, Tensor.is_cuda, Tensor.is_sparse,
    Tensor.requires_grad, Tensor.grad_fn, Tensor.is_leaf, Tensor._version, Tensor.is_meta,
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.nelement, Tensor.stride, Tensor.storage_offset,
    Tensor.is_contiguous, Tensor.is_floating_point, Tensor.is_complex, Tensor.element_size, Tensor.data_ptr,
    Tensor.get_device, Tensor.__len__, Tensor.__hash__,
    Tensor.is_signed, Tensor.ndimension, Tensor.untyped_storage, Tensor.is_inference, torch.is_tensor,
    torch.is_floating_point, torch.is_complex, torch.numel)}


def is_data_dependent(func) -> bool:
    """Whether ``func``'s answer depends on tensor data (staged capture cannot record it)."""
    return canonical_key(func) in DATA_DEPENDENT


PLAIN, METADATA_CALL, INPLACE = "plain", "metadata", "inplace"
_kinds: dict = {}


def call_kind(func) -> str:
    """Whether ``func`` only reads metadata, mutates, or neither (cached per callable)."""
    try:
        return _kinds[func]
    except (KeyError, TypeError):
        pass
    kind = METADATA_CALL if canonical_key(func) in METADATA else INPLACE if is_inplace(func) else PLAIN
    if not isinstance(func, types.MethodType):  # a bound method would keep its object alive
        try:
            _kinds[func] = kind
        except TypeError:
            pass
    return kind


# -- nodes -----------------------------------------------------------------------------------------

RANDOM_WORDS = ("rand", "dropout", "bernoulli", "normal", "multinomial", "uniform", "poisson",
                "exponential", "geometric", "cauchy", "log_normal")

# Elementwise activations and casts: memory-bound, cheap to run again.
ACTIVATION_FUNCTIONS = {torch.relu, torch.sigmoid, torch.tanh, torch._C._nn.gelu, torch.nn.functional.silu,
                        torch.nn.functional.gelu, torch.nn.functional.relu}
ACTIVATION_METHODS = {"relu", "sigmoid", "tanh", "neg", "float", "to", "half", "bfloat16"}
# On the CPU these compute erf / tanh / exp per element, which costs more than the memory they free
# (GPT step, 2 cores: recomputing GELU made it about 2.5% slower): the CPU recomputes only the rest.
TRANSCENDENTAL = {torch.sigmoid, torch.tanh, torch._C._nn.gelu, torch.nn.functional.silu, torch.nn.functional.gelu,
                  "sigmoid", "tanh"}
VIEW_FUNCTIONS = {operator.getitem, getattr}
VIEW_METHODS = {"reshape", "view", "transpose", "permute", "expand", "unsqueeze", "squeeze", "flatten",
                "contiguous", "t"}
ARITHMETIC_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.exp,
                        torch.where, torch.neg}
ARITHMETIC_METHODS = {"exp"}
CHEAP_FUNCTIONS = ACTIVATION_FUNCTIONS | ARITHMETIC_FUNCTIONS | VIEW_FUNCTIONS
CHEAP_METHODS = ACTIVATION_METHODS | ARITHMETIC_METHODS | VIEW_METHODS


@dataclass(frozen=True)
class OpClass:
    """What a graph node's op is (see the module docstring); all false for placeholders, constants
    and outputs."""

    random: bool = False
    effectful: bool = False
    inplace: bool = False
    view: bool = False
    activation: bool = False
    transcendental: bool = False
    cheap: bool = False


NOT_AN_OP = OpClass()
_interned: dict = {}  # its flags -> the one OpClass with them, shared by the nodes
_RANDOM_NAME = re.compile("|".join(RANDOM_WORDS))  # (a name containing any of the words)


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _member(target, collection) -> bool:
    try:
        return target in collection
    except TypeError:  # an unhashable target
        return False


def classify(op: str, target, func=None) -> OpClass:
    """The class of a node ``op``/``target`` recorded for the call ``func`` (None: made by a pass)."""
    if op not in ("call_function", "call_method"):
        return NOT_AN_OP
    name = _name(target)
    function = op == "call_function"
    flags = (_RANDOM_NAME.search(name) is not None,  # random
             func is not None and is_inplace(func),  # effectful
             name.endswith("_") and not name.endswith("__"),  # inplace
             _member(target, VIEW_FUNCTIONS if function else VIEW_METHODS),  # view
             _member(target, ACTIVATION_FUNCTIONS if function else ACTIVATION_METHODS),  # activation
             _member(target, TRANSCENDENTAL),  # transcendental
             _member(target, CHEAP_FUNCTIONS if function else CHEAP_METHODS))  # cheap
    cls = _interned.get(flags)
    if cls is None:
        cls = _interned[flags] = OpClass(*flags)
    return cls


def classify_node(node) -> OpClass:
    """Write ``node``'s class into its metadata (where the node is created); return it."""
    cls = node.meta[OP_CLASS] = classify(node.op, node.target, node.meta.get("func"))
    return cls


def op_class(node) -> OpClass:
    """``node``'s class, as written when it was created (classified now if it was not)."""
    cls = node.meta.get(OP_CLASS)
    return cls if cls is not None else classify_node(node)
