"""Partition a joint graph into a forward and a backward program.

Nodes recorded while the tape was walked backwards are tagged ``meta['phase'] == 'backward'``.
The forward program computes the outputs and the residuals; the backward program takes the
residuals (and output cotangents), recomputes the cheap forward values it needs that were not kept
(see :mod:`.mincut`), and returns the input cotangents.
"""
from __future__ import annotations

import torch.fx as fx

from .aliasing import Aliasing
from .mincut import choose_residuals


def partition(gm: fx.GraphModule, n_outputs: int, memory_budget: float | None = None) \
        -> tuple[fx.GraphModule, fx.GraphModule, list[str]]:
    """(forward, backward, residual names). The joint output is ``(*outputs, *grads)``;
    placeholders named ``d_output*`` (output cotangents) belong to the backward program."""
    joint = gm.graph
    output = next(n for n in joint.nodes if n.op == "output")
    outs, grads = output.args[0][:n_outputs], output.args[0][n_outputs:]
    is_backward = {n for n in joint.nodes if n.meta.get("phase") == "backward"
                   or (n.op == "placeholder" and n.name.startswith("d_output"))}
    forward = [n for n in joint.nodes if n not in is_backward and n.op != "output"]
    needed = {n for n in forward if n.op != "get_attr" and any(u in is_backward for u in n.users)}
    needed |= {g for g in grads if isinstance(g, fx.Node) and g not in is_backward and g.op != "get_attr"}
    residuals, recomputed = choose_residuals(forward, needed, memory_budget, Aliasing(joint).stable)

    fwd, fenv = fx.Graph(), {}
    for n in joint.nodes:
        if n not in is_backward and n.op != "output":
            fenv[n] = fwd.node_copy(n, fenv.__getitem__)
    fwd.output(tuple(fenv[o] if isinstance(o, fx.Node) else o for o in outs) + tuple(fenv[r] for r in residuals))

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
    fwd_gm, bwd_gm = fx.GraphModule(gm, fwd), fx.GraphModule(gm, bwd)
    from .dce import eliminate_dead_code
    for g in (fwd_gm, bwd_gm):
        eliminate_dead_code(g.graph)
        g.recompile()
    return fwd_gm, bwd_gm, [r.name for r in residuals]
