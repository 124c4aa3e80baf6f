"""The Zygote API: gradient, withgradient, pullback, derivative (dynamic) and code (staged).

Dynamic calls run ``f`` on real tensors under a recorder that applies each call's rule as it goes
(capture and the forward half of AD in one pass), then walk the tape backwards. Nothing is reused
across calls, so any Python works: data-dependent branches, loops, recursion, dict dispatch.
"""
from __future__ import annotations

import numbers

import torch

from .ad.registry import REGISTRY
from .ad.tangents import is_differentiable, is_zero, unthunk
from .ad.tape import Tape
from .capture import leaves
from .capture.pytree import flatten
from .capture.trace import is_python_float
from .capture.recorder import Recorder
from .errors import ZygoteError, describe_frame
from .params import Grads, Params


class _Arguments:
    """The arguments of one call, flattened: their differentiable leaves and tracked stand-ins.

    A Python float becomes a 0-d float64 tensor and a floating-point NumPy array a tensor sharing its
    memory (their gradients are given back as a float and an array); a tensor is tracked as itself
    (so closures and modules that hold it are seen too), except a tensor passed twice, whose second
    occurrence is a fresh alias so each argument gets its own cotangent.
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
        if is_python_float(x):
            t = torch.tensor(float(x), dtype=torch.float64)
        elif _is_float_array(x):  # a NumPy array: f sees a tensor sharing its memory
            t = torch.from_numpy(x)
        elif is_differentiable(x):
            t = x.view_as(x) if id(x) in seen else x
            seen.add(id(x))
        else:
            return x
        tape.track_input(t)
        return t

    @property
    def only_numbers(self) -> bool:
        return all(not isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Module)
                   for flat, _ in self.structures for x in flat)

    def gradients(self, tape: Tape, cot: dict) -> tuple:
        """Cotangents mirroring each argument; None for an argument with no dependence."""
        out = []
        for (flat, rebuild), standins in zip(self.structures, self.standins):
            grads = [_leaf_gradient(x, s, tape, cot) for x, s in zip(flat, standins)]
            out.append(None if all(g is None for g in grads) else rebuild(grads))
        return tuple(out)


def _leaf_gradient(original, standin, tape: Tape, cot: dict):
    if standin is original and not isinstance(original, torch.Tensor):
        return None
    g = tape.cotangent(cot, standin)
    if g is None:
        return None
    if is_python_float(original):
        return float(g)
    if _is_float_array(original):
        return g.detach().cpu().numpy()
    return g


def _is_float_array(x) -> bool:
    return type(x).__module__ == "numpy" and type(x).__name__ == "ndarray" and x.dtype.kind in "fc"


class _recording:
    """Context: every torch call touching the tape's tensors is recorded on it (torch.autograd
    builds no graph meanwhile). A class rather than nested context managers: it is entered at
    every dynamic call, and this is its cheapest form."""

    __slots__ = ("leaves", "recorder", "grad_was_enabled")

    def __init__(self, tape: Tape):
        self.leaves = leaves.intercepting(REGISTRY.python_leaves())
        self.recorder = Recorder(tape.record_touching, tape.tracked)

    def __enter__(self):
        self.grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        self.leaves.__enter__()
        self.recorder.__enter__()

    def __exit__(self, *exc):
        try:
            self.recorder.__exit__(*exc)
            self.leaves.__exit__(*exc)
        finally:
            torch._C._set_grad_enabled(self.grad_was_enabled)


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
    if is_python_float(out) or isinstance(out, numbers.Integral):
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


def _implicit(args):
    """The Params of an implicit-parameter call ``gradient(f, ps)``, or None."""
    return args[0] if len(args) == 1 and isinstance(args[0], Params) else None


def _run_implicit(f, ps: Params):
    tape = Tape()
    for p in ps:
        if not is_differentiable(p):
            raise ZygoteError(f"Params holds a {p.dtype} tensor, which has no gradient")
        tape.track_input(p)
    with _recording(tape):
        out = f()
    return tape, out


def withgradient(f, *args):
    """``(f(*args), gradient(f, *args))`` computed in one forward and one reverse pass.
    With ``args == (ps,)`` for ``zt.Params`` ``ps``, ``f`` takes no arguments and the gradient is a
    ``zt.Grads``."""
    ps = _implicit(args)
    if ps is not None:
        tape, out = _run_implicit(f, ps)
        y = _scalar_output(f, out, "gradient")
        cot = tape.backward([(y, torch.ones_like(y))], keep=False) if y is not None else {}
        return out, _grads(ps, tape, cot)
    tape, arguments, out = _run(f, args)
    y = _scalar_output(f, out, "withgradient")
    if y is None or not tape.tracks(y):
        return _value(out, arguments), tuple(None for _ in args)
    cot = tape.backward([(y, torch.ones_like(y))], keep=False)
    return _value(out, arguments), arguments.gradients(tape, cot)


def gradient(f, *args):
    """The gradient of scalar-valued ``f`` at ``args``: one entry per argument, mirroring its
    structure, None where ``f`` does not depend on it, a float for a Python number.

    ``gradient(f, ps)`` with ``zt.Params`` ``ps``: ``f()`` reads the parameters itself; the result
    is a ``zt.Grads``, ``gs[W]``."""
    return withgradient(f, *args)[1]


def pullback(f, *args):
    """``(y, back)`` where ``back(dy)`` gives the cotangents of ``args`` for output cotangent ``dy``
    (a vector-Jacobian product). ``back`` may be called any number of times. With
    ``args == (ps,)`` for ``zt.Params``, ``back(dy)`` returns ``zt.Grads``."""
    ps = _implicit(args)
    if ps is not None:
        tape, out = _run_implicit(f, ps)
        return out, lambda dy: _grads(ps, tape, tape.backward(_seeds(f, out, dy), keep=True))
    tape, arguments, out = _run(f, args)
    return _value(out, arguments), lambda dy: arguments.gradients(tape, tape.backward(_seeds(f, out, dy), keep=True))


def _grads(ps: Params, tape: Tape, cot: dict) -> Grads:
    return Grads(ps, {id(p): tape.cotangent(cot, p) for p in ps})


def _seeds(f, out, dy) -> list:
    """(output tensor, its cotangent) pairs, ``dy`` mirroring the output's structure."""
    out_leaves, dy_leaves = flatten(out)[0], flatten(dy)[0]
    if len(dy_leaves) != len(out_leaves):
        raise ZygoteError(f"zt.pullback: the cotangent has {len(dy_leaves)} leaves but the output "
                          f"of {_describe(f)} has {len(out_leaves)}")
    seeds = []
    for y, d in zip(out_leaves, dy_leaves):
        d = unthunk(d)
        if is_zero(d) or not isinstance(y, torch.Tensor):
            continue  # None, ZeroTangent(), NoTangent(): nothing to seed
        d = torch.as_tensor(d, dtype=y.dtype, device=y.device)
        if d.shape != y.shape:
            raise ZygoteError(f"zt.pullback: cotangent of shape {tuple(d.shape)} for an output of "
                              f"shape {tuple(y.shape)}")
        seeds.append((y, d))
    return seeds


