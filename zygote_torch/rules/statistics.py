"""Rules for statistics and finite differences along a dimension: quantile and nanquantile, cov and
corrcoef; diff, torch.gradient and the trapezoid rule (trapezoid, cumulative_trapezoid, trapz).
(mean, var, std, aminmax and the other reductions are in :mod:`.reductions`; median, kthvalue and
mode in :mod:`.scans`.)

Each is a rule via rules (:func:`._util._via_rules`): torch's own algorithm, op for op (ATen's
quantile_compute, cov, gradient_helper), written with ops that have rules and differentiated
through them; the value is torch's own, where the decomposition only rounds differently.
"""
from __future__ import annotations

import torch

from ..ad.registry import rrule
from ._util import NoTangent, _via_rules, nondiff

Tensor = torch.Tensor


# -- quantiles -------------------------------------------------------------------------------------

def _quantile_decomposition(x, q, dim, keepdim, interpolation, ignore_nan):
    """torch's quantile (aten/native/Sorting.cpp quantile_compute), written with ruled ops."""
    if x.dim() == 0:
        x, dim, keepdim = x.reshape(1), None, False
    s = x.reshape(-1) if dim is None else x.movedim(dim, -1)
    s = s.gather(-1, s.argsort(-1))  # sorted (NaN last), through gather's rule
    qv = (q.to(x.dtype) if isinstance(q, Tensor) else torch.tensor(q, dtype=x.dtype, device=x.device)).reshape(-1)
    n = s.shape[-1]
    nan = torch.isnan(s)
    if ignore_nan:
        ranks = qv * ((~nan).sum(-1, keepdim=True) - 1).to(x.dtype)
        ranks = torch.where(ranks < 0, torch.zeros_like(ranks), ranks)
    else:
        ranks = torch.where(nan.any(-1, keepdim=True), float(n - 1), qv * (n - 1))
    if interpolation == "lower":
        ranks = torch.floor(ranks)
    elif interpolation == "higher":
        ranks = torch.ceil(ranks)
    elif interpolation == "nearest":
        ranks = torch.round(ranks)
    ranks_w, ranks = ranks, ranks.detach()  # only the interpolation weight below is differentiated (as in torch)
    below = ranks.long()
    v = s.gather(-1, below.expand(*s.shape[:-1], below.shape[-1]) if s.dim() > 1 else below)
    if interpolation in ("linear", "midpoint"):
        w = torch.full_like(ranks, 0.5) if interpolation == "midpoint" else ranks_w - below
        above = torch.ceil(ranks).long()
        va = s.gather(-1, above.expand(*s.shape[:-1], above.shape[-1]) if s.dim() > 1 else above)
        v = v + w * (va - v)
    if keepdim:
        if dim is None:
            v = v.reshape(v.shape[:-1] + (1,) * x.dim() + v.shape[-1:])
        else:
            v = v.unsqueeze(dim % x.dim())
    scalar_q = not isinstance(q, Tensor) or q.dim() == 0
    return v.squeeze(-1) if scalar_q else v.movedim(-1, 0)


def _make_quantile(fn, ignore_nan):
    def rule(input, q, dim=None, keepdim=False, *, interpolation="linear", out=None):
        """y = the q-quantiles along dim: sorted values, interpolated;  dx = dy through the sort and
        the interpolation weights (torch's quantile, written with ruled ops)."""
        return _quantile_rule(fn, ignore_nan, input, q, dim, keepdim, interpolation)
    return rule


def _quantile_rule(fn, ignore_nan, input, q, dim, keepdim, interpolation):
    y, back = _via_rules(lambda x, qq: _quantile_decomposition(x, qq, dim, keepdim, interpolation, ignore_nan),
                         input, q, value=lambda: fn(input, q, dim, keepdim, interpolation=interpolation))
    return y, lambda dy: back(dy) + nondiff(2)


rrule(torch.quantile, Tensor.quantile)(_make_quantile(torch.quantile, False))
rrule(torch.nanquantile, Tensor.nanquantile)(_make_quantile(torch.nanquantile, True))


# -- covariance and correlation --------------------------------------------------------------------

