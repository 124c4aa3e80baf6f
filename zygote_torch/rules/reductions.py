"""Rules for reductions: sum, mean, nansum, nanmean, prod, amax/amin, max/min (all three forms),
logsumexp, var/std (and var_mean/std_mean), norm / vector_norm, cumsum, aminmax and segment_reduce.

Each rule mirrors torch's signature, so ``torch.sum(x, dim=1)``, ``x.sum((0, 1), keepdim=True)``,
``torch.var(x, 0, unbiased=False)`` and ``x.max(1)`` all bind. ``dim`` may be None, an int, or a
tuple/list; an empty tuple/list means every dimension, as in torch. torch's numpy-style ``axis=``
and ``keepdims=`` keywords are accepted too (:func:`numpy_keywords`).

Subgradients follow torch.autograd: ties of amax/amin and full max/min split the gradient evenly;
``max(x, dim)`` sends it to the index it returns; the 2-norm's gradient at 0 is 0; prod handles
zeros (one zero: the product of the others; two or more: 0) with ``torch.where``, never with
data-dependent Python.
"""
from __future__ import annotations

import builtins
import functools
import inspect
import math

import torch

from ..ad.registry import rrule
from ._util import NoTangent, _via_rules, expand_reduced, is_zero, materialize, normalize_dims, nondiff
from ._util import conj as _c
from .elementwise import maximum_pullback

Tensor = torch.Tensor

# NB: the rules below are named after the functions they differentiate (sum, max, min), which
# shadows those builtins inside this module; use ``builtins.sum`` etc. if ever needed here.


def _scalar(value, like):
    """A 0-d tensor of ``like``'s dtype and device (for ``torch.where`` branches)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _dims(dim, ndim: int) -> tuple:
    """Reduced dimensions, sorted and non-negative; None and an empty sequence mean all."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return tuple(range(ndim))
    return normalize_dims(dim, ndim)


def numpy_keywords(rule):
    """Let a rule accept torch's numpy-style keywords: ``axis=`` for ``dim`` and ``keepdims=`` for
    ``keepdim`` (``x.sum(axis=1)``, ``torch.amax(x, axis=0, keepdims=True)``).

    The wrapper's signature is the rule's plus two keyword-only parameters, so the registry binds
    calls as usual; a given ``axis``/``keepdims`` then replaces the bound ``dim``/``keepdim``.
    """
    sig = inspect.signature(rule)
    names = list(sig.parameters)
    dim_at, keepdim_at = names.index("dim"), names.index("keepdim")

    @functools.wraps(rule)
    def wrapper(*args, axis=None, keepdims=None, **kwargs):
        if axis is not None or keepdims is not None:
            args = list(args)
            if axis is not None:
                given = args[dim_at]
                if given is not None and not (isinstance(given, (tuple, list)) and len(given) == 0):
                    raise TypeError(f"{rule.__name__}: give either dim or axis, not both")
                args[dim_at] = axis
            if keepdims is not None:
                args[keepdim_at] = keepdims
        return rule(*args, **kwargs)

    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("axis", "keepdims")]
    wrapper.__signature__ = sig.replace(parameters=list(sig.parameters.values()) + extra)
    return wrapper


def _unsqueeze(t, shape, dims, keepdim):
    """A reduced tensor with its reduced dimensions restored as size 1 (no expansion)."""
    if keepdim or len(shape) == 0:
        return t
    for d in dims:
        t = t.unsqueeze(d)
    return t


def _reduce_kwargs(input, dim, keepdim, dtype):
    """Keyword arguments for torch's reduction: an empty ``dim`` is spelled out as every dimension
    (FakeTensor's nansum/nanmean read ``dim=()`` as "reduce nothing", eager torch as "reduce all")."""
    kw = {"dtype": dtype} if dtype is not None else {}
    if isinstance(dim, (tuple, list)) and len(dim) == 0:
        dim = None
    if dim is not None:
        kw["dim"], kw["keepdim"] = dim, keepdim
    elif keepdim:
        kw["dim"], kw["keepdim"] = tuple(range(input.dim())), True
    return kw


# -- sum and mean -----------------------------------------------------------------------------------

