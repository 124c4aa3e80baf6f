"""Rules for scans and order statistics: cumprod, cummax/cummin, logcumsumexp, sort/msort, topk,
kthvalue, median/nanmedian, mode. (cumsum is in :mod:`.reductions`, flip in :mod:`.shape`.)

Order statistics send the cotangent of each selected value to the position its index names
(a scatter: torch's value_selecting_reduction_backward); full-tensor median/nanmedian split it
evenly among the elements equal to the result (NaN-aware), as torch does; cummax/cummin add
(scatter_add) since an element can be the running extremum of several positions.

cumprod handles zeros like torch, without data-dependent Python: before the first zero of a
slice ``dx_k = sum_{j >= k} dy_j y_j / x_k``; at the first zero, the sum over the following
positions of ``dy_j prod_{i <= j, i != k} x_i``; after it, 0 in value, written so that second
derivatives are exact too (see :func:`_cumprod_grad`).
"""
from __future__ import annotations

import torch

from ..ad.registry import rrule
from ._util import NoTangent, materialize, no_out, nondiff
from ._util import conj as _c

Tensor = torch.Tensor
return_types = torch.return_types


def _scalar(value, like):
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _reversed_cumsum(x, d):
    return x.flip(d).cumsum(d).flip(d)


# -- cumprod ---------------------------------------------------------------------------------------

def _cumprod_grad(x, y, dy, d):
    """dx_k = sum_{j >= k} dy_j conj(prod_{i <= j, i != k} x_i), written with ``where`` (no
    data-dependent Python) as polynomial identities that stay exact when differentiated again.
    With z1, z2 the first two zeros of a slice:

    * k before z1:            (sum_{j >= k} dy_j y_j) / x_k          (torch's formula);
    * k = z1:                 sum_{j >= z1} dy_j p1_j,               p1 = cumprod(x, z1 -> 1);
    * k after z1, x_k != 0:   x_z1 (sum_{j >= k} dy_j p1_j) / x_k    (0, but not its derivative);
    * k = z2:                 x_z1 sum_{j >= z2} dy_j p2_j,          p2 = cumprod(x, z1, z2 -> 1);
    * later zeros:            0 (a product of two zeros: zero to first order too).

    The values are torch's (its O(n) first-order formula); the derivatives of this expression are
    exact for any zeros to second order (torch recomputes an O(n^2) formula for that)."""
    xc, yc = _c(x), _c(y)
    is_zero = x == 0
    nz = is_zero.to(torch.int64).cumsum(d)
    first, second = is_zero & (nz == 1), is_zero & (nz == 2)
    one, zero = _scalar(1, x), _scalar(0, dy)
    safe = torch.where(is_zero, one, xc)  # finite denominators in every branch of the where's
    p1 = torch.cumprod(torch.where(first, one, xc), d)
    p2 = torch.cumprod(torch.where(first | second, one, xc), d)
    x_z1 = torch.where(first, xc, _scalar(0, x)).sum(d, keepdim=True)
    before = _reversed_cumsum(dy * yc, d) / safe
    at_first = torch.where(nz >= 1, dy * p1, zero).sum(d, keepdim=True)
    after = x_z1 * _reversed_cumsum(dy * p1, d) / safe
    at_second = x_z1 * torch.where(nz >= 2, dy * p2, zero).sum(d, keepdim=True)
    return torch.where(nz == 0, before,
                       torch.where(first, at_first,
                                   torch.where(~is_zero, after, torch.where(second, at_second, zero))))


@rrule(torch.cumprod, Tensor.cumprod)
def cumprod(input, dim, *, dtype=None, out=None):
    """y_k = prod_{j <= k} x_j along dim;  dx_k = sum_{j >= k} dy_j conj(prod_{i <= j, i != k} x_i),
    computed as torch does (y/x before the first zero, the zero-aware sum at it, 0 after)."""
    no_out(out)
    y = torch.cumprod(input, dim, dtype=dtype)

    def pullback(dy):
        x = input.to(y.dtype) if y.dtype != input.dtype else input
        if x.dim() == 0 or x.numel() <= 1 or x.shape[dim % x.dim()] == 1:
            return NoTangent(), dy, NoTangent()
        return NoTangent(), _cumprod_grad(x, y, dy, dim % x.dim()), NoTangent()

    return y, pullback


# -- cummax / cummin -------------------------------------------------------------------------------

def _make_cummax(name, fn, return_type):
    def rule(input, dim, *, out=None):
        no_out(out)
        res = fn(input, dim)

        def pullback(dys):
            dv = materialize(dys[0], like=res.values)
            if input.numel() == 0:
                return NoTangent(), dv, NoTangent()
            if input.dim() == 0:
                return NoTangent(), dv, NoTangent()
            return NoTangent(), torch.zeros_like(dv).scatter_add(dim, res.indices, dv), NoTangent()

        return res, pullback

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = (f"(values, indices) = running {name[3:]}imum along dim;  dx = dvalues added (scatter_add) "
                    "at the indices.")
    return rule


cummax = rrule(torch.cummax, Tensor.cummax)(_make_cummax("cummax", torch.cummax, return_types.cummax))
cummin = rrule(torch.cummin, Tensor.cummin)(_make_cummax("cummin", torch.cummin, return_types.cummin))


# -- logcumsumexp ----------------------------------------------------------------------------------

