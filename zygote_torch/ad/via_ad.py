"""``rrule_via_ad``: a rule's pullback computed by differentiating a function with the project's own
rules (ChainRulesCore's name), for the rules whose derivative is that of a reference formula.

It drives the tape directly (:mod:`.recording`), so rules need not import the API.
"""
from __future__ import annotations

from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ..capture.pytree import flatten
from ..errors import RuleError
from .recording import describe, run_on_tape, seeds
from .tangents import NoTangent, is_zero, unthunk


def rrule_via_ad(f, *args, strict: bool = False, value=None):
    """``(y, pullback)`` of ``f(*args)``, differentiated by the project's rules on a fresh tape.

    The tensor arguments (and lists or tuples holding tensors) are differentiated; the others are
    passed through unchanged (Python numbers stay numbers, None stays None). ``pullback(dy)``, for
    ``dy`` mirroring ``y`` (symbolic zeros seed nothing), returns ``(NoTangent(), *one cotangent per
    argument)`` as a rule's pullback does: ``NoTangent()`` for an argument not differentiated or
    not reached, and in a list of tensors for each tensor not reached. It may be called any number
    of times. ``strict=True``: a call inside ``f`` that had no rule (the torch.func fallback) is a
    :class:`RuleError` naming the ops. ``value``: a callable computing the primal output another
    way (torch's own kernel, where ``f`` only rounds differently), returned instead of ``f``'s on
    real tensors (on the fake tensors of staging ``f``'s own value stands in).
    """
    where = [i for i, a in enumerate(args) if _has_tensor(a)]

    def differentiated(*tensors):
        full = list(args)
        for i, t in zip(where, tensors):
            full[i] = t
        return f(*full)

    tape, arguments, out = run_on_tape(differentiated, tuple(args[i] for i in where))
    if strict:
        _refuse_fallbacks(f, tape)

    def pullback(dy):
        tape.check_output(out, describe(f))  # nothing the output depends on was cut from the tape
        dy = unthunk(dy)
        pairs = [] if is_zero(dy) else seeds(f, out, _without_zeros(dy))  # symbolic zeros seed nothing
        grads = arguments.gradients(tape, tape.backward(pairs, keep=True)) if pairs else (None,) * len(where)
        cots = [NoTangent()] * len(args)
        for i, g in zip(where, grads):
            cots[i] = _as_cotangent(g)
        return (NoTangent(), *cots)

    if value is not None and not any(isinstance(t, FakeTensor) for a in args for t in _tensors_of(a)):
        return value(), pullback
    return out, pullback


def _without_zeros(dy):
    """``dy`` with its symbolic zeros as None (which seeds nothing) and its thunks evaluated."""
    leaves, rebuild = flatten(dy)
    return rebuild([None if is_zero(d) else unthunk(d) for d in leaves])


def _refuse_fallbacks(f, tape) -> None:
    missing = sorted({e.op for e in tape.entries if e.fallback})
    if missing:
        raise RuleError(f"the decomposition {getattr(f, '__qualname__', f)} reached the torch.func fallback "
                        f"for {missing}: give those ops rules")


def _as_cotangent(g):
    """A gradient of the tape as a rule's cotangent: NoTangent for none (in a list too)."""
    if g is None:
        return NoTangent()
    if isinstance(g, (list, tuple)):
        return [NoTangent() if x is None else x for x in g]
    return g


def _has_tensor(a) -> bool:
    if isinstance(a, Tensor):
        return True
    return isinstance(a, (list, tuple)) and any(isinstance(x, Tensor) for x in a)


def _tensors_of(a):
    if isinstance(a, Tensor):
        return [a]
    return [x for x in a if isinstance(x, Tensor)] if isinstance(a, (list, tuple)) else []
