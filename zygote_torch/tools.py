"""Rule-side tools: stopping, hooking and checkpointing gradients.

Each is a function with its own rule (or declared non-differentiable), so it behaves the same in the
dynamic and the staged path.
"""
from __future__ import annotations

import torch

from .ad.registry import non_differentiable, rrule
from .ad.tangents import NoTangent
from .capture.leaves import announces
from .capture.pytree import flatten


@announces
def ignore_derivatives(x):
    """``x`` with no derivative flowing through it (Zygote's ``ignore_derivatives``/``dropgrad``):
    the value is used, its cotangent is dropped. Works on tensors and structures of them."""
    leaves, rebuild = flatten(x, modules_as_dicts=False)
    return rebuild([leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])


dropgrad = ignore_derivatives
non_differentiable(ignore_derivatives)


@announces
def hook(fn, x):
    """``x`` unchanged in the forward; in the backward its cotangent ``dx`` becomes ``fn(dx)``
    (Zygote's ``hook``), e.g. ``zt.hook(lambda g: g.clamp(-1, 1), h)`` clips a gradient."""
    return x.view_as(x)


@rrule(hook)
def _hook(fn, x):
    """y = x;  dx = fn(dy)."""
    return x.view_as(x), lambda dy: (NoTangent(), NoTangent(), fn(dy))


@announces
def checkpointed(f, *xs):
    """``f(*xs)``, whose intermediates are not kept: the backward recomputes them (Zygote's
    ``checkpointed``), trading compute for memory."""
    return f(*xs)


@rrule(checkpointed)
def _checkpointed(f, *xs):
    """y = f(xs);  dxs = pullback of f, recomputed from xs in the backward."""
    from .api import pullback  # the API differentiates f afresh when the cotangent arrives

    y = f(*xs)

    def back(dy):
        _, f_back = pullback(f, *xs)
        return (NoTangent(), NoTangent()) + tuple(NoTangent() if g is None else g for g in f_back(dy))

    return y, back
