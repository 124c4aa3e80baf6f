"""The Zygote API: gradient, withgradient, pullback, derivative, jacobian, hessian (dynamic) and code
(staged).

Dynamic calls run ``f`` on real tensors under a recorder that applies each call's rule as it goes
(capture and the forward half of AD in one pass), then walk the tape backwards. Nothing is reused
across calls, so any Python works: data-dependent branches, loops, recursion, dict dispatch.

Each public function is a raw computation (``_raw_*``: tensors in, tensors out, torch.autograd off)
handed to :func:`.compose.connected`, which keeps the result connected to an outer torch.autograd
graph when an input requires grad, and makes it a single op under ``torch.func`` transforms.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence, Union

import torch

from . import compose
from .ad.recording import (describe as _describe, recording as _recording, recording_tapes, run_on_tape,
                           seeds as _seeds, track_params)
from .ad.tangents import is_differentiable, is_zero, unthunk
from .ad.tape import Tape
from .capture.arguments import Arguments, as_numbers, implicit_params, is_python_float
from .capture.pytree import structure
from .capture.recorder import is_staging
from .errors import ZygoteError, describe_frame, user_frame
from .params import Grads
from .rules.custom_autograd import apply_registered_hooks
from .runtime import replay

ArgNums = Union[int, Sequence[int], None]  # which arguments to differentiate (torch.func's argnums)


def _live(t) -> bool:
    """Whether tensor ``t`` is still being differentiated (by an enclosing zt call, torch.autograd,
    a torch.func transform or a staged capture): then a number's gradient stays a tensor."""
    if not isinstance(t, torch.Tensor):
        return False
    return (t.requires_grad or is_staging() or compose.is_transformed(t)
            or any(tape.tracks(t) for tape in recording_tapes()))


def _where() -> str:
    """The user's line that called the zt function (for errors raised before ``f`` runs)."""
    return describe_frame(user_frame())


# -- requests ----------------------------------------------------------------------------------

