"""Tangent types: symbolic zeros that are never materialised, and lazily computed cotangents.

ChainRulesCore's vocabulary: ``NoTangent()`` says an argument is not differentiable at all (an
index, a shape, a flag); ``ZeroTangent()`` says its cotangent is zero. Both are singletons, ``None``
is accepted wherever ``NoTangent()`` is. ``Thunk`` wraps a cotangent that is only computed if some
consumer needs it.
"""
from __future__ import annotations

import torch


class AbstractZero:
    """A cotangent known to be zero; arithmetic with it never touches memory."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __bool__(self) -> bool:
        return False

    def __add__(self, other):
        return other

    __radd__ = __add__

    def __mul__(self, other):
        return self

    __rmul__ = __mul__

    def __neg__(self):
        return self


class NoTangent(AbstractZero):
    """The argument has no tangent space (integers, indices, shapes, flags)."""


class ZeroTangent(AbstractZero):
    """The cotangent is zero."""


class Thunk:
    """A cotangent computed on first use: ``Thunk(lambda: expensive(dy))``."""

    __slots__ = ("_fn", "_value", "_done")

    def __init__(self, fn):
        self._fn, self._value, self._done = fn, None, False

    def __call__(self):
        if not self._done:
            self._value, self._done = self._fn(), True
            self._fn = None
        return self._value

    def __repr__(self) -> str:
        return "Thunk(...)"


def is_differentiable(x) -> bool:
    """Whether ``x`` can carry a cotangent: a floating-point or complex tensor."""
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def unthunk(t):
    """The value of a possibly lazy cotangent."""
    return t() if isinstance(t, Thunk) else t


def is_zero(t) -> bool:
    """True for symbolic zeros (``ZeroTangent``, ``NoTangent``, ``None``)."""
    return t is None or isinstance(t, AbstractZero)


def add_tangents(a, b):
    """Accumulate two cotangents; symbolic zeros are the identity and are never materialised."""
    if is_zero(a):
        return b
    if is_zero(b):
        return a
    return unthunk(a) + unthunk(b)


def materialize(dy, like: torch.Tensor) -> torch.Tensor:
    """A real tensor for ``dy``: zeros shaped like ``like`` where ``dy`` is a symbolic zero.

    For rules of multi-output functions whose outputs may not all receive a cotangent.
    """
    dy = unthunk(dy)
    if is_zero(dy):
        return torch.zeros_like(like)
    return dy
