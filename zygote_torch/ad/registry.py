"""The rrule registry: which rule differentiates which callable.

``@rrule(f, g, ...)`` registers one rule under every callable that computes the same function
(``torch.sin`` and ``torch.Tensor.sin``, say). A rule has ChainRulesCore's shape::

    @rrule(torch.sin, torch.Tensor.sin)
    def _(x):
        y = torch.sin(x)
        return y, lambda dy: (NoTangent(), dy * torch.cos(x))

The pullback returns the cotangent of the function itself first, then one per positional
parameter of the rule's signature (calls are bound to that signature, defaults filled in), so a
rule always returns the same number of cotangents. Keyword-only parameters are not differentiated.

Registration bumps :data:`REGISTRY.version`, which every cache of generated code keys on: a rule
registered after a first call takes effect at the next call.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from ..capture import leaves
from ..capture.leaves import is_python_leaf
from ..capture.op_classes import canonical_key
from ..errors import RuleError, op_name

_EMPTY = inspect.Parameter.empty


@dataclass
class Signature:
    """How a call is bound to a rule: positional parameters (with defaults) and keyword-only ones."""

    positional: tuple  # ((name, default), ...)
    varargs: bool
    varkw: bool
    kwonly: frozenset

    @classmethod
    def of(cls, fn) -> "Signature":
        sig = inspect.signature(fn)
        positional, varargs, varkw, kwonly = [], False, False, set()
        for p in sig.parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                positional.append((p.name, p.default))
            elif p.kind is p.VAR_POSITIONAL:
                varargs = True
            elif p.kind is p.KEYWORD_ONLY:
                kwonly.add(p.name)
            else:
                varkw = True
        return cls(tuple(positional), varargs, varkw, frozenset(kwonly))

    def index(self, name: str):
        """The position of positional parameter ``name``, or None."""
        return next((i for i, (n, _) in enumerate(self.positional) if n == name), None)

    def bind(self, func, args: tuple, kwargs: dict):
        """(positional args, keyword-only kwargs): keywords naming positional parameters are moved
        into place and missing positionals take their defaults."""
        n = len(self.positional)
        if len(args) > n and not self.varargs:
            raise TypeError(f"{op_name(func)}: {len(args)} positional arguments given, "
                            f"its rule takes at most {n}")
        if not kwargs and len(args) >= n:
            return tuple(args), {}
        kwargs = dict(kwargs)
        bound = list(args)
        for name, default in self.positional[len(args):]:
            if name in kwargs:
                bound.append(kwargs.pop(name))
            elif default is not _EMPTY:
                bound.append(default)
            else:
                raise TypeError(f"{op_name(func)}: missing argument '{name}'")
        if not self.varkw:
            unknown = set(kwargs) - self.kwonly
            if unknown:
                raise TypeError(f"{op_name(func)}: unexpected keyword argument(s) "
                                f"{sorted(unknown)} for its rule")
        return tuple(bound), kwargs


@dataclass
class Rule:
    fn: Callable
    signature: Signature
    builtin: bool
    keys: tuple = field(default_factory=tuple)

    def __post_init__(self):
        self.inplace_index = self.signature.index("inplace")  # F.relu(x, inplace=True) & co
        self.name = getattr(self.fn, "__qualname__", repr(self.fn))


class Registry:
    """Maps callables to rules. Later registrations (a user's) override earlier ones (built in)."""

    def __init__(self):
        self._rules: dict = {}
        self._non_differentiable: set = set()
        self.version = 0
        self._loading_builtins = False
        self._leaves, self._leaves_version = [], -1

    def register(self, keys, fn) -> Rule:
        rule = Rule(fn, Signature.of(fn), builtin=self._loading_builtins,
                    keys=tuple(canonical_key(k) for k in keys))
        for key in rule.keys:
            self._rules[key] = rule
            self._non_differentiable.discard(key)
        self.version += 1
        return rule

    def mark_non_differentiable(self, keys) -> None:
        for key in keys:
            key = canonical_key(key)
            self._non_differentiable.add(key)
            self._rules.pop(key, None)
        self.version += 1

    def lookup(self, func) -> Rule | None:
        try:
            rule = self._rules.get(func)
        except TypeError:  # an unhashable callable
            return None
        return rule if rule is not None else self._rules.get(canonical_key(func))

    def is_non_differentiable(self, func) -> bool:
        try:
            if func in self._non_differentiable:
                return True
        except TypeError:
            return False
        return canonical_key(func) in self._non_differentiable

    def python_leaves(self) -> list:
        """User Python functions that have a rule or are non-differentiable (capture installs a
    trampoline in each: see :mod:`..capture.leaves`)."""
        if self._leaves_version != self.version:
            keys = list(self._rules) + list(self._non_differentiable)
            self._leaves = [k for k in keys if is_python_leaf(k)]
            self._leaves_version = self.version
        return self._leaves

    def __contains__(self, func) -> bool:
        return canonical_key(func) in self._rules


REGISTRY = Registry()
leaves.install_leaf_functions(REGISTRY.python_leaves)  # capture asks which functions stay leaves


def rrule(*fns):
    """Decorator registering a reverse rule for each callable in ``fns``.

    ``@zt.rrule(f)`` over ``def _(*args): return y, pullback`` where
    ``pullback(dy) -> (d_self, d_arg1, ...)``.
    """
    if not fns:
        raise TypeError("rrule needs at least one callable to register the rule for")
    for f in fns:
        if not callable(f) and not hasattr(f, "__get__"):
            raise TypeError(f"rrule: {f!r} is not callable")

    def decorate(rule_fn):
        if not callable(rule_fn):
            raise RuleError(f"rrule({', '.join(op_name(f) for f in fns)}): the rule must be callable")
        REGISTRY.register(fns, rule_fn)
        return rule_fn

    return decorate


def non_differentiable(*fns):
    """Declare callables whose outputs carry no gradient (``ChainRulesCore.@non_differentiable``).

    Usable as a decorator (``@zt.non_differentiable`` over a function) or called with callables.
    """
    REGISTRY.mark_non_differentiable(fns)
    return fns[0] if len(fns) == 1 else fns