class _Request:
    """One call of the API: ``f``, its arguments, which of them are differentiated (``argnums``,
    or implicit ``Params``), keyword arguments passed through to ``f``, ``has_aux``."""

    def __init__(self, api: str, f, args: tuple, kwargs: dict, argnums=None, has_aux: bool = False):
        if not callable(f):
            raise ZygoteError(f"zt.{api}: the first argument must be the function to differentiate, "
                              f"got a {type(f).__name__}, at {_where()}")
        self.api, self.f, self.args, self.kwargs, self.has_aux = api, f, tuple(args), dict(kwargs), has_aux
        self.params = implicit_params(args)
        self.argnums, self.wrt = _argnums(api, argnums, len(args), self.params is not None)

    def __str__(self) -> str:  # how errors about the call name it
        return f"zt.{self.api} of {_describe(self.f)}"

    def site_key(self) -> tuple:
        """What tells apart calls of the same function for :mod:`.runtime.replay`: the form of the call,
        and which Params and modules it differentiates or reaches through ``f``'s closure (one helper
        that takes the gradient for two models keeps a program for each rather than alternating)."""
        return self.argnums, self.has_aux, len(self.args), tuple(self.kwargs), _reached_objects(self)

    def inputs(self):
        """What the result depends on, as a structure: the arguments and keyword arguments."""
        return self.args, self.kwargs

    def on(self, args, kwargs, f=None) -> "_Request":
        """The same request on other arguments (or for another function)."""
        return _Request(self.api, self.f if f is None else f, tuple(args), kwargs, self.argnums,
                        self.has_aux and f is None)

    def run(self, inputs=None, tape: Tape | None = None):
        """``(tape, arguments, out)``: ``f`` run once on a fresh tape, or on ``tape`` (``inputs``:
        the arguments and keyword arguments to use instead of the request's own)."""
        args, kwargs = self.inputs() if inputs is None else inputs
        if self.params is None:
            return run_on_tape(self.f, args, kwargs, self.wrt, apply_registered_hooks, tape)
        tape = Tape() if tape is None else tape
        track_params(tape, self.params, self.api, _where, apply_registered_hooks)
        with _recording(tape):
            out = self.f(**kwargs)
        return tape, None, out

    def gradients(self, tape: Tape, arguments, cot: dict):
        """The gradient structure: a Grads for Params, else one entry per argument."""
        if self.params is not None:
            return Grads.of(self.params, [tape.cotangent(cot, p) for p in self.params])
        return arguments.gradients(tape, cot)

    def no_gradients(self):
        if self.params is not None:
            return Grads(self.params, {})
        return tuple(None for _ in self.args)

    def select(self, grads):
        """The gradients the caller asked for: all (Zygote), one (``argnums=i``) or some."""
        if isinstance(grads, Grads) or self.argnums is None:
            return grads
        if isinstance(self.argnums, int):
            return grads[self.argnums]
        return tuple(grads[i] for i in self.argnums)

    def numbers(self, grads):
        """Gradients of Python numbers and NumPy arrays as numbers and arrays (see
        :func:`.capture.arguments.as_numbers`)."""
        return grads if isinstance(grads, Grads) else as_numbers(grads, self.args, _live)

    def value(self, y):
        """A 0-d output of a function of numbers only is given back as a number."""
        if self.params is None and isinstance(y, torch.Tensor) and y.dim() == 0 and not y.is_complex() \
                and not _live(y) and all(not isinstance(x, (torch.Tensor, torch.nn.Module))
                                         for x in structure((self.args, self.kwargs))[0]):
            return y.item()
        return y

    def split_output(self, out, allow_tuple: bool):
        """(differentiated output, aux): ``has_aux`` takes ``(y, aux)``; with ``allow_tuple``
        (Zygote's withgradient) a tuple's first element is differentiated, the rest is auxiliary."""
        if self.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ZygoteError(f"zt.{self.api}(..., has_aux=True): {_describe(self.f)} must return a pair "
                                  f"(output, aux), got {_kind(out)}")
            return out[0], out[1]
        if allow_tuple and isinstance(out, tuple) and len(out) > 0:
            return out[0], None
        return out, None

    def scalar(self, y):
        """The scalar tensor to differentiate, or None for a number output (no dependence)."""
        if isinstance(y, numbers.Real) and not isinstance(y, bool):
            return None
        if isinstance(y, (tuple, list, dict)) and not isinstance(y, torch.Tensor):
            raise ZygoteError(f"zt.{self.api}: {_describe(self.f)} returned {_kind(y)}; a gradient needs a scalar "
                              "output. For auxiliary outputs use zt.withgradient (the first element is "
                              "differentiated) or has_aux=True; for several outputs zt.jacobian or zt.pullback")
        if not isinstance(y, torch.Tensor):
            raise ZygoteError(f"zt.{self.api}: {_describe(self.f)} returned {_kind(y)}; it must return a tensor "
                              "or a number")
        if y.is_complex():
            raise ZygoteError(f"zt.{self.api}: {_describe(self.f)} returned a complex tensor; the gradient is only "
                              "defined for a real scalar output (as torch.autograd refuses too). Differentiate "
                              "its real part, its absolute value, or use zt.pullback with a complex cotangent")
        if y.numel() != 1:
            raise ZygoteError(f"zt.{self.api}: {_describe(self.f)} returned a tensor of shape {tuple(y.shape)}, "
                              "but a gradient needs a scalar output (one element). Use zt.pullback(f, ...) "
                              "for a vector-Jacobian product, or zt.jacobian(f, ...)")
        if not is_differentiable(y):
            raise ZygoteError(f"zt.{self.api}: {_describe(self.f)} returned a {y.dtype} tensor, which has no "
                              "gradient")
        return y


def _reached_objects(request: "_Request") -> tuple:
    """The identity of the Params (its size, first and last tensor) and of the modules among the
    arguments and in ``f``'s closure cells."""
    params, out = request.params, []
    if params is not None:
        out.append((len(params), id(params[0]), id(params[-1])) if len(params) else 0)
    out.extend(id(a) for a in request.args if isinstance(a, torch.nn.Module))
    for cell in getattr(request.f, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, torch.nn.Module):
            out.append(id(value))
    return tuple(out)


def _kind(x) -> str:
    if isinstance(x, tuple):
        return f"a tuple of {len(x)}"
    return f"a {type(x).__name__}"


