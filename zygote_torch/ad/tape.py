"""The tape: rules applied call by call, then walked in reverse.

One tape serves both ways of running. Dynamically, the recorder hands it each call on real
tensors and the pullbacks compute cotangents. When staging, the reverse transform replays a
forward graph into it on fake tensors under a recording mode, so the very same pullbacks write
backward nodes instead.

Values are keyed by identity and version, ``(id(t), t._version)``: an in-place op makes a new
version of the same tensor object, so cotangents of the value before and after the mutation are
kept apart (see :mod:`.mutation`). The tape keeps every tracked tensor alive so ids stay unique.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import RuleError, ZygoteError, describe_frame, op_name, user_frame
from ..capture.pytree import tensors_in
from ..capture.recorder import INPLACE, call_kind, is_staging, touches
from . import fusion, mutation
from .fallback import fallback_rule
from .registry import REGISTRY
from .tangents import NoTangent, ZeroTangent, add_tangents, is_differentiable, is_zero, unthunk


try:
    _is_transformed = torch._C._functorch.is_functorch_wrapped_tensor
except AttributeError:  # pragma: no cover
    def _is_transformed(t):
        return False


def key(t: torch.Tensor) -> tuple:
    """The identity of a tensor's current value."""
    return id(t), t._version


@dataclass(slots=True)
class Entry:
    """One differentiated call: bound positional arguments, outputs, pullback, and the keys of
    the argument and output values at the time of the call."""

    func: Any
    args: tuple
    out: Any
    pullback: Callable
    where: Any
    rule_name: str
    fallback: bool
    in_keys: list
    out_keys: Any

    @property
    def op(self) -> str:
        return op_name(self.func)

    def context(self) -> str:
        return f"{self.op} (rule {self.rule_name}) called at {describe_frame(self.where)}"