@rrule(torch.sum, Tensor.sum)
@numpy_keywords
def sum(input, dim=None, keepdim=False, *, dtype=None):
    """y = sum of x over dim;  dx = dy broadcast back over the reduced dimensions."""
    y = torch.sum(input, **_reduce_kwargs(input, dim, keepdim, dtype))
    dims = _dims(dim, input.dim())
    return y, lambda dy: (NoTangent(), expand_reduced(dy, input.shape, dims, keepdim), NoTangent(), NoTangent())


@rrule(torch.mean, Tensor.mean)
@numpy_keywords
def mean(input, dim=None, keepdim=False, *, dtype=None):
    """y = mean of x over dim (N elements);  dx = dy / N broadcast back over the reduced dimensions."""
    y = torch.mean(input, **_reduce_kwargs(input, dim, keepdim, dtype))
    dims = _dims(dim, input.dim())
    n = math.prod(input.shape[d] for d in dims)
    return y, lambda dy: (NoTangent(), expand_reduced(dy / n, input.shape, dims, keepdim), NoTangent(), NoTangent())


@rrule(torch.nansum, Tensor.nansum)
@numpy_keywords
def nansum(input, dim=None, keepdim=False, *, dtype=None):
    """y = sum of the non-NaN x over dim;  dx = dy broadcast back, 0 where x is NaN."""
    y = torch.nansum(input, **_reduce_kwargs(input, dim, keepdim, dtype))
    dims = _dims(dim, input.dim())

    def pullback(dy):
        g = expand_reduced(dy, input.shape, dims, keepdim)
        return NoTangent(), torch.where(torch.isnan(input), _scalar(0, g), g), NoTangent(), NoTangent()

    return y, pullback


@rrule(torch.nanmean, Tensor.nanmean)
@numpy_keywords
def nanmean(input, dim=None, keepdim=False, *, dtype=None):
    """y = mean of the non-NaN x over dim (n of them);  dx = dy / n broadcast back, 0 where x is NaN."""
    y = torch.nanmean(input, **_reduce_kwargs(input, dim, keepdim, dtype))
    dims = _dims(dim, input.dim())

    def pullback(dy):
        keep = ~torch.isnan(input)
        n = keep.sum(dims, keepdim=True) if dims else keep
        g = _unsqueeze(dy, input.shape, dims, keepdim) / n
        return NoTangent(), torch.where(keep, g, _scalar(0, g)), NoTangent(), NoTangent()

    return y, pullback


# -- prod -------------------------------------------------------------------------------------------

def _prod_grad(x, y, dy, d):
    """dx for y = prod(x, d) (keepdim shapes): y/x where the slice has no zero; at the single zero
    of a slice with one zero, the product of the others; 0 elsewhere."""
    is_zero = x == 0
    zeros = is_zero.sum(d, keepdim=True)
    others = torch.where(is_zero, _scalar(1, x), x).prod(d, keepdim=True)
    zero = _scalar(0, x)
    local = torch.where(zeros == 0, y / x, torch.where(is_zero & (zeros == 1), others, zero))
    return dy * _c(local)


@rrule(torch.prod, Tensor.prod)
@numpy_keywords
def prod(input, dim=None, keepdim=False, *, dtype=None):
    """y = prod of x over dim (or all);  dx_i = dy * prod_{j != i} x_j, computed as y/x_i without
    zeros and with a zero-aware ``where`` otherwise (one zero: the product of the others at it,
    0 elsewhere; two or more zeros: 0)."""
    kw = {"dtype": dtype} if dtype is not None else {}
    y = torch.prod(input, **kw) if dim is None else torch.prod(input, dim, keepdim, **kw)

    def pullback(dy):
        x = input.to(y.dtype) if y.dtype != input.dtype else input
        if x.dim() == 0:
            return NoTangent(), dy, NoTangent(), NoTangent()
        if dim is None:
            flat = x.reshape(-1)
            g = _prod_grad(flat, y.reshape(1), dy.reshape(1), 0).reshape(x.shape)
        else:
            d = dim % x.dim()
            g = _prod_grad(x, _unsqueeze(y, x.shape, (d,), keepdim), _unsqueeze(dy, x.shape, (d,), keepdim), d)
        return NoTangent(), g, NoTangent(), NoTangent()

    return y, pullback


# -- amax / amin / max / min ------------------------------------------------------------------------