def _argnums(api: str, argnums, n_args: int, implicit: bool):
    """(argnums as given, the set of differentiated argument indices or None for all)."""
    if argnums is None:
        return None, None
    if implicit:
        raise ZygoteError(f"zt.{api}: argnums= selects arguments; with zt.Params there are none "
                          f"(at {_where()})")
    chosen = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for i in chosen:
        if not isinstance(i, int) or isinstance(i, bool) or not -n_args <= i < n_args:
            raise ZygoteError(f"zt.{api}: argnums={argnums!r} does not select among the {n_args} "
                              f"argument(s) (at {_where()})")
    normalised = tuple(i % n_args for i in chosen)
    if len(set(normalised)) != len(normalised):
        raise ZygoteError(f"zt.{api}: argnums={argnums!r} repeats an argument (at {_where()})")
    return (normalised[0] if isinstance(argnums, int) else normalised), set(normalised)


# -- gradient, withgradient, pullback ----------------------------------------------------------

def _raw_withgradient(request: _Request, inputs=None):
    """(output of f, gradient structure), torch.autograd off. A call of the user's own (not a
    recomputation for torch.autograd) may replay the backward its site generated
    (:mod:`.runtime.replay`)."""
    site = None if inputs is not None else replay.site(request.api, request.f, request.site_key())
    if site is None:
        return _withgradient_on(request, request.run(inputs))
    try:
        tape = site.tape()
        result = _withgradient_on(request, request.run(None, tape))
        site.done(tape)
        return result
    finally:
        replay.release(site)


def _withgradient_on(request: _Request, recorded: tuple):
    """(output of f, gradient structure) of a recorded run ``(tape, arguments, out)``."""
    tape, arguments, out = recorded
    differentiated = request.split_output(out, allow_tuple=request.api == "withgradient")[0]
    tape.check_output(differentiated, _describe(request.f))  # nothing it depends on was cut from the tape
    y = request.scalar(differentiated)
    if y is None or not tape.tracks(y):
        return out, request.no_gradients()
    cot = tape.backward([(y, torch.ones_like(y))], keep=False)
    return out, request.gradients(tape, arguments, cot)


def withgradient(f: Callable[..., Any], *args: Any, argnums: ArgNums = None, has_aux: bool = False,
                 **kwargs: Any) -> tuple[Any, Any]:
    """``(f(*args), gradient(f, *args))`` computed in one forward and one reverse pass.

    As Zygote's: when ``f`` returns a tuple, its first element is differentiated and the whole
    tuple is returned as the value (the rest is auxiliary output). With ``args == (ps,)`` for
    ``zt.Params`` ``ps``, ``f`` takes no arguments and the gradient is a ``zt.Grads``. Keyword
    arguments are passed to ``f`` and not differentiated; ``argnums`` as in :func:`gradient`."""
    request = _Request("withgradient", f, args, kwargs, argnums, has_aux)
    out, grads = compose.connected(lambda inputs=None: _raw_withgradient(request, inputs), request.inputs(),
                                   name=request)
    if isinstance(out, tuple) and not has_aux and len(out) > 0:
        out = (request.value(out[0]),) + out[1:] if type(out) is tuple else out
    elif has_aux:
        out = (request.value(out[0]), out[1])
    else:
        out = request.value(out)
    return out, request.select(request.numbers(grads))


def gradient(f: Callable[..., Any], *args: Any, argnums: ArgNums = None, has_aux: bool = False, **kwargs: Any) -> Any:
    """The gradient of scalar-valued ``f`` at ``args``: one entry per argument, mirroring its
    structure, None where ``f`` does not depend on it, a float for a Python number.

    ``gradient(f, ps)`` with ``zt.Params`` ``ps``: ``f()`` reads the parameters itself; the result
    is a ``zt.Grads``, ``gs[W]``. As ``torch.func.grad``: ``argnums=i`` gives the gradient of
    argument ``i`` alone, ``argnums=(i, j)`` a tuple of those; ``has_aux=True`` takes ``f``
    returning ``(output, aux)`` and gives ``(gradients, aux)``. Keyword arguments go to ``f`` and
    are not differentiated."""
    request = _Request("gradient", f, args, kwargs, argnums, has_aux)
    if not has_aux:  # f's value is not returned: only the gradients are the connected result
        grads = compose.connected(lambda inputs=None: _raw_withgradient(request, inputs)[1], request.inputs(),
                                  name=request)
        return request.select(request.numbers(grads))
    out, grads = compose.connected(lambda inputs=None: _raw_withgradient(request, inputs), request.inputs(),
                                   name=request)
    return request.select(request.numbers(grads)), out[1]