def derivative(f):
    """``f'`` for a scalar function: ``zt.derivative(lambda x: 5*x + 3)(10) == 5.0``."""
    def df(x):
        if isinstance(x, numbers.Integral) and not isinstance(x, bool):
            x = float(x)
        g = gradient(f, x)[0]
        return 0.0 if g is None and is_python_float(x) else g
    df.__name__ = f"derivative_of_{getattr(f, '__name__', 'f')}"
    return df


def fallbacks(f, *args) -> list[str]:
    """The calls of ``f(*args)`` that had no rule and went through the ``torch.func.vjp`` fallback,
    each as 'op at file:line: source'. ``fallbacks(f, ps)`` for implicit ``zt.Params``."""
    ps = _implicit(args)
    tape = _run_implicit(f, ps)[0] if ps is not None else _run(f, args)[0]
    return [f"{e.op} at {describe_frame(e.where)}" for e in tape.entries if e.fallback]


def code(f, *args) -> str:
    """The program zygote_torch generates for ``gradient(f, *args)``, as readable Python: a forward
    computing the output and the residuals the backward needs, and the backward (seeded with 1)
    computing the gradients. ``zt.code(lambda x: 5*x + 3, 10.0)``'s backward is ``return (5.0,)``."""
    from .runtime.staged import build
    ps = _implicit(args)
    if ps is not None:  # implicit parameters: f takes no arguments, the Params are its captured tensors
        return build(lambda: f(), (), seeded=False, differentiate=lambda inp, value: value in ps).code()
    return build(f, args, seeded=False).code()


