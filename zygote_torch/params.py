"""Implicit parameters: ``Params`` (an ordered identity-set of tensors) and ``Grads``; and
``destructure`` (a flat vector of parameters and the function rebuilding the model from one).

As in Zygote, ``zt.gradient(() -> loss(), ps)`` differentiates with respect to tensors the function
reaches by itself (globals, closures, module attributes) rather than through its arguments, and
returns a ``Grads`` indexed by the tensors themselves: ``gs[W]``.
"""
from __future__ import annotations

import numbers
import operator
from typing import Callable, Iterable, Iterator

import torch

from .capture.pytree import register_parameter_types, structure


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
        """Add ``t`` if it is not already present."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"Params holds tensors, got {type(t).__name__}")
        if id(t) not in self._ids:
            self._ids.add(id(t))
            self._order.append(t)
        return self

    def push(self, *tensors: torch.Tensor) -> "Params":
        """Add each tensor not already present (Zygote's ``push!(ps, x...)``)."""
        for t in tensors:
            self.add(t)
        return self

    def union(self, *collections) -> "Params":
        """Add every tensor of each collection (a Params, a module, any iterable), in place
        (Zygote's ``union!``)."""
        for c in collections:
            self.push(*(c.parameters() if isinstance(c, torch.nn.Module) else c))
        return self

    def remove(self, t: torch.Tensor) -> "Params":
        """Remove ``t``; a KeyError if absent."""
        if id(t) not in self._ids:
            raise KeyError("tensor not in Params")
        self._ids.discard(id(t))
        self._order = [p for p in self._order if p is not t]
        return self

    delete = remove  # Zygote's delete!(ps, x)

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
        return _concatenate([p.detach() for p in self._order])

    def from_vector(self, vector: torch.Tensor) -> "Params":
        """Copy ``vector`` into the parameters in place, in order (Zygote's ``copy!(ps, x)``)."""
        with torch.no_grad():
            for p, piece in zip(self._order, _split(vector, self._order)):
                p.copy_(piece)
        return self


def _concatenate(tensors: list) -> torch.Tensor:
    if not tensors:
        return torch.empty(0)
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(vector: torch.Tensor, like: list) -> list:
    """``vector`` cut into pieces shaped (and typed) like the tensors of ``like``."""
    total = sum(t.numel() for t in like)
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"a vector of {total} elements is needed, got one of shape {tuple(vector.shape)}")
    pieces, offset = [], 0
    for t in like:
        piece = vector[offset:offset + t.numel()].reshape(t.shape)
        pieces.append(piece.to(t.dtype) if piece.dtype != t.dtype else piece)
        offset += t.numel()
    return pieces


