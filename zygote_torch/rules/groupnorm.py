"""Rules for group normalisation, instance normalisation and local response normalisation.

Group norm normalises each group of C/G channels of each sample over those channels and all
spatial positions; instance norm each channel of each sample over its spatial positions (with
batch statistics), or with the running statistics when ``use_input_stats=False``. With
statistics computed from x, over the M elements of a normalisation group:

    xhat = (x - mean) * rstd,   dxhat = dy * w,
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
    dw = sum(dy * xhat),  db = sum(dy)  (over everything but the channel).

instance_norm updates its running statistics in the forward, exactly once, as in eager mode (the
forward is F.instance_norm itself; the pullback recomputes what it needs from x).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ._util import NoTangent, is_float_tensor, nondiff

Tensor = torch.Tensor


def _channel(t, x):
    """A per-channel vector shaped to broadcast against x (N, C, *)."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _normalized_grad(x, dxhat, dims, eps):
    """(dx, xhat) for xhat = (x - mean) / sqrt(var + eps), statistics over ``dims`` (keepdim)."""
    centered = x - x.mean(dims, keepdim=True)
    rstd = torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
    xhat = centered * rstd
    dx = rstd * (dxhat - dxhat.mean(dims, keepdim=True) - xhat * (dxhat * xhat).mean(dims, keepdim=True))
    return dx, xhat


def _affine_grads(dy, xhat, weight, bias, x):
    """(dw, db): sums over every dimension but the channel."""
    dims = [0] + list(range(2, x.dim()))
    dw = (dy * xhat).sum(dims) if is_float_tensor(weight) else NoTangent()
    db = dy.sum(dims) if is_float_tensor(bias) else NoTangent()
    return dw, db


def _group_norm(input, num_groups, weight, bias, eps):
    """(y, pullback(dy) -> (dx, dw, db)) of group norm."""
    y = F.group_norm(input, num_groups, weight, bias, eps)

    def pullback(dy):
        n, c = input.shape[0], input.shape[1]
        group = (c // num_groups) * math.prod(input.shape[2:])
        shape = (n, num_groups, group)
        dxhat = dy * _channel(weight, input) if weight is not None else dy
        dx, xhat = _normalized_grad(input.reshape(shape), dxhat.reshape(shape), (2,), eps)
        xhat = xhat.reshape(input.shape)
        return (dx.reshape(input.shape), *_affine_grads(dy, xhat, weight, bias, input))

    return y, pullback


@rrule(F.group_norm)
def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """y = xhat * w + b, xhat normalised over each group of C/G channels (and all positions) of a
    sample;  dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) per group, dxhat = dy w,
    dw = sum(dy xhat), db = sum(dy)."""
    y, back = _group_norm(input, num_groups, weight, bias, eps)

    def pullback(dy):
        dx, dw, db = back(dy)
        return NoTangent(), dx, NoTangent(), dw, db, NoTangent()

    return y, pullback


@rrule(torch.group_norm)
def group_norm_(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """torch.group_norm (the ATen spelling): the same as F.group_norm."""
    y, back = _group_norm(input, num_groups, weight, bias, eps)

    def pullback(dy):
        dx, dw, db = back(dy)
        return NoTangent(), dx, NoTangent(), dw, db, NoTangent(), NoTangent()

    return y, pullback


def _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, forward):
    """(y, pullback(dy) -> (dx, dw, db)) of instance norm; ``forward`` computes y (and updates the
    running statistics)."""
    y = forward()
    use_batch = use_input_stats or running_mean is None or running_var is None

    def pullback(dy):
        dxhat = dy * _channel(weight, input) if weight is not None else dy
        if use_batch:
            dims = tuple(range(2, input.dim()))
            dx, xhat = _normalized_grad(input, dxhat, dims, eps)
        else:
            mean = _channel(running_mean, input).to(input.dtype)
            rstd = torch.rsqrt(_channel(running_var, input).to(input.dtype) + eps)
            xhat = (input - mean) * rstd
            dx = dxhat * rstd
        return (dx, *_affine_grads(dy, xhat, weight, bias, input))

    return y, pullback


@rrule(F.instance_norm)
def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    """y = xhat * w + b, each channel of each sample normalised over its positions (or with the
    running statistics when use_input_stats=False, then dx = dy w rstd);
    dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dw = sum(dy xhat), db = sum(dy).
    The running statistics are updated once, in the forward."""
    y, back = _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                             lambda: F.instance_norm(input, running_mean, running_var, weight, bias,
                                                     use_input_stats, momentum, eps))

    def pullback(dy):
        dx, dw, db = back(dy)
        return NoTangent(), dx, NoTangent(), NoTangent(), dw, db, *nondiff(3)

    return y, pullback


@rrule(torch.instance_norm)
def instance_norm_(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
    """torch.instance_norm (the ATen spelling): the same as F.instance_norm."""
    y, back = _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                             lambda: torch.instance_norm(input, weight, bias, running_mean, running_var,
                                                         use_input_stats, momentum, eps, cudnn_enabled))

    def pullback(dy):
        dx, dw, db = back(dy)
        return NoTangent(), dx, dw, db, *nondiff(6)

    return y, pullback


def _channel_window_sum(t, before, after, size):
    """s_c = sum of t over channels c - before .. c + after (zero outside), along dim 1."""
    c = t.shape[1]
    pad_before = list(t.shape)
    pad_before[1] = before
    pad_after = list(t.shape)
    pad_after[1] = after
    padded = torch.cat([t.new_zeros(pad_before), t, t.new_zeros(pad_after)], 1)
    total = padded.narrow(1, 0, c)
    for i in range(1, size):
        total = total + padded.narrow(1, i, c)
    return total


@rrule(F.local_response_norm)
def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """y = x / D^beta, D = k + alpha/size * (sum of x^2 over the size channels around c);
    dx = dy D^-beta - 2 alpha beta / size * x * (sum over the channels whose window holds c of
    dy x D^(-beta-1))."""
    y = F.local_response_norm(input, size, alpha, beta, k)

    def pullback(dy):
        if input.numel() == 0:
            return NoTangent(), dy, *nondiff(4)
        D = k + alpha / size * _channel_window_sum(input * input, size // 2, (size - 1) // 2, size)
        inner = dy * input * D.pow(-beta - 1)
        back = _channel_window_sum(inner, (size - 1) // 2, size // 2, size)
        dx = dy * D.pow(-beta) - (2 * alpha * beta / size) * input * back
        return NoTangent(), dx, *nondiff(4)

    return y, pullback
