"""The per-node fallback: differentiate a call with no rule through ``torch.func.vjp``.

Dynamically the forward runs once, inside ``torch.func.vjp``. Staged, the pullback is one callable,
``vjp_<op>(dy, *inputs)``, so it becomes one node of the backward graph (recomputing that op's
forward inside it). Every use is visible: an entry with ``fallback=True`` in the tape, listed by
:func:`zygote_torch.fallbacks`.

The pullback returns one cotangent per positional argument, like a rule's, then one per keyword
argument (torch's own Python functions pass tensors such as ``weight=`` by keyword).
"""
from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function

from ..capture.pytree import tensors_in
from ..errors import op_name
from .tangents import NoTangent, is_differentiable, is_zero, unthunk


def _substitute(obj, it):
    """``obj`` with its tensors replaced, in order, by the items of ``it``."""
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        return type(obj)(*(_substitute(x, it) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_substitute(x, it) for x in obj)
    return obj


def _structure_cotangents(obj, it):
    """Cotangents mirroring argument ``obj`` (a tensor, or a list/tuple holding tensors)."""
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, (tuple, list)) and tensors_in(obj):
        return [_structure_cotangents(x, it) for x in obj]
    return NoTangent()


def _like(dy, out):
    """dy shaped like ``out``, as torch.func.vjp wants it: symbolic zeros, and the cotangents of
    integer outputs (which it ignores), materialised as zeros."""
    if isinstance(out, torch.Tensor):
        dy = unthunk(dy)
        return torch.zeros_like(out) if is_zero(dy) or not is_differentiable(out) else dy
    if not isinstance(out, (tuple, list)):
        return out  # a non-tensor output (None, a number) needs no cotangent
    parts = [_like(d, o) for d, o in zip(dy, out)]
    return type(out)(*parts) if hasattr(type(out), "_fields") else type(out)(parts)


class _Call:
    """A call ``func(*args, **kwargs)`` seen as a function of its floating-point tensors."""

    def __init__(self, func, args: tuple, kwargs: dict, tracked):
        self.func, self.args, self.names = func, tuple(args), list(kwargs)
        self.operands = tuple(args) + tuple(kwargs.values())  # positionals, then keyword values
        self.tensors = tensors_in(self.operands)
        self.diff_mask = [is_differentiable(t) and tracked(t) for t in self.tensors]

    def primals(self, tensors) -> list:
        return [t for t, d in zip(tensors, self.diff_mask) if d]

    def __call__(self, tensors, primals):
        it = iter(primals)
        merged = iter([next(it) if d else t for t, d in zip(tensors, self.diff_mask)])
        operands = _substitute(self.operands, merged)
        n = len(self.args)
        return self.func(*operands[:n], **dict(zip(self.names, operands[n:])))

    def cotangents(self, grads) -> tuple:
        """(NoTangent(), one cotangent per operand) from the cotangents of the differentiable tensors."""
        grads = iter(grads)
        it = iter([next(grads) if d else NoTangent() for d in self.diff_mask])
        return (NoTangent(),) + tuple(_structure_cotangents(a, it) for a in self.operands)


def make_vjp(call: _Call):
    """``vjp(dy, *tensors)``: the cotangents of the differentiable tensors, as one callable that a
    recording mode sees as a single call."""
    def vjp(dy, *tensors):
        if has_torch_function(tensors):
            return handle_torch_function(vjp, tensors, dy, *tensors)
        with torch.enable_grad():
            out, back = torch.func.vjp(lambda *p: call(tensors, p), *call.primals(tensors))
        return back(_like(dy, out))

    vjp.__name__ = vjp.__qualname__ = f"vjp_{op_name(call.func).replace('.', '_')}"
    return vjp


def _eager_vjp(call: _Call):
    """Run the call once inside ``torch.func.vjp``: (its output, vjp of its float outputs).
    Outputs that are not floating-point tensors travel as the auxiliary output."""
    structure = []

    def differentiable_part(*primals):
        out = call(call.tensors, primals)
        structure.append(out)  # read only for its shape and non-tensor leaves
        leaves = tensors_in(out)
        return tuple(t for t in leaves if is_differentiable(t)), tuple(t for t in leaves if not is_differentiable(t))

    with torch.enable_grad():
        diff_out, back, other = torch.func.vjp(differentiable_part, *call.primals(call.tensors), has_aux=True)
    diff_it, other_it = iter(diff_out), iter(other)
    leaves = [next(diff_it) if is_differentiable(t) else next(other_it) for t in tensors_in(structure[0])]
    return _substitute(structure[0], iter(leaves)), back


def _diff_leaves(obj, like) -> tuple:
    """The leaves of ``obj`` at the positions of ``like``'s floating-point tensors."""
    return tuple(o for o, l in zip(tensors_in(obj), tensors_in(like)) if is_differentiable(l))


def fallback_rule(func, args: tuple, kwargs: dict, staged: bool | None = None, tracked=None):
    """(y, pullback) for a call with no rule (see the module docstring); only the tensors for which
    ``tracked(t)`` holds are differentiated (a BatchNorm's running statistics are not; default: every
    floating-point tensor). ``staged`` defaults to whether a graph is being recorded."""
    if staged is None:
        from ..capture.recorder import is_staging
        staged = is_staging()
    call = _Call(func, args, kwargs, tracked or (lambda t: True))
    if staged:
        y = func(*args, **kwargs)
        vjp = make_vjp(call)
        compute = lambda dy: vjp(_like(dy, y), *call.tensors)  # noqa: E731
    else:
        y, back = _eager_vjp(call)
        compute = lambda dy: back(_diff_leaves(_like(dy, y), y))  # noqa: E731
    return y, lambda dy: call.cotangents(compute(dy))