class Grads:
    """Gradients of ``Params``, indexed by the parameter tensors: ``gs[W]``.

    A parameter the function did not depend on has gradient None (a zero). As Zygote's:
    ``+ - * /`` between two ``Grads`` (entry by entry) or a ``Grads`` and a number, in place too
    (``gs += other``, or ``gs.merge_(other)`` for Zygote's ``merge!``); ``gs.map(f)`` (Python's
    builtin ``map(f, gs)`` iterates the parameters, as for a dict: use ``gs.map``);
    ``gs.to_vector()`` and ``gs.from_vector(v)`` (Zygote's ``copy!``); ``to_grad()`` hands the
    gradients to any ``torch.optim`` optimizer.
    """

    def __init__(self, params: Params, grads: dict[int, torch.Tensor | None]):
        self.params = params
        self._grads = {id(p): grads.get(id(p)) for p in params}

    @classmethod
    def of(cls, params: Params, values) -> "Grads":
        """The Grads whose entries are ``values``, one per parameter in ``params``' order."""
        grads = cls.__new__(cls)
        grads.params, grads._grads = params, {id(p): g for p, g in zip(params, values)}
        return grads

    def __getitem__(self, p: torch.Tensor):
        if id(p) not in self._grads:
            raise KeyError("tensor is not one of these Grads' Params")
        return self._grads[id(p)]

    def __setitem__(self, p: torch.Tensor, g) -> None:
        if id(p) not in self._grads:
            raise KeyError("tensor is not one of these Grads' Params")
        self._grads[id(p)] = g

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

    def copy(self) -> "Grads":
        """A new Grads holding the same gradient tensors."""
        return Grads(self.params, dict(self._grads))

    def map(self, fn: Callable, *others: "Grads") -> "Grads":
        """A new Grads with ``fn(g, *others' gradients)`` for every gradient that is not None
        (Zygote's ``map(f, gs...)``); the others' None gradients are passed as zeros."""
        out = {}
        for p in self.params:
            g = self._grads[id(p)]
            if g is None:
                out[id(p)] = None
                continue
            rest = [_entry(o, p, g) for o in others]
            out[id(p)] = fn(g, *rest)
        return Grads(self.params, out)

    def _combine(self, other, op, reverse: bool = False) -> "Grads":
        if isinstance(other, Grads):
            out = {}
            for p in self.params:
                a, b = self._grads[id(p)], other._grads.get(id(p))
                if a is None and b is None:
                    out[id(p)] = None
                else:
                    a = torch.zeros_like(b) if a is None else a
                    b = torch.zeros_like(a) if b is None else b
                    out[id(p)] = op(b, a) if reverse else op(a, b)
            return Grads(self.params, out)
        if not isinstance(other, (numbers.Number, torch.Tensor)):
            return NotImplemented
        return self.map(lambda g: op(other, g) if reverse else op(g, other))

    def __add__(self, other):
        return self._combine(other, operator.add)

    def __sub__(self, other):
        return self._combine(other, operator.sub)

    def __mul__(self, other):
        return self._combine(other, operator.mul)

    def __truediv__(self, other):
        return self._combine(other, operator.truediv)

    def __radd__(self, other):
        return self._combine(other, operator.add, reverse=True)

    def __rsub__(self, other):
        return self._combine(other, operator.sub, reverse=True)

    def __rmul__(self, other):
        return self._combine(other, operator.mul, reverse=True)

    def __neg__(self):
        return self.map(operator.neg)

    def __iadd__(self, other):
        self._grads = (self + other)._grads
        return self

    def __isub__(self, other):
        self._grads = (self - other)._grads
        return self

    def __imul__(self, other):
        self._grads = (self * other)._grads
        return self

    def __itruediv__(self, other):
        self._grads = (self / other)._grads
        return self

    def merge_(self, *others) -> "Grads":
        """Accumulate the gradients of ``others`` (Grads, or dicts keyed by parameter) into these,
        in place (Zygote's ``merge!``); parameters they do not hold are left alone."""
        for other in others:
            for p, g in (other.items() if isinstance(other, (Grads, dict)) else other):
                if g is None:
                    continue
                if id(p) not in self._grads:
                    raise KeyError("merge_: a gradient for a tensor that is not one of these Grads' Params")
                mine = self._grads[id(p)]
                self._grads[id(p)] = g if mine is None else mine + g
        return self

    def to_vector(self) -> torch.Tensor:
        """Every gradient flattened into one new vector, in the parameters' order, zeros for a None
        (Zygote's ``copy!(v, gs)``)."""
        return _concatenate([torch.zeros_like(p) if g is None else g for p, g in self.items()])

    def from_vector(self, vector: torch.Tensor) -> "Grads":
        """The gradients set from ``vector``, in the parameters' order (Zygote's ``copy!(gs, v)``);
        in place, as new tensors."""
        for p, piece in zip(self.params, _split(vector, list(self.params))):
            self._grads[id(p)] = piece.clone()
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


def _entry(other, p, like):
    g = other[p] if isinstance(other, Grads) else other
    return torch.zeros_like(like) if g is None else g


class Restructured:
    """A module run with other parameters: what ``destructure``'s rebuild gives for a module.
    Calling it calls the module with the parameters taken from the vector
    (``torch.func.functional_call``), so gradients flow to that vector."""

    def __init__(self, module: torch.nn.Module, parameters: dict):
        self.module, self.parameters = module, parameters

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.module, self.parameters, args, kwargs)

    def __repr__(self) -> str:
        return f"Restructured({type(self.module).__name__}, {len(self.parameters)} parameters)"


def destructure(obj):
    """``(flat, rebuild)``, as Optimisers.jl's ``destructure``: ``flat`` is one new vector of all
    the floating-point tensors of ``obj`` (a module's parameters, or the tensors of any structure),
    and ``rebuild(v)`` gives ``obj`` again with its tensors taken from ``v`` (differentiably: views
    of ``v``). For a module, ``rebuild(v)`` is a callable running it with those parameters."""
    if isinstance(obj, torch.nn.Module):
        named = [(n, p) for n, p in obj.named_parameters() if p.is_floating_point() or p.is_complex()]
        flat = _concatenate([p.detach() for _, p in named])

        def rebuild_module(vector: torch.Tensor) -> Restructured:
            pieces = _split(vector, [p for _, p in named])
            return Restructured(obj, {n: piece for (n, _), piece in zip(named, pieces)})

        return flat, rebuild_module
    leaves, shape = structure(obj)
    positions = [i for i, x in enumerate(leaves)
                 if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())]
    flat = _concatenate([leaves[i].detach() for i in positions])

    def rebuild(vector: torch.Tensor):
        new = list(leaves)
        for i, piece in zip(positions, _split(vector, [leaves[i] for i in positions])):
            new[i] = piece
        return shape.argument(new)

    return flat, rebuild


register_parameter_types(Grads, Params)  # (capture/pytree.py flattens Grads, keeps Params whole)
