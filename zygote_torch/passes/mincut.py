"""Which forward values the backward program keeps: a bytes-weighted minimum cut.

The backward reads some forward values. Each can be kept (a residual, costing its bytes until the
backward uses it) or recomputed in the backward from other kept values, when it is cheap (an
elementwise op or a view). Following the rematerialising partitioner of AOTAutograd: every forward
node ``v`` becomes an edge ``v_in -> v_out`` of capacity ``bytes(v)``; data dependencies are
infinite edges ``u_out -> v_in``; the source feeds the inputs and every node that may not be
recomputed (matmuls, reductions, random or in-place ops); the values the backward reads drain to the
sink. A minimum cut is a cheapest set of kept values from which everything else the backward needs
can be recomputed. Program inputs cost nothing to keep (they are alive anyway). Under a memory
budget the cut may also recompute expensive pure ops. A value whose memory, or whose inputs'
memory, the forward writes after it was computed is never recomputed (``stable``, from
:mod:`.aliasing`): computed again it would differ.
"""
from __future__ import annotations

import collections

import torch
import torch.fx as fx

from ..capture.op_classes import op_class

_INF = float("inf")


def _bytes(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.numel() * value.element_size())
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    return _INF


def _recomputable(node: fx.Node, any_pure_op: bool, stable) -> bool:
    """Whether the backward may compute ``node`` again: a cheap op (:mod:`..capture.op_classes`:
    activations, arithmetic, views), or under a memory budget (or where ``node`` may not be kept)
    any op but random ones; never one that writes, nor one whose value would differ (``stable``)."""
    cls = op_class(node)
    if cls.effectful or node.op not in ("call_function", "call_method") or not stable(node):
        return False
    if any_pure_op:  # under a memory budget: anything but random ops may run again
        return not cls.random
    return cls.cheap


def _max_flow_source_side(edges: dict, source, sink) -> set:
    """The nodes on the source side of a minimum cut (Edmonds-Karp)."""
    residual = collections.defaultdict(dict)
    for (u, v), c in edges.items():
        residual[u][v] = residual[u].get(v, 0) + c
        residual[v].setdefault(u, 0)
    while True:
        parent = {source: None}
        queue = collections.deque([source])
        while queue and sink not in parent:
            u = queue.popleft()
            for v, c in residual[u].items():
                if c > 0 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if sink not in parent:
            return set(parent)
        path, v = [], sink
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        flow = min(residual[u][v] for u, v in path)
        if flow == _INF:
            raise RuntimeError("min-cut: an infinite path; a value the backward needs cannot be kept")
        for u, v in path:
            residual[u][v] -= flow
            residual[v][u] += flow


def choose_residuals(forward: list, needed: set, memory_budget: float | None = None,
                     stable=lambda node: True, keepable=None) -> tuple[list, list]:
    """(kept, recomputed) forward nodes, in program order, for a backward that reads ``needed``;
    ``stable(node)``: whether computing ``node`` again after the forward gives its value.

    With ``memory_budget`` (bytes): if the kept values of the cheap-recompute cut exceed it, the cut
    is made again with every pure op recomputable (matmuls too), trading compute for memory.
    ``keepable`` (a set of nodes; None: all): only these may be kept, and they are never computed
    again (a program for a forward the user's own code runs: what it made costs nothing to keep
    beyond its memory); every other value the backward needs is computed again from them (any pure
    op may then run again), and a value that can be neither (a random draw no kept value gives)
    raises ``RuntimeError``."""
    kept, recomputed = _cut(forward, needed, False, stable, keepable)
    if memory_budget is not None and kept_bytes(kept) > memory_budget:
        kept, recomputed = _cut(forward, needed, True, stable, keepable)
    return kept, recomputed


def kept_bytes(kept: list) -> float:
    """The bytes of the kept values that are not program inputs (those are alive anyway)."""
    return sum(_bytes(n.meta.get("val")) for n in kept if n.op != "placeholder")


def _cut(forward: list, needed: set, any_pure_op: bool, stable, keepable=None) -> tuple[list, list]:
    edges: dict = {}
    for n in forward:
        if n.op == "get_attr":
            continue
        val = n.meta.get("val")
        cost = 0.0 if n.op == "placeholder" else _bytes(val)
        if isinstance(val, (tuple, list)):  # keep a multi-output call's items rather than the tuple, on a tie
            cost += 1.0
        may_keep = keepable is None or n in keepable
        edges[(("in", n), ("out", n))] = cost if may_keep else _INF
        if n.op == "placeholder" or keepable is not None and may_keep \
                or not _recomputable(n, any_pure_op or not may_keep, stable):
            edges[("source", ("in", n))] = _INF
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                edges[(("out", a), ("in", n))] = _INF
        if n in needed:
            edges[(("out", n), "sink")] = _INF
    reachable = _max_flow_source_side(edges, "source", "sink")
    kept = [n for n in forward if n.op != "get_attr" and ("in", n) in reachable and ("out", n) not in reachable]
    recomputed = [n for n in forward if n.op != "get_attr" and n.op != "placeholder" and ("in", n) not in reachable]
    return kept, recomputed
