"""Dead-code elimination: drop nodes whose values nothing uses."""
from __future__ import annotations

import torch.fx as fx

from ..capture.op_classes import op_class
from .aliasing import writes


def _is_effectful(node: fx.Node) -> bool:
    """Placeholders, outputs, and ops that write memory (``add_``, ``x[i] = v``, ``out=``,
    ``inplace=True``: see :mod:`.aliasing` and :mod:`..capture.op_classes`)."""
    if op_class(node).effectful or writes(node):
        return True
    return node.op in ("placeholder", "output") or node.is_impure()


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """Remove unused pure nodes, last to first; True if anything was removed."""
    changed = False
    for node in reversed(list(graph.nodes)):
        if not node.users and not _is_effectful(node):
            graph.erase_node(node)
            changed = True
    return changed
