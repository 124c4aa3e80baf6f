"""Forward mode: ``pushforward``, ``jvp`` and ``hvp``, with ``frule``s registered the ChainRules way.

``zt.jvp(f, primals, tangents)`` runs ``f`` once on dual numbers (torch's forward-mode AD, the
mechanism ``torch.func.jvp`` runs on): each tensor carries its tangent, and every torch op
propagates it, in-place ops and views included. A callable with a registered ``frule`` is
intercepted instead (a ``TorchFunctionMode``), and its rule computes the output and its tangent:

    @zt.frule(torch.sin)
    def _(dargs, x):
        _, dx = dargs                      # ChainRules: frule((Δself, Δx), sin, x)
        return torch.sin(x), dx * torch.cos(x)

``dargs`` holds the tangent of the function itself (``NoTangent()``), then one per positional
parameter of the rule (after ``dargs``), ``ZeroTangent()`` for a tensor without one and
``NoTangent()`` for anything else; the rule returns ``(y, dy)``, ``dy`` mirroring ``y`` (a
symbolic zero, or None, for no tangent). A user Python function with an frule is a leaf (its body
does not run); everything else is differentiated by torch's forward AD, the fallback.

Forward over reverse: ``zt.gradient`` inside ``zt.jvp`` runs its tape on dual numbers, so
``zt.hvp(f, x, v)`` (a Hessian-vector product) costs one forward and one reverse pass.
"""
from __future__ import annotations

import threading

import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode

from .ad.registry import Signature, canonical_key, is_python_leaf
from .ad.tangents import NoTangent, ZeroTangent, is_zero, unthunk
from .capture import leaves
from .capture.pytree import structure
from .capture.trace import is_python_float
from .errors import RuleError, ZygoteError, describe_frame, op_name, user_frame

_FRULES: dict = {}  # canonical key -> (rule, Signature of its arguments after dargs)
_state = threading.local()


def frule(*fns):
    """Decorator registering a forward rule ``rule(dargs, *args, **kwargs) -> (y, dy)`` for each
    callable in ``fns`` (see the module docstring)."""
    if not fns:
        raise TypeError("frule needs at least one callable to register the rule for")

    def decorate(rule):
        if not callable(rule):
            raise RuleError(f"frule({', '.join(op_name(f) for f in fns)}): the rule must be callable")
        signature = Signature.of(rule)
        if not signature.positional and not signature.varargs:
            raise RuleError(f"frule {getattr(rule, '__qualname__', rule)}: its first parameter receives the tangents")
        signature = Signature(signature.positional[1:], signature.varargs, signature.varkw, signature.kwonly)
        for f in fns:
            _FRULES[canonical_key(f)] = (rule, signature)
        return rule

    return decorate


def _lookup(func):
    try:
        return _FRULES.get(func) or _FRULES.get(canonical_key(func))
    except TypeError:  # an unhashable callable
        return None


def _tangent(t):
    """The tangent a tensor carries at the current dual level, or None."""
    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
        return None
    return fwAD.unpack_dual(t).tangent


def _has_tangent(values) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor):
            if _tangent(v) is not None:
                return True
        elif isinstance(v, (list, tuple)) and _has_tangent(v):
            return True
    return False


def _primal(v):
    if isinstance(v, torch.Tensor):
        return fwAD.unpack_dual(v).primal if _tangent(v) is not None else v
    if isinstance(v, (list, tuple)) and not hasattr(type(v), "_fields"):
        return type(v)(_primal(x) for x in v)
    return v


def _darg(v):
    if isinstance(v, torch.Tensor):
        t = _tangent(v)
        if t is not None:
            return t
        return ZeroTangent() if v.is_floating_point() or v.is_complex() else NoTangent()
    if isinstance(v, (list, tuple)) and _has_tangent(v):
        return [_darg(x) for x in v]
    return NoTangent()


def _dual(y, dy):
    """``y`` carrying ``dy`` (mirroring it) as tangents; no tangent where ``dy`` is a zero."""
    if isinstance(y, torch.Tensor):
        dy = unthunk(dy)
        if is_zero(dy) or not (y.is_floating_point() or y.is_complex()):
            return y
        if not isinstance(dy, torch.Tensor) or dy.shape != y.shape:
            raise RuleError(f"an frule returned a tangent {type(dy).__name__} "
                            f"{tuple(getattr(dy, 'shape', ()))} for an output of shape {tuple(y.shape)}")
        return fwAD.make_dual(y, dy.to(y.dtype))
    if isinstance(y, (tuple, list)):
        parts = dy if isinstance(dy, (tuple, list)) else [dy] * len(y) if is_zero(dy) else None
        if parts is None or len(parts) != len(y):
            raise RuleError(f"an frule returned a tangent {type(dy).__name__} for an output of {len(y)} items")
        out = [_dual(a, b) for a, b in zip(y, parts)]
        return type(y)(*out) if hasattr(type(y), "_fields") else type(y)(out)
    return y


