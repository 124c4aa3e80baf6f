"""Staged capture: ``f(*args)`` -> a forward ``torch.fx.Graph`` on fake tensors.

Every leaf of the arguments becomes a placeholder: tensors, Python floats (as 0-d float64 tensors)
and the parameters and buffers of modules passed in. Tensors that ``f`` reaches by other routes
(globals, closures, module attributes) are lifted to placeholders too when first used, so the graph
reads them afresh at each run. Other Python values (ints, strings, flags) are baked in: the graph is
specialised on them, as on shapes and dtypes.

A Python float stays a float: the tensor standing for it is marked (:func:`.arguments.stands_for_float`), and
so is what Python's number operators compute from marked values only (``a * 2.0 + b``, ``-a``,
``a ** b``; ``a > b`` stands for a bool), as eager Python would compute floats there. Outputs so
marked are given back as Python floats and bools.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from . import leaves
from .pytree import flatten
from .op_classes import METADATA_CALL, call_kind
from .recorder import GraphBuilder, Recorder

from .arguments import Arguments, is_python_float, mark_python_number, python_type


# The Tensor methods Python's number operators dispatch to (``a * b`` reaches ``TensorBase.mul``), and
# the Python type their result has when every operand is a Python number.
_NUMBER_OPERATORS = {name: float for name in (
    "add", "sub", "__rsub__", "mul", "div", "__rdiv__", "__floordiv__", "__rfloordiv__", "remainder",
    "__rmod__", "pow", "__rpow__", "neg", "positive", "abs")}
_NUMBER_OPERATORS.update({name: bool for name in ("lt", "le", "gt", "ge", "__eq__", "ne")})


def _python_result_type(func, args: tuple, kwargs: dict, out):
    """The Python type eager Python gives ``func(*args)`` when it is a number operator applied to
    values standing for Python numbers only (None otherwise)."""
    kind = _NUMBER_OPERATORS.get(getattr(func, "__name__", None))
    if kind is None or not getattr(func, "__qualname__", "").startswith(("TensorBase.", "Tensor.")) or kwargs or not isinstance(out, torch.Tensor) or out.dim() != 0:
        return None
    operands = [a for a in args if isinstance(a, torch.Tensor)]
    if operands and all(python_type(a) in (float, bool) for a in operands):
        return kind
    return None


def _output_converter(out_leaves: list, rebuild):
    """``rebuild`` giving back marked outputs as the Python numbers they stand for."""
    kinds = [(i, python_type(v)) for i, v in enumerate(out_leaves)
             if isinstance(v, torch.Tensor) and python_type(v) is not None]
    if not kinds:
        return rebuild

    def rebuild_with_numbers(leaves):
        leaves = list(leaves)
        for i, kind in kinds:
            if isinstance(leaves[i], torch.Tensor):
                leaves[i] = kind(leaves[i].item())
        return rebuild(leaves)
    return rebuild_with_numbers


@dataclass
class Input:
    """A placeholder of a traced graph and where its value comes from at each run."""

    node: fx.Node
    arg_index: int | None  # which argument of f (None: a tensor captured from elsewhere)
    leaf_index: int | None  # which leaf of that argument
    tensor: torch.Tensor | None = None  # the captured tensor when not an argument
    python_float: bool = False
    source: object = None  # a captured tensor: a function reading it afresh at each run (else: ``tensor``)


@dataclass
class Traced:
    """The forward graph of ``f`` at one input signature."""

    builder: GraphBuilder
    inputs: list[Input]
    output_structure: object  # rebuild(leaves) -> f's output structure
    n_outputs: int
    arg_leaves: list = field(default_factory=list)  # per argument: its leaves at trace time
    metadata_read: dict = field(default_factory=dict)  # id -> real tensors whose shape, dtype... f read

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
                values.append(inp.tensor if inp.source is None else inp.source())
                continue
            v = flat_args[inp.arg_index][inp.leaf_index]
            values.append(torch.tensor(float(v), dtype=torch.float64) if inp.python_float else v)
        return values


class _TraceRecorder(Recorder):
    """The staging recorder (``on_call`` is the builder's ``record``), also noting the real tensors
    whose metadata (shape, dtype, ...) the traced code reads (the trace is specialised on them, so
    the guards check them), and marking what number operators compute from Python numbers."""

    def __init__(self, on_call, metadata_read: dict):
        super().__init__(on_call, tracked=None)
        self.metadata_read = metadata_read

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if call_kind(func) is METADATA_CALL:
            for a in args:
                if isinstance(a, torch.Tensor) and not isinstance(a, FakeTensor):
                    self.metadata_read[id(a)] = a
        out = super().__torch_function__(func, types, args, kwargs)
        kind = _python_result_type(func, args, kwargs or {}, out)
        return mark_python_number(out, kind) if kind is not None else out


def _arg_names(f, n: int) -> list[str]:
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [names[i] if i < len(names) else f"arg{i}" for i in range(n)]


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text)


class _LiftedArguments(Arguments):
    """The arguments of a traced call: each tensor leaf and Python float a placeholder of the graph
    (named after ``f``'s parameter, and a module's after its parameters' names), which ``f`` sees
    as its fake tensor (a module's parameters are read in place, through the module)."""

    def __init__(self, f, args: tuple, builder: GraphBuilder):
        self.builder, self.names, self.inputs = builder, _arg_names(f, len(args)), []
        super().__init__(args)

    def standins(self, index: int, arg, flat: list) -> list:
        name, builder = self.names[index], self.builder
        names = [f"{name}_{n}" for n, _ in arg.named_parameters()] if isinstance(arg, torch.nn.Module) \
            else [name if len(flat) == 1 else f"{name}_{j}" for j in range(len(flat))]
        standins = []
        for j, (leaf, leaf_name) in enumerate(zip(flat, names)):
            if isinstance(leaf, torch.Tensor):
                fake = builder.lift(leaf, _identifier(leaf_name))
                self.inputs.append(Input(builder.env[id(fake)], index, j))
                standins.append(fake if not isinstance(arg, torch.nn.Module) else leaf)
            elif is_python_float(leaf):
                real = torch.tensor(float(leaf), dtype=torch.float64)
                fake = mark_python_number(builder.lift(real, _identifier(leaf_name)))
                self.inputs.append(Input(builder.env[id(fake)], index, j, python_float=True))
                standins.append(fake)
            else:
                standins.append(leaf)
        return standins


def trace(f, args: tuple, fake_mode: FakeTensorMode | None = None) -> Traced:
    """Record ``f(*args)`` on fake tensors into a forward graph."""
    builder = GraphBuilder(fake_mode or FakeTensorMode())
    arguments = _LiftedArguments(f, args, builder)
    inputs = arguments.inputs
    n_args = len(builder.lifted)
    metadata_read: dict = {}
    recorder = _TraceRecorder(builder.record, metadata_read)
    with torch.no_grad(), leaves.intercepting(leaves.leaf_functions()), recorder:
        out = f(*arguments.call_args)
    for real, node in builder.lifted[n_args:]:
        inputs.append(Input(node, None, None, tensor=real))
    out_leaves, rebuild_out = flatten(out)
    builder.output(tuple(out_leaves))
    return Traced(builder, inputs, _output_converter(out_leaves, rebuild_out), len(out_leaves),
                  [flat for flat, _ in arguments.structures], metadata_read)
