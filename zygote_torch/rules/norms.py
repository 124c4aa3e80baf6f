"""Rules for normalisation: batch norm (F.batch_norm and torch's native kernels), layer norm
(F.layer_norm, torch.layer_norm and the native kernels), RMS norm, group norm, instance norm, local
response norm, F.normalize and renorm, and weight normalisation (torch._weight_norm).

Most of them normalise x with statistics computed from x itself, then scale and shift. Over the
elements of one normalisation group (a channel over the batch for batch norm, the trailing dims for
layer norm, a group of channels of a sample for group norm, ...):

    xhat = (x - mean) * rstd,   rstd = 1 / sqrt(var + eps)  (biased variance),   g = dy * w,
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
    dw = sum(dy * xhat),  db = sum(dy)  (over everything but the channel, or the leading dims).

With running statistics (batch norm and instance norm in eval mode) mean and rstd are constants
and dx = g * rstd. ``F.batch_norm`` and ``F.instance_norm`` update their running statistics in the
forward, exactly once, as in eager mode: the pullbacks never call them again (batch norm's is
torch's backward kernel, reading the batch statistics the forward kernel saved). The rules of the
backward kernels themselves (``native_batch_norm_backward``, ``native_layer_norm_backward``)
differentiate a reference formula that recomputes the statistics from x, so second derivatives
stay exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ..errors import ZygoteError
from .. import ops
from ._util import (NoTangent, _via_rules, grad_like, is_float_tensor, is_zero, materialize, nondiff,
                    normalize_dims, reference_pullback, unbroadcast)
from ..ops import use_kernels
from ..ops.norms import layer_norm_backward_formula, layer_norm_cotangents, normalized_dims as _norm_dims

aten = torch.ops.aten
Tensor = torch.Tensor


# -- shared helpers ---------------------------------------------------------------------------------

def _channel_shape(x):
    """The shape of a per-channel vector that broadcasts against x (N, C, *)."""
    return (1, -1) + (1,) * (x.dim() - 2)


def _channel(t, x):
    """A per-channel vector shaped to broadcast against x (N, C, *)."""
    return t.reshape(_channel_shape(x))


def _except_channel(x) -> list:
    """The dimensions of x (N, C, *) other than the channel: the batch and the positions."""
    return [0] + list(range(2, x.dim()))


def _dims_except(x, dim) -> list:
    """The dimensions of x other than ``dim``."""
    return [d for d in range(x.dim()) if d != dim % x.dim()]


def _affine_norm_pullback(back, n_args, x=0, weight=2, bias=3):
    """The pullback of a norm rule with ``n_args`` positional parameters whose ``back(dy)`` gives
    (dx, dw, db): those at the positions of x, weight and bias, NoTangent elsewhere."""
    def pullback(dy):
        cotangents = [NoTangent()] * (1 + n_args)
        cotangents[1 + x], cotangents[1 + weight], cotangents[1 + bias] = back(dy)
        return tuple(cotangents)

    return pullback


def _normalized_grad(x, dxhat, dims, eps):
    """(dx, xhat) for xhat = (x - mean) / sqrt(var + eps), statistics over ``dims`` (keepdim)."""
    centered = x - x.mean(dims, keepdim=True)
    rstd = torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
    xhat = centered * rstd
    dx = rstd * (dxhat - dxhat.mean(dims, keepdim=True) - xhat * (dxhat * xhat).mean(dims, keepdim=True))
    return dx, xhat


def _affine_grads(dy, xhat, weight, bias, x):
    """(dw, db): sums over every dimension but the channel."""
    dims = _except_channel(x)
    dw = (dy * xhat).sum(dims) if is_float_tensor(weight) else NoTangent()
    db = dy.sum(dims) if is_float_tensor(bias) else NoTangent()
    return dw, db


# -- batch norm ------------------------------------------------------------------------------------

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
    dims = _except_channel(input)
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


def _batch_norm_rule(y, input, weight, bias, running_mean, running_var, training, eps):
    """The pullback of a batch norm kernel whose first output is y (the saved statistics it also
    returns are not differentiable outputs, as in torch): the formula of ``batch_norm``, batch
    statistics in training (or without running ones), the running statistics otherwise."""
    use_batch_stats = training or running_mean is None or running_var is None

    def pullback(dy):
        dx, dw, db = _batch_norm_backward_reference(materialize(dy[0], like=y), input, weight, running_mean,
                                                    running_var, use_batch_stats, eps)
        return dx, dw if is_float_tensor(weight) else NoTangent(), db if is_float_tensor(bias) else NoTangent()

    return pullback


@rrule(torch.native_batch_norm, torch.ops.aten.native_batch_norm, torch.ops.aten.native_batch_norm.default)
def native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    """(y, save_mean, save_invstd) = torch's batch norm kernel (updating the running statistics
    once, in the forward);  see _batch_norm_rule."""
    out = torch.native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)
    back = _batch_norm_rule(out[0], input, weight, bias, running_mean, running_var, training, eps)
    return out, lambda dy: (NoTangent(), *back(dy)) + nondiff(5)


@rrule(torch._native_batch_norm_legit, torch.ops.aten._native_batch_norm_legit)
def native_batch_norm_legit(input, weight, bias, *rest):
    """torch._native_batch_norm_legit(x, w, b, [running_mean, running_var,] training, momentum, eps):
    (y, save_mean, save_invstd);  see _batch_norm_rule."""
    out = torch._native_batch_norm_legit(input, weight, bias, *rest)
    rm, rv = (rest[0], rest[1]) if len(rest) == 5 else (None, None)
    back = _batch_norm_rule(out[0], input, weight, bias, rm, rv, rest[-3], rest[-1])
    return out, lambda dy: (NoTangent(), *back(dy)) + nondiff(len(rest))


@rrule(torch.ops.aten._batch_norm_with_update, torch.ops.aten._batch_norm_with_update.default)
def batch_norm_with_update(input, weight, bias, running_mean, running_var, momentum, eps):
    """(y, save_mean, save_invstd, reserve) = the training-mode batch norm kernel;  see _batch_norm_rule."""
    out = torch.ops.aten._batch_norm_with_update(input, weight, bias, running_mean, running_var, momentum, eps)
    back = _batch_norm_rule(out[0], input, weight, bias, running_mean, running_var, True, eps)
    return out, lambda dy: (NoTangent(), *back(dy)) + nondiff(4)


# -- layer norm ------------------------------------------------------------------------------------

def _layer_norm_rule(input, normalized_shape, weight, bias, eps):
    """y = xhat * w + b,  xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps) over the trailing
    ``normalized_shape`` dims (biased variance);
    db = sum(dy) and dw = sum(dy * xhat) over the leading dims;
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w.

    The pullback recomputes mean and rstd from x with ordinary ops (two passes) rather than taking
    native_layer_norm's: those outputs have no derivative in torch, so nested AD through this
    pullback (Hessians) would miss their dependence on x. Half precision works in float32."""
    dims = _norm_dims(input, normalized_shape)
    if not dims or not input.numel():
        y = torch.layer_norm(input, normalized_shape, weight, bias, eps)
        return y, lambda dy: (torch.zeros_like(input), grad_like(dy * 0, weight) if weight is not None
                              else NoTangent(), grad_like(dy, bias) if bias is not None else NoTangent())
    y, mean, rstd = aten.native_layer_norm(input, normalized_shape, weight, bias, eps)

    def pullback(dy):
        if use_kernels(input, "layer_norm"):
            dx, dw, db = ops.layer_norm_backward(dy, input, mean, rstd, weight, normalized_shape)
        else:
            mask = [True, weight is not None, bias is not None]
            dx, dw, db = aten.native_layer_norm_backward(dy, input, normalized_shape, mean, rstd, weight, bias, mask)
        return dx, dw if weight is not None else NoTangent(), db if bias is not None else NoTangent()

    return y, pullback


@rrule(aten.native_layer_norm, aten.native_layer_norm.default)
def native_layer_norm(input, normalized_shape, weight, bias, eps):
    """(y, mean, rstd) = torch's layer-norm kernel;  (dx, dw, db) = native_layer_norm_backward(dy).
    mean and rstd are statistics for the backward kernel: cotangents reaching them are refused."""
    out = aten.native_layer_norm(input, normalized_shape, weight, bias, eps)
    _, mean, rstd = out

    def pullback(dout):
        if not (is_zero(dout[1]) and is_zero(dout[2])):
            raise NotImplementedError("aten.native_layer_norm: differentiating through its mean and rstd "
                                      "outputs is not supported; use F.layer_norm")
        mask = [True, weight is not None, bias is not None]
        dx, dw, db = aten.native_layer_norm_backward(materialize(dout[0], like=out[0]), input, normalized_shape,
                                                     mean, rstd, weight, bias, mask)
        return (NoTangent(), dx, NoTangent(), dw if weight is not None else NoTangent(),
                db if bias is not None else NoTangent(), NoTangent())

    return out, pullback


@rrule(aten.native_layer_norm_backward, aten.native_layer_norm_backward.default)
def native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    """The layer-norm pullback as an op: (dx, dw, db) as in ``_layer_norm_rule``; differentiated
    through the reference formula, which recomputes mean and rstd from x (their dependence on x
    matters for second derivatives)."""
    out = aten.native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask)
    back = reference_pullback(
        lambda g, x, w: layer_norm_backward_formula(g, x, w, normalized_shape, rstd), (grad_out, input, weight))

    def pullback(dout):
        douts = tuple(materialize(d, like=o) if isinstance(o, torch.Tensor) else None for d, o in zip(dout, out))
        dg, dx, dw = back(douts)
        return (NoTangent(), dg, dx, NoTangent(), NoTangent(), NoTangent(), dw) + nondiff(2)

    return out, pullback


@rrule(F.layer_norm)
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm: normalise over the trailing ``normalized_shape`` dims, then scale and shift;
    see ``_layer_norm_rule`` for the math."""
    y, back = _layer_norm_rule(input, normalized_shape, weight, bias, eps)
    return y, _affine_norm_pullback(back, 5)


