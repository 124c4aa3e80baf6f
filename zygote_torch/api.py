"""The Zygote API: gradient, withgradient, pullback, derivative (dynamic) and code (staged).

Dynamic calls run ``f`` on real tensors under a recorder that applies each call's rule as it goes
(capture and the forward half of AD in one pass), then walk the tape backwards. Nothing is reused
across calls, so any Python works: data-dependent branches, loops, recursion, dict dispatch.
"""
from __future__ import annotations

import contextlib
import numbers

import torch

from .ad.registry import REGISTRY
from .ad.tape import Tape, is_differentiable
from .capture import leaves
from .capture.pytree import flatten
from .capture.recorder import Recorder
from .errors import ZygoteError, describe_frame


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, numbers.Integral))


class _Arguments:
    """The arguments of one call, flattened: their differentiable leaves and tracked stand-ins.

    A Python float becomes a 0-d float64 tensor; a tensor is tracked as itself (so closures and
    modules that hold it are seen too), except a tensor passed twice, whose second occurrence is a
    fresh alias so each argument gets its own cotangent.
    """

    def __init__(self, args: tuple, tape: Tape):
        self.structures = []  # per argument: (leaves, rebuild as gradient)
        self.standins = []  # per argument: stand-in leaves
        seen: set[int] = set()
        for arg in args:
            flat, rebuild = flatten(arg)
            standins = [self._standin(x, seen, tape) for x in flat]
            self.structures.append((flat, rebuild))
            self.standins.append(standins)
        self.call_args = tuple(flatten(arg, modules_as_dicts=False)[1](s) if not isinstance(arg, torch.nn.Module)
                               else arg for arg, s in zip(args, self.standins))

    @staticmethod
    def _standin(x, seen: set, tape: Tape):
        if _is_number(x):
            t = torch.tensor(float(x), dtype=torch.float64)
        elif is_differentiable(x):
            t = x.view_as(x) if id(x) in seen else x
            seen.add(id(x))
        else:
            return x
        tape.track(t)
        return t

    @property
    def only_numbers(self) -> bool:
        return all(not isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Module)
                   for flat, _ in self.structures for x in flat)

    def gradients(self, cot: dict) -> tuple:
        """Cotangents mirroring each argument; None for an argument with no dependence."""
        out = []
        for (flat, rebuild), standins in zip(self.structures, self.standins):
            grads = [_leaf_gradient(x, s, cot) for x, s in zip(flat, standins)]
            out.append(None if all(g is None for g in grads) else rebuild(grads))
        return tuple(out)


def _leaf_gradient(original, standin, cot: dict):
    if standin is original and not isinstance(original, torch.Tensor):
        return None
    g = cot.get(id(standin))
    if g is None:
        return None
    if _is_number(original):
        return float(g)
    return g


@contextlib.contextmanager
def _recording(tape: Tape):
    with torch.no_grad(), leaves.intercepting(REGISTRY.python_leaves()), Recorder(tape.record, tape.tracks):
        yield


def _describe(f) -> str:
    code = getattr(f, "__code__", None)
    name = getattr(f, "__qualname__", repr(f))
    return f"{name} ({code.co_filename}:{code.co_firstlineno})" if code else name


def _run(f, args):
    tape = Tape()
    arguments = _Arguments(args, tape)
    with _recording(tape):
        out = f(*arguments.call_args)
    return tape, arguments, out


def _scalar_output(f, out, api: str):
    if _is_number(out) or isinstance(out, numbers.Integral):
        return None
    if not isinstance(out, torch.Tensor):
        raise ZygoteError(f"zt.{api}: {_describe(f)} returned a {type(out).__name__}; it must return "
                          "a tensor or a number")
    if out.numel() != 1:
        raise ZygoteError(f"zt.{api}: {_describe(f)} returned a tensor of shape {tuple(out.shape)}, "
                          "but a gradient needs a scalar output (one element). Use zt.pullback(f, ...) "
                          "for a vector-Jacobian product, or zt.jacobian(f, ...)")
    if not is_differentiable(out):
        raise ZygoteError(f"zt.{api}: {_describe(f)} returned a {out.dtype} tensor, which has no gradient")
    return out


def _value(out, arguments: _Arguments):
    if arguments.only_numbers and isinstance(out, torch.Tensor) and out.dim() == 0:
        return out.item()
    return out


def withgradient(f, *args):
    """``(f(*args), gradient(f, *args))`` computed in one forward and one reverse pass."""
    tape, arguments, out = _run(f, args)
    y = _scalar_output(f, out, "withgradient")
    if y is None or not tape.tracks(y):
        return _value(out, arguments), tuple(None for _ in args)
    cot = tape.backward([(y, torch.ones_like(y))], keep=False)
    return _value(out, arguments), arguments.gradients(cot)


def gradient(f, *args):
    """The gradient of scalar-valued ``f`` at ``args``: one entry per argument, mirroring its
    structure, None where ``f`` does not depend on it, a float for a Python number."""
    return withgradient(f, *args)[1]


def pullback(f, *args):
    """``(y, back)`` where ``back(dy)`` gives the cotangents of ``args`` for output cotangent ``dy``
    (a vector-Jacobian product). ``back`` may be called any number of times."""
    tape, arguments, out = _run(f, args)
    out_leaves, _ = flatten(out)

    def back(dy):
        dy_leaves, _ = flatten(dy)
        if len(dy_leaves) != len(out_leaves):
            raise ZygoteError(f"zt.pullback: the cotangent has {len(dy_leaves)} leaves but the output "
                              f"of {_describe(f)} has {len(out_leaves)}")
        seeds = []
        for y, d in zip(out_leaves, dy_leaves):
            if d is None or not isinstance(y, torch.Tensor):
                continue
            d = torch.as_tensor(d, dtype=y.dtype, device=y.device)
            if d.shape != y.shape:
                raise ZygoteError(f"zt.pullback: cotangent of shape {tuple(d.shape)} for an output of "
                                  f"shape {tuple(y.shape)}")
            seeds.append((y, d))
        return arguments.gradients(tape.backward(seeds, keep=True))

    return _value(out, arguments), back


def derivative(f):
    """``f'`` for a scalar function: ``zt.derivative(lambda x: 5*x + 3)(10) == 5.0``."""
    def df(x):
        if isinstance(x, numbers.Integral) and not isinstance(x, bool):
            x = float(x)
        g = gradient(f, x)[0]
        return 0.0 if g is None and _is_number(x) else g
    df.__name__ = f"derivative_of_{getattr(f, '__name__', 'f')}"
    return df


def fallbacks(f, *args) -> list[str]:
    """The calls of ``f(*args)`` that had no rule and went through the ``torch.func.vjp`` fallback,
    each as 'op at file:line: source'."""
    tape, _, _ = _run(f, args)
    return [f"{e.op} at {describe_frame(e.where)}" for e in tape.entries if e.fallback]


def code(f, *args) -> str:
    """The program zygote_torch generates for ``gradient(f, *args)``, as readable Python: a forward
    computing the output and the residuals the backward needs, and the backward (seeded with 1)
    computing the gradients. ``zt.code(lambda x: 5*x + 3, 10.0)``'s backward is ``return (5.0,)``."""
    from .runtime.staged import gradient_code
    return gradient_code(f, *args)
