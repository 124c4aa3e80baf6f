"""Staged capture: ``f(*args)`` -> a forward ``torch.fx.Graph`` on fake tensors.

Every leaf of the arguments becomes a placeholder: tensors, Python floats (as 0-d float64 tensors)
and the parameters and buffers of modules passed in. Tensors that ``f`` reaches by other routes
(globals, closures, module attributes) are lifted to placeholders too when first used, so the graph
reads them afresh at each run. Other Python values (ints, strings, flags) are baked in: the graph is
specialised on them, as on shapes and dtypes.
"""
from __future__ import annotations

import inspect
import numbers
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ..ad.registry import REGISTRY
from . import leaves
from .pytree import flatten
from .recorder import GraphBuilder


def is_python_float(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, numbers.Integral))


@dataclass
class Input:
    """A placeholder of a traced graph and where its value comes from at each run."""

    node: fx.Node
    arg_index: int | None  # which argument of f (None: a tensor captured from elsewhere)
    leaf_index: int | None  # which leaf of that argument
    tensor: torch.Tensor | None = None  # the captured tensor (read at each run) when not an argument
    python_float: bool = False


@dataclass
class Traced:
    """The forward graph of ``f`` at one input signature."""

    builder: GraphBuilder
    inputs: list[Input]
    output_structure: object  # rebuild(leaves) -> f's output structure
    n_outputs: int
    arg_leaves: list = field(default_factory=list)  # per argument: its leaves at trace time

    @property
    def graph(self) -> fx.Graph:
        return self.builder.graph

    def value_at_trace(self, inp: Input):
        """The real value input ``inp`` had when traced."""
        if inp.arg_index is None:
            return inp.tensor
        return self.arg_leaves[inp.arg_index][inp.leaf_index]

    def input_values(self, args) -> list:
        """The real value of each placeholder for a call with ``args`` (same signature)."""
        flat_args = [flatten(a)[0] for a in args]
        values = []
        for inp in self.inputs:
            if inp.arg_index is None:
                values.append(inp.tensor)
                continue
            v = flat_args[inp.arg_index][inp.leaf_index]
            values.append(torch.tensor(float(v), dtype=torch.float64) if inp.python_float else v)
        return values


def _arg_names(f, n: int) -> list[str]:
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [names[i] if i < len(names) else f"arg{i}" for i in range(n)]


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text)


def trace(f, args: tuple, fake_mode: FakeTensorMode | None = None) -> Traced:
    """Record ``f(*args)`` on fake tensors into a forward graph."""
    builder = GraphBuilder(fake_mode or FakeTensorMode())
    inputs: list[Input] = []
    call_args, arg_leaves = [], []
    for i, (arg, name) in enumerate(zip(args, _arg_names(f, len(args)))):
        flat, rebuild_arg = flatten(arg, modules_as_dicts=False)
        arg_leaves.append(flat)
        names = [f"{name}_{n}" for n, _ in arg.named_parameters()] if isinstance(arg, torch.nn.Module) \
            else [name if len(flat) == 1 else f"{name}_{j}" for j in range(len(flat))]
        standins = []
        for j, (leaf, leaf_name) in enumerate(zip(flat, names)):
            if isinstance(leaf, torch.Tensor):
                fake = builder.lift(leaf, _identifier(leaf_name))
                inputs.append(Input(builder.env[id(fake)], i, j))
                standins.append(fake if not isinstance(arg, torch.nn.Module) else leaf)
            elif is_python_float(leaf):
                real = torch.tensor(float(leaf), dtype=torch.float64)
                fake = builder.lift(real, _identifier(leaf_name))
                inputs.append(Input(builder.env[id(fake)], i, j, python_float=True))
                standins.append(fake)
            else:
                standins.append(leaf)
        call_args.append(arg if isinstance(arg, torch.nn.Module) else rebuild_arg(standins))
    n_args = len(builder.lifted)
    with torch.no_grad(), leaves.intercepting(REGISTRY.python_leaves()), builder.recorder():
        out = f(*call_args)
    for real, node in builder.lifted[n_args:]:
        inputs.append(Input(node, None, None, tensor=real))
    out_leaves, rebuild_out = flatten(out)
    builder.output(tuple(out_leaves))
    return Traced(builder, inputs, rebuild_out, len(out_leaves), arg_leaves)
