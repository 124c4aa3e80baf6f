"""Rules for batch normalisation.

``F.batch_norm`` updates its running statistics in the forward, exactly once, as in eager mode: the
pullback recomputes what it needs from ``x`` and never calls batch_norm again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ._util import NoTangent, is_float_tensor


def _channel_shape(x):
    return (1, -1) + (1,) * (x.dim() - 2)


@rrule(F.batch_norm)
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5):
    """y = xhat * w + b over the channel dim 1, xhat = (x - mu) / sqrt(var + eps), with batch
    statistics (training, or no running statistics: N = numel / C) or the running ones.

    Batch statistics:   dxhat = dy*w;  dx = rstd/N * (N*dxhat - sum(dxhat) - xhat*sum(dxhat*xhat));
    running statistics: dx = dy * w * rstd;   and in both dw = sum(dy*xhat), db = sum(dy)."""
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    use_batch_stats = training or running_mean is None or running_var is None

    def pullback(dy):
        if input.numel() == 0:  # an empty batch: nothing flows (torch's kernel returns zeros too)
            zeros = lambda t: torch.zeros_like(t) if is_float_tensor(t) else NoTangent()  # noqa: E731
            return (NoTangent(), torch.zeros_like(input), NoTangent(), NoTangent(), zeros(weight), zeros(bias)) \
                + (NoTangent(),) * 3
        dims = [0] + list(range(2, input.dim()))
        shape = _channel_shape(input)
        if use_batch_stats:
            mean = input.mean(dims, keepdim=True)
            rstd = torch.rsqrt(input.var(dims, unbiased=False, keepdim=True) + eps)
        else:
            mean = running_mean.reshape(shape).to(input.dtype)
            rstd = torch.rsqrt(running_var.reshape(shape).to(input.dtype) + eps)
        xhat = (input - mean) * rstd
        dxhat = dy * weight.reshape(shape) if weight is not None else dy
        if use_batch_stats:
            n = input.numel() // input.shape[1]
            dx = rstd / n * (n * dxhat - dxhat.sum(dims, keepdim=True)
                             - xhat * (dxhat * xhat).sum(dims, keepdim=True))
        else:
            dx = dxhat * rstd
        dw = (dy * xhat).sum(dims) if is_float_tensor(weight) else NoTangent()
        db = dy.sum(dims) if is_float_tensor(bias) else NoTangent()
        return (NoTangent(), dx, NoTangent(), NoTangent(), dw, db) + (NoTangent(),) * 3

    return y, pullback