@rrule(torch.layer_norm)
def torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    """torch.layer_norm (F.layer_norm plus an unused ``cudnn_enable`` flag)."""
    y, back = _layer_norm_rule(input, normalized_shape, weight, bias, eps)
    return y, _affine_norm_pullback(back, 6)


def _native_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """(y, mean, rstd) = torch's layer norm kernel (mean and rstd are not differentiable outputs,
    as in torch);  (dx, dw, db) from the saved statistics, as in ``_layer_norm_rule``
    (``ops.norms.layer_norm_cotangents``)."""
    out = torch.native_layer_norm(input, normalized_shape, weight, bias, eps)
    dims = _norm_dims(input, normalized_shape)

    def pullback(dy):
        _, mean, rstd = out
        dx, dw, db = layer_norm_cotangents(materialize(dy[0], like=out[0]), (input - mean) * rstd, rstd, weight, dims)
        if not (dims and input.numel()):
            dx = torch.zeros_like(input)
        return (NoTangent(), dx, NoTangent(), dw if is_float_tensor(weight) else NoTangent(),
                db if is_float_tensor(bias) else NoTangent(), NoTangent())

    return out, pullback


rrule(torch.native_layer_norm)(_native_layer_norm)


# -- RMS norm --------------------------------------------------------------------------------------

