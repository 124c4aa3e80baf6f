"""Dead-code elimination: drop nodes whose values nothing uses."""
from __future__ import annotations

import torch.fx as fx

def _is_effectful(node: fx.Node) -> bool:
    """Placeholders, outputs, and ops that mutate (in-place Tensor methods such as ``add_``)."""
    if node.meta.get("effectful"):
        return True
    if node.op == "call_method" and isinstance(node.target, str):
        return node.target.endswith("_") and not node.target.startswith("__")
    return node.op in ("placeholder", "output") or node.is_impure()


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """Remove unused pure nodes, last to first; True if anything was removed."""
    changed = False
    for node in reversed(list(graph.nodes)):
        if not node.users and not _is_effectful(node):
            graph.erase_node(node)
            changed = True
    return changed