def _spread(dy, x, y, dims, keepdim, nan_aware=False):
    """dx for an extremum y of x over dims: dy split evenly among the elements equal to it."""
    y_k = _unsqueeze(y, x.shape, dims, keepdim)
    dy_k = _unsqueeze(dy, x.shape, dims, keepdim)
    mask = x == y_k
    if nan_aware:
        mask = mask | (torch.isnan(x) & torch.isnan(y_k))
    count = mask.sum(dims, keepdim=True) if dims else mask.to(torch.int64)
    return mask * (dy_k / count)


def _make_amax(name, forward):
    def rule(input, dim=(), keepdim=False):
        y = forward(input, dim, keepdim)
        dims = _dims(dim, input.dim())
        return y, lambda dy: (NoTangent(), _spread(dy, input, y, dims, keepdim), NoTangent(), NoTangent())

    rule.__name__ = rule.__qualname__ = name
    which = "maximum" if name == "amax" else "minimum"
    rule.__doc__ = (f"y = {which} of x over dim (all when dim is empty);  dx = dy / k at each of the k "
                    f"elements equal to y (ties split evenly), 0 elsewhere.")
    return rule


amax = rrule(torch.amax, Tensor.amax)(numpy_keywords(_make_amax("amax", torch.amax)))
amin = rrule(torch.amin, Tensor.amin)(numpy_keywords(_make_amax("amin", torch.amin)))


def _make_max(name, forward, binary, return_type):
    larger = name == "max"

    def rule(input, dim=None, keepdim=False, other=None):
        if isinstance(dim, Tensor) or other is not None:  # max(x, y): y arrives as `dim` or `other=`
            y_slot = 1 if isinstance(dim, Tensor) else 3
            y = dim if y_slot == 1 else other
            z = binary(input, y)

            def binary_pullback(dz):
                dx, dy = maximum_pullback(input, y, dz, larger)
                grads = [NoTangent(), dx, NoTangent(), NoTangent(), NoTangent()]
                grads[1 + y_slot] = dy
                return tuple(grads)

            return z, binary_pullback
        if dim is None:
            y = forward(input)
            return y, lambda dy: (NoTangent(), _spread(dy, input, y, tuple(range(input.dim())), False, True),
                                  *nondiff(3))
        values, indices = forward(input, dim, keepdim)

        def pullback(dys):
            dv = materialize(dys[0], like=values)
            if input.dim() == 0:
                return NoTangent(), dv, *nondiff(3)
            d = dim % input.dim()
            dv = _unsqueeze(dv, input.shape, (d,), keepdim)
            idx = _unsqueeze(indices, input.shape, (d,), keepdim)
            return NoTangent(), torch.zeros_like(input, dtype=dv.dtype).scatter(d, idx, dv), *nondiff(3)

        return return_type((values, indices)), pullback

    rule.__name__ = rule.__qualname__ = name
    which = "maximum" if larger else "minimum"
    rule.__doc__ = (
        f"Three forms. {name}(x): y = {which} of all x, dx = dy split evenly among the elements equal "
        f"to y. {name}(x, dim, keepdim): (values, indices), dx = dvalues scattered to the indices. "
        f"{name}(x, other): elementwise {which}, gradient to the selected argument, halved on ties.")
    return rule


max = rrule(torch.max, Tensor.max)(numpy_keywords(_make_max("max", torch.max, torch.maximum, torch.return_types.max)))
min = rrule(torch.min, Tensor.min)(numpy_keywords(_make_max("min", torch.min, torch.minimum, torch.return_types.min)))


# -- logsumexp --------------------------------------------------------------------------------------

@rrule(torch.logsumexp, Tensor.logsumexp, torch.special.logsumexp)
@numpy_keywords
def logsumexp(input, dim=None, keepdim=False):  # dim is required by torch (None: its error)
    """y = log(sum(exp(x), dim));  dx = dy * exp(x - y) (= dy * softmax(x, dim))."""
    y = torch.logsumexp(input, dim, keepdim)
    dims = _dims(dim, input.dim())

    def pullback(dy):
        y_k = _unsqueeze(y, input.shape, dims, keepdim)
        dy_k = _unsqueeze(dy, input.shape, dims, keepdim)
        return NoTangent(), dy_k * _c(torch.exp(input - y_k)), NoTangent(), NoTangent()

    return y, pullback


# -- var / std --------------------------------------------------------------------------------------