def _cov_decomposition(input, correction, fweights, aweights):
    """torch's cov (aten/native/Correlation.cpp), written with ruled ops."""
    x = input.reshape(1, -1) if input.dim() < 2 else input
    n = x.shape[1]
    w = fweights
    if aweights is not None:
        w = aweights if w is None else w * aweights
    w_sum = w.sum() if w is not None else n
    avg = (x * w if w is not None else x).sum(1) / w_sum
    if w is not None and aweights is not None and correction != 0:
        norm = w_sum - correction * (w * aweights).sum() / w_sum
    else:
        norm = w_sum - correction
    if isinstance(norm, Tensor):
        norm = torch.where(norm <= 0, torch.zeros_like(norm), norm)
    else:
        norm = max(norm, 0)
    xc = x - avg.unsqueeze(1)
    c = torch.mm(xc, (xc * w if w is not None else xc).mH)
    return (c / norm).squeeze()


@rrule(torch.cov, Tensor.cov)
def cov(input, correction=1, fweights=None, aweights=None):
    """The covariance of the rows' observations (frequency and observation weights);  dinput and
    daweights through the rules of the formula (torch's cov, op for op).  (correction, fweights and
    aweights are keywords in torch.)"""
    y, back = _via_rules(lambda x, fw, aw: _cov_decomposition(x, correction, fw, aw), input, fweights, aweights,
                         value=lambda: torch.cov(input, correction=correction, fweights=fweights, aweights=aweights))
    return y, lambda dy: (lambda g: (g[0], g[1], NoTangent(), NoTangent(), g[3]))(back(dy))


@rrule(torch.corrcoef, Tensor.corrcoef)
def corrcoef(input):
    """r = cov / (stddev_i stddev_j) (torch clips r to [-1, 1], which only moves rounding);
    dinput through the rules of cov, abs, sqrt and division."""
    def decomposition(x):
        c = _cov_decomposition(x, 1, None, None)
        if c.dim() == 0:
            return c / c
        sd = torch.sqrt(c.diagonal().abs())
        return c / sd.reshape(-1, 1) / sd.reshape(1, -1)
    return _via_rules(decomposition, input, value=lambda: torch.corrcoef(input))


# -- differences and integrals ---------------------------------------------------------------------

def _diff_decomposition(x, n, dim, prepend, append):
    if n == 0:
        return x.view_as(x)
    parts = [t for t in (prepend, x, append) if t is not None]
    if len(parts) > 1:
        x = torch.cat(parts, dim)
    for _ in range(n):
        length = max(x.shape[dim] - 1, 0)
        x = x.narrow(dim, min(1, x.shape[dim]), length) - x.narrow(dim, 0, length)
    return x


@rrule(torch.diff, Tensor.diff)
def diff(input, n=1, dim=-1, prepend=None, append=None):
    """y = the n-th forward difference along dim of cat(prepend, x, append);  dx = the adjoint
    differences (through the rules of cat, narrow and sub)."""
    y, back = _via_rules(lambda x, pre, app: _diff_decomposition(x, n, dim, pre, app), input, prepend, append)

    def pullback(dy):
        _, dx, dpre, dapp = back(dy)
        return NoTangent(), dx, NoTangent(), NoTangent(), dpre, dapp

    return y, pullback


def _gradient_decomposition(x, spacing, dims, edge_order):
    """torch.gradient (aten/native/ReduceOps.cpp gradient_helper), written with ruled ops."""
    out = []
    for k, d in enumerate(dims):
        n = x.shape[d]
        h = spacing[k]
        if isinstance(h, Tensor) and h.dim() == 1:  # coordinates
            step = h[1:] - h[:-1]
            shape = [1] * x.dim()
            shape[d] = n - 2
            d1, d2 = step[:-1], step[1:]
            a = (-d2 / (d1 * (d1 + d2))).reshape(shape)
            b = ((d2 - d1) / (d1 * d2)).reshape(shape)
            c = (d1 / (d2 * (d1 + d2))).reshape(shape)
            center = a * x.narrow(d, 0, n - 2) + b * x.narrow(d, 1, n - 2) + c * x.narrow(d, 2, n - 2)
            s0, sm1 = step[0], step[-1]
            s1, sm2 = (step[1], step[-2]) if edge_order == 2 else (None, None)
            if edge_order == 1:
                first = (x.narrow(d, 1, 1) - x.narrow(d, 0, 1)) / s0
                last = (x.narrow(d, n - 1, 1) - x.narrow(d, n - 2, 1)) / sm1
            else:
                first = (-(2.0 * s0 + s1) / (s0 * (s0 + s1)) * x.narrow(d, 0, 1)
                         + (s0 + s1) / (s0 * s1) * x.narrow(d, 1, 1)
                         + (-s0) / (s1 * (s0 + s1)) * x.narrow(d, 2, 1))
                last = (sm1 / (sm2 * (sm1 + sm2)) * x.narrow(d, n - 3, 1)
                        - (sm1 + sm2) / (sm1 * sm2) * x.narrow(d, n - 2, 1)
                        + (2 * sm1 + sm2) / (sm1 * (sm1 + sm2)) * x.narrow(d, n - 1, 1))
            out.append(torch.cat([first, center, last], d))
            continue
        center = (x.narrow(d, 2, n - 2) - x.narrow(d, 0, n - 2)) / h
        if edge_order == 1:
            first = (x.narrow(d, 1, 1) - x.narrow(d, 0, 1)) / h
            last = (x.narrow(d, n - 1, 1) - x.narrow(d, n - 2, 1)) / h
        else:
            first = (-1.5 * x.narrow(d, 0, 1) + 2 * x.narrow(d, 1, 1) - 0.5 * x.narrow(d, 2, 1)) / h
            last = (0.5 * x.narrow(d, n - 3, 1) - 2 * x.narrow(d, n - 2, 1) + 1.5 * x.narrow(d, n - 1, 1)) / h
        out.append(torch.cat([first, center / 2, last], d))
    return tuple(out)


