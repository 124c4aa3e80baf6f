"""Constant folding: evaluate, once, every node that depends on no input.

A gradient seed ``ones(())`` times the constant 5 becomes the constant 5: the backward of
``5x + 3`` is ``return 5.0``. Random ops (the nodes' class, :mod:`..capture.op_classes`) are
never folded. Folded 0-d results that feed the output directly may become Python numbers
(``literal_outputs``), the rest become tensor constants held by the module.

Memory decides what is constant (:mod:`.aliasing`): a node that writes is never evaluated ahead of
time; a value read after something wrote its memory is not known; a value whose memory is written
at all (``buf = torch.zeros(3); buf.add_(x)``: the factory runs at each call) or that the program
returns (the caller may write it; a Python-number literal excepted) stays computed at each call.
"""
from __future__ import annotations


import torch
import torch.fx as fx

from ..capture.op_classes import classify_node, op_class
from .aliasing import Aliasing, writes


def _evaluate(node: fx.Node, value_of) -> object:
    args = fx.node.map_arg(node.args, value_of)
    kwargs = fx.node.map_arg(node.kwargs, value_of)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def fold_constants(gm: fx.GraphModule, literal_outputs: set[int] = frozenset()) -> int:
    """Fold constant subgraphs of ``gm`` in place; return the number of nodes folded.

    ``literal_outputs``: positions of the (flat, tuple) output allowed to become Python numbers.
    """
    graph = gm.graph
    aliasing = Aliasing(graph)
    known: dict[fx.Node, object] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            known[node] = getattr(gm, node.target)
        elif node.op in ("call_function", "call_method") and not op_class(node).random and not writes(node) \
                and all(n in known for n in node.all_input_nodes) \
                and not aliasing.inputs_written_between(node, -1, aliasing.position[node]):
            with torch.no_grad():
                known[node] = _evaluate(node, known.__getitem__)
    folded = 0
    output = next(n for n in graph.nodes if n.op == "output")
    for node, value in known.items():
        if node.op == "get_attr" or not isinstance(value, torch.Tensor):
            continue
        live_users = [u for u in node.users if u not in known]
        if not live_users or aliasing.written_anywhere(node):
            continue  # unused, or computed at each call since its memory is written
        literal = _as_literal(value) if live_users == [output] and _output_positions(output, node) <= set(literal_outputs) \
            else None
        if literal is None and aliasing.escapes(node):
            continue  # computed at each call: the caller may write what the program returns
        if literal is not None:
            output.args = fx.node.map_arg(output.args, lambda n: literal if n is node else n)
        else:
            name = f"_folded_{folded}"
            gm.register_buffer(name, value)
            with graph.inserting_before(node):
                const = graph.get_attr(name)
            const.meta["val"] = node.meta.get("val")
            classify_node(const)
            node.replace_all_uses_with(const, delete_user_cb=lambda u: u not in known)
        folded += 1
    from .dce import eliminate_dead_code
    eliminate_dead_code(graph)
    gm.recompile()
    return folded


def _output_positions(output: fx.Node, node: fx.Node) -> set[int]:
    return {i for i, a in enumerate(output.args[0]) if a is node}


def _as_literal(value: torch.Tensor):
    if value.dim() != 0 or value.is_complex() or value.device.type != "cpu":
        return None
    return value.item()