def _var_args(dim, unbiased, correction):
    """(dim, correction) from torch's overloads: ``var(x, unbiased)``, ``var(x, dim, unbiased)``,
    ``var(x, dim, correction=c)``."""
    if isinstance(dim, bool):  # var(x, False): the bool is `unbiased`
        dim, unbiased = None, dim
    if correction is not None and unbiased is not None:
        raise TypeError("give either unbiased or correction, not both")
    if correction is None:
        correction = 1 if unbiased is None or unbiased else 0
    return dim, correction


def _var_grad(dy, x, dim, correction, keepdim):
    """dvar/dx: 2 (x - mean) / (N - correction) * dy; torch's conventions where N <= correction."""
    full = dim is None or x.dim() == 0
    dims = _dims(dim, x.dim())
    n = math.prod(x.shape[d] for d in dims)
    dof = n - correction
    if full:
        mean = x.mean()
        if dof <= 0:
            nan_or_inf = torch.where(x == mean, _scalar(math.nan, x),
                                     _scalar(math.inf, x))
            return dy * nan_or_inf
        return (2.0 / dof) * dy * (x - mean)
    scale = 2.0 / dof if dof != 0 else math.inf
    dy_k = _unsqueeze(dy, x.shape, dims, keepdim)
    return scale * dy_k * (x - x.mean(dims, keepdim=True))


def _std_to_var_cotangent(dy, y):
    """d(var) from d(std) for std = sqrt(var): dy / (2 std), 0 where std == 0."""
    g = dy / (2 * y)
    return torch.where(y == 0, _scalar(0, g), g)


def _var_call(fn, input, dim, correction, keepdim):
    return fn(input, dim, correction=correction, keepdim=keepdim)


@rrule(torch.var, Tensor.var)
@numpy_keywords
def var(input, dim=None, unbiased=None, keepdim=False, *, correction=None):
    """y = sum((x - mean)^2) / (N - correction) over dim;  dx = 2 dy (x - mean) / (N - correction)."""
    dim, corr = _var_args(dim, unbiased, correction)
    y = _var_call(torch.var, input, dim, corr, keepdim)
    return y, lambda dy: (NoTangent(), _var_grad(dy, input, dim, corr, keepdim), *nondiff(3))


@rrule(torch.std, Tensor.std)
@numpy_keywords
def std(input, dim=None, unbiased=None, keepdim=False, *, correction=None):
    """y = sqrt(var(x, dim, correction));  dx = dvar(x) applied to dy / (2y) (0 where y == 0)."""
    dim, corr = _var_args(dim, unbiased, correction)
    y = _var_call(torch.std, input, dim, corr, keepdim)
    return y, lambda dy: (NoTangent(), _var_grad(_std_to_var_cotangent(dy, y), input, dim, corr, keepdim),
                          *nondiff(3))


def _make_var_mean(name, forward, is_std):
    def rule(input, dim=None, unbiased=None, keepdim=False, *, correction=None):
        dim_, corr = _var_args(dim, unbiased, correction)
        v, m = _var_call(forward, input, dim_, corr, keepdim)
        dims = _dims(dim_, input.dim())
        n = math.prod(input.shape[d] for d in dims)

        def pullback(dys):
            dv, dm = dys
            g = None
            if not is_zero(dv):
                dv = materialize(dv, like=v)
                g = _var_grad(_std_to_var_cotangent(dv, v) if is_std else dv, input, dim_, corr, keepdim)
            if not is_zero(dm):
                gm = expand_reduced(materialize(dm, like=m) / n, input.shape, dims, keepdim)
                g = gm if g is None else g + gm
            return NoTangent(), (g if g is not None else NoTangent()), *nondiff(3)

        return (v, m), pullback

    rule.__name__ = rule.__qualname__ = name
    what = "std" if is_std else "var"
    rule.__doc__ = (f"(s, m) = ({what}(x, dim, correction), mean(x, dim));  dx = d{what}(x) applied to ds "
                    f"+ dm / N broadcast back over the reduced dimensions.")
    return rule


var_mean = rrule(torch.var_mean)(numpy_keywords(_make_var_mean("var_mean", torch.var_mean, False)))
std_mean = rrule(torch.std_mean)(numpy_keywords(_make_var_mean("std_mean", torch.std_mean, True)))


# -- norms ------------------------------------------------------------------------------------------

