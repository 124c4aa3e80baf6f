"""Rules for random ops: the feature dropouts (dropout1d, dropout2d, dropout3d), the alpha dropouts
(alpha_dropout, feature_alpha_dropout) and the samplers normal and bernoulli. (F.dropout and
torch.dropout are in :mod:`.nn`, rrelu in :mod:`.activations`.)

A dropout rule makes torch's own draw, once, in the forward: the mask depends only on the shape,
so ``fn(ones_like(x))`` draws exactly the mask torch would draw for x, and the pullback multiplies
by it. The samples of normal and bernoulli are not reparameterised: their derivatives are zero,
as torch defines them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ._util import NoTangent, nondiff

Tensor = torch.Tensor


# -- dropout variants ------------------------------------------------------------------------------

def _feature_dropout(fn):
    def rule(input, p=0.5, training=True, inplace=False):
        """y = x * m, m = fn(ones) (the same random draw torch makes for x: it depends only on the
        shape);  dx = dy * m."""
        m = fn(torch.ones_like(input), p, training)
        return input * m, lambda dy: (NoTangent(), dy * m, NoTangent(), NoTangent(), NoTangent())
    return rule


rrule(F.dropout1d)(_feature_dropout(F.dropout1d))
rrule(F.dropout2d)(_feature_dropout(F.dropout2d))
rrule(F.dropout3d)(_feature_dropout(F.dropout3d))

_SELU_ALPHA_PRIME = 1.7580993408473766


def _alpha_dropout(fn):
    def rule(input, p=0.5, training=False, inplace=False):
        """y = a * keep * x + b(keep), keep in {0, 1} (alpha dropout keeps SELU's statistics);
        dx = a * keep * dy.  m = fn(ones) draws keep exactly as for x (it depends only on the shape),
        and is a*keep + (keep - 1)*alpha*a + alpha*a*p, so keep = (m + alpha*a*(1 - p)) / (a*(1 + alpha))."""
        if not training or p == 0:
            return input.view_as(input), lambda dy: (NoTangent(), dy) + nondiff(3)
        if p == 1:
            return input * 0.0, lambda dy: (NoTangent(), torch.zeros_like(dy)) + nondiff(3)
        m = fn(torch.ones_like(input), p, training)
        alpha = _SELU_ALPHA_PRIME
        a = 1.0 / math.sqrt((alpha * alpha * p + 1) * (1 - p))
        keep = torch.round((m + alpha * a * (1 - p)) / (a * (1 + alpha)))
        slope = keep * a
        return m + (input - 1) * slope, lambda dy: (NoTangent(), dy * slope) + nondiff(3)
    return rule


rrule(F.alpha_dropout)(_alpha_dropout(F.alpha_dropout))
rrule(F.feature_alpha_dropout)(_alpha_dropout(F.feature_alpha_dropout))


# -- random sampling -------------------------------------------------------------------------------

@rrule(torch.normal)
def normal(mean, std=1.0, size=None, *, generator=None, out=None, dtype=None, layout=None, device=None,
           pin_memory=False):
    """y ~ N(mean, std): a sample, not reparameterized;  dmean = dstd = 0, as torch defines them."""
    args = (mean, std) if size is None else (mean, std, size)
    kwargs = {k: v for k, v in dict(generator=generator, dtype=dtype, layout=layout, device=device).items()
              if v is not None}
    y = torch.normal(*args, **kwargs)
    return y, lambda dy: nondiff(4)


@rrule(torch.bernoulli, Tensor.bernoulli)
def bernoulli(input, p=None, *, generator=None, out=None):
    """y ~ Bernoulli(x) (or p): a sample;  dx = 0, as torch defines it."""
    y = torch.bernoulli(input, generator=generator) if p is None else torch.bernoulli(input, p, generator=generator)
    return y, lambda dy: nondiff(3)