@rrule(F.rms_norm, torch.rms_norm)
def rms_norm(input, normalized_shape, weight=None, eps=None):
    """y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps) over the trailing ``normalized_shape``
    dims (eps defaults to the dtype's machine epsilon);  dw = sum(dy * x * rstd) over the leading
    dims;  dx = rstd * (g - xhat * mean(g * xhat)),  xhat = x * rstd,  g = dy * w."""
    y = torch.rms_norm(input, normalized_shape, weight, eps)
    dims = _norm_dims(input, normalized_shape)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    low = input.dtype in (torch.float16, torch.bfloat16)
    xc = input.float() if low else input

    def pullback(dy):
        if dims and input.numel() and use_kernels(input, "rms_norm"):
            dx, dw = ops.rms_norm_backward(dy, input, normalized_shape, weight, eps)
            return NoTangent(), dx, NoTangent(), dw if weight is not None else NoTangent(), NoTangent()
        dyc = dy.float() if low else dy
        if dims and input.numel():
            rstd = torch.rsqrt((xc * xc).mean(dims, keepdim=True) + eps)
            xhat = xc * rstd
            g = dyc * weight if weight is not None else dyc
            dx = rstd * (g - xhat * (g * xhat).mean(dims, keepdim=True))
        else:
            xhat = torch.zeros_like(xc)
            dx = torch.zeros_like(xc)
        dw = grad_like(dyc * xhat, weight) if weight is not None else NoTangent()
        return NoTangent(), grad_like(dx, input), NoTangent(), dw, NoTangent()

    return y, pullback


# -- group norm, instance norm, local response norm ------------------------------------------------

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
    return y, _affine_norm_pullback(back, 5)


