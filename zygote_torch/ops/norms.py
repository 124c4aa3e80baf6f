"""Layer norm and RMS norm backward: the compiled ops ``layer_norm_bwd`` / ``rms_norm_bwd``, their
fake kernels, the wrappers and the pure-torch formulas (written once: the wrappers' fallback, the
reference the kernels are tested against, and the differentiable formula the rules differentiate
for second derivatives). Batch norm has no kernel of ours: its rules are in ``rules/``.

Over the trailing normalised dims, with g = dy * w:

    layer norm:  y = xhat * w + b,  xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps);
                 dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
                 dw = sum over rows of dy * xhat,  db = sum over rows of dy
    RMS norm:    y = xhat * w,  xhat = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps);
                 dx = rstd * (g - xhat * mean(g * xhat)),  dw = sum over rows of dy * xhat
"""
from __future__ import annotations

import math

import torch

from ..capture.leaves import announces
from . import kernel_choice
from ._common import acc_dtype, compiled, fake, kernel_ok, to_acc

# float32, 1 thread: layer norm backward 16.1 vs 7.9 us (ours vs torch's) at 128x128, 32.1 vs 36.3 us
# at 512x256; rms_norm's kernel is faster at every size
kernel_choice.measured("layer_norm", kernel_choice.FAST, min_numel=131072)
kernel_choice.measured("rms_norm", kernel_choice.FAST)


@fake("layer_norm_bwd")
def _(dy, x, mean, rstd, weight):
    n = x.shape[1]
    return x.new_empty(x.shape), x.new_empty((n,), dtype=acc_dtype(x.dtype)), x.new_empty((n,), dtype=acc_dtype(x.dtype))


fake("rms_norm_bwd")(lambda dy, x, rstd, weight, eps:
                     (x.new_empty(x.shape), x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))))


# ---------------------------------------------------------------------------------------------
# the formulas

def normalized_dims(x, normalized_shape) -> tuple:
    """The trailing dims of x that ``normalized_shape`` covers."""
    k = len(tuple(normalized_shape))
    return tuple(range(x.dim() - k, x.dim()))


def _sum_over_rows(t, dims):
    """The sum of t over the dims not in ``dims`` (t itself where there are none: .sum(()) would sum all)."""
    lead = tuple(range(t.dim() - len(dims)))
    return t.sum(lead) if lead else t


def layer_norm_cotangents(dy, xhat, rstd, weight, dims):
    """(dx, dw, db) of y = xhat * w + b normalised over ``dims``, with g = dy * w:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw = sum over rows of dy * xhat (0 * db
    without a weight),  db = sum over rows of dy."""
    g = dy * weight if weight is not None else dy
    dx = rstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
    db = _sum_over_rows(dy, dims)
    return dx, (_sum_over_rows(dy * xhat, dims) if weight is not None else db * 0), db


def layer_norm_backward_reference(dy, x, mean, rstd, weight, m, n):
    """(dx, dw, db) on [m, n] views from the saved ``mean`` and ``rstd``: dx [m, n] in x's dtype,
    dw [n], db [n] in the accumulation dtype."""
    xa, ga = to_acc(x).reshape(m, n), to_acc(dy).reshape(m, n)
    mu, rs = mean.reshape(m, 1).to(xa.dtype), rstd.reshape(m, 1).to(xa.dtype)
    xhat = (xa - mu) * rs
    w = weight.reshape(n).to(xa.dtype) if weight is not None else None
    dx, dw, db = layer_norm_cotangents(ga, xhat, rs, w, (1,))
    return (dx if n else torch.zeros_like(xa)).to(x.dtype), dw, db


def layer_norm_backward_formula(dy, x, weight, normalized_shape, rstd_saved):
    """(dx, dw, db) of layer norm in differentiable ops, mean and rstd recomputed from x (their
    dependence on x matters for second derivatives; half precision works in float32). The eps is
    recovered from the saved rstd (rstd^-2 - var(x), held constant), so values match exactly."""
    dims = normalized_dims(x, normalized_shape)
    low = x.dtype in (torch.float16, torch.bfloat16)
    xf = x.float() if low else x
    dyc = dy.float() if low else dy
    xc = xf - xf.mean(dims, keepdim=True)
    var = (xc * xc).mean(dims, keepdim=True)
    eps = (rstd_saved.to(var.dtype).reshape(var.shape) ** -2 - var).detach()
    rstd = torch.rsqrt(var + eps)
    dx, dw, db = layer_norm_cotangents(dyc, xc * rstd, rstd, weight, dims)
    return dx.to(x.dtype), dw, db