class _Forward(TorchFunctionMode):
    """Calls with a registered frule, and an argument carrying a tangent, go to their rule."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = _lookup(func)
        if entry is None or not (_has_tangent(args) or kwargs and _has_tangent(kwargs.values())):
            return func(*args, **kwargs)
        rule, signature = entry
        args, rest = signature.bind(func, args, kwargs)
        dargs = (NoTangent(),) + tuple(_darg(a) for a in args)
        try:
            result = rule(dargs, *[_primal(a) for a in args], **{k: _primal(v) for k, v in rest.items()})
        except RuleError:
            raise
        except Exception as exc:
            exc.add_note(f"in frule {getattr(rule, '__qualname__', rule)} for {op_name(func)}, called at "
                         f"{describe_frame(user_frame())}")
            raise
        if not (isinstance(result, tuple) and len(result) == 2):
            raise RuleError(f"frule {getattr(rule, '__qualname__', rule)} for {op_name(func)} must return (y, dy); "
                            f"got {type(result).__name__}. Called at {describe_frame(user_frame())}")
        return _dual(*result)


def _python_frule_functions() -> list:
    return [k for k in _FRULES if is_python_leaf(k)]


def jvp(f, primals, tangents, *, has_aux: bool = False, **kwargs):
    """``(f(*primals), J tangents)``, as ``torch.func.jvp``: ``primals`` and ``tangents`` are tuples
    (one per argument, structures mirroring each other; a Python number's tangent a number). The
    output's tangent mirrors the output, zeros where it does not depend on the primals. With
    ``has_aux=True``: ``(y, dy, aux)``. Keyword arguments go to ``f`` and carry no tangent."""
    if not isinstance(primals, tuple) or not isinstance(tangents, tuple) or len(primals) != len(tangents):
        raise ZygoteError(f"zt.jvp: primals and tangents must be tuples of the same length, one per argument "
                          f"(at {describe_frame(user_frame())})")
    level = getattr(_state, "level", 0)
    _state.level = level + 1
    try:
        with fwAD.dual_level(), leaves.intercepting(_python_frule_functions()), _Forward():
            duals = tuple(_make_duals(p, t) for p, t in zip(primals, tangents))
            out = f(*duals, **kwargs)
            aux = None
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise ZygoteError("zt.jvp(..., has_aux=True): f must return a pair (output, aux)")
                out, aux = out
            y, dy = _split_duals(out)
    finally:
        _state.level = level
    return (y, dy, _strip(aux)) if has_aux else (y, dy)


def _make_duals(primal, tangent):
    p_leaves, shape = structure(primal)
    t_leaves, _ = structure(tangent)
    if len(p_leaves) != len(t_leaves):
        raise ZygoteError(f"zt.jvp: a tangent with {len(t_leaves)} leaves for a primal with {len(p_leaves)} "
                          f"(at {describe_frame(user_frame())})")
    duals = []
    for p, t in zip(p_leaves, t_leaves):
        if is_python_float(p):
            p = torch.tensor(float(p), dtype=torch.float64)
        if isinstance(p, torch.Tensor) and (p.is_floating_point() or p.is_complex()) and t is not None \
                and not is_zero(t):
            t = torch.as_tensor(t, dtype=p.dtype, device=p.device)
            if t.shape != p.shape:
                raise ZygoteError(f"zt.jvp: a tangent of shape {tuple(t.shape)} for a primal of shape "
                                  f"{tuple(p.shape)} (at {describe_frame(user_frame())})")
            p = fwAD.make_dual(p, t)
        duals.append(p)
    return shape.argument(duals)


def _split_duals(out):
    leaves_, shape = structure(out)
    ys, dys = [], []
    for leaf in leaves_:
        if isinstance(leaf, torch.Tensor):
            primal, tangent = fwAD.unpack_dual(leaf)
            ys.append(primal)
            dys.append(torch.zeros_like(primal) if tangent is None else tangent)
        else:
            ys.append(leaf)
            dys.append(None)
    return shape.argument(ys), shape.argument(dys)


def _strip(obj):
    leaves_, shape = structure(obj)
    return shape.argument([fwAD.unpack_dual(x).primal if isinstance(x, torch.Tensor) else x for x in leaves_])


def pushforward(f, *args, **kwargs):
    """Zygote's ``pushforward(f, x...)``: the function ``(dx...) -> dy`` giving the tangent of
    ``f(x...)`` for tangents ``dx`` of the arguments (one per argument)."""
    def push(*tangents):
        if len(tangents) != len(args):
            raise ZygoteError(f"zt.pushforward: {len(tangents)} tangents for {len(args)} arguments "
                              f"(at {describe_frame(user_frame())})")
        return jvp(f, args, tangents, **kwargs)[1]

    return push


def hvp(f, x, v, **kwargs):
    """The Hessian-vector product ``H(x) v`` of scalar ``f``, forward over reverse: the tangent of
    ``zt.gradient(f, x)`` in the direction ``v`` (``x`` and ``v`` mirror each other)."""
    from .api import gradient
    return jvp(lambda x: _dense_gradient(gradient(f, x, **kwargs)[0], x), (x,), (v,))[1]


def _dense_gradient(g, x):
    """The gradient with zeros where it is None (no dependence), shaped like ``x``."""
    if g is not None:
        return g
    x_leaves, shape = structure(x)
    return shape.gradient([torch.zeros_like(t) if isinstance(t, torch.Tensor) else 0.0 for t in x_leaves])
