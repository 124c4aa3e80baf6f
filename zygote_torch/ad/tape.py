"""The tape: rules applied call by call, then walked in reverse.

One tape serves both ways of running. Dynamically, the recorder hands it each call on real
tensors and the pullbacks compute cotangents. When staging, the reverse transform replays a
forward graph into it on fake tensors under a recording mode, so the very same pullbacks write
backward nodes instead. Values are keyed by identity (``id``); the tape keeps every tracked
tensor alive so identities stay unique.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import RuleError, describe_frame, op_name, user_frame
from .fallback import fallback_rule
from .registry import REGISTRY
from .tangents import ZeroTangent, add_tangents, is_zero, unthunk


def is_differentiable(x) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors(x, out)
    return out


@dataclass
class Entry:
    """One differentiated call: its bound positional arguments, outputs and pullback."""

    func: Any
    args: tuple
    out: Any
    pullback: Callable
    where: Any
    rule_name: str
    fallback: bool = False

    @property
    def op(self) -> str:
        return op_name(self.func)

    def context(self) -> str:
        return f"{self.op} (rule {self.rule_name}) called at {describe_frame(self.where)}"


class Tape:
    def __init__(self, staged: bool = False):
        self.staged = staged  # values are fake tensors being recorded into a graph
        self.entries: list[Entry] = []
        self.tracked: dict[int, torch.Tensor] = {}
        self.where = None  # set by a replay to the user's line of the call being replayed

    # -- forward ---------------------------------------------------------------------------------
    def track(self, t: torch.Tensor) -> None:
        self.tracked[id(t)] = t

    def tracks(self, t) -> bool:
        return id(t) in self.tracked

    def record(self, func, args: tuple, kwargs: dict):
        """Apply ``func``'s rule (or the fallback) and remember its pullback; return the value."""
        if REGISTRY.is_non_differentiable(func) or not any(self.tracks(t) for t in _tensors(args, [])):
            return func(*args, **kwargs)
        rule = REGISTRY.lookup(func)
        where = self.where or user_frame()
        if rule is None:
            out, pullback = fallback_rule(func, args, kwargs, self.staged)
            name, is_fallback = "torch.func.vjp fallback", True
        else:
            args, kwargs = rule.signature.bind(func, args, kwargs)
            out, pullback = _checked_call(rule, func, args, kwargs, where)
            name, is_fallback = rule.name, False
        outputs = [t for t in _tensors(out, []) if is_differentiable(t)]
        if outputs:
            for t in outputs:
                self.track(t)
            self.entries.append(Entry(func, tuple(args), out, pullback, where, name, is_fallback))
        return out

    # -- reverse ---------------------------------------------------------------------------------
    def backward(self, seeds, keep: bool = True) -> dict[int, Any]:
        """Cotangents of every tracked tensor reached from ``seeds`` (pairs of tensor, cotangent).

        With ``keep=False`` entries are dropped as they are used, freeing residuals early.
        """
        cot: dict[int, Any] = {}
        for t, dy in seeds:
            if id(t) in self.tracked:
                cot[id(t)] = add_tangents(cot.get(id(t)), dy)
        entries = self.entries
        for i in range(len(entries) - 1, -1, -1):
            entry = entries[i]
            if not keep:
                entries[i] = None
            dy = _gather(entry.out, cot)
            if dy is None:
                continue
            grads = entry.pullback(dy)
            _check_arity(entry, grads)
            for arg, g in zip(entry.args, grads[1:]):
                self._accumulate(entry, arg, g, cot)
        if not keep:
            self.entries = []
        return cot

    def _accumulate(self, entry: Entry, arg, g, cot: dict) -> None:
        if isinstance(arg, torch.Tensor):
            if id(arg) not in self.tracked or is_zero(g):
                return
            g = unthunk(g)
            if is_zero(g):
                return
            _check_cotangent(entry, arg, g)
            if g.dtype != arg.dtype:
                g = g.to(arg.dtype)
            cot[id(arg)] = add_tangents(cot.get(id(arg)), g)
        elif isinstance(arg, (tuple, list)) and not is_zero(g):
            g = unthunk(g)
            if not isinstance(g, (tuple, list)) or len(g) != len(arg):
                raise RuleError(f"pullback of {entry.context()}: the cotangent of a sequence argument "
                                f"must be a sequence of {len(arg)} cotangents, got {type(g).__name__}")
            for a, gi in zip(arg, g):
                self._accumulate(entry, a, gi, cot)


def _gather(out, cot: dict):
    """The cotangent of an output structure, or None when all of it is zero."""
    if isinstance(out, torch.Tensor):
        return cot.pop(id(out), None)
    if isinstance(out, (tuple, list)):
        parts = [_gather(o, cot) if isinstance(o, (torch.Tensor, tuple, list)) else None for o in out]
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
