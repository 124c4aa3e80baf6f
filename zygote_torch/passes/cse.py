"""Common-subexpression elimination: one node per distinct pure computation."""
from __future__ import annotations

import torch.fx as fx

from .constant_fold import _is_random
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


def eliminate_common_subexpressions(graph: fx.Graph) -> int:
    """Replace each pure node identical to an earlier one by that one; return how many."""
    seen: dict = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or _is_effectful(node) or _is_random(node):
            continue
        try:
            key = _key(node)
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            removed += 1
        else:
            seen[key] = node
    return removed