def pullback(f: Callable[..., Any], *args: Any, argnums: ArgNums = None, has_aux: bool = False,
             **kwargs: Any) -> tuple:
    """``(y, back)`` where ``back(dy)`` gives the cotangents of ``args`` for output cotangent ``dy``
    (a vector-Jacobian product; ``dy`` mirrors ``y``'s structure, None for a zero). ``back`` may be
    called any number of times. With ``args == (ps,)`` for ``zt.Params``, ``back(dy)`` returns
    ``zt.Grads``. ``has_aux=True`` (``f`` returns ``(y, aux)``) gives ``(y, back, aux)``, as
    ``torch.func.vjp``; ``argnums`` as in :func:`gradient`."""
    request = _Request("pullback", f, args, kwargs, argnums, has_aux)
    kept: dict = {}  # the tape of the first run, which back(dy) uses without running f again

    def first():
        kept["tape"], kept["arguments"], kept["out"] = request.run()
        return kept["out"]

    reached: list = []  # the tensors requiring grad that f read: back(dy) depends on them too
    out = compose.connected(lambda inputs=None: request.run(inputs)[2], request.inputs(), first=first,
                            reached=reached, name=request)
    y, aux = request.split_output(out, allow_tuple=False)

    def vjp(tape, arguments, out, dy):
        differentiated = request.split_output(out, allow_tuple=False)[0]
        tape.check_output(differentiated, _describe(request.f))
        seeds = _seeds(request.f, differentiated, dy)
        if not seeds:
            return request.no_gradients()
        return request.gradients(tape, arguments, tape.backward(seeds, keep=True))

    def back(dy):
        def run(inputs=None):  # a recomputation, for torch.autograd or a torch.func transform
            inputs, d = (request.inputs(), dy) if inputs is None else inputs
            return vjp(*request.run(inputs), d)

        if "tape" in kept:
            grads = compose.connected(run, (request.inputs(), dy), theta=reached, name=request,
                                      first=lambda: vjp(kept["tape"], kept["arguments"], kept["out"], dy))
        else:
            grads = compose.connected(run, (request.inputs(), dy), theta=reached, name=request)
        return request.select(request.numbers(grads))

    y = request.value(y)
    return (y, back, aux) if has_aux else (y, back)


def derivative(f: Callable[..., Any]) -> Callable[[Any], Any]:
    """``f'`` for a scalar function: ``zt.derivative(lambda x: 5*x + 3)(10) == 5.0``."""
    def df(x, **kwargs):
        if isinstance(x, numbers.Integral) and not isinstance(x, bool):
            x = float(x)
        g = gradient(f, x, **kwargs)[0]
        return 0.0 if g is None and is_python_float(x) else g
    df.__name__ = f"derivative_of_{getattr(f, '__name__', 'f')}"
    return df


def fallbacks(f: Callable[..., Any], *args: Any, **kwargs: Any) -> list[str]:
    """The calls of ``f(*args)`` that had no rule and went through the ``torch.func.vjp`` fallback,
    each as 'op at file:line: source'. ``fallbacks(f, ps)`` for implicit ``zt.Params``."""
    tape = _Request("fallbacks", f, args, kwargs).run()[0]
    return [f"{e.op} at {describe_frame(e.where)}" for e in tape.entries if e.fallback]


def code(f: Callable[..., Any], *args: Any) -> str:
    """The program zygote_torch generates for ``gradient(f, *args)``, as readable Python: a forward
    computing the output and the residuals the backward needs, and the backward (seeded with 1)
    computing the gradients. ``zt.code(lambda x: 5*x + 3, 10.0)``'s backward is ``return (5.0,)``."""
    from .runtime.staged import gradient_program
    return gradient_program(f, args).code()


# -- Jacobians and Hessians --------------------------------------------------------------------