def rms_norm_backward_reference(dy, x, rstd, weight, eps, m, n):
    """(dx, dw) on [m, n] views, rstd recomputed from x when None: dx in x's dtype, dw [n] in the
    accumulation dtype."""
    xa, ga = to_acc(x).reshape(m, n), to_acc(dy).reshape(m, n)
    if rstd is None:
        rs = torch.rsqrt((xa * xa).mean(1, keepdim=True) + eps) if n else torch.ones(m, 1, dtype=xa.dtype,
                                                                                      device=xa.device)
    else:
        rs = rstd.reshape(m, 1).to(xa.dtype)
    xhat = xa * rs
    g = ga * weight.reshape(n).to(xa.dtype) if weight is not None else ga
    dx = rs * (g - xhat * (g * xhat).mean(1, keepdim=True)) if n else torch.zeros_like(xa)
    return dx.to(x.dtype), (ga * xhat).sum(0)


# ---------------------------------------------------------------------------------------------
# the kernel or the formula

def _trailing_numel(x, mean):
    """N (the normalised size) and the normalised shape, from a keepdim statistic such as the mean
    of ``torch.native_layer_norm``: the trailing dims where the statistic has size 1 (leading
    size-1 dims of x among them are taken as not normalised; pass normalized_shape to be exact)."""
    if mean.dim() == x.dim():
        k = 0
        while k < x.dim() and mean.shape[x.dim() - 1 - k] == 1:
            k += 1
        while k > 1 and x.shape[x.dim() - k] == 1:  # ambiguous size-1 dims: not normalised
            k -= 1
        shape = tuple(x.shape[x.dim() - k:])
        return math.prod(shape), shape
    if mean.numel():
        n = x.numel() // mean.numel()
        return n, (n,)
    return x.shape[-1], (x.shape[-1],)


@announces
def layer_norm_backward(dy, x, mean, rstd, weight=None, normalized_shape=None):
    """Backward of y = xhat * w + b, xhat = (x - mean) * rstd over the trailing normalised dims:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w;
    dw = sum over rows of dy * xhat;  db = sum over rows of dy.

    ``mean`` / ``rstd`` as returned by ``torch.native_layer_norm`` (any shape with one entry per
    row). The normalised size is taken from ``normalized_shape``, else weight, else mean's shape.
    Returns (dx, dw, db): dw None without weight; dw, db in weight's dtype (x's without weight).
    One pass over x and dy.
    """
    if normalized_shape is not None:
        shape = tuple(normalized_shape)
        n = math.prod(shape)
    elif weight is not None:
        shape, n = tuple(weight.shape), weight.numel()
    else:
        n, shape = _trailing_numel(x, mean)
    m = x.numel() // n if n else mean.numel()
    if kernel_ok(x, dy, *( [weight] if weight is not None else [])) and n and mean.numel() == m:
        dx, dw, db = compiled().layer_norm_bwd(dy.reshape(m, n), x.reshape(m, n), mean.reshape(m), rstd.reshape(m),
                                               weight.reshape(n) if weight is not None else None)
    else:
        dx, dw, db = layer_norm_backward_reference(dy, x, mean, rstd, weight, m, n)
    pdtype = weight.dtype if weight is not None else x.dtype
    dw = dw.to(pdtype).reshape(shape) if weight is not None else None
    return dx.reshape(x.shape), dw, db.to(pdtype).reshape(shape)


@announces
def rms_norm_backward(dy, x, normalized_shape, weight=None, eps=None, rstd=None):
    """Backward of y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) over the trailing
    ``normalized_shape`` dims (eps None: the dtype's machine epsilon, as torch.rms_norm):

    dx = rstd * (g - xhat * mean(g * xhat)),  xhat = x * rstd,  g = dy * w;
    dw = sum over rows of dy * xhat.

    ``rstd`` (one entry per row) is recomputed from x when not given. Returns (dx, dw), dw None
    without weight. One pass over x and dy.
    """
    shape = tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)
    n = math.prod(shape)
    m = x.numel() // n if n else 0
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    ts = [x, dy] + ([weight] if weight is not None else [])
    if kernel_ok(*ts) and n and (rstd is None or rstd.numel() == m) and \
            (rstd is None or (rstd.device == x.device and not (torch.is_grad_enabled() and rstd.requires_grad))):
        dx, dw = compiled().rms_norm_bwd(dy.reshape(m, n), x.reshape(m, n),
                                         rstd.reshape(m) if rstd is not None else None,
                                         weight.reshape(n) if weight is not None else None, float(eps))
    else:
        dx, dw = rms_norm_backward_reference(dy, x, rstd, weight, eps, m, n)
    return dx.reshape(x.shape), (dw.to(weight.dtype).reshape(shape) if weight is not None else None)
