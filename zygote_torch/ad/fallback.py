"""The per-node fallback: differentiate a call with no rule through ``torch.func.vjp``.

The pullback is one callable, ``vjp_<op>(dy, *inputs)``, so under staging it becomes one node of
the backward graph (recomputing that op's forward inside it). It is visible: every use is an
entry with ``fallback=True`` in the tape, listed by :func:`zygote_torch.fallbacks`.
"""
from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function

from ..errors import op_name
from .tangents import NoTangent, is_zero, unthunk


def _is_diff(x) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _substitute(obj, it):
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        return type(obj)(*(_substitute(x, it) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_substitute(x, it) for x in obj)
    return obj


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _tensors(x, out)
    return out


def _structure_cotangents(obj, it):
    """Cotangents mirroring positional argument ``obj`` (tensor, or list/tuple of them)."""
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, (tuple, list)) and _tensors(obj, []):
        return [_structure_cotangents(x, it) for x in obj]
    return NoTangent()


def make_vjp(func, args: tuple, kwargs: dict):
    """``vjp(dy, *tensors) -> cotangents of the differentiable tensors among ``args``."""
    tensors = _tensors(args, [])
    diff_mask = [_is_diff(t) for t in tensors]

    def call_with(diff_values, all_tensors):
        return func(*_substitute(args, _merge(all_tensors, diff_mask, diff_values)), **kwargs)

    def vjp(dy, *all_tensors):
        if has_torch_function(all_tensors):
            return handle_torch_function(vjp, all_tensors, dy, *all_tensors)
        primals = [t for t, d in zip(all_tensors, diff_mask) if d]
        with torch.enable_grad():
            out, back = torch.func.vjp(lambda *p: call_with(p, all_tensors), *primals)
        return back(_like(dy, out))

    vjp.__name__ = vjp.__qualname__ = f"vjp_{op_name(func).replace('.', '_')}"
    return vjp, tensors, diff_mask


def _like(dy, out):
    """dy shaped like ``out``, as torch.func.vjp wants it: symbolic zeros, and the cotangents of
    integer outputs (which it ignores), materialised as zeros."""
    if isinstance(out, torch.Tensor):
        dy = unthunk(dy)
        return torch.zeros_like(out) if is_zero(dy) or not _is_diff(out) else dy
    return type(out)(*(_like(d, o) for d, o in zip(dy, out))) if hasattr(type(out), "_fields") \
        else type(out)(_like(d, o) for d, o in zip(dy, out))


def fallback_rule(func, args: tuple, kwargs: dict, staged: bool):
    """(y, pullback) for a call with no rule; the pullback returns one cotangent per positional
    argument, like a rule's.

    Run eagerly, the forward happens once, inside ``torch.func.vjp`` (side effects such as
    BatchNorm's running statistics happen once, as in eager mode). Staged, the backward is one
    ``vjp_<op>`` node that recomputes the op's forward.
    """
    vjp, tensors, diff_mask = make_vjp(func, args, kwargs)
    if staged:
        y = func(*args, **kwargs)
        compute = lambda dy: vjp(_like(dy, y), *tensors)  # noqa: E731
    else:
        y, back = _eager_vjp(func, args, kwargs, tensors, diff_mask)
        compute = lambda dy: back(_diff_leaves(_like(dy, y), y))  # noqa: E731

    def pullback(dy):
        grads = iter(compute(dy))
        flat = [next(grads) if d else NoTangent() for d in diff_mask]
        it = iter(flat)
        return (NoTangent(),) + tuple(_structure_cotangents(a, it) for a in args)

    return y, pullback


def _diff_leaves(obj, like) -> tuple:
    """The leaves of ``obj`` at the positions of ``like``'s floating-point tensors."""
    return tuple(o for o, l in zip(_tensors(obj, []), _tensors(like, [])) if _is_diff(l))


def _eager_vjp(func, args, kwargs, tensors, diff_mask):
    """Run ``func`` once inside ``torch.func.vjp``: (its output, vjp of its float outputs).

    Outputs that are not floating-point tensors (indices, flags, shapes) travel as the auxiliary
    output, so any output structure works."""
    primals = [t for t, d in zip(tensors, diff_mask) if d]

    def call(*p):
        out = func(*_substitute(args, _merge(tensors, diff_mask, p)), **kwargs)
        leaves = _tensors(out, [])
        return tuple(t for t in leaves if _is_diff(t)), out

    with torch.enable_grad():
        diff_out, back, out = torch.func.vjp(call, *primals, has_aux=True)
    it = iter(diff_out)
    y = _substitute(out, iter([next(it) if _is_diff(t) else t for t in _tensors(out, [])]))
    return y, back


def _merge(tensors, diff_mask, primals):
    """Iterator over ``tensors`` with the differentiable ones replaced by ``primals``."""
    it = iter(primals)
    return iter([next(it) if d else t for t, d in zip(tensors, diff_mask)])