@rrule(torch.group_norm)
def group_norm_(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """torch.group_norm (the ATen spelling): the same as F.group_norm."""
    y, back = _group_norm(input, num_groups, weight, bias, eps)
    return y, _affine_norm_pullback(back, 6)


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
    return y, _affine_norm_pullback(back, 8, weight=3, bias=4)


@rrule(torch.instance_norm)
def instance_norm_(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
    """torch.instance_norm (the ATen spelling): the same as F.instance_norm."""
    y, back = _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                             lambda: torch.instance_norm(input, weight, bias, running_mean, running_var,
                                                         use_input_stats, momentum, eps, cudnn_enabled))
    return y, _affine_norm_pullback(back, 9, weight=1, bias=2)


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


# -- F.normalize, renorm ---------------------------------------------------------------------------

def _vector_norm_backward(x, norm, grad, p, dims):
    """The cotangent of x for n = ||x||_p over ``dims`` (keepdim), as torch defines it at zeros
    and ties: p=2: grad * x / n (0 where n == 0);  p=1: grad * sign(x);  p=inf: grad * sign(x)
    shared evenly among the entries with |x| == n."""
    if p == 2:
        return grad * torch.where(norm == 0, torch.zeros_like(x), x / norm)
    if p == 1:
        return grad * torch.sign(x)
    if p == 0:
        return torch.zeros_like(x)
    if math.isinf(p):
        a = x.abs()
        mask = (a == norm) | torch.isnan(a)
        maskf = mask.to(x.dtype)
        return torch.sign(x) * (grad / maskf.sum(dims, keepdim=True)) * maskf
    if p < 1:
        scaled = torch.where(x == 0, torch.zeros_like(x), torch.sign(x) * x.abs().pow(p - 1))
        return scaled * grad * norm.pow(1 - p)
    scale = torch.where(norm == 0, torch.zeros_like(norm), grad / norm.pow(p - 1))
    if p < 2:
        return torch.sign(x) * x.abs().pow(p - 1) * scale
    return x * x.abs().pow(p - 2) * scale


@rrule(F.normalize)
def normalize(input, p=2.0, dim=1, eps=1e-12, out=None):
    """y = x / max(||x||_p, eps) along ``dim``;  with d = max(n, eps):
    dx = dy / d + norm_backward(-sum(dy * x, dim) / d^2 * [n >= eps])."""
    if out is not None:
        raise ZygoteError("F.normalize(..., out=...) writes in place, which cannot be differentiated; "
                          "use the returned value instead")
    n = torch.linalg.vector_norm(input, p, dim, keepdim=True)
    d = n.clamp_min(eps)
    y = input / d
    dims = normalize_dims(dim, input.dim())

    def pullback(dy):
        dd = -(dy * input).sum(dims, keepdim=True) / (d * d)
        dn = torch.where(n >= eps, dd, torch.zeros_like(dd))
        dx = dy / d + _vector_norm_backward(input, n, dn, p, dims)
        return NoTangent(), dx, NoTangent(), NoTangent(), NoTangent(), NoTangent()

    return y, pullback


@rrule(torch.renorm, Tensor.renorm)
def renorm(input, p, dim, maxnorm, *, out=None):
    """y = each slice along dim scaled to p-norm maxnorm where its norm exceeds it:
    y = x * where(n > maxnorm, maxnorm / (n + 1e-7), 1);  dx through the norm's rule too."""
    d = dim % input.dim()
    dims = [i for i in range(input.dim()) if i != d]

    def decomposition(x):
        n = torch.linalg.vector_norm(x, p, dims, keepdim=True)
        return x * torch.where(n > maxnorm, maxnorm / (n + 1e-7), torch.ones_like(n))

    y, back = _via_rules(decomposition, input, value=lambda: torch.renorm(input, p, dim, maxnorm))
    return y, lambda dy: back(dy) + nondiff(3)


# -- weight normalisation --------------------------------------------------------------------------

def _norm_except_dim(v, dim):
    """||v||_2 over every dimension but ``dim`` (keepdim), over all of ``v`` for ``dim=-1``."""
    if dim == -1:
        return torch.linalg.vector_norm(v)
    return torch.linalg.vector_norm(v, dim=_dims_except(v, dim), keepdim=True)


def _sum_except_dim(x, dim):
    """The sum of x over every dimension but ``dim`` (keepdim), over all of x for ``dim=-1``."""
    if dim == -1:
        return x.sum()
    return x.sum(_dims_except(x, dim), keepdim=True)


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
