"""Rematerialisation: recompute cheap elementwise values where they are needed late instead of
keeping them alive.

A forward value used again by the backward (gelu's output, read by the next linear's weight
gradient) occupies memory all the way from the forward to that use. When the value is one cheap
elementwise op away from inputs that are alive at that point anyway (gelu's input, which gelu's own
pullback reads), computing it again just before the late use costs one memory-bound kernel and frees
the bytes for the whole interval (on the GPU; the CPU keeps transcendental activations, which are
compute-bound there). The pass works on any graph (no forward/backward labels needed):
it splits a node's uses at the largest gap in program order and recomputes for the late group when
every input outlives it, and when neither it nor what it reads is written after it
(:mod:`.aliasing`), so the value computed again is the value it had.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture.op_classes import op_class
from .aliasing import Aliasing

_MIN_GAP = 8  # nodes between the early and the late uses for recomputation to pay off


def _is_cheap(node: fx.Node) -> bool:
    """An elementwise activation or cast (:mod:`..capture.op_classes`), except, on the CPU, the
    transcendental ones (compute-bound there)."""
    val = node.meta.get("val")
    cls = op_class(node)
    if cls.effectful or not isinstance(val, torch.Tensor):
        return False
    if val.device.type == "cpu" and cls.transcendental:
        return False
    return cls.activation


def recompute_cheap_values(graph: fx.Graph) -> int:
    """Apply the rematerialisation described above; return how many values were recomputed."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    last_use = {}
    for n in graph.nodes:
        for a in n.all_input_nodes:
            last_use[a] = order[n]
    aliasing = Aliasing(graph)
    changed = 0
    for node in list(graph.nodes):
        if not _is_cheap(node) or len(node.users) < 2 or not aliasing.stable(node):
            continue
        uses = sorted(node.users, key=order.__getitem__)
        gaps = [(order[b] - order[a], k + 1) for k, (a, b) in enumerate(zip(uses, uses[1:]))]
        gap, split = max(gaps)
        late = [u for u in uses[split:] if u.op != "output"]
        if gap < _MIN_GAP or not late:
            continue
        start = order[late[0]]
        if not all(a.op in ("placeholder", "get_attr") or last_use.get(a, -1) >= start
                   for a in node.all_input_nodes):
            continue
        with graph.inserting_before(late[0]):
            copy = graph.node_copy(node)
        for user in late:
            user.replace_input_with(node, copy)
        changed += 1
    return changed
