"""Common-subexpression elimination: one node per distinct pure computation.

Two identical calls give the same value only where memory does not change under them
(:mod:`.aliasing`): a later duplicate is merged into an earlier one when they are views of the same
memory (the same bytes, whatever is written there), or when neither value is ever written,
nothing they read is written between them, and they are not both returned (the caller would get
one tensor twice).
"""
from __future__ import annotations

import torch.fx as fx

from ..capture.op_classes import op_class
from .aliasing import Aliasing
from .dce import _is_effectful


def _key(node: fx.Node):
    def freeze(a):
        if isinstance(a, (list, tuple)):
            return (type(a).__name__,) + tuple(freeze(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, freeze(v)) for k, v in a.items()))
        if isinstance(a, (fx.Node, int, float, bool, str, type(None), slice, type(Ellipsis))) \
                or type(a).__module__ == "torch":
            return (type(a).__name__, a if not isinstance(a, slice) else (a.start, a.stop, a.step))
        raise TypeError
    return node.op, node.target, freeze(node.args), freeze(node.kwargs)


def _same_value(first: fx.Node, later: fx.Node, aliasing: Aliasing, returned: set) -> bool:
    """Whether ``later`` may use ``first``'s value: see the module docstring."""
    if first in aliasing.written_directly or later in aliasing.written_directly:
        return False  # an in-place op on the value object itself (data, or shape as t_() changes it)
    if aliasing.is_view_of_inputs(first) and aliasing.is_view_of_inputs(later):
        return True
    return not (aliasing.written_anywhere(first) or aliasing.written_anywhere(later)
                or ((first in returned or aliasing.escapes(first)) and aliasing.escapes(later))
                or aliasing.inputs_written_between(first, aliasing.position[first], aliasing.position[later]))


def eliminate_common_subexpressions(graph: fx.Graph) -> int:
    """Replace each pure node identical to an earlier one by that one; return how many."""
    aliasing = Aliasing(graph)
    returned: set = set()  # nodes returned since a returned duplicate was merged into them
    seen: dict = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or _is_effectful(node) or op_class(node).random:
            continue
        try:
            key = _key(node)
            hash(key)
        except TypeError:
            continue
        first = seen.get(key)
        if first is not None and _same_value(first, node, aliasing, returned):
            if aliasing.escapes(node):
                returned.add(first)
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            removed += 1
        else:
            seen[key] = node
    return removed
