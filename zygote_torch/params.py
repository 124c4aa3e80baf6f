"""Implicit parameters: ``Params`` (an ordered identity-set of tensors) and ``Grads``.

As in Zygote, ``zt.gradient(() -> loss(), ps)`` differentiates with respect to tensors the function
reaches by itself (globals, closures, module attributes) rather than through its arguments, and
returns a ``Grads`` indexed by the tensors themselves: ``gs[W]``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch


class Params:
    """An ordered set of tensors, compared by identity (two equal tensors are two parameters)."""

    def __init__(self, tensors: Iterable[torch.Tensor] | torch.nn.Module = ()):
        if isinstance(tensors, torch.nn.Module):
            tensors = tensors.parameters()
        self._order: list[torch.Tensor] = []
        self._ids: set[int] = set()
        for t in tensors:
            self.add(t)

    def add(self, t: torch.Tensor) -> "Params":
        """Add ``t`` if it is not already present (Zygote's ``push!``)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Params holds tensors, got {type(t).__name__}")
        if id(t) not in self._ids:
            self._ids.add(id(t))
            self._order.append(t)
        return self

    def remove(self, t: torch.Tensor) -> "Params":
        """Remove ``t`` (Zygote's ``delete!``); a KeyError if absent."""
        if id(t) not in self._ids:
            raise KeyError("tensor not in Params")
        self._ids.discard(id(t))
        self._order = [p for p in self._order if p is not t]
        return self

    def __contains__(self, t) -> bool:
        return id(t) in self._ids

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._order[i]

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(p.shape)) for p in self._order)
        return f"Params([{shapes}])"

    def to_vector(self) -> torch.Tensor:
        """All parameters flattened into one new vector, in order (Zygote's ``copy!(x, ps)``)."""
        if not self._order:
            return torch.empty(0)
        return torch.cat([p.detach().reshape(-1) for p in self._order])

    def from_vector(self, vector: torch.Tensor) -> "Params":
        """Copy ``vector`` into the parameters in place, in order (Zygote's ``copy!(ps, x)``)."""
        total = sum(p.numel() for p in self._order)
        if vector.numel() != total:
            raise ValueError(f"vector has {vector.numel()} elements, the parameters {total}")
        offset = 0
        with torch.no_grad():
            for p in self._order:
                p.copy_(vector[offset:offset + p.numel()].reshape(p.shape))
                offset += p.numel()
        return self


class Grads:
    """Gradients of ``Params``, indexed by the parameter tensors: ``gs[W]``.

    A parameter the function did not depend on has gradient None. Supports ``+ - *`` with another
    ``Grads`` or a number (in place too), ``map``, and ``to_grad()`` to hand the gradients to any
    ``torch.optim`` optimizer.
    """

    def __init__(self, params: Params, grads: dict[int, torch.Tensor | None]):
        self.params = params
        self._grads = {id(p): grads.get(id(p)) for p in params}

    def __getitem__(self, p: torch.Tensor):
        if id(p) not in self._grads:
            raise KeyError("tensor is not one of these Grads' Params")
        return self._grads[id(p)]

    def __contains__(self, p) -> bool:
        return id(p) in self._grads

    def __iter__(self):
        return iter(self.params)

    def __len__(self) -> int:
        return len(self._grads)

    def keys(self):
        return list(self.params)

    def values(self):
        return [self._grads[id(p)] for p in self.params]

    def items(self):
        return [(p, self._grads[id(p)]) for p in self.params]

    def __repr__(self) -> str:
        return f"Grads({len(self)} parameters)"

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Grads":
        """A new Grads with ``fn`` applied to every gradient that is not None."""
        return Grads(self.params, {k: None if g is None else fn(g) for k, g in self._grads.items()})

    def _combine(self, other, op) -> "Grads":
        if isinstance(other, Grads):
            out = {}
            for p in self.params:
                a, b = self._grads[id(p)], other._grads.get(id(p))
                out[id(p)] = a if b is None else (op(torch.zeros_like(b), b) if a is None else op(a, b))
            return Grads(self.params, out)
        return self.map(lambda g: op(g, other))

    def __add__(self, other):
        return self._combine(other, torch.add)

    def __sub__(self, other):
        return self._combine(other, torch.sub)

    def __mul__(self, other):
        return self._combine(other, torch.mul)

    __radd__ = __add__
    __rmul__ = __mul__

    def __neg__(self):
        return self.map(torch.neg)

    def __iadd__(self, other):
        self._grads = (self + other)._grads
        return self

    def __isub__(self, other):
        self._grads = (self - other)._grads
        return self

    def __imul__(self, other):
        self._grads = (self * other)._grads
        return self

    def to_grad(self, accumulate: bool = False) -> None:
        """Write each gradient into its parameter's ``.grad`` (added to it with ``accumulate``), so
        ``optimizer.step()`` uses them. A parameter without gradient gets ``.grad = None``
        (unless accumulating)."""
        for p in self.params:
            g = self._grads[id(p)]
            if g is None:
                if not accumulate:
                    p.grad = None
                continue
            g = g.detach().to(p.dtype)
            if accumulate and p.grad is not None:
                p.grad = p.grad + g
            else:
                p.grad = g.clone()
