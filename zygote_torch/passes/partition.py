"""Partition a joint graph into a forward and a backward program.

Nodes recorded while the tape was walked backwards are tagged ``meta['phase'] == 'backward'``.
The forward program computes the outputs and the residuals; the backward program takes the
residuals (and output cotangents), recomputes the cheap forward values it needs that were not kept
(see :mod:`.mincut`), and returns the input cotangents.
"""
from __future__ import annotations

import torch.fx as fx

from .aliasing import Aliasing
from .dce import eliminate_dead_code
from .mincut import choose_residuals


def partition(gm: fx.GraphModule, n_outputs: int, memory_budget: float | None = None) \
        -> tuple[fx.GraphModule, fx.GraphModule, list[str]]:
    """(forward, backward, residual names). The joint output is ``(*outputs, *grads)``;
    placeholders named ``d_output*`` (output cotangents) belong to the backward program."""
    joint = gm.graph
    output = next(n for n in joint.nodes if n.op == "output")
    outs, grads = output.args[0][:n_outputs], output.args[0][n_outputs:]
    is_backward = _backward_nodes(joint)
    forward = [n for n in joint.nodes if n not in is_backward and n.op != "output"]
    needed = _needed(forward, is_backward, grads)
    residuals, recomputed = choose_residuals(forward, needed, memory_budget, Aliasing(joint).stable)

    fwd, fenv = fx.Graph(), {}
    for n in joint.nodes:
        if n not in is_backward and n.op != "output":
            fenv[n] = fwd.node_copy(n, fenv.__getitem__)
    fwd.output(tuple(fenv[o] if isinstance(o, fx.Node) else o for o in outs) + tuple(fenv[r] for r in residuals))

    bwd = _backward_graph(joint, is_backward, residuals, recomputed, grads)
    fwd_gm, bwd_gm = fx.GraphModule(gm, fwd), fx.GraphModule(gm, bwd)
    for g in (fwd_gm, bwd_gm):
        eliminate_dead_code(g.graph)
        g.recompile()
    return fwd_gm, bwd_gm, [r.name for r in residuals]


def backward_only(gm: fx.GraphModule, keepable: set) -> tuple[fx.GraphModule, list]:
    """(backward program, residual nodes of ``gm``) of a joint graph whose output is the cotangents
    alone, for a forward that is not generated: the user's own code computed it (see
    :mod:`..runtime.replay`), so the backward may read only values that code made (``keepable``,
    nodes of ``gm``); every other forward value it needs it computes again from them. The program
    takes the residuals, then the output cotangents, in that order."""
    joint = gm.graph
    output = next(n for n in joint.nodes if n.op == "output")
    grads = output.args[0]
    is_backward = _backward_nodes(joint)
    forward = [n for n in joint.nodes if n not in is_backward and n.op != "output"]
    needed = _needed(forward, is_backward, grads)
    residuals, recomputed = choose_residuals(forward, needed, None, Aliasing(joint).stable, keepable)
    bwd_gm = fx.GraphModule(gm, _backward_graph(joint, is_backward, residuals, recomputed, grads))
    eliminate_dead_code(bwd_gm.graph)
    bwd_gm.recompile()
    return bwd_gm, residuals


def _backward_nodes(joint: fx.Graph) -> set:
    return {n for n in joint.nodes if n.meta.get("phase") == "backward"
            or (n.op == "placeholder" and n.name.startswith("d_output"))}


def _needed(forward: list, is_backward: set, grads) -> set:
    """The forward values the backward reads, and the gradients that are forward values."""
    needed = {n for n in forward if n.op != "get_attr" and any(u in is_backward for u in n.users)}
    return needed | {g for g in grads if isinstance(g, fx.Node) and g not in is_backward and g.op != "get_attr"}


def _backward_graph(joint: fx.Graph, is_backward: set, residuals: list, recomputed: list, grads) -> fx.Graph:
    """The backward program: residuals and output cotangents in, the recomputed forward values and
    the backward nodes, ``grads`` out."""
    bwd, benv = fx.Graph(), {}
    for r in residuals:
        benv[r] = bwd.placeholder(r.name)
        benv[r].meta = dict(r.meta)
    for n in joint.nodes:
        if n.op == "placeholder" and n in is_backward:
            benv[n] = bwd.node_copy(n)
    for n in joint.nodes:
        if n.op == "get_attr":
            benv[n] = bwd.node_copy(n)
    for n in recomputed:  # cheap forward values computed again from the kept ones
        benv[n] = bwd.node_copy(n, benv.__getitem__)
    for n in joint.nodes:
        if n in is_backward and n.op != "placeholder":
            benv[n] = bwd.node_copy(n, benv.__getitem__)
    bwd.output(tuple(benv[g] if isinstance(g, fx.Node) else g for g in grads))
    return bwd
