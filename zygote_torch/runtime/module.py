"""``zt.compile(module)``: a module for an unchanged PyTorch training loop whose forward runs our
staged forward program and whose backward runs our generated backward, through a
``torch.autograd.Function`` bridge.

    cm = zt.compile(model)
    loss = F.cross_entropy(cm(x), y); loss.backward(); opt.step()

Programs are cached per input signature (and per grad mode). Buffers are graph inputs updated in
place by the forward, so BatchNorm running statistics move as in eager mode.
"""
from __future__ import annotations

import torch

from ..ad.tangents import is_differentiable
from .compile import signature, stage
from .staged import Program, build


class _Bridge(torch.autograd.Function):
    """forward: our forward program; backward: our backward program on the saved residuals."""

    @staticmethod
    def forward(ctx, program: Program, *inputs):
        results = program.forward(*inputs)
        n = program.n_outputs
        outputs, residuals = results[:n], results[n:]
        ctx.program = program
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(*residuals)
        ctx.mark_non_differentiable(*[o for o in outputs if isinstance(o, torch.Tensor) and not is_differentiable(o)])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *douts):
        program = ctx.program
        dys = [douts[i] for i in program.seeded_outputs]
        grads = program.backward(*ctx.saved_tensors, *dys)
        per_input = [None] * ctx.n_inputs
        for k, i in enumerate(program.joint.wrt):
            per_input[i] = grads[k]
        return (None, *per_input)


class CompiledModule(torch.nn.Module):
    """Wraps ``module``: same parameters, buffers and ``state_dict``; staged forward and backward."""

    def __init__(self, module: torch.nn.Module, memory_budget: float | None = None):
        super().__init__()
        self.module = module
        self.memory_budget = memory_budget
        self._programs: dict = {}

    def forward(self, *args):
        call = lambda m, *a: m(*a)  # noqa: E731
        full = (self.module,) + args
        requires = tuple(t.requires_grad for t in list(self.module.parameters()) + list(self.module.buffers())
                         + [a for a in args if isinstance(a, torch.Tensor)])
        differentiating = torch.is_grad_enabled() and any(requires)
        key = (signature(full), differentiating, requires)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = build(call, full, seeded=True, differentiate=_requires_grad,
                                                  memory_budget=self.memory_budget) \
                if differentiating else stage(call, full)
        if not differentiating:
            with torch.no_grad():
                return program(full)
        inputs = program.traced.input_values(full)
        outputs = _Bridge.apply(program, *inputs)
        return program.traced.output_structure(list(outputs))


def _requires_grad(inp, value) -> bool:
    """Differentiate the inputs autograd will ask about: those that require grad."""
    return isinstance(value, torch.Tensor) and value.requires_grad