@rrule(torch.gradient)
def gradient(input, *, spacing=1, dim=None, edge_order=1):
    """The central-difference estimate of x's partial derivatives (one tensor per dimension), with
    one-sided differences of order edge_order at the ends;  linear in x: dx through the rules of
    narrow, mul, sub, cat.  (Tensor coordinates in spacing are not differentiated.)"""
    if dim is None:
        dims = list(range(input.dim()))
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
    dims = [d % input.dim() for d in dims]
    if isinstance(spacing, (list, tuple)):
        sp = list(spacing)
    else:
        sp = [spacing] * len(dims)
    sp = [1.0 if s is None else s for s in sp]
    y = torch.gradient(input, spacing=spacing, dim=dim, edge_order=edge_order)
    _, back = _via_rules(lambda x: _gradient_decomposition(x, sp, dims, edge_order), input)
    return y, back


def _trapezoid_decomposition(y, x, dx, dim, cumulative):
    n = y.shape[dim]
    left, right = y.narrow(dim, 0, max(n - 1, 0)), y.narrow(dim, min(1, n), max(n - 1, 0))
    if x is None:
        if cumulative:
            return ((left + right) * ((1.0 if dx is None else dx) / 2)).cumsum(dim)
        if n == 0:
            return y.sum(dim)
        return (y.sum(dim) - (y.select(dim, 0) + y.select(dim, -1)) * 0.5) * (1.0 if dx is None else dx)
    d = dim % y.dim()
    if x.dim() == 1:
        x = x.reshape([x.shape[0] if i == d else 1 for i in range(y.dim())])
    elif x.dim() < y.dim():
        x = x.reshape((1,) * (y.dim() - x.dim()) + tuple(x.shape))
    m = x.shape[d]
    step = x.narrow(d, min(1, m), max(m - 1, 0)) - x.narrow(d, 0, max(m - 1, 0))
    if cumulative:
        return (step / 2.0 * (left + right)).cumsum(d)
    if n == 0:
        return y.sum(d)
    return (step * (left + right)).sum(d) / 2.0


def _make_trapezoid(fn, cumulative):
    def rule(y, x=None, *, dx=None, dim=-1):
        """The trapezoid rule along dim (cumulative: its running sums) with sample points x or spacing
        dx;  dy and dx through the rules of narrow, sub, mul, sum (cumsum)."""
        kwargs = {"dim": dim} if dx is None else {"dx": dx, "dim": dim}
        value = (lambda: fn(y, x, **kwargs)) if x is not None else (lambda: fn(y, **kwargs))
        return _via_rules(lambda yy, xx: _trapezoid_decomposition(yy, xx, dx, dim, cumulative), y, x, value=value)
    return rule


rrule(torch.trapezoid)(_make_trapezoid(torch.trapezoid, False))
rrule(torch.cumulative_trapezoid)(_make_trapezoid(torch.cumulative_trapezoid, True))


@rrule(torch.trapz)
def trapz(y, x=None, *, dx=None, dim=-1):
    """torch.trapz: the trapezoid rule (see trapezoid)."""
    kwargs = {"dim": dim} if dx is None else {"dx": dx, "dim": dim}
    value = (lambda: torch.trapz(y, x, **kwargs)) if x is not None else (lambda: torch.trapz(y, **kwargs))
    return _via_rules(lambda yy, xx: _trapezoid_decomposition(yy, xx, dx, dim, False), y, x, value=value)
