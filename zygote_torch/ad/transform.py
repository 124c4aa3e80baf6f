"""The reverse transform: a forward fx graph -> one joint graph computing outputs and cotangents.

The forward graph is replayed node by node onto fake tensors under a recording mode; each call goes
through the same :class:`~.tape.Tape` as the dynamic path, so its rule's forward ops are written as
forward nodes. The tape is then walked backwards under the same mode, and the pullbacks' ops become
the backward nodes. Symbolic zeros stay symbolic (no node is ever written for them), cotangents of
values used more than once are summed, and unbroadcasting is the rules' own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..capture import leaves
from ..capture.recorder import GraphBuilder
from ..capture.trace import Traced
from .registry import REGISTRY
from .tape import TAPE_EFFECTS, Tape


@dataclass
class Joint:
    """``graph(*inputs[, *output_cotangents]) -> (*outputs, *cotangents of wrt inputs)``."""

    builder: GraphBuilder
    n_outputs: int
    wrt: list[int]  # indices into the traced inputs whose cotangents are returned
    seeded: bool  # True: output cotangents are inputs of the graph; False: ones (gradient)

    @property
    def graph(self) -> fx.Graph:
        return self.builder.graph


def reverse(traced: Traced, wrt: list[int], seeded: bool) -> Joint:
    """Build the joint forward+backward graph of ``traced`` differentiating the inputs ``wrt``.

    User functions with rules stay single calls in the joint graph too (their rules' calls of
    them are recorded as calls, not as their bodies).
    """
    with leaves.intercepting(REGISTRY.python_leaves()):
        return _reverse(traced, wrt, seeded)


def _reverse(traced: Traced, wrt: list[int], seeded: bool) -> Joint:
    joint = GraphBuilder(traced.builder.fake_mode, lift_real_tensors=False)
    tape = Tape(staged=True)
    values: dict[fx.Node, object] = {}
    wrt_nodes = {traced.inputs[i].node for i in wrt}
    with joint.recorder():
        for node in traced.graph.nodes:
            if node.op == "placeholder":
                value = values[node] = node.meta["val"]
                joint.placeholder(node.name, value)
                if node in wrt_nodes:
                    tape.track_input(value)
            elif node.op == "output":
                outputs = [_value(a, values) for a in node.args[0]]
            elif node.op == "get_attr":  # an object with no literal form (a torch.Generator, ...)
                values[node] = traced.builder.constants[node.target]
            elif node.meta.get("func") is None:  # getitem of a multi-output call
                values[node] = _value(node.args[0], values)[node.args[1]]
            else:
                args = _value(node.meta["func_args"], values)
                kwargs = _value(node.meta["func_kwargs"], values)
                tape.where = node.meta.get("where")
                tape.differentiating = node.meta.get("user_grad", True)
                effect = TAPE_EFFECTS.get(node.meta["func"])
                values[node] = effect(tape, *args, **kwargs) if effect else tape.record(node.meta["func"], args, kwargs)
    tape.where, tape.differentiating = None, True
    joint.phase = "backward"
    differentiable = [(i, y) for i, y in enumerate(outputs) if isinstance(y, torch.Tensor) and tape.tracks(y)]
    if seeded:
        seeds = [(y, joint.new_input(f"d_output{i}", y)) for i, y in differentiable]
    with joint.recorder():
        if not seeded:
            seeds = [(y, torch.ones(y.shape, dtype=y.dtype, device=y.device)) for _, y in differentiable]
        cot = tape.backward(seeds, keep=False)
    grads = [tape.cotangent(cot, traced.inputs[i].node.meta["val"]) for i in wrt]
    joint.output(tuple(outputs) + tuple(grads))
    return Joint(joint, len(outputs), list(wrt), seeded)


def _value(arg, values: dict):
    """Replace graph nodes in ``arg`` (a node, or containers of them) by their replayed values."""
    if isinstance(arg, fx.Node):
        return values[arg]
    if isinstance(arg, (tuple, list)):
        return type(arg)(_value(a, values) for a in arg)
    if isinstance(arg, dict):
        return {k: _value(v, values) for k, v in arg.items()}
    return arg