class _Leaf:
    """What a Jacobian needs of one differentiated leaf: its shape, and where its cotangent sits."""

    __slots__ = ("shape",)

    def __init__(self, x):
        self.shape = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(getattr(x, "shape", ()))


def _wrt_structures(request: _Request) -> list:
    """Per differentiated thing (argument, or the Params as one): (leaves, rebuild as gradient)."""
    if request.params is not None:
        ps = request.params
        return [(list(ps), lambda values: Grads(ps, {id(p): v for p, v in zip(ps, values)}))]
    return [None if s is None else (s[0], s[1].gradient) for s in Arguments(request.args, request.wrt).structures]


def _dense(g, like, dtype, device):
    """A cotangent as a dense tensor shaped like leaf ``like`` (zeros for a symbolic zero)."""
    g = unthunk(g)
    if is_zero(g):
        return torch.zeros(_Leaf(like).shape, dtype=dtype, device=device)
    return g if isinstance(g, torch.Tensor) else torch.as_tensor(g, dtype=dtype, device=device)


def _raw_withjacobian(request: _Request, inputs=None):
    """(y, Jacobians), torch.autograd off: per differentiated argument, the output's structure whose
    leaves mirror the argument's structure, each block of shape ``out_leaf.shape + in_leaf.shape``."""
    tape, arguments, out = request.run(inputs)
    y, aux = request.split_output(out, allow_tuple=False)
    y_leaves, y_shape = structure(y)
    for leaf in y_leaves:
        if not isinstance(leaf, (torch.Tensor, numbers.Number)) and leaf is not None:
            raise ZygoteError(f"zt.{request.api}: {_describe(request.f)} returned {_kind(leaf)} in its output; "
                              "a Jacobian needs tensors or numbers")
    outputs = [torch.tensor(float(v), dtype=torch.float64) if is_python_float(v) else v for v in y_leaves]
    wrt = _wrt_structures(request)
    in_leaves = [x for s in wrt if s is not None for x in s[0]]
    blocks = _jacobian_blocks(request, tape, arguments, outputs, in_leaves)
    jacobians, k = [], 0
    for s in wrt:
        if s is None:
            jacobians.append(None)
            continue
        flat, rebuild = s
        per_output = []
        for o, row in zip(outputs, blocks):
            entries = row[k:k + len(flat)]
            per_output.append(None if all(e is None for e in entries) else rebuild(entries))
        k += len(flat)
        jacobians.append(None if all(j is None for j in per_output) else y_shape.gradient(per_output))
    jacobians = jacobians[0] if request.params is not None else tuple(jacobians)
    return (y, aux), jacobians


def _jacobian_blocks(request: _Request, tape: Tape, arguments, outputs: list, in_leaves: list) -> list:
    """blocks[i][j]: the Jacobian of output leaf i with respect to input leaf j, or None where
    output i does not depend on input j. One batch of pullbacks per output leaf (the rows of its
    identity), through ``torch.func.vmap`` where the rules batch."""
    blocks = [[None] * len(in_leaves) for _ in outputs]
    for i, o in enumerate(outputs):
        if isinstance(o, torch.Tensor) and is_differentiable(o) and tape.tracks(o) and o.numel():
            blocks[i] = _jacobian_of(request, tape, arguments, o, in_leaves)
    return blocks


def _jacobian_of(request: _Request, tape: Tape, arguments, o: torch.Tensor, in_leaves: list) -> list:
    """The Jacobian of tracked output ``o`` with respect to each input leaf (None: no dependence)."""
    depends: list = []  # per input leaf: whether o depends on it (the same for every row)

    def row(e):  # every input leaf's cotangent for the output cotangent e (a row of the identity)
        grads = request.gradients(tape, arguments, tape.backward([(o, e.reshape(o.shape))], keep=True))
        leaves = _gradient_leaves(request, grads)
        depends[:] = [g is not None and not is_zero(g) for g in leaves]
        return tuple(_dense(g, x, o.dtype, o.device) for g, x in zip(leaves, in_leaves))

    basis = torch.eye(o.numel(), dtype=o.dtype, device=o.device)
    stacked = None
    if not recording_tapes() and not is_staging():  # (nested, vmap would hide the tape from the outer one)
        try:
            stacked = list(torch.func.vmap(row)(basis))
        except Exception:  # a rule that does not batch: one row at a time
            stacked = None
    if stacked is None:
        rows = [row(e) for e in basis]
        stacked = [torch.stack([r[j] for r in rows]) for j in range(len(in_leaves))]
    return [stacked[j].reshape(tuple(o.shape) + _Leaf(x).shape) if depends[j] else None
            for j, x in enumerate(in_leaves)]