def _vector_norm_grad(dy, x, y, ord, dims, keepdim):
    """dx for y = ||x||_ord over dims (torch's norm_backward, including its conventions at 0)."""
    ord = float(ord)
    y = _unsqueeze(y, x.shape, dims, keepdim)
    dy = _unsqueeze(dy, x.shape, dims, keepdim)
    zero = _scalar(0, dy)
    if ord == 0.0:
        return torch.zeros_like(x, dtype=dy.dtype)
    if ord == 1.0:
        return torch.sgn(x) * dy
    if ord == 2.0:
        return dy * torch.where(y == 0, zero, x / y)
    if math.isinf(ord):
        ax = x.abs()
        mask = (ax == y) | torch.isnan(ax)
        count = mask.sum(dims, keepdim=True) if dims else mask.to(torch.int64)
        return torch.sgn(x) * ((dy / count) * mask)
    if ord < 1.0:
        scaled = torch.sgn(x) * torch.where(x == 0, zero, x.abs().pow(ord - 1))
        return scaled * dy * y.pow(1 - ord)
    scaled = torch.sgn(x) * x.abs().pow(ord - 1) if ord < 2.0 else x * x.abs().pow(ord - 2)
    scale = torch.where(y == 0, zero, dy / y.pow(ord - 1))
    return scaled * scale


def _vector_norm(input, ord, dim, keepdim, dtype):
    y = torch.linalg.vector_norm(input, ord, dim, keepdim, dtype=dtype)
    dims = _dims(dim, input.dim())

    def grad(dy):
        x = input.to(y.dtype) if y.dtype != input.dtype and not input.is_complex() else input
        return _vector_norm_grad(dy, x, y, ord, dims, keepdim)

    return y, grad


@rrule(torch.linalg.vector_norm)
def vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """y = (sum |x|^p)^(1/p) over dim;  dx = dy * sgn(x) |x|^(p-1) / y^(p-1) (p = 2: dy x / y,
    0 where y = 0; p = 1: dy sgn(x); p = inf: dy sgn(x) split among the maximal |x|)."""
    y, grad = _vector_norm(x, ord, dim, keepdim, dtype)
    return y, lambda dy: (NoTangent(), grad(dy), *nondiff(3))


def _nuclear_norm(input, dim, keepdim):
    dims = (-2, -1) if dim is None else tuple(dim)
    y = torch.linalg.matrix_norm(input, "nuc", dims, keepdim)

    def grad(dy):
        moved = torch.movedim(input, dims, (-2, -1))
        u, _, vh = torch.linalg.svd(moved, full_matrices=False)
        d = sorted(x % input.dim() for x in dims)
        dy = _unsqueeze(dy, input.shape, d, keepdim)
        dy = torch.movedim(dy, dims, (-2, -1))
        return torch.movedim(dy * (u @ vh), (-2, -1), dims)

    return y, grad


def _norm(input, p, dim, keepdim, dtype):
    """(y, dx(dy)) for torch.norm / Tensor.norm, dispatched as torch.functional.norm does."""
    if isinstance(dim, int):
        dim = [dim]
    if isinstance(p, str):
        if p == "fro" and (dim is None or len(dim) <= 2):
            return _vector_norm(input, 2, dim, keepdim, dtype)
        if p == "nuc" and dtype is None:
            return _nuclear_norm(input, dim, keepdim)
        raise NotImplementedError(f"torch.norm with p={p!r} and dim={dim!r} has no rule")
    return _vector_norm(input, 2.0 if p is None else p, dim, keepdim, dtype)


@rrule(torch.norm)
def norm(input, p="fro", dim=None, keepdim=False, out=None, dtype=None):
    """y = ||x||_p over dim ('fro': the 2-norm; 'nuc': the nuclear norm of a matrix);
    dx = dy * sgn(x) |x|^(p-1) / y^(p-1) (2-norm: dy x / y, 0 at 0; nuclear: dy U V^H)."""
    if out is not None:
        raise TypeError("out= is not differentiable; assign the result instead")
    y, grad = _norm(input, p, dim, keepdim, dtype)
    return y, lambda dy: (NoTangent(), grad(dy), *nondiff(5))


@rrule(Tensor.norm)
def norm_method(input, p="fro", dim=None, keepdim=False, dtype=None):
    """x.norm(p, dim, keepdim, dtype) = torch.norm(x, ...): y = ||x||_p;  dx as for torch.norm."""
    y, grad = _norm(input, p, dim, keepdim, dtype)
    return y, lambda dy: (NoTangent(), grad(dy), *nondiff(4))


