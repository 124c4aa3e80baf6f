"""Staged programs: trace once, transform, optimise, generate Python, run.

``build(f, args, seeded)`` runs the pipeline capture -> ad -> passes -> runtime for one input
signature and returns a :class:`Program` whose ``forward`` and ``backward`` are generated
``torch.fx.GraphModule``s (``.code`` is their Python source). :func:`gradient_program` is the
program of ``zt.gradient(f, *args)`` that ``zt.code`` prints and ``zt.draw`` draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ad.tangents import is_differentiable
from ..ad.transform import Joint, reverse
from ..capture.arguments import Arguments, implicit_call, implicit_params
from ..capture.pytree import flatten
from ..capture.trace import Traced, trace
from ..passes import optimize, partition


@dataclass
class Program:
    traced: Traced
    joint: Joint
    forward: fx.GraphModule  # inputs -> (*outputs, *residuals)
    backward: fx.GraphModule  # (*residuals, *output cotangents) -> cotangents of wrt inputs
    residuals: list[str]
    seeded_outputs: list[int]  # outputs whose cotangent the backward takes

    @property
    def n_outputs(self) -> int:
        return self.joint.n_outputs

    def code(self) -> str:
        back = self.backward.code.replace("def forward(", "def backward(", 1)
        return f"# forward\n{self.forward.code.strip()}\n\n# backward\n{back.strip()}\n"


def build(f, args: tuple, seeded: bool, differentiate=None, memory_budget: float | None = None,
          traced: Traced | None = None) -> Program:
    """Stage ``f`` at ``args`` (``traced``: its trace, when made already). ``differentiate(input,
    value)`` picks the inputs to differentiate with respect to (default: every floating-point
    argument leaf); ``memory_budget`` (bytes) bounds the residuals kept between forward and
    backward, recomputing more where needed."""
    traced = traced or trace(f, args)
    differentiate = differentiate or (lambda inp, value: inp.arg_index is not None)
    wrt = [i for i, inp in enumerate(traced.inputs)
           if is_differentiable(inp.node.meta["val"]) and differentiate(inp, traced.value_at_trace(inp))]
    joint = reverse(traced, wrt, seeded)
    gm = joint.builder.module()
    optimize(gm, literal_outputs={joint.n_outputs + k for k, i in enumerate(wrt) if traced.inputs[i].python_float})
    fwd, bwd, residuals = partition(gm, joint.n_outputs, memory_budget)
    seeded_outputs = [int(n.name[len("d_output"):]) for n in bwd.graph.nodes
                      if n.op == "placeholder" and n.name.startswith("d_output")]
    return Program(traced, joint, fwd, bwd, residuals, seeded_outputs)


def gradient_program(f, args: tuple) -> Program:
    """The program of ``zt.gradient(f, *args)``, unseeded (the backward starts from 1); for
    implicit ``zt.Params`` (``args == (ps,)``), of ``f()`` with the parameters as its inputs
    ``param_0``, ... (see :func:`..capture.arguments.implicit_call`)."""
    ps = implicit_params(args)
    if ps is not None:
        f, args = implicit_call(f, ps)
    return build(f, tuple(args), seeded=False)


def _gradients_per_argument(program: Program, args: tuple, grads) -> tuple:
    """Map the backward's outputs (one per wrt input) back onto the arguments' structures."""
    by_leaf = {}
    for k, i in enumerate(program.joint.wrt):
        inp = program.traced.inputs[i]
        g = grads[k]
        if g is not None and inp.python_float:
            g = float(g)
        by_leaf[(inp.arg_index, inp.leaf_index)] = g
    arguments = Arguments(args)
    return arguments.gradients_of([[by_leaf.get((i, j)) for j in range(len(flat))]
                                   for i, (flat, _) in enumerate(arguments.structures)])


def pullback(f, *args):
    """The staged counterpart of :func:`zygote_torch.pullback` (traced afresh at each call)."""
    program = build(f, args, seeded=True)
    results = program.forward(*program.traced.input_values(args))
    outs, residuals = results[:program.n_outputs], results[program.n_outputs:]
    y = program.traced.output_structure(list(outs))

    def back(dy):
        dy_leaves = flatten(dy)[0]
        seeds = [torch.as_tensor(dy_leaves[i], dtype=outs[i].dtype) for i in program.seeded_outputs]
        return _gradients_per_argument(program, args, program.backward(*residuals, *seeds))

    return y, back