@rrule(torch.logcumsumexp, Tensor.logcumsumexp)
def logcumsumexp(input, dim, *, out=None):
    """y_k = log sum_{j <= k} exp(x_j);  dx_j = sum_{k >= j} dy_k exp(x_j - y_k), summed in log space
    separately for positive and negative dy (torch's formula; complex: directly)."""
    no_out(out)
    y = torch.logcumsumexp(input, dim)

    def pullback(dy):
        if dy.dim() == 0 or dy.numel() == 0:
            return NoTangent(), dy, NoTangent()
        d = dim % dy.dim()

        def rev_lcse(t):
            return torch.logcumsumexp(t.flip(d), d).flip(d)

        if dy.is_complex():
            out = torch.exp(rev_lcse(torch.log(dy.conj()) - y) + input)
            return NoTangent(), out.conj(), NoTangent()
        lowest = _scalar(torch.finfo(dy.dtype).min, dy)
        log_abs = dy.abs().log()
        log_pos = torch.where(dy > 0, log_abs, lowest)
        log_neg = torch.where(dy < 0, log_abs, lowest)
        pos = torch.exp(rev_lcse(log_pos - y) + input)
        neg = torch.exp(rev_lcse(log_neg - y) + input)
        return NoTangent(), pos - neg, NoTangent()

    return y, pullback


# -- order statistics ------------------------------------------------------------------------------

def _select_back(dv, values, indices, input, dim, keepdim=True):
    """dx for values = x gathered at ``indices`` along dim: dv scattered back (unsqueezed when the
    reduction dropped dim)."""
    dv = materialize(dv, like=values)
    if input.dim() == 0:
        return dv.reshape(())
    d = dim % input.dim()
    if not keepdim:
        dv, indices = dv.unsqueeze(d), indices.unsqueeze(d)
    return torch.zeros(input.shape, dtype=dv.dtype, device=dv.device).scatter(d, indices, dv)


@rrule(torch.sort, Tensor.sort)
def sort(input, dim=-1, descending=False, *, stable=False, out=None):
    """(values, indices) = x sorted along dim;  dx = dvalues scattered to the indices."""
    no_out(out)
    res = torch.sort(input, dim=dim, descending=descending, stable=stable)
    return res, lambda dys: (NoTangent(), _select_back(dys[0], res.values, res.indices, input, dim), *nondiff(2))


@rrule(torch.msort, Tensor.msort)
def msort(input, *, out=None):
    """y = x sorted along dim 0;  dx = dy scattered to the sorting permutation."""
    no_out(out)
    res = torch.sort(input, dim=0)
    return res.values, lambda dy: (NoTangent(), _select_back(dy, res.values, res.indices, input, 0))


@rrule(torch.topk, Tensor.topk)
def topk(input, k, dim=-1, largest=True, sorted=True, *, out=None):
    """(values, indices) = the k largest (or smallest) along dim;  dx = dvalues scattered to the
    indices, 0 elsewhere."""
    no_out(out)
    res = torch.topk(input, k, dim, largest, sorted)
    return res, lambda dys: (NoTangent(), _select_back(dys[0], res.values, res.indices, input, dim), *nondiff(4))


@rrule(torch.kthvalue, Tensor.kthvalue)
def kthvalue(input, k, dim=-1, keepdim=False, *, out=None):
    """(values, indices) = the k-th smallest along dim;  dx = dvalues at the index, 0 elsewhere."""
    no_out(out)
    res = torch.kthvalue(input, k, dim, keepdim)
    return res, lambda dys: (NoTangent(), _select_back(dys[0], res.values, res.indices, input, dim, keepdim),
                             *nondiff(3))


def _even_split(dy, input, value):
    """dx for a full reduction whose result equals some elements (torch's
    evenly_distribute_backward): dy split evenly among them; NaN results go to the NaNs."""
    mask = (input == value) | (torch.isnan(input) & torch.isnan(value))
    return mask * (dy / mask.sum())


def _make_median(name, fn, return_type):
    def rule(input, dim=None, keepdim=False, *, out=None):
        no_out(out)
        if dim is None:
            y = fn(input)
            return y, lambda dy: (NoTangent(), _even_split(dy, input, y), NoTangent(), NoTangent())
        res = fn(input, dim, keepdim)
        return res, lambda dys: (NoTangent(), _select_back(dys[0], res.values, res.indices, input, dim, keepdim),
                                 NoTangent(), NoTangent())

    rule.__name__ = rule.__qualname__ = name
    what = "NaN-ignoring median" if name == "nanmedian" else "median (lower of the two middle values)"
    rule.__doc__ = (f"{name}(x): y = {what} of all x, dx = dy split evenly among the elements equal to y; "
                    f"{name}(x, dim, keepdim): (values, indices), dx = dvalues scattered to the indices.")
    return rule


median = rrule(torch.median, Tensor.median)(_make_median("median", torch.median, return_types.median))
nanmedian = rrule(torch.nanmedian, Tensor.nanmedian)(
    _make_median("nanmedian", torch.nanmedian, return_types.nanmedian))


@rrule(torch.mode, Tensor.mode)
def mode(input, dim=-1, keepdim=False, *, out=None):
    """(values, indices) = the most frequent value along dim;  dx = dvalues at the index returned."""
    no_out(out)
    res = torch.mode(input, dim, keepdim)
    return res, lambda dys: (NoTangent(), _select_back(dys[0], res.values, res.indices, input, dim, keepdim),
                             *nondiff(2))