# -- cumsum -----------------------------------------------------------------------------------------

@rrule(torch.cumsum, Tensor.cumsum)
def cumsum(input, dim, *, dtype=None):
    """y_k = sum_{j <= k} x_j along dim;  dx_j = sum_{k >= j} dy_k (a reversed cumulative sum)."""
    y = torch.cumsum(input, dim, dtype=dtype)

    def pullback(dy):
        if input.dim() == 0:
            return NoTangent(), dy, NoTangent()
        d = dim % input.dim()
        return NoTangent(), dy.flip(d).cumsum(d).flip(d), NoTangent()

    return y, pullback


# -- aminmax ---------------------------------------------------------------------------------------

@rrule(torch.aminmax, Tensor.aminmax)
def aminmax(input, *, dim=None, keepdim=False, out=None):
    """(min, max) over dim (or everything);  dx = dmin split evenly over the elements equal to the
    min, plus dmax likewise (amin/amax's convention)."""
    y = torch.aminmax(input, dim=dim, keepdim=keepdim)
    dims = tuple(range(input.dim())) if dim is None else (dim % builtins.max(input.dim(), 1),)

    def expand(t):
        if not keepdim and input.dim():
            t = t.reshape([1 if i in dims else n for i, n in enumerate(input.shape)])
        return t.expand(input.shape) if input.dim() else t.reshape(())

    def pullback(dy):
        dx = torch.zeros_like(input)
        for v, d in zip(y, dy):
            d = materialize(d, like=v)
            mask = input == expand(v)
            count = mask.sum(dims, keepdim=True) if input.dim() else mask.to(input.dtype)
            dx = dx + mask * expand(d) / count
        return NoTangent(), dx

    return y, pullback


# -- segment_reduce --------------------------------------------------------------------------------

_SEGMENT_INIT = {"sum": 0.0, "mean": 0.0, "prod": 1.0, "max": float("-inf"), "min": float("inf")}
_SEGMENT_REDUCE = {"sum": "sum", "mean": "sum", "prod": "prod", "max": "amax", "min": "amin"}


def _segment_decomposition(data, reduce, lengths, axis, initial):
    """torch's segment_reduce (initial folded into every segment, an empty segment's mean is
    initial or NaN), as a scatter_reduce over segment ids, written with ruled ops."""
    axis = axis % data.dim()
    lead, n, trail = data.shape[:axis], data.shape[axis], data.shape[axis + 1:]
    b = math.prod(lead)
    t = math.prod(trail)
    s = lengths.shape[-1]
    x = data.reshape(b, n, t)
    ends = lengths.reshape(-1, s).expand(b, s).cumsum(-1)
    ids = torch.searchsorted(ends.contiguous(), torch.arange(n, device=data.device).expand(b, n).contiguous(),
                             right=True)
    init = _SEGMENT_INIT[reduce] if initial is None else float(initial)
    base = x.new_full((b, s + 1, t), init)
    out = base.scatter_reduce(1, ids.unsqueeze(-1).expand(b, n, t), x, _SEGMENT_REDUCE[reduce], include_self=True)
    out = out[:, :s]
    if reduce == "mean":
        count = lengths.reshape(-1, s).expand(b, s).unsqueeze(-1).to(out.dtype)
        empty = float("nan") if initial is None else float(initial)
        out = torch.where(count > 0, out / count.clamp_min(1), empty)
    return out.reshape(tuple(lead) + (s,) + tuple(trail))


@rrule(torch.segment_reduce)
def segment_reduce(data, reduce, *, lengths=None, indices=None, offsets=None, axis=0, unsafe=False, initial=None):
    """y = the sum / mean / prod / max / min of each segment of data along axis (segments given by
    lengths or offsets, ``initial`` folded into each);  ddata through the rule of scatter_reduce
    (max/min: split over ties, like torch)."""
    lens = lengths if lengths is not None else offsets.diff(dim=-1)
    y, back = _via_rules(lambda x: _segment_decomposition(x, reduce, lens, axis, initial), data,
                         value=lambda: torch.segment_reduce(data, reduce, lengths=lengths, indices=indices,
                                                            offsets=offsets, axis=axis, unsafe=unsafe, initial=initial))
    return y, lambda dy: back(dy) + nondiff(1)