def _gradient_leaves(request: _Request, grads) -> list:
    """The gradients of every differentiated leaf, in order (None where there is none)."""
    if isinstance(grads, Grads):
        return grads.values()
    out = []
    for s, g in zip(_wrt_structures(request), grads):
        if s is None:
            continue
        out.extend([None] * len(s[0]) if g is None else structure(g)[0])
    return out


def withjacobian(f: Callable[..., Any], *args: Any, argnums: ArgNums = None, has_aux: bool = False,
                 **kwargs: Any) -> tuple[Any, Any]:
    """``(y, jacobians)``: for each argument, the Jacobian of ``f`` with respect to it.

    For a tensor output, each argument's Jacobian mirrors the argument's structure, with blocks of
    shape ``y.shape + leaf.shape`` (torch's convention; a Python-number argument gives ``y.shape``),
    None where ``y`` does not depend on it. For a structured output (tuple, dict, dataclass, ...),
    each argument's Jacobian mirrors the output's structure, each of its leaves holding that output
    leaf's Jacobian mirroring the argument. With ``zt.Params``, a ``zt.Grads`` of Jacobians. The
    pullback is applied to every basis vector of the output at once with ``torch.func.vmap`` (one
    reverse pass per output element where the rules do not batch). ``has_aux=True``: ``f`` returns
    ``(y, aux)`` and the value is ``(y, aux)``."""
    request = _Request("jacobian", f, args, kwargs, argnums, has_aux)
    (y, aux), jacobians = compose.connected(lambda inputs=None: _raw_withjacobian(request, inputs),
                                            request.inputs(), name=request)
    jacobians = jacobians if isinstance(jacobians, Grads) else request.select(jacobians)
    return ((y, aux) if has_aux else y), jacobians


def jacobian(f: Callable[..., Any], *args: Any, argnums: ArgNums = None, has_aux: bool = False, **kwargs: Any) -> Any:
    """The Jacobian of ``f`` with respect to each argument (see :func:`withjacobian`);
    ``(jacobians, aux)`` with ``has_aux=True``."""
    (value, jacobians) = withjacobian(f, *args, argnums=argnums, has_aux=has_aux, **kwargs)
    return (jacobians, value[1]) if has_aux else jacobians


def _raw_hessian(request: _Request, inputs=None):
    """(argument structures, their leaves, blocks[i][j] = d^2 f / dx_i dx_j), reverse over reverse:
    the Jacobian of the gradient."""
    base = request if inputs is None else request.on(*inputs)
    wrt = _wrt_structures(base)
    in_leaves = [x for s in wrt if s is not None for x in s[0]]

    def gradient_leaves(*call_args):
        inner = base if base.params is not None else base.on(call_args, base.kwargs)
        grads = _raw_withgradient(inner)[1]
        return tuple(_dense_zero(g, x) for g, x in zip(_gradient_leaves(base, grads), in_leaves))

    outer = base.on(base.args, {}, f=gradient_leaves)
    tape, arguments, out = outer.run()
    return wrt, in_leaves, _jacobian_blocks(outer, tape, arguments, list(out), in_leaves)


def _dense_zero(g, x):
    if g is None or is_zero(g):
        dtype = x.dtype if isinstance(x, torch.Tensor) else torch.float64
        return torch.zeros(_Leaf(x).shape, dtype=dtype)
    return g