class Tape:
    def __init__(self, staged: bool | None = None):
        # staged: values are fake tensors being recorded into a graph (by default: whenever a
        # graph is being recorded, e.g. zt.gradient called inside a function zt.compile stages)
        self.staged = is_staging() if staged is None else staged
        self.entries: list[Entry] = []
        self.tracked: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, tuple] = {}  # id -> key of each tensor differentiated with respect to
        self.where = None  # set by a replay to the user's line of the call being replayed

    # -- forward ---------------------------------------------------------------------------------
    def track(self, t: torch.Tensor) -> None:
        self.tracked[id(t)] = t

    def track_input(self, t: torch.Tensor) -> None:
        """Track ``t`` as a tensor to differentiate with respect to (an argument, a parameter)."""
        self.track(t)
        self.inputs[id(t)] = key(t)

    def tracks(self, t) -> bool:
        return id(t) in self.tracked

    def holds(self, t: torch.Tensor) -> bool:
        """Whether some recorded entry took ``t`` as an argument or produced it (its pullback may
        hold it)."""
        return any(e is not None and any(x is t for x in tensors_in((e.args, e.out))) for e in self.entries)

    def cotangent(self, cot: dict, t: torch.Tensor):
        """The cotangent of input ``t`` in the result of :meth:`backward`."""
        return cot.get(self.inputs.get(id(t)) or key(t))

    def _keys(self, obj):
        """Keys of the tracked tensors in ``obj``, mirroring its structure (None elsewhere)."""
        if isinstance(obj, torch.Tensor):
            return (id(obj), obj._version) if id(obj) in self.tracked else None
        if isinstance(obj, (tuple, list)):
            return [self._keys(x) for x in obj]
        return None

    def record(self, func, args: tuple, kwargs: dict):
        """Apply ``func``'s rule (or the fallback) and remember its pullback; return the value."""
        if call_kind(func) is not INPLACE and not (touches(args, self.tracked)
                                                   or kwargs and touches(kwargs.values(), self.tracked)):
            return func(*args, **kwargs)
        return self.record_touching(func, args, kwargs)

    def record_touching(self, func, args: tuple, kwargs: dict):
        """:meth:`record` for a call known to touch a tracked tensor or to be in place (the
        recorder's ``on_call``: it has checked)."""
        kind, non_differentiable, rule = _plan(func)
        if kind is INPLACE:
            return mutation.record_inplace(self, func, args, kwargs)
        if non_differentiable:
            return func(*args, **kwargs)
        if rule is not None and rule.inplace_index is not None:
            inplace = self._inplace_flag(rule, func, args, kwargs)
            if inplace is not None:  # F.relu(x, inplace=True) and the like: a mutation of x
                return mutation.record_inplace(self, func, *inplace, functional=func)
        # frame 3 up is the code that called the torch function (through the recorder, or record)
        where = self.where or user_frame(3)
        if kwargs and kwargs.get("out") is not None:
            raise ZygoteError(f"{op_name(func)}(..., out=...) at {describe_frame(where)}: "
                              "writing into out= is not differentiable; assign the result instead")
        return self.apply(func, args, kwargs, rule=rule, where=where)

    @staticmethod
    def _inplace_flag(rule, func, args, kwargs):
        """For a call with a true ``inplace`` flag: its bound arguments with the flag false."""
        i = rule.inplace_index
        if len(args) <= i and not kwargs.get("inplace"):
            return None
        bound, rest = rule.signature.bind(func, args, kwargs)
        if bound[i] is not True:
            return None
        return bound[:i] + (False,) + bound[i + 1:], rest

    def apply(self, func, args: tuple, kwargs: dict, first_key=None, rule=False, where=None):
        """Apply the rule of ``func`` and push its entry. ``first_key`` overrides the key of the
        first argument (an in-place op computes on a copy of its target's old value); ``where``,
        the user's line of the call, is found here unless given."""
        if rule is False:
            rule = REGISTRY.lookup(func)
        where = where or self.where or user_frame()
        if rule is None:  # keyword tensors are differentiated too: they follow the positionals
            out, pullback = fallback_rule(func, args, kwargs, self.staged, self.tracks)
            args = tuple(args) + tuple(kwargs.values())
            name, is_fallback = "torch.func.vjp fallback", True
        else:
            args, kwargs = rule.signature.bind(func, args, kwargs)
            out, pullback = _checked_call(rule, func, args, kwargs, where)
            name, is_fallback = rule.name, False
        outputs = _differentiable_outputs(out)
        if outputs and _is_transformed(outputs[0]):
            raise ZygoteError(f"{op_name(func)} at {describe_frame(where)} mixes a tensor being differentiated with "
                              "one inside a torch.func transform (grad, jvp, ...): zygote_torch differentiates "
                              "torch.func.vmap calls, not other transforms inside f; write the computation with "
                              "ordinary torch ops instead")
        if outputs:
            keys = self._arg_keys(args)
            if first_key is not None:
                keys[0] = first_key
            tracked = self.tracked
            for t in outputs:
                tracked[id(t)] = t
            self.entries.append(Entry(func, tuple(args), out, pullback, where, name, is_fallback,
                                      keys, self._keys(out)))
        return out

    def _arg_keys(self, args) -> list:
        """:meth:`_keys` of each argument (the common flat case without recursion)."""
        tracked = self.tracked
        return [(id(a), a._version) if id(a) in tracked else None
                if isinstance(a, torch.Tensor) else self._keys(a) if isinstance(a, (tuple, list)) else None
                for a in args]

    def push_identity(self, source: torch.Tensor, target: torch.Tensor, func) -> None:
        """Record that ``target``'s current value is ``source``'s (the write-back of an in-place op)."""
        self.track(target)
        self.entries.append(Entry(func, (source,), target, lambda dy: (NoTangent(), dy),
                                  self.where or user_frame(), "write-back", False,
                                  [self._keys(source)], key(target)))

    # -- reverse ---------------------------------------------------------------------------------
    def backward(self, seeds, keep: bool = True) -> dict:
        """Cotangents of every tracked value reached from ``seeds`` (pairs of tensor, cotangent),
        keyed by :func:`key`; read an input's with :meth:`cotangent`.

        With ``keep=False`` entries are dropped as they are used, freeing residuals early. The
        pullbacks run with torch.autograd off (as the forward does): no graph is built for them.
        """
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self._backward(seeds, keep)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)

    def _backward(self, seeds, keep: bool) -> dict:
        if self.staged and not keep:  # one pass, every seed known: chains no other cotangent reaches may fuse
            fusion.fuse(self, seeds)
        cot: dict = {}
        for t, dy in seeds:
            if id(t) in self.tracked:
                cot[key(t)] = add_tangents(cot.get(key(t)), dy)
        entries = self.entries
        for i in range(len(entries) - 1, -1, -1):
            entry = entries[i]
            if entry is None:  # replaced by a fused entry
                continue
            if not keep:
                entries[i] = None
            dy = _gather(entry.out_keys, cot)
            if dy is None:
                continue
            grads = entry.pullback(dy)
            _check_arity(entry, grads)
            for arg, k, g in zip(entry.args, entry.in_keys, grads[1:]):
                _accumulate(entry, arg, k, g, cot)
        if not keep:
            self.entries = []
        return cot