def withjacobian(f, *args):
    """``(y, jacobians)``: for each argument, the Jacobian of tensor-valued ``f`` with respect to
    it, of shape ``y.shape + leaf.shape`` for each leaf (torch's convention; a Python-number argument
    gives ``y.shape``), None where ``y`` does not depend on the argument. The pullback is applied to
    every basis vector of the output at once with ``torch.func.vmap`` (one reverse pass per output
    element where the rules do not batch)."""
    y, back = pullback(f, *args)
    if is_python_float(y):
        y = torch.tensor(float(y), dtype=torch.float64)
    if not isinstance(y, torch.Tensor):
        raise ZygoteError(f"zt.jacobian: {_describe(f)} returned a {type(y).__name__}; it must return "
                          "a tensor or a number")
    structures = [flatten(arg) for arg in args]
    n_leaves = sum(len(flat) for flat, _ in structures)
    basis = torch.eye(y.numel(), dtype=y.dtype, device=y.device).reshape((y.numel(),) + tuple(y.shape))
    depends: list = []  # per leaf: whether y depends on it (the same for every row), set by the first row

    def dense_row(e):  # every leaf's cotangent for output cotangent e, zeros where there is none
        grads = [d for g, (flat, _) in zip(back(e), structures)
                 for d in (flatten(g)[0] if g is not None else [None] * len(flat))]
        depends[:] = [d is not None for d in grads]
        leaves = [x for flat, _ in structures for x in flat]
        return tuple(torch.zeros(_shape(x), dtype=y.dtype, device=y.device) if d is None
                     else d if isinstance(d, torch.Tensor) else torch.as_tensor(d, dtype=y.dtype, device=y.device)
                     for d, x in zip(grads, leaves))

    if y.numel() == 0:
        stacked, depends = [None] * n_leaves, [False] * n_leaves
    else:
        try:
            stacked = list(torch.func.vmap(dense_row)(basis))
        except Exception:  # a rule that does not batch, or a float/array gradient: one row at a time
            rows = [dense_row(e) for e in basis]
            stacked = [torch.stack([r[k] for r in rows]) for k in range(n_leaves)]
    jacobians, k = [], 0
    for flat, rebuild in structures:
        leaves = []
        for x in flat:
            leaves.append(stacked[k].reshape(tuple(y.shape) + _shape(x)) if depends[k] else None)
            k += 1
        jacobians.append(None if all(j is None for j in leaves) else rebuild(leaves))
    return y, tuple(jacobians)


def _shape(x) -> tuple:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(getattr(x, "shape", ()))


def jacobian(f, *args):
    """The Jacobian of ``f`` with respect to each argument (see :func:`withjacobian`)."""
    return withjacobian(f, *args)[1]


def hessian(f, x):
    """The Hessian of scalar ``f`` at tensor or number ``x``: the Jacobian of its gradient, shape
    ``x.shape + x.shape`` (reverse over reverse)."""
    h = jacobian(lambda x: _gradient_or_zero(f, x), x)[0]
    if h is None:  # the gradient does not depend on x: the Hessian exists and is zero
        shape = tuple(torch.as_tensor(x).shape)
        h = torch.zeros(shape + shape, dtype=torch.float64 if is_python_float(x) else x.dtype)
    return h


def _gradient_or_zero(f, x):
    g = gradient(f, x)[0]
    if g is None:
        return torch.zeros_like(torch.as_tensor(x, dtype=torch.float64))
    return g


def diaghessian(f, *args):
    """The diagonal of the Hessian of scalar ``f`` with respect to each argument, shaped like it."""
    out = []
    for i, x in enumerate(args):
        def f_i(xi, i=i):
            return f(*args[:i], xi, *args[i + 1:])
        h = hessian(f_i, x)
        n = torch.as_tensor(x).numel()
        out.append(None if h is None else h.reshape(n, n).diagonal().reshape(torch.as_tensor(x).shape))
    return tuple(float(d) if is_python_float(x) and d is not None else d for d, x in zip(out, args))