def _hessian_structure(request: _Request, wrt, in_leaves, blocks):
    """Blocks arranged as the arguments' structures twice over: H[i][j] (one argument: H)."""
    def block(a, b):
        h = blocks[a][b]
        if h is None:
            x, y = in_leaves[a], in_leaves[b]
            dtype = next((t.dtype for t in (x, y) if isinstance(t, torch.Tensor)), torch.float64)
            h = torch.zeros(_Leaf(x).shape + _Leaf(y).shape, dtype=dtype)
        if is_python_float(in_leaves[a]) and is_python_float(in_leaves[b]) and not _live(h):
            return float(h)
        return h

    offsets, k = [], 0
    for s in wrt:
        offsets.append(k)
        k += 0 if s is None else len(s[0])
    rows = []
    for si, oi in zip(wrt, offsets):
        if si is None:
            rows.append(None)
            continue
        cols = []
        for sj, oj in zip(wrt, offsets):
            if sj is None:
                cols.append(None)
                continue
            inner = [sj[1]([block(oi + a, oj + b) for b in range(len(sj[0]))]) for a in range(len(si[0]))]
            cols.append(si[1](inner))
        rows.append(cols)
    if request.params is not None:
        return rows[0][0]
    chosen = [i for i, s in enumerate(wrt) if s is not None]
    if len(chosen) == 1 and (request.argnums is None or isinstance(request.argnums, int)):
        return rows[chosen[0]][chosen[0]]
    return tuple(tuple(rows[i][j] for j in chosen) for i in chosen)


def hessian(f: Callable[..., Any], *args: Any, argnums: ArgNums = None, **kwargs: Any) -> Any:
    """The Hessian of scalar ``f``. One argument ``x``: ``d^2 f / dx dx`` of shape
    ``x.shape + x.shape`` (a float for a number; for a structured ``x``, its structure twice over:
    ``H["w"]["b"]``). Several arguments: the blocks ``H[i][j] = d^2 f / dx_i dx_j``. With
    ``zt.Params``: a ``zt.Grads`` of ``zt.Grads``, ``H[W][b]``. Reverse over reverse (Zygote's
    ``hessian_reverse``; see :func:`hessian_reverse`)."""
    return _hessian(f, args, argnums, kwargs, "hessian")


def hessian_reverse(f: Callable[..., Any], *args: Any, argnums: ArgNums = None, **kwargs: Any) -> Any:
    """The Hessian by reverse-mode over reverse-mode AD, as Zygote's ``hessian_reverse``."""
    return _hessian(f, args, argnums, kwargs, "hessian_reverse")


def _hessian(f, args, argnums, kwargs, api):
    request = _Request(api, f, args, kwargs, argnums)
    if not args:
        raise ZygoteError(f"zt.{api}: no argument to differentiate with respect to (at {_where()})")
    wrt, in_leaves, blocks = compose.connected(lambda inputs=None: _raw_hessian(request, inputs),
                                               request.inputs(), name=request)
    return _hessian_structure(request, wrt, in_leaves, blocks)


def diaghessian(f: Callable[..., Any], *args: Any, argnums: ArgNums = None, **kwargs: Any) -> tuple:
    """The diagonal of the Hessian of scalar ``f`` with respect to each argument, shaped like it
    (Zygote's ``diaghessian``): ``h[k] = d^2 f / dx[k]^2`` for every leaf of every argument."""
    request = _Request("diaghessian", f, args, kwargs, argnums)
    wrt, in_leaves, blocks = compose.connected(lambda inputs=None: _raw_hessian(request, inputs),
                                               request.inputs(), name=request)
    out, k = [], 0
    for s in wrt:
        if s is None:
            out.append(None)
            continue
        diags = []
        for x in s[0]:
            h = blocks[k][k]
            shape = _Leaf(x).shape
            n = 1
            for d in shape:
                n *= d
            if h is None:
                d = torch.zeros(shape, dtype=x.dtype if isinstance(x, torch.Tensor) else torch.float64)
            else:
                d = h.reshape(n, n).diagonal().reshape(shape)
            diags.append(float(d) if is_python_float(x) and not _live(d) else d)
            k += 1
        out.append(s[1](diags))
    if request.params is not None:
        return out[0]
    return request.select(tuple(out))


def isderiving() -> bool:
    """Whether the code calling it is being differentiated by zt right now (Zygote's
    ``isderiving()``): true inside ``f`` during ``zt.gradient(f, ...)`` and the like, and while a
    staged program is captured."""
    return bool(recording_tapes()) or is_staging()