_plans: dict = {}  # func -> (registry version, call kind, non-differentiable, rule)


def _plan(func) -> tuple:
    """(call kind, non-differentiable, rule) of ``func``, cached until the registry changes."""
    try:
        plan = _plans[func]
        if plan[0] == REGISTRY.version:
            return plan[1:]
    except (KeyError, TypeError):
        pass
    plan = (REGISTRY.version, call_kind(func), REGISTRY.is_non_differentiable(func), REGISTRY.lookup(func))
    if not isinstance(func, types.MethodType):  # a bound method would keep its object alive
        try:
            _plans[func] = plan
        except TypeError:  # an unhashable callable
            pass
    return plan[1:]


def _differentiable_outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    return [t for t in tensors_in(out) if is_differentiable(t)]


def _accumulate(entry: Entry, arg, k, g, cot: dict) -> None:
    if k is None or is_zero(g):
        return
    g = unthunk(g)
    if is_zero(g):
        return
    if isinstance(arg, torch.Tensor):
        _check_cotangent(entry, arg, g)
        if g.dtype != arg.dtype:
            g = g.to(arg.dtype)
        cot[k] = add_tangents(cot.get(k), g)
    elif isinstance(arg, (tuple, list)):
        if not isinstance(g, (tuple, list)) or len(g) != len(arg):
            raise RuleError(f"pullback of {entry.context()}: the cotangent of a sequence argument "
                            f"must be a sequence of {len(arg)} cotangents, got {type(g).__name__}")
        for a, ki, gi in zip(arg, k, g):
            _accumulate(entry, a, ki, gi, cot)


def _gather(keys, cot: dict):
    """The cotangent of an output structure (given by its keys), or None when all of it is zero."""
    if isinstance(keys, tuple):
        return cot.pop(keys, None)
    if isinstance(keys, list):
        parts = [_gather(k, cot) for k in keys]
        if all(p is None for p in parts):
            return None
        return tuple(ZeroTangent() if p is None else p for p in parts)
    return None


def _checked_call(rule, func, args, kwargs, where):
    try:
        result = rule.fn(*args, **kwargs)
    except RuleError:
        raise
    except Exception as exc:
        exc.add_note(f"in rule {rule.name} for {op_name(func)}, called at {describe_frame(where)}")
        raise
    if not (isinstance(result, tuple) and len(result) == 2 and callable(result[1])):
        raise RuleError(f"rule {rule.name} for {op_name(func)} must return (value, pullback); "
                        f"got {type(result).__name__}. Called at {describe_frame(where)}")
    return result


def _check_arity(entry: Entry, grads) -> None:
    expected = 1 + len(entry.args)
    if not isinstance(grads, tuple) or len(grads) != expected:
        got = f"{len(grads)} cotangents" if isinstance(grads, tuple) else f"a {type(grads).__name__}"
        raise RuleError(f"pullback of {entry.context()} returned {got}; expected a tuple of {expected} "
                        f"(the function's own cotangent, then one per positional argument)")


def _check_cotangent(entry: Entry, arg: torch.Tensor, g) -> None:
    if not isinstance(g, torch.Tensor):
        raise RuleError(f"pullback of {entry.context()} returned a {type(g).__name__} as the "
                        f"cotangent of a tensor argument of shape {tuple(arg.shape)}")
    if g.shape != arg.shape:
        raise RuleError(f"pullback of {entry.context()} returned a cotangent of shape "
                        f"{tuple(g.shape)} for an argument of shape {tuple(arg.shape)}")
