"""Pure-torch implementations of the custom ops: the fallback where no kernel applies, and the
reference the kernels are tested against. Same signatures and results as the functions of
``zygote_torch.ops`` (see there for the math); computed in float32 for bfloat16/float16 inputs
(float64 for float64), results cast back to the input dtype.
"""
from __future__ import annotations

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(acc_dtype(t.dtype))


def reduce_loss(rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """'none': the per-row losses; 'sum': their sum; 'mean': their sum over the number of rows
    whose target is not ignore_index (NaN when there is none, as torch)."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / (target != ignore_index).sum().to(rows.dtype)
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def loss_grad_scale(dloss: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
                    dtype: torch.dtype) -> torch.Tensor:
    """The per-row (or single) factor g of the cross-entropy pullback: dloss for 'none' (per row)
    and 'sum', dloss / (number of non-ignored rows) for 'mean'; a 1-d tensor of ``dtype``."""
    dloss = torch.as_tensor(dloss, device=target.device).to(dtype)
    if reduction == "none":
        return dloss.reshape(-1)
    g = dloss.reshape(1)
    if reduction == "mean":
        g = g / (target != ignore_index).sum().to(dtype)
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return g


def cross_entropy_forward(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    x = _acc(logits)
    lse = torch.logsumexp(x, 1)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    rows = lse - x.gather(1, t[:, None])[:, 0]
    if label_smoothing > 0:
        rows = (1 - label_smoothing) * rows + label_smoothing * (lse - x.mean(1))
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return reduce_loss(rows, target, ignore_index, reduction).to(logits.dtype), lse


def cross_entropy_backward(dloss, logits, target, lse, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    x = _acc(logits)
    c = x.shape[1]
    g = loss_grad_scale(dloss, target, ignore_index, reduction, x.dtype)
    g = g.expand(x.shape[0])[:, None]
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    d = torch.exp(x - lse.to(x.dtype)[:, None]) - label_smoothing / c
    d = d - (1 - label_smoothing) * torch.nn.functional.one_hot(t, c).to(x.dtype)
    d = torch.where(valid[:, None], g * d, torch.zeros_like(d))
    return d.to(logits.dtype)


def layer_norm_backward(dy, x, mean, rstd, weight, m, n):
    """On [m, n] views; returns (dx [m, n] in x's dtype, dw [n], db [n] in the accumulation dtype)."""
    xa, ga = _acc(x).reshape(m, n), _acc(dy).reshape(m, n)
    mu, rs = mean.reshape(m, 1).to(xa.dtype), rstd.reshape(m, 1).to(xa.dtype)
    xhat = (xa - mu) * rs
    g = ga * weight.reshape(n).to(xa.dtype) if weight is not None else ga
    if n:
        dx = rs * (g - g.mean(1, keepdim=True) - xhat * (g * xhat).mean(1, keepdim=True))
    else:
        dx = torch.zeros_like(xa)
    return dx.to(x.dtype), (ga * xhat).sum(0), ga.sum(0)


def rms_norm_backward(dy, x, rstd, weight, eps, m, n):
    """On [m, n] views; rstd recomputed from x when None. Returns (dx in x's dtype, dw [n] in
    the accumulation dtype)."""
    xa, ga = _acc(x).reshape(m, n), _acc(dy).reshape(m, n)
    if rstd is None:
        rs = torch.rsqrt((xa * xa).mean(1, keepdim=True) + eps) if n else torch.ones(m, 1, dtype=xa.dtype,
                                                                                      device=xa.device)
    else:
        rs = rstd.reshape(m, 1).to(xa.dtype)
    xhat = xa * rs
    g = ga * weight.reshape(n).to(xa.dtype) if weight is not None else ga
    dx = rs * (g - xhat * (g * xhat).mean(1, keepdim=True)) if n else torch.zeros_like(xa)
    return dx.to(x.dtype), (ga * xhat).sum(0)


def softmax_backward(dy, y, dim):
    ya, ga = _acc(y), _acc(dy)
    return (ya * (ga - (ga * ya).sum(dim, keepdim=True))).to(y.dtype)


def log_softmax_backward(dy, y, dim):
    ya, ga = _acc(y), _acc(dy)
    return (ga - torch.exp(ya) * ga.sum(dim, keepdim=True)).to(y.dtype)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_backward(dy, x, approximate="none"):
    xa = _acc(x)
    if approximate == "tanh":
        x2 = xa * xa
        t = torch.tanh(_SQRT_2_OVER_PI * (xa + 0.044715 * x2 * xa))
        local = 0.5 * (1 + t) + 0.5 * xa * (1 - t * t) * (_SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x2))
    elif approximate == "none":
        local = 0.5 * (1 + torch.erf(xa * _INV_SQRT_2)) + xa * torch.exp(-0.5 * xa * xa) * _INV_SQRT_2PI
    else:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return (_acc(dy) * local).to(torch.promote_types(dy.dtype, x.dtype))


def silu_backward(dy, x):
    xa = _acc(x)
    s = torch.sigmoid(xa)
    return (_acc(dy) * (s * (1 + xa * (1 - s)))).to(torch.promote_types(dy.dtype, x.dtype))


def swiglu_forward(a, b):
    aa = _acc(a)
    return (aa * torch.sigmoid(aa) * _acc(b)).to(torch.promote_types(a.dtype, b.dtype))


def swiglu_backward(dy, a, b):
    aa, ba, ga = _acc(a), _acc(b), _acc(dy)
    s = torch.sigmoid(aa)
    da = ga * ba * (s * (1 + aa * (1 - s)))
    db = ga * aa * s
    return da.to(a.dtype), db.to(b.dtype)


def embedding_backward(dy, indices, num_weights, padding_idx=None):
    d = dy.shape[-1]
    idx = indices.reshape(-1).long()
    out = torch.zeros(num_weights, d, dtype=acc_dtype(dy.dtype), device=dy.device)
    out.index_add_(0, idx, _acc(dy).reshape(-1, d))
    if padding_idx is not None and padding_idx >= 0:
        out[padding_idx] = 0
    return out.to(dy.dtype)
