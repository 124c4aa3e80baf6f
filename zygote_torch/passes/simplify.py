"""Algebraic simplification: remove nodes that compute their own input.

``x * 1``, ``x + 0``, ``x.mT.mT``, ``x.reshape(x.shape)``, ``x.expand(x.shape)``, ``x.to(x.dtype)``,
``-(-x)``, ``x.contiguous()`` on a contiguous value... Each rewrite checks, with the recorded
shapes and dtypes (``meta['val']``), that the result is exactly the input: same shape, same dtype.
Rules write such nodes freely (a pullback of ``reshape`` reshapes, whether or not it is needed);
this pass is why they may.

A node that computes a new tensor equal to its input is replaced only when the two could not be
told apart (:mod:`.aliasing`): neither is written after it, and it is not something the program
returns (which would then be the caller's own tensor, or another output). A view equal to its input
is replaced unless it is written itself or something asks it what it is a view of (``._base``).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..capture.op_classes import op_class
from .aliasing import Aliasing

_SAME_SHAPE_METHODS = {"reshape", "view", "expand", "view_as", "reshape_as", "expand_as"}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_meta(a: fx.Node, b: fx.Node) -> bool:
    va, vb = _val(a), _val(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
            and va.dtype == vb.dtype and va.device == vb.device)


def _is_constant(arg, value) -> bool:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return arg == value
    return False


def _identity_input(node: fx.Node):
    """The input ``node`` merely reproduces, or None."""
    if node.op == "call_function":
        t, args = node.target, node.args
        if t in (operator.mul, torch.mul) and len(args) == 2:
            for i, j in ((0, 1), (1, 0)):
                if isinstance(args[i], fx.Node) and _is_constant(args[j], 1):
                    return args[i]
        if t in (operator.add, torch.add) and len(args) == 2 and not node.kwargs:
            for i, j in ((0, 1), (1, 0)):
                if isinstance(args[i], fx.Node) and _is_constant(args[j], 0):
                    return args[i]
        if t in (operator.sub,) and len(args) == 2 and isinstance(args[0], fx.Node) and _is_constant(args[1], 0):
            return args[0]
        if t in (operator.truediv,) and len(args) == 2 and isinstance(args[0], fx.Node) and _is_constant(args[1], 1):
            return args[0]
        if t is operator.neg and isinstance(args[0], fx.Node) and args[0].target is operator.neg:
            return args[0].args[0]
        if t is getattr and args[1] in ("mT", "T") and isinstance(args[0], fx.Node) \
                and args[0].target is getattr and args[0].args[1] == args[1]:
            return args[0].args[0]
    if node.op == "call_method" and isinstance(node.args[0], fx.Node):
        if node.target in _SAME_SHAPE_METHODS:
            return node.args[0]
        if node.target == "contiguous" and _val(node.args[0]) is not None and _val(node.args[0]).is_contiguous():
            return node.args[0]
        if node.target == "to" and len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.dtype):
            return node.args[0]
    return None


def _asks_base(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads which tensor ``node`` is a view of (replacing the view changes it)."""
    return (user.op == "call_function" and user.target is getattr and user.args[0] is node
            and user.args[1] in ("_base", "_is_view")) or (user.op == "call_method" and user.target == "_is_view")


def _interchangeable(node: fx.Node, source: fx.Node, aliasing: Aliasing) -> bool:
    """Whether ``node`` may be replaced by ``source``: see the module docstring."""
    if node in aliasing.written_directly or op_class(node).effectful:
        return False
    if aliasing.is_view_of_inputs(node):
        return not any(_asks_base(u, node) for u in node.users)
    return not (aliasing.written_after(node) or aliasing.written_after(source, aliasing.position[node])
                or aliasing.escapes(node))


def simplify(graph: fx.Graph) -> int:
    """Replace identity nodes by their inputs; return how many were removed."""
    aliasing = Aliasing(graph)
    removed = 0
    for node in list(graph.nodes):
        source = _identity_input(node)
        if source is not None and _same_meta(node, source) and _interchangeable(node, source, aliasing):
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            removed += 1
    return removed
