"""Rules for batch normalisation and weight normalisation.

``F.batch_norm`` updates its running statistics in the forward, exactly once, as in eager mode: the
pullback is torch's backward kernel, reading the batch statistics the forward kernel saved, and never
calls batch_norm again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ._util import NoTangent, is_float_tensor, materialize, nondiff, reference_pullback, unbroadcast


def _channel_shape(x):
    return (1, -1) + (1,) * (x.dim() - 2)


aten = torch.ops.aten
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@rrule(F.batch_norm)
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5):
    """y = xhat * w + b over the channel dim 1, xhat = (x - mu) * rstd, rstd = 1 / sqrt(var + eps),
    with batch statistics (training, or no running statistics: N = numel / C) or the running ones.

    Batch statistics:   dxhat = dy*w;  dx = rstd/N * (N*dxhat - sum(dxhat) - xhat*sum(dxhat*xhat));
    running statistics: dx = dy * w * rstd;   and in both dw = sum(dy*xhat), db = sum(dy).

    Computed by torch's kernels (``native_batch_norm`` and its backward, which reads the batch
    statistics the forward saved); empty batches and other dtypes take the formula."""
    use_batch_stats = training or running_mean is None or running_var is None
    if input.numel() == 0 or input.dim() < 2 or input.dtype not in _KERNEL_DTYPES:
        return _batch_norm_by_formula(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if training:
        F._verify_batch_size(input.size())
    y, save_mean, save_invstd = aten.native_batch_norm(input, weight, bias, running_mean, running_var,
                                                       use_batch_stats, momentum, eps)

    def pullback(dy):
        mask = [True, is_float_tensor(weight), is_float_tensor(bias)]
        dx, dw, db = aten.native_batch_norm_backward(dy, input, weight, running_mean, running_var, save_mean,
                                                     save_invstd, use_batch_stats, eps, mask)
        return ((NoTangent(), dx, NoTangent(), NoTangent(), dw if mask[1] else NoTangent(),
                 db if mask[2] else NoTangent()) + (NoTangent(),) * 3)

    return y, pullback


def _batch_norm_backward_reference(dy, input, weight, running_mean, running_var, use_batch_stats, eps):
    """(dx, dw, db) of batch norm in differentiable ops, the batch statistics recomputed from x."""
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
        dx = rstd / n * (n * dxhat - dxhat.sum(dims, keepdim=True) - xhat * (dxhat * xhat).sum(dims, keepdim=True))
    else:
        dx = dxhat * rstd
    return dx, (dy * xhat).sum(dims), dy.sum(dims)


def _batch_norm_by_formula(input, running_mean, running_var, weight, bias, training, momentum, eps):
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    use_batch_stats = training or running_mean is None or running_var is None

    def pullback(dy):
        if input.numel() == 0:  # an empty batch: nothing flows (torch's kernel returns zeros too)
            zeros = lambda t: torch.zeros_like(t) if is_float_tensor(t) else NoTangent()  # noqa: E731
            return (NoTangent(), torch.zeros_like(input), NoTangent(), NoTangent(), zeros(weight), zeros(bias)) \
                + (NoTangent(),) * 3
        dx, dw, db = _batch_norm_backward_reference(dy, input, weight, running_mean, running_var, use_batch_stats,
                                                    eps)
        return (NoTangent(), dx, NoTangent(), NoTangent(), dw if is_float_tensor(weight) else NoTangent(),
                db if is_float_tensor(bias) else NoTangent()) + (NoTangent(),) * 3

    return y, pullback


@rrule(aten.native_batch_norm_backward, aten.native_batch_norm_backward.default)
def native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train,
                               eps, output_mask):
    """The batch-norm pullback as an op: (dx, dw, db) as in ``batch_norm``; differentiated through
    the reference formula, which recomputes the batch statistics from x (their dependence on x
    matters for second derivatives)."""
    out = aten.native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean,
                                          save_invstd, train, eps, output_mask)
    back = reference_pullback(
        lambda g, x, w: _batch_norm_backward_reference(g, x, w, running_mean, running_var, train, eps),
        (grad_out, input, weight))

    def pullback(dout):
        douts = tuple(materialize(d, like=o) if isinstance(o, torch.Tensor) else None for d, o in zip(dout, out))
        dg, dx, dw = back(douts)
        return (NoTangent(), dg, dx, dw) + nondiff(7)

    return out, pullback


# -- weight normalisation ------------------------------------------------------------------------

def _norm_except_dim(v, dim):
    """||v||_2 over every dimension but ``dim`` (keepdim), over all of ``v`` for ``dim=-1``."""
    if dim == -1:
        return torch.linalg.vector_norm(v)
    return torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != dim % v.dim()], keepdim=True)


def _sum_except_dim(x, dim):
    if dim == -1:
        return x.sum()
    return x.sum([d for d in range(x.dim()) if d != dim % x.dim()], keepdim=True)


@rrule(torch._weight_norm)
def weight_norm(v, g, dim=0):
    """w = g * u with u = v / ||v|| (the norm over every dim but ``dim``: ``nn.utils.weight_norm``
    and ``parametrizations.weight_norm``);  dg = sum(dy * u) to g's shape,
    dv = (g / ||v||) * (dy - u * sum(dy * u)), both sums over every dim but ``dim``."""
    norm = _norm_except_dim(v, dim)
    u = v / norm
    w = u * g

    def pullback(dy):
        projection = _sum_except_dim(dy * u, dim)
        dv = (g / norm) * (dy - u * projection) if is_float_tensor(v) else NoTangent()
        dg = unbroadcast(projection, g.shape) if is_float_tensor(g) else NoTangent()
        return NoTangent(), dv, dg, NoTangent()

    return w, pullback
