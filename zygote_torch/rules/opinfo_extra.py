"""Rules the OpInfo sweep (tests/opinfo_sweep.py) found missing, outside the families other modules
cover: activations (softmin, hardswish, hardsigmoid, celu, selu, softsign, tanhshrink, hardshrink,
softshrink, threshold, glu, prelu, rrelu), the feature and alpha dropouts, the ``*_copy`` view
copies and other shape ops (atleast_nd, block_diag, cartesian_prod, combinations, meshgrid,
h/v/dsplit, unsafe_split/chunk, rot90, diagflat, the ``*_scatter`` ops, as_strided, unfold, kron,
repeat_interleave, sum_to_size, put), aminmax and quantile, differences and integrals (diff,
trapezoid, cumulative_trapezoid), statistics (cov, corrcoef), distances (cdist, pdist, dist,
pairwise_distance, cosine_similarity), bilinear, renorm, scatter_reduce and index_reduce,
embedding_bag, the sampling ops (normal, bernoulli), and the remaining losses of
``torch.nn.functional``.

Most are written out as math. Composite ones (most losses and distances) are rules *via rules*:
``_via_rules(decomposition, *args)`` differentiates the decomposition, written with ops that have
rules, with zygote_torch itself (ChainRules' ``rrule_via_ad``), so the op is one node of the tape
whose pullback is the composition of those rules' pullbacks. It refuses a decomposition that
reaches the torch.func fallback, so no fallback hides inside a rule.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ._util import NoTangent, _via_rules, conj, grad_like, is_float_tensor, materialize, nondiff, unbroadcast

Tensor = torch.Tensor


def _reduce(loss, reduction):
    """torch's loss reduction ('none' | 'mean' | 'sum'), as the legacy size_average/reduce flags resolve."""
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"{reduction} is not a valid value for reduction")


def _reduction(size_average, reduce, reduction):
    if size_average is None and reduce is None:
        return reduction
    from torch.nn import _reduction as _R
    return _R.legacy_get_string(size_average, reduce, emit_warning=False)


# -- activations ------------------------------------------------------------------------------------

def _softmax_dim(ndim: int) -> int:
    return 0 if ndim in (0, 1, 3) else 1


@rrule(F.softmin)
def softmin(input, dim=None, _stacklevel=3, dtype=None):
    """y = softmax(-x);  dx = -y * (dy - sum(dy * y, dim))."""
    if dim is None:
        dim = _softmax_dim(input.dim())
    y = F.softmin(input, dim, dtype=dtype)

    def pullback(dy):
        dx = -(y * (dy - (dy * y).sum(dim, keepdim=True)))
        return NoTangent(), grad_like(dx, input), NoTangent(), NoTangent(), NoTangent()

    return y, pullback


@rrule(F.hardswish)
def hardswish(input, inplace=False):
    """y = x * relu6(x + 3) / 6;  dx = 0 for x < -3, dy * (x/3 + 1/2) for -3 <= x <= 3, dy above
    (torch's convention at the kinks)."""
    y = F.hardswish(input)

    def pullback(dy):
        dx = torch.where(input < -3, 0.0, torch.where(input <= 3, dy * (input / 3 + 0.5), dy))
        return NoTangent(), dx.to(input.dtype), NoTangent()

    return y, pullback


@rrule(F.hardsigmoid)
def hardsigmoid(input, inplace=False):
    """y = relu6(x + 3) / 6;  dx = dy / 6 for -3 < x < 3, else 0."""
    y = F.hardsigmoid(input)
    return y, lambda dy: (NoTangent(), torch.where((input > -3) & (input < 3), dy / 6, 0.0).to(input.dtype),
                          NoTangent())


@rrule(F.celu, torch.celu)
def celu(input, alpha=1.0, inplace=False):
    """y = max(0, x) + min(0, alpha * (exp(x / alpha) - 1));  dx = dy for x > 0, dy * exp(x / alpha)
    otherwise."""
    y = torch.celu(input, alpha)
    return y, lambda dy: (NoTangent(), torch.where(input > 0, dy, dy * torch.exp(input / alpha)), NoTangent(),
                          NoTangent())


_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717


@rrule(F.selu, torch.selu)
def selu(input, inplace=False):
    """y = scale * (max(0, x) + min(0, alpha * (exp(x) - 1)));  dx = scale * dy for x > 0,
    scale * alpha * exp(x) * dy otherwise."""
    y = torch.selu(input)
    return y, lambda dy: (NoTangent(), torch.where(input > 0, dy * _SELU_SCALE,
                                                   dy * (_SELU_SCALE * _SELU_ALPHA) * torch.exp(input)), NoTangent())


@rrule(F.softsign)
def softsign(input):
    """y = x / (1 + |x|);  dx = dy / (1 + |x|)^2 (complex x: through the rules of abs and division)."""
    if input.is_complex():
        return _via_rules(lambda x: x / (x.abs() + 1), input)
    d = 1 + input.abs()
    return input / d, lambda dy: (NoTangent(), dy / (d * d))


@rrule(F.tanhshrink)
def tanhshrink(input):
    """y = x - tanh(x);  dx = dy * tanh(x)^2."""
    t = torch.tanh(input)
    return input - t, lambda dy: (NoTangent(), dy * conj(t * t))


@rrule(F.hardshrink, torch.hardshrink, Tensor.hardshrink)
def hardshrink(input, lambd=0.5):
    """y = x where |x| > lambd, else 0;  dx = dy where |x| > lambd, else 0."""
    y = torch.hardshrink(input, lambd)
    return y, lambda dy: (NoTangent(), torch.where(input.abs() > lambd, dy, 0.0).to(dy.dtype), NoTangent())


@rrule(F.softshrink)
def softshrink(input, lambd=0.5):
    """y = x - lambd for x > lambd, x + lambd for x < -lambd, else 0;  dx = dy where |x| > lambd."""
    y = F.softshrink(input, lambd)
    return y, lambda dy: (NoTangent(), torch.where(input.abs() > lambd, dy, 0.0).to(dy.dtype), NoTangent())


@rrule(F.threshold, F._threshold, torch.threshold)
def threshold(input, threshold, value, inplace=False):
    """y = x where x > threshold, else value;  dx = dy where x > threshold, else 0."""
    y = torch.threshold(input, threshold, value)
    return y, lambda dy: (NoTangent(), torch.where(input > threshold, dy, 0.0).to(dy.dtype), NoTangent(),
                          NoTangent(), NoTangent())


@rrule(F.glu)
def glu(input, dim=-1):
    """a, b = halves of x along dim;  y = a * sigmoid(b);  da = dy * s,  db = dy * a * s * (1 - s)."""
    a, b = input.chunk(2, dim)
    s = torch.sigmoid(b)
    y = a * s

    def pullback(dy):
        return NoTangent(), torch.cat([dy * s, dy * a * s * (1 - s)], dim), NoTangent()

    return y, pullback


@rrule(F.prelu, torch.prelu)
def prelu(input, weight):
    """y = x for x > 0, w * x otherwise (w per channel, dim 1);  dx = dy or w * dy,
    dw = sum of dy * x over the non-positive x of each channel."""
    y = torch.prelu(input, weight)
    if weight.numel() == 1:
        w = weight.reshape(())
    elif input.dim() > 1:
        w = weight.reshape((weight.numel(),) + (1,) * (input.dim() - 2))
    else:
        w = weight

    def pullback(dy):
        pos = input > 0
        dx = torch.where(pos, dy, w * dy) if is_float_tensor(input) else NoTangent()
        dw = unbroadcast(torch.where(pos, 0.0, input * dy), w.shape).reshape(weight.shape) \
            if is_float_tensor(weight) else NoTangent()
        return NoTangent(), dx, dw

    return y, pullback


@rrule(F.rrelu, torch.rrelu)
def rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    """y = x for x >= 0, a * x otherwise, a ~ U(lower, upper) per element when training, else
    (lower + upper) / 2;  dx = dy * slope.  The slopes torch drew are read back as y / x."""
    y = torch.rrelu(input, lower, upper, training)
    mid = (lower + upper) / 2
    if training:
        safe = torch.where(input == 0, 1.0, input)
        slope = torch.where(input > 0, 1.0, torch.where(input == 0, mid, y / safe))
    else:
        slope = torch.where(input > 0, 1.0, mid)
    slope = slope.to(input.dtype)
    return y, lambda dy: (NoTangent(), dy * slope) + nondiff(4)


# -- dropout variants -------------------------------------------------------------------------------

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


# -- elementwise odds and ends -------------------------------------------------------------------

@rrule(torch.nextafter, Tensor.nextafter)
def nextafter(input, other, *, out=None):
    """y = the next float after x towards other;  dx = dy (y - x is below rounding), dother = 0, as
    torch defines it."""
    y = torch.nextafter(input, other)
    return y, lambda dy: (NoTangent(), grad_like(dy, input) if is_float_tensor(input) else NoTangent(), NoTangent())


@rrule(torch.frexp, Tensor.frexp)
def frexp(input, *, out=None):
    """(mantissa, exponent) with x = mantissa * 2^exponent;  dx = dmantissa / 2^exponent."""
    y = torch.frexp(input)

    def pullback(dy):
        dm = materialize(dy[0], like=y.mantissa)
        return NoTangent(), dm / torch.exp2(y.exponent.to(dm.dtype))

    return y, pullback


@rrule(torch.fill)
def fill(input, value):
    """y = value everywhere (out of place);  dx = 0,  dvalue = sum(dy) for a tensor value."""
    y = torch.fill(input, value)
    return y, lambda dy: (NoTangent(), torch.zeros_like(dy) if is_float_tensor(input) else NoTangent(),
                          grad_like(dy.sum(), value) if is_float_tensor(value) else NoTangent())


# -- the *_copy views and aliases --------------------------------------------------------------------

def _clone_of(view):
    """The rule of ``<view>_copy``: the view's rule, then clone's."""
    def rule(input, *args):
        return _via_rules(lambda x, *a: view(x, *a).clone(), input, *args)
    return rule


@rrule(torch.expand_copy)
def expand_copy(input, size, *, implicit=False):
    """y = expand(x, size), copied;  dx = dy summed over the expanded dimensions."""
    return _clone_of(lambda x, s: x.expand(s))(input, size)


@rrule(torch.diagonal_copy)
def diagonal_copy(input, offset=0, dim1=0, dim2=1):
    """y = diagonal(x), copied;  dx = dy written on the diagonal of zeros."""
    return _clone_of(torch.diagonal)(input, offset, dim1, dim2)


@rrule(torch.alias_copy)
def alias_copy(input):
    """y = copy of x;  dx = dy."""
    return input.clone(), lambda dy: (NoTangent(), dy)


@rrule(torch.view_copy)
def view_copy(input, size):
    """y = x.view(size), copied (a dtype instead of a size reinterprets the bits: not differentiable);
    dx = dy.reshape(x.shape)."""
    if isinstance(size, torch.dtype):
        return torch.view_copy(input, size), lambda dy: (NoTangent(), NoTangent(), NoTangent())
    return _clone_of(lambda x, s: x.view(s))(input, size)


@rrule(torch.unsqueeze_copy)
def unsqueeze_copy(input, dim):
    """y = unsqueeze(x, dim), copied;  dx = dy.squeeze(dim)."""
    return _clone_of(torch.unsqueeze)(input, dim)


@rrule(torch.squeeze_copy)
def squeeze_copy(input, dim=None):
    """y = squeeze(x, dim), copied;  dx = dy.reshape(x.shape)."""
    if dim is None:
        return _clone_of(lambda x, d: torch.squeeze(x))(input, dim)
    return _clone_of(torch.squeeze)(input, dim)


@rrule(torch.transpose_copy)
def transpose_copy(input, dim0, dim1):
    """y = transpose(x), copied;  dx = transpose(dy)."""
    return _clone_of(torch.transpose)(input, dim0, dim1)


@rrule(torch.t_copy)
def t_copy(input):
    """y = t(x), copied;  dx = t(dy)."""
    return _clone_of(torch.t)(input)


@rrule(torch.permute_copy)
def permute_copy(input, dims):
    """y = permute(x, dims), copied;  dx = dy permuted back."""
    return _clone_of(torch.permute)(input, dims)


@rrule(torch.unfold_copy)
def unfold_copy(input, dimension, size, step):
    """y = x.unfold(dimension, size, step), copied (see ``unfold``)."""
    return _clone_of(lambda x, d, s, st: x.unfold(d, s, st))(input, dimension, size, step)


@rrule(torch.as_strided_copy)
def as_strided_copy(input, size, stride, storage_offset=None):
    """y = as_strided(x, ...), copied (see ``as_strided``)."""
    return _clone_of(torch.as_strided)(input, size, stride, storage_offset)


def _join_pieces(ys, dim):
    """The pullback of a split into ``ys`` along ``dim``: the pieces' cotangents concatenated."""
    def pullback(dys):
        return torch.cat([materialize(d, like=y) for d, y in zip(dys, ys)], dim)
    return pullback


@rrule(torch.unbind_copy)
def unbind_copy(input, dim=0):
    """ys = unbind(x, dim), copied;  dx = stack(dys, dim)."""
    ys = torch.unbind_copy(input, dim)
    return ys, lambda dys: (NoTangent(), torch.stack([materialize(d, like=y) for d, y in zip(dys, ys)], dim),
                            NoTangent())


@rrule(torch.split_with_sizes_copy)
def split_with_sizes_copy(input, split_sizes, dim=0):
    """ys = split(x, sizes, dim), copied;  dx = cat(dys, dim)."""
    ys = torch.split_with_sizes_copy(input, split_sizes, dim)
    back = _join_pieces(ys, dim)
    return ys, lambda dys: (NoTangent(), back(dys), NoTangent(), NoTangent())


@rrule(torch.unsafe_split, Tensor.unsafe_split)
def unsafe_split(tensor, split_size, dim=0):
    """ys = split(x, split_size, dim);  dx = cat(dys, dim)."""
    ys = torch.unsafe_split(tensor, split_size, dim)
    back = _join_pieces(ys, dim)
    return ys, lambda dys: (NoTangent(), back(dys), NoTangent(), NoTangent())


@rrule(torch.unsafe_chunk, Tensor.unsafe_chunk)
def unsafe_chunk(input, chunks, dim=0):
    """ys = chunk(x, chunks, dim);  dx = cat(dys, dim)."""
    ys = torch.unsafe_chunk(input, chunks, dim)
    back = _join_pieces(ys, dim)
    return ys, lambda dys: (NoTangent(), back(dys), NoTangent(), NoTangent())


def _make_nsplit(fn, dim_of):
    def rule(input, indices_or_sections):
        """ys = the pieces of x along one dimension;  dx = cat(dys) along it."""
        ys = fn(input, indices_or_sections)
        back = _join_pieces(ys, dim_of(input))
        return ys, lambda dys: (NoTangent(), back(dys), NoTangent())
    return rule


rrule(torch.hsplit, Tensor.hsplit)(_make_nsplit(torch.hsplit, lambda x: 1 if x.dim() > 1 else 0))
rrule(torch.vsplit, Tensor.vsplit)(_make_nsplit(torch.vsplit, lambda x: 0))
rrule(torch.dsplit, Tensor.dsplit)(_make_nsplit(torch.dsplit, lambda x: 2))


# -- other shape ops -------------------------------------------------------------------------------

def _make_atleast(fn):
    def rule(*tensors):
        """y = x with leading (or, for 3-d, trailing) dimensions of size 1 added;  dx = dy reshaped
        back. One tensor gives one tensor; several (or a sequence) give a tuple."""
        y = fn(*tensors)
        if len(tensors) == 1 and isinstance(tensors[0], Tensor):
            return y, lambda dy: (NoTangent(), dy.reshape(tensors[0].shape))
        xs = tensors[0] if len(tensors) == 1 else tensors

        def pullback(dys):
            grads = [materialize(d, like=t).reshape(x.shape) for d, t, x in zip(dys, y, xs)]
            return (NoTangent(), grads) if len(tensors) == 1 else (NoTangent(), *grads)

        return y, pullback
    return rule


rrule(torch.atleast_1d, torch.functional.atleast_1d)(_make_atleast(torch.atleast_1d))
rrule(torch.atleast_2d, torch.functional.atleast_2d)(_make_atleast(torch.atleast_2d))
rrule(torch.atleast_3d, torch.functional.atleast_3d)(_make_atleast(torch.atleast_3d))


@rrule(torch.block_diag, torch.functional.block_diag)
def block_diag(*tensors):
    """y = the tensors (as matrices: 0-d is 1x1, 1-d is 1xn) on the diagonal of zeros;  dt = the
    matching block of dy."""
    y = torch.block_diag(*tensors)

    def pullback(dy):
        out, r, c = [NoTangent()], 0, 0
        for t in tensors:
            rows, cols = (1, 1) if t.dim() == 0 else (1, t.shape[0]) if t.dim() == 1 else tuple(t.shape)
            out.append(grad_like(dy[r:r + rows, c:c + cols].reshape(t.shape), t) if is_float_tensor(t)
                       else NoTangent())
            r, c = r + rows, c + cols
        return tuple(out)

    return y, pullback


@rrule(torch.meshgrid, torch.functional.meshgrid)
def meshgrid(*tensors, indexing=None):
    """ys[i] = tensors[i] broadcast along the other axes;  dt_i = dys[i] summed over them
    (``indexing='xy'`` swaps the first two axes)."""
    ys = torch.meshgrid(*tensors, indexing=indexing or "ij")
    xs = tensors[0] if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)) else tensors
    n = len(xs)

    def axis(i):
        if indexing == "xy" and n >= 2 and i < 2:
            return 1 - i
        return i

    def pullback(dys):
        grads = []
        for i, (x, d, y) in enumerate(zip(xs, dys, ys)):
            d = materialize(d, like=y)
            others = [k for k in range(n) if k != axis(i)]
            grads.append(d.sum(others).reshape(x.shape) if others else d.reshape(x.shape))
        if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            return NoTangent(), grads
        return (NoTangent(), *grads)

    return ys, pullback


@rrule(torch.cartesian_prod, torch.functional.cartesian_prod)
def cartesian_prod(*tensors):
    """y = every combination of the 1-d tensors' elements, one per row;  dt_i = column i of dy
    summed over the other tensors' axes."""
    if len(tensors) == 1:
        return tensors[0].view_as(tensors[0]), lambda dy: (NoTangent(), dy)
    y = torch.cartesian_prod(*tensors)
    sizes = [t.shape[0] for t in tensors]

    def pullback(dy):
        grid = dy.reshape(*sizes, len(tensors))
        n = len(tensors)
        return (NoTangent(), *[grid[..., i].sum([k for k in range(n) if k != i]) for i in range(n)])

    return y, pullback


@rrule(torch.combinations)
def combinations(input, r=2, with_replacement=False):
    """y[k] = x[idx[k]] for the index combinations idx (they depend only on len(x));
    dx = dy scattered back (accumulating repeats)."""
    y = torch.combinations(input, r, with_replacement)
    idx = torch.combinations(torch.arange(input.shape[0], device=input.device), r, with_replacement)

    def pullback(dy):
        dx = dy.new_zeros(input.shape).index_add(0, idx.reshape(-1), dy.reshape(-1)) if dy.numel() \
            else dy.new_zeros(input.shape)
        return NoTangent(), dx, NoTangent(), NoTangent()

    return y, pullback


@rrule(torch.rot90, Tensor.rot90)
def rot90(input, k=1, dims=(0, 1)):
    """y = x rotated k quarter turns in the plane dims;  dx = dy rotated -k quarter turns."""
    y = torch.rot90(input, k, dims)
    return y, lambda dy: (NoTangent(), torch.rot90(dy, -k, dims), NoTangent(), NoTangent())


@rrule(torch.diagflat, Tensor.diagflat)
def diagflat(input, offset=0):
    """y = diag(flatten(x), offset);  dx = the offset diagonal of dy, reshaped."""
    y = torch.diagflat(input, offset)
    return y, lambda dy: (NoTangent(), torch.diagonal(dy, offset).reshape(input.shape), NoTangent())


@rrule(torch.diagonal_scatter, Tensor.diagonal_scatter)
def diagonal_scatter(input, src, offset=0, dim1=0, dim2=1):
    """y = x with its diagonal replaced by src;  dx = dy with a zero diagonal,  dsrc = diagonal(dy)."""
    y = torch.diagonal_scatter(input, src, offset, dim1, dim2)

    def pullback(dy):
        dx = torch.diagonal_scatter(dy, torch.zeros_like(src, dtype=dy.dtype), offset, dim1, dim2)
        ds = torch.diagonal(dy, offset, dim1, dim2)
        return (NoTangent(), grad_like(dx, input) if is_float_tensor(input) else NoTangent(),
                grad_like(ds, src) if is_float_tensor(src) else NoTangent()) + nondiff(3)

    return y, pullback


@rrule(torch.select_scatter, Tensor.select_scatter)
def select_scatter(input, src, dim, index):
    """y = x with x.select(dim, index) replaced by src;  dx = dy with that slice zeroed,
    dsrc = dy.select(dim, index)."""
    y = torch.select_scatter(input, src, dim, index)

    def pullback(dy):
        dx = torch.select_scatter(dy, torch.zeros_like(src, dtype=dy.dtype), dim, index)
        return (NoTangent(), grad_like(dx, input) if is_float_tensor(input) else NoTangent(),
                grad_like(dy.select(dim, index), src) if is_float_tensor(src) else NoTangent()) + nondiff(2)

    return y, pullback


def _slice(t, dim, start, end, step):
    return t[(slice(None),) * (dim % max(t.dim(), 1)) + (slice(start, end, step),)]


@rrule(torch.slice_scatter, Tensor.slice_scatter)
def slice_scatter(input, src, dim=0, start=None, end=None, step=1):
    """y = x with x[start:end:step] along dim replaced by src;  dx = dy with that slice zeroed,
    dsrc = dy[start:end:step] along dim."""
    y = torch.slice_scatter(input, src, dim, start, end, step)

    def pullback(dy):
        dx = torch.slice_scatter(dy, torch.zeros_like(src, dtype=dy.dtype), dim, start, end, step)
        return (NoTangent(), grad_like(dx, input) if is_float_tensor(input) else NoTangent(),
                grad_like(_slice(dy, dim, start, end, step), src) if is_float_tensor(src) else NoTangent()) \
            + nondiff(4)

    return y, pullback


@rrule(torch.ops.aten.slice.Tensor, torch.ops.aten.slice)
def aten_slice(input, dim=0, start=None, end=None, step=1):
    """y = x[start:end:step] along dim;  dx = zeros with dy written at the slice."""
    y = torch.ops.aten.slice.Tensor(input, dim, start, end, step)
    return y, lambda dy: (NoTangent(), torch.slice_scatter(torch.zeros_like(input, dtype=dy.dtype), dy, dim,
                                                           start, end, step)) + nondiff(4)


def _extent(shape, stride, offset) -> int:
    """One past the last storage element a geometry reaches (0 for an empty one)."""
    if any(s == 0 for s in shape):
        return 0
    return offset + sum((n - 1) * st for n, st in zip(shape, stride)) + 1


@rrule(torch.as_strided, Tensor.as_strided)
def as_strided(input, size, stride, storage_offset=None):
    """y = the elements of x's storage at the given geometry;  dx = the cotangent scattered back to
    storage positions (accumulating where y's elements overlap) and read at x's own geometry."""
    y = torch.as_strided(input, size, stride, storage_offset)
    offset = input.storage_offset() if storage_offset is None else storage_offset

    def pullback(dy):
        n = max(_extent(input.shape, input.stride(), input.storage_offset()), _extent(size, stride, offset))
        positions = torch.arange(n, device=dy.device).as_strided(size, stride, offset)
        storage = dy.new_zeros(n).index_add(0, positions.reshape(-1), dy.reshape(-1))
        dx = storage.as_strided(input.shape, input.stride(), input.storage_offset()).clone()
        return NoTangent(), dx, NoTangent(), NoTangent(), NoTangent()

    return y, pullback


@rrule(torch.as_strided_scatter, Tensor.as_strided_scatter)
def as_strided_scatter(input, src, size, stride, storage_offset=None):
    """y = a contiguous copy of x with the strided view replaced by src;  dx = dy with that view
    zeroed,  dsrc = dy read at the view."""
    y = torch.as_strided_scatter(input, src, size, stride, storage_offset)

    def pullback(dy):
        dy = dy.clone(memory_format=torch.contiguous_format)  # a fresh storage: the geometry is relative to it
        dx = torch.as_strided_scatter(dy, torch.zeros_like(src, dtype=dy.dtype), size, stride, storage_offset)
        ds = dy.as_strided(size, stride, storage_offset).clone() if is_float_tensor(src) else NoTangent()
        return (NoTangent(), grad_like(dx, input) if is_float_tensor(input) else NoTangent(), ds) + nondiff(3)

    return y, pullback


@rrule(Tensor.unfold)
def unfold(input, dimension, size, step):
    """y = the windows of x along ``dimension`` (a new last axis of length size);  dx = dy summed
    back onto the window positions (windows may overlap)."""
    y = input.unfold(dimension, size, step)
    if input.dim() == 0:
        return y, lambda dy: (NoTangent(), dy.sum().reshape(())) + nondiff(3)
    d = dimension % input.dim()
    idx = torch.arange(input.shape[d], device=input.device).unfold(0, size, step).reshape(-1)

    def pullback(dy):
        t = dy.movedim(d, -2).flatten(-2)  # (..., windows * size)
        zeros = dy.new_zeros(t.shape[:-1] + (input.shape[d],))
        dx = zeros.index_add(-1, idx, t) if t.numel() else zeros
        return (NoTangent(), dx.movedim(-1, d)) + nondiff(3)

    return y, pullback


def _interleave(a, b):
    return tuple(x for pair in zip(a, b) for x in pair)


@rrule(torch.kron, Tensor.kron)
def kron(input, other, *, out=None):
    """y = kron(a, b), y[i*B + j] = a[i] * b[j] per axis;  da = sum over b's axes of dy * conj(b),
    db = sum over a's axes of dy * conj(a) (dy viewed as (a0, b0, a1, b1, ...))."""
    y = torch.kron(input, other)
    nd = max(input.dim(), other.dim())
    a_shape = (1,) * (nd - input.dim()) + tuple(input.shape)
    b_shape = (1,) * (nd - other.dim()) + tuple(other.shape)

    def pullback(dy):
        g = dy.reshape(_interleave(a_shape, b_shape))
        a = input.reshape(_interleave(a_shape, (1,) * nd))
        b = other.reshape(_interleave((1,) * nd, b_shape))
        da = (g * conj(b)).sum(tuple(range(1, 2 * nd, 2))).reshape(input.shape) if is_float_tensor(input) \
            else NoTangent()
        db = (g * conj(a)).sum(tuple(range(0, 2 * nd, 2))).reshape(other.shape) if is_float_tensor(other) \
            else NoTangent()
        return NoTangent(), da, db

    return y, pullback


@rrule(torch.repeat_interleave, Tensor.repeat_interleave)
def repeat_interleave(input, repeats=None, dim=None, *, output_size=None):
    """y = each element (slice along dim) of x repeated;  dx = dy summed over the repeats of each.
    (``repeat_interleave(repeats)`` alone gives indices: not differentiable.)"""
    if repeats is None:
        return torch.repeat_interleave(input), lambda dy: (NoTangent(),) + nondiff(2)
    y = torch.repeat_interleave(input, repeats, dim, output_size=output_size)
    x = input.reshape(-1) if dim is None else input
    d = 0 if dim is None else dim % max(input.dim(), 1)

    def pullback(dy):
        if x.dim() == 0:
            return NoTangent(), dy.sum().reshape(input.shape), NoTangent(), NoTangent()
        idx = torch.repeat_interleave(torch.arange(x.shape[d], device=dy.device), repeats,
                                      output_size=output_size)
        dx = dy.new_zeros(x.shape).index_add(d, idx, dy)
        return NoTangent(), dx.reshape(input.shape), NoTangent(), NoTangent()

    return y, pullback


@rrule(Tensor.sum_to_size)
def sum_to_size(input, *size):
    """y = x summed down to size (the adjoint of expanding);  dx = dy expanded back."""
    shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
    y = input.sum_to_size(shape)
    return y, lambda dy: (NoTangent(), dy.expand(input.shape)) + nondiff(len(size))


@rrule(torch.put, Tensor.put)
def put(input, index, source, accumulate=False):
    """y = x with flat positions index set to (or, accumulating, incremented by) source;
    dx = dy (zeroed at index unless accumulating),  dsource = dy.take(index)."""
    y = torch.put(input, index, source, accumulate)

    def pullback(dy):
        dx = dy if accumulate else dy.put(index, torch.zeros_like(source, dtype=dy.dtype))
        ds = dy.take(index).reshape(source.shape)
        return (NoTangent(), dx if is_float_tensor(input) else NoTangent(), NoTangent(),
                ds if is_float_tensor(source) else NoTangent(), NoTangent())

    return y, pullback


# -- sorting and selection ----------------------------------------------------------------------------

@rrule(torch.aminmax, Tensor.aminmax)
def aminmax(input, *, dim=None, keepdim=False, out=None):
    """(min, max) over dim (or everything);  dx = dmin split evenly over the elements equal to the
    min, plus dmax likewise (amin/amax's convention)."""
    y = torch.aminmax(input, dim=dim, keepdim=keepdim)
    dims = tuple(range(input.dim())) if dim is None else (dim % max(input.dim(), 1),)

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


# -- differences, integrals, statistics -------------------------------------------------------------

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


# -- distances and bilinear -----------------------------------------------------------------------------

@rrule(torch.cdist, torch.functional.cdist)
def cdist(x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """y[..., i, j] = ||x1[..., i, :] - x2[..., j, :]||_p;  dx1, dx2 through the rules of sub and
    vector_norm (0 at zero distance, like torch)."""
    y, back = _via_rules(lambda a, b: torch.linalg.vector_norm(a.unsqueeze(-2) - b.unsqueeze(-3), p, -1), x1, x2,
                         value=lambda: torch.cdist(x1, x2, p, compute_mode))
    return y, lambda dy: back(dy) + nondiff(2)


@rrule(torch.pdist, F.pdist)
def pdist(input, p=2):
    """y = ||x_i - x_j||_p for the row pairs i < j, row-major;  dx through gather, sub, vector_norm."""
    n = input.shape[0]
    i, j = torch.triu_indices(n, n, 1, device=input.device)
    y, back = _via_rules(lambda x: torch.linalg.vector_norm(x[i] - x[j], p, -1), input,
                         value=lambda: torch.pdist(input, p))
    return y, lambda dy: back(dy) + nondiff(1)


@rrule(torch.dist, Tensor.dist)
def dist(input, other, p=2):
    """y = ||x - other||_p over all elements;  through the rules of sub and vector_norm."""
    y, back = _via_rules(lambda a, b: torch.linalg.vector_norm(a - b, p), input, other,
                         value=lambda: torch.dist(input, other, p))
    return y, lambda dy: back(dy) + nondiff(1)


@rrule(torch.pairwise_distance, F.pairwise_distance)
def pairwise_distance(x1, x2, p=2.0, eps=1e-6, keepdim=False):
    """y = ||x1 - x2 + eps||_p over the last dimension;  through the rules of sub, add, vector_norm."""
    d = max(x1.dim(), x2.dim()) - 1
    y, back = _via_rules(lambda a, b: torch.linalg.vector_norm(a - b + eps, p, d if d >= 0 else None, keepdim),
                         x1, x2, value=lambda: torch.pairwise_distance(x1, x2, p, eps, keepdim))
    return y, lambda dy: back(dy) + nondiff(3)


@rrule(torch.cosine_similarity, F.cosine_similarity)
def cosine_similarity(x1, x2, dim=1, eps=1e-8):
    """y = sum((x1 / max(||x1||, eps)) * (x2 / max(||x2||, eps)), dim) on the broadcast inputs; torch
    clamps the norms without differentiating the clamp, and so does this decomposition."""
    def decomposition(a, b):
        shape = torch.broadcast_shapes(a.shape, b.shape)
        a, b = a.expand(shape), b.expand(shape)
        na = torch.linalg.vector_norm(a, 2, dim, keepdim=True)
        nb = torch.linalg.vector_norm(b, 2, dim, keepdim=True)
        na = na + (na.clamp_min(eps) - na).detach()
        nb = nb + (nb.clamp_min(eps) - nb).detach()
        return ((a / na) * (b / nb)).sum(dim)

    y, back = _via_rules(decomposition, x1, x2, value=lambda: torch.cosine_similarity(x1, x2, dim, eps))
    return y, lambda dy: back(dy) + nondiff(2)


@rrule(torch.bilinear, F.bilinear)
def bilinear(input1, input2, weight, bias=None):
    """y[..., k] = x1 W_k x2 + b_k;  through einsum's rule."""
    def decomposition(a, b, w, bb):
        out = torch.einsum("...i,kij,...j->...k", a, w, b)
        return out + bb if bb is not None else out
    return _via_rules(decomposition, input1, input2, weight, bias,
                      value=lambda: torch.bilinear(input1, input2, weight, bias))


# -- losses -----------------------------------------------------------------------------------------
# Each is torch's own formula (ATen's loss kernels or torch.nn.functional's Python), op for op, so
# the subgradients at kinks are torch's: clamp_min where torch clamps, relu where it tests z > 0.

def _loss_rule(decomposition, n_args, value=None):
    """(y, pullback) for a loss whose first ``n_args`` positional arguments may be tensors."""
    def rule(*args):
        y, back = _via_rules(decomposition, *args[:n_args], value=value and (lambda: value(*args)))
        return y, lambda dy: back(dy) + nondiff(len(args) - n_args)
    return rule


@rrule(F.soft_margin_loss)
def soft_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """loss = log(1 + exp(-y x)), reduced;  through the rules of mul, exp, log1p."""
    red = _reduction(size_average, reduce, reduction)
    return _loss_rule(lambda x, t: _reduce(torch.log1p(torch.exp(-x * t)), red), 2)(
        input, target, size_average, reduce, reduction)


@rrule(F.margin_ranking_loss)
def margin_ranking_loss(input1, input2, target, margin=0, size_average=None, reduce=None, reduction="mean"):
    """loss = max(0, -y (x1 - x2) + margin), reduced (torch's clamp_min)."""
    red = _reduction(size_average, reduce, reduction)
    return _loss_rule(lambda a, b, t: _reduce((-t * (a - b) + margin).clamp_min(0), red), 3)(
        input1, input2, target, margin, size_average, reduce, reduction)


@rrule(F.hinge_embedding_loss)
def hinge_embedding_loss(input, target, margin=1.0, size_average=None, reduce=None, reduction="mean"):
    """loss = x where y == 1, max(0, margin - x) where y == -1 (torch sums both masks), reduced."""
    red = _reduction(size_average, reduce, reduction)

    def decomposition(x, t):
        clamp = (margin - x).clamp_min(0)
        out = torch.where(t != 1, clamp, torch.zeros_like(clamp)) + torch.where(t != -1, x, torch.zeros_like(x))
        return _reduce(out, red)

    return _loss_rule(decomposition, 2)(input, target, margin, size_average, reduce, reduction)


@rrule(F.cosine_embedding_loss)
def cosine_embedding_loss(input1, input2, target, margin=0, size_average=None, reduce=None, reduction="mean"):
    """cos = <x1, x2> / sqrt((|x1|^2 + 1e-12)(|x2|^2 + 1e-12));  loss = 1 - cos where y == 1,
    max(0, cos - margin) where y == -1, reduced."""
    red = _reduction(size_average, reduce, reduction)

    def decomposition(a, b, t):
        d = 1 if a.dim() == 2 else 0
        prod = (a * b).sum(d)
        denom = torch.sqrt(((a * a).sum(d) + 1e-12) * ((b * b).sum(d) + 1e-12))
        cos = prod / denom
        zeros = torch.zeros_like(cos)
        out = torch.where(t == 1, 1 - cos, zeros) + torch.where(t == -1, (cos - margin).clamp_min(0), zeros)
        return _reduce(out, red)

    return _loss_rule(decomposition, 3)(input1, input2, target, margin, size_average, reduce, reduction)


@rrule(F.poisson_nll_loss)
def poisson_nll_loss(input, target, log_input=True, full=False, size_average=None, eps=1e-8, reduce=None,
                     reduction="mean"):
    """loss = exp(x) - y x (log_input) or x - y log(x + eps), plus Stirling's term for y > 1 when
    full, reduced."""
    red = _reduction(size_average, reduce, reduction)

    def decomposition(x, t):
        loss = torch.exp(x) - t * x if log_input else x - t * torch.log(x + eps)
        if full:
            stirling = t * torch.log(t) - t + 0.5 * torch.log(2 * math.pi * t)
            loss = loss + stirling.masked_fill(t <= 1, 0)
        return _reduce(loss, red)

    return _loss_rule(decomposition, 2)(input, target, log_input, full, size_average, eps, reduce, reduction)


@rrule(F.gaussian_nll_loss)
def gaussian_nll_loss(input, target, var, full=False, eps=1e-6, reduction="mean"):
    """loss = (log(max(var, eps)) + (x - y)^2 / max(var, eps)) / 2 (+ log(2 pi) / 2 when full), reduced;
    like torch, the clamp of var is not differentiated."""
    def decomposition(x, t, v):
        if not isinstance(v, Tensor):
            v = torch.ones_like(x) * v
        if v.shape != x.shape and x.shape[:-1] == v.shape:
            v = v.unsqueeze(-1)
        v = v + (v.clamp(min=eps) - v).detach()
        loss = 0.5 * (torch.log(v) + (x - t) ** 2 / v)
        if full:
            loss = loss + 0.5 * math.log(2 * math.pi)
        return _reduce(loss, reduction)

    return _loss_rule(decomposition, 3)(input, target, var, full, eps, reduction)


@rrule(F.multilabel_soft_margin_loss)
def multilabel_soft_margin_loss(input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    """loss = -mean over classes of (y logsigmoid(x) + (1 - y) logsigmoid(-x)) (times weight), reduced."""
    red = _reduction(size_average, reduce, reduction)

    def decomposition(x, t, w):
        loss = -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
        if w is not None:
            loss = loss * w
        c = x.dim() - 1
        return _reduce(loss.sum(c) / x.shape[c], red)

    return _loss_rule(decomposition, 3)(input, target, weight, size_average, reduce, reduction)


@rrule(F.multi_margin_loss)
def multi_margin_loss(input, target, p=1, margin=1.0, weight=None, size_average=None, reduce=None,
                      reduction="mean"):
    """loss_n = sum over classes j != y_n of w[y_n] * max(0, margin - x[y_n] + x[j])^p / C (torch's
    z > 0 test), reduced."""
    red = _reduction(size_average, reduce, reduction)

    def decomposition(x, t, w):
        c = x.shape[-1] if x.dim() else 1
        x2, t2 = x.reshape(-1, c), t.reshape(-1, 1)
        z = torch.relu(margin - x2.gather(1, t2) + x2)
        h = z if p == 1 else z * z
        h = torch.where(torch.arange(c, device=x.device) == t2, torch.zeros_like(h), h)
        if w is not None:
            h = h * w[t2.reshape(-1)].unsqueeze(1)
        return _reduce((h.sum(1) / c).reshape(t.shape), red)

    y, back = _via_rules(decomposition, input, target, weight)

    def pullback(dy):
        g = back(dy)
        return (NoTangent(), g[1], g[2], NoTangent(), NoTangent(), g[3]) + nondiff(3)

    return y, pullback


@rrule(F.multilabel_margin_loss)
def multilabel_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """loss_n = sum over target classes j (those before the first -1) and non-target classes k of
    max(0, 1 - (x[j] - x[k])) / C (torch's z > 0 test), reduced."""
    red = _reduction(size_average, reduce, reduction)

    def decomposition(x, t):
        c = x.shape[-1] if x.dim() else 1
        x2, t2 = x.reshape(-1, c), t.reshape(-1, c)
        valid = (t2 >= 0).long().cumprod(1)
        idx = torch.where(valid.bool(), t2, torch.zeros_like(t2))
        is_target = (F.one_hot(idx, c) * valid.unsqueeze(-1)).amax(1)
        z = torch.relu(1 - x2.gather(1, idx).unsqueeze(2) + x2.unsqueeze(1))
        mask = valid.unsqueeze(2) * (1 - is_target).unsqueeze(1)
        loss = (z * mask).sum((1, 2)) / c
        return _reduce(loss.reshape(x.shape[:-1] if x.dim() else ()), red)

    return _loss_rule(decomposition, 2)(input, target, size_average, reduce, reduction)


@rrule(F.triplet_margin_loss)
def triplet_margin_loss(anchor, positive, negative, margin=1.0, p=2, eps=1e-6, swap=False, size_average=None,
                        reduce=None, reduction="mean"):
    """loss = max(0, margin + d(a, p) - d(a, n)), d the pairwise p-distance (with swap: d(a, n)
    replaced by min(d(a, n), d(p, n))), reduced."""
    red = _reduction(size_average, reduce, reduction)

    def decomposition(a, pos, neg):
        d_pos = F.pairwise_distance(a, pos, p, eps)
        d_neg = F.pairwise_distance(a, neg, p, eps)
        if swap:
            d_neg = torch.minimum(d_neg, F.pairwise_distance(pos, neg, p, eps))
        return _reduce((margin + d_pos - d_neg).clamp_min(0), red)

    return _loss_rule(decomposition, 3)(anchor, positive, negative, margin, p, eps, swap, size_average, reduce,
                                        reduction)


@rrule(F.triplet_margin_with_distance_loss)
def triplet_margin_with_distance_loss(anchor, positive, negative, *, distance_function=None, margin=1.0,
                                      swap=False, reduction="mean"):
    """loss = max(0, margin + d(a, p) - d(a, n)) for the given distance (pairwise_distance by
    default; with swap d(a, n) becomes min(d(a, n), d(p, n))), reduced; through the distance's rules."""
    dist_fn = distance_function if distance_function is not None else F.pairwise_distance

    def decomposition(a, pos, neg):
        d_pos = dist_fn(a, pos)
        d_neg = dist_fn(a, neg)
        if swap:
            d_neg = torch.minimum(d_neg, dist_fn(pos, neg))
        return _reduce(torch.clamp_min(margin + d_pos - d_neg, 0), reduction)

    return _via_rules(decomposition, anchor, positive, negative)


def linear_cross_entropy(input, linear_weight, target, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=None, label_smoothing=0.0, options=None):
    """loss = cross_entropy(linear(x, W, b), target, ...) (the reference formula; the chunked
    ``options`` path computes the same loss);  through the rules of linear and cross_entropy.
    (linear_bias and the later parameters are keywords in torch.)"""
    num_batches = tuple(input.shape[:-1])
    num_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    ignore = ignore_index if ignore_index is not None else -100

    def decomposition(x, w, t, b, cw):
        logits = F.linear(x, w.reshape(-1, w.shape[-1]), b.reshape(-1) if b is not None else None)
        logits = logits.reshape(num_batches + (num_classes,) + out_features)
        return F.cross_entropy(logits, t, weight=cw, reduction=reduction, ignore_index=ignore,
                               label_smoothing=label_smoothing)

    y, back = _via_rules(decomposition, input, linear_weight, target, linear_bias, weight)
    return y, lambda dy: back(dy) + nondiff(4)


if hasattr(F, "linear_cross_entropy"):  # new in torch 2.13
    rrule(F.linear_cross_entropy)(linear_cross_entropy)


# -- scatter_reduce and index_reduce -------------------------------------------------------------------

def _reduce_back(kind, reduce, include_self, input, index, src, result, dy, dim):
    """torch's scatter_reduce_backward / index_reduce_backward (FunctionsManual.cpp): ``kind`` is
    'scatter' (gather / scatter_add / scatter) or 'index' (index_select / index_add / index_fill)."""
    if kind == "scatter":
        pick = lambda t: t.gather(dim, index)  # noqa: E731
        add = lambda t, v: t.scatter_add(dim, index, v)  # noqa: E731
        again = lambda t, s: t.scatter_reduce(dim, index, s, reduce, include_self=include_self)  # noqa: E731
        clear = lambda t: t.scatter(dim, index, 0.0)  # noqa: E731
    else:
        pick = lambda t: t.index_select(dim, index)  # noqa: E731
        add = lambda t, v: t.index_add(dim, index, v)  # noqa: E731
        again = lambda t, s: t.index_reduce(dim, index, s, reduce, include_self=include_self)  # noqa: E731
        clear = lambda t: t.index_fill(dim, index, 0.0)  # noqa: E731
    if reduce == "sum":
        d_self, d_src = dy, pick(dy)
    elif reduce == "prod":
        masked_self = input.masked_fill(input == 0, 1)
        d_self = dy * again(masked_self, src) / masked_self
        src_zero = src == 0
        src_zeros = pick(add(torch.zeros_like(input), src_zero.to(input.dtype)))
        single = src_zero & (src_zeros == 1)
        masked_src_result = again(input, src.masked_fill(single, 1))
        d_src = torch.where(single, pick(dy * masked_src_result), pick(dy * result) / src.masked_fill(src_zero, 1))
    elif reduce == "mean":
        n = torch.ones_like(dy) if include_self else torch.zeros_like(dy)
        n = add(n, torch.ones_like(src, dtype=dy.dtype))
        n = n.masked_fill(n == 0, 1)
        d_self, d_src = dy / n, pick(dy) / pick(n)
    else:  # amax, amin: split evenly over every element equal to the result
        self_is = (input == result).to(dy.dtype)
        src_is = (src == pick(result)).to(dy.dtype)
        share = dy / add(self_is, src_is)
        d_self, d_src = self_is * share, src_is * pick(share)
    if not include_self:
        d_self = clear(d_self)
    return d_self, d_src


@rrule(torch.scatter_reduce, Tensor.scatter_reduce)
def scatter_reduce(input, dim, index, src, reduce, *, include_self=True, out=None):
    """y = x with src reduced in (sum, prod, mean, amax, amin) at index along dim;  torch's own
    cotangents: dsrc = gathered dy (times the other factors for prod, over the count for mean, split
    over ties for amax/amin), dx likewise (zeroed where scattered when include_self=False)."""
    y = torch.scatter_reduce(input, dim, index, src, reduce, include_self=include_self)

    def pullback(dy):
        dx, ds = _reduce_back("scatter", reduce, include_self, input, index, src, y, dy, dim)
        return (NoTangent(), dx if is_float_tensor(input) else NoTangent(), NoTangent(), NoTangent(),
                ds if is_float_tensor(src) else NoTangent(), NoTangent())

    return y, pullback


@rrule(torch.index_reduce, Tensor.index_reduce)
def index_reduce(input, dim, index, source, reduce, *, include_self=True, out=None):
    """y = x with the slices of source reduced in (prod, mean, amax, amin) at index along dim;
    torch's own cotangents (see scatter_reduce, with index_select for gather)."""
    y = torch.index_reduce(input, dim, index, source, reduce, include_self=include_self)

    def pullback(dy):
        dx, ds = _reduce_back("index", reduce, include_self, input, index, source, y, dy, dim)
        return (NoTangent(), dx if is_float_tensor(input) else NoTangent(), NoTangent(), NoTangent(),
                ds if is_float_tensor(source) else NoTangent(), NoTangent())

    return y, pullback


def _clamped(indices, shape):
    """torch's _unsafe_masked_index clamps each index into its dimension's range."""
    return [None if i is None else i.clamp(-shape[k], shape[k] - 1) for k, i in enumerate(indices)]


@rrule(torch._unsafe_masked_index)
def unsafe_masked_index(input, mask, indices, fill):
    """y = where(mask, x[clamped indices], fill);  dx = zeros with dy (masked) accumulated at the
    indices."""
    y = torch._unsafe_masked_index(input, mask, indices, fill)
    idx = _clamped(indices, input.shape)

    def pullback(dy):
        dx = torch.ops.aten._unsafe_masked_index_put_accumulate(torch.zeros_like(input), mask, idx, dy)
        return (NoTangent(), dx, NoTangent(), NoTangent(),
                grad_like(dy.masked_fill(mask, 0).sum(), fill) if is_float_tensor(fill) else NoTangent())

    return y, pullback


@rrule(torch._unsafe_masked_index_put_accumulate)
def unsafe_masked_index_put_accumulate(input, mask, indices, values):
    """y = x with values (zeroed where mask is false) accumulated at the clamped indices;
    dx = dy,  dvalues = dy read at the indices where mask holds."""
    y = torch._unsafe_masked_index_put_accumulate(input, mask, indices, values)
    idx = _clamped(indices, input.shape)

    def pullback(dy):
        dv = torch._unsafe_masked_index(dy, mask, idx, 0.0)
        return (NoTangent(), dy if is_float_tensor(input) else NoTangent(), NoTangent(), NoTangent(),
                grad_like(dv, values) if is_float_tensor(values) else NoTangent())

    return y, pullback


@rrule(Tensor.chalf)
def chalf(input, memory_format=torch.preserve_format):
    """y = x as complex32;  dx = dy cast back (its real part for a real x)."""
    y = input.chalf(memory_format=memory_format)

    def pullback(dy):
        d = dy if input.is_complex() else dy.real
        return NoTangent(), d.to(input.dtype), NoTangent()

    return y, pullback


# -- random sampling ----------------------------------------------------------------------------------

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


@rrule(torch._safe_softmax, torch.ops.aten._safe_softmax, torch.ops.aten._safe_softmax.default)
def safe_softmax(input, dim, dtype=None):
    """y = softmax(x, dim), 0 on slices that are -inf throughout;  dx = y * (dy - sum(dy * y, dim))."""
    y = torch.ops.aten._safe_softmax(input, dim, dtype)
    return y, lambda dy: (NoTangent(), grad_like(y * (dy - (dy * y).sum(dim, keepdim=True)), input),
                          NoTangent(), NoTangent())


# -- embedding_bag ----------------------------------------------------------------------------------------

@rrule(F.embedding_bag)
def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False, mode="mean",
                  sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """y[b] = sum / mean / max of the rows weight[i] (times per_sample_weights, for sum) over the
    indices i of bag b (the rows of a 2-d input, or the ranges that offsets start), padding_idx
    left out (an empty bag gives 0);  dweight, dper_sample_weights through the rules of
    index_select, mul, index_add and scatter_reduce.  The cotangent of weight is dense."""
    from ..errors import ZygoteError
    if max_norm is not None or scale_grad_by_freq:
        raise ZygoteError("F.embedding_bag: max_norm (which renormalises weight in place) and "
                          "scale_grad_by_freq have no rule yet")
    idx = input.reshape(-1)
    n, num = idx.shape[0], weight.shape[0]
    if input.dim() == 2:
        bags = input.shape[0]
        bag = torch.arange(bags, device=idx.device).repeat_interleave(input.shape[1])
    else:
        bags = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
        starts = offsets[:bags]
        bag = torch.searchsorted(starts, torch.arange(n, device=idx.device), right=True) - 1
    pad = None if padding_idx is None else padding_idx % num
    keep = torch.ones_like(idx, dtype=torch.bool) if pad is None else idx != pad
    count = torch.zeros(bags, dtype=weight.dtype, device=weight.device).index_add(0, bag, keep.to(weight.dtype))

    def decomposition(w, psw):
        rows = w.index_select(0, idx)
        if psw is not None:
            rows = rows * psw.reshape(-1, 1)
        if mode == "max":
            rows = torch.where(keep.unsqueeze(1), rows, float("-inf"))
            out = w.new_zeros(bags, w.shape[1]).scatter_reduce(0, bag.unsqueeze(1).expand(-1, w.shape[1]), rows, "amax",
                                                               include_self=False)
            return torch.where(count.unsqueeze(1) > 0, out, torch.zeros_like(out))
        rows = torch.where(keep.unsqueeze(1), rows, torch.zeros_like(rows))
        out = w.new_zeros(bags, w.shape[1]).index_add(0, bag, rows)
        return out / count.clamp_min(1).unsqueeze(1) if mode == "mean" else out

    y, back = _via_rules(decomposition, weight, per_sample_weights)

    def pullback(dy):
        _, dw, dpsw = back(dy)
        return (NoTangent(), NoTangent(), dw) + nondiff(6) + (dpsw, NoTangent(), NoTangent())

    return y, pullback


# -- torch.gradient ---------------------------------------------------------------------------------------

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


# -- segment_reduce -----------------------------------------------------------------------------------------

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


# -- ctc_loss --------------------------------------------------------------------------------------------

_CTC_NEG = -1e30  # "log 0" kept finite, so the pullback of logsumexp over unreachable states is not NaN


def _ctc_decomposition(lp, targets, input_lengths, target_lengths, blank, reduction, zero_infinity):
    """The CTC forward (alpha) recursion in log space, written with ruled ops."""
    if lp.dim() == 2:
        lp, targets = lp.unsqueeze(1), targets.reshape(1, -1)
    t_len, n, _ = lp.shape
    dev = lp.device
    in_len = torch.as_tensor(input_lengths, dtype=torch.long, device=dev).reshape(-1)
    tg_len = torch.as_tensor(target_lengths, dtype=torch.long, device=dev).reshape(-1)
    if targets.dim() == 1:  # concatenated targets: pad them to (N, total length)
        total = targets.shape[0]
        starts = tg_len.cumsum(0) - tg_len
        idx = (starts.unsqueeze(1) + torch.arange(total, device=dev)).clamp(max=max(total - 1, 0))
        targets = targets[idx] if total else targets.new_zeros(n, 0)
    s = targets.shape[1]
    states = 2 * s + 1
    ext = torch.cat([torch.stack([torch.full_like(targets, blank), targets], -1).reshape(n, 2 * s),
                     torch.full((n, 1), blank, dtype=targets.dtype, device=dev)], 1)
    lp_ext = lp.gather(2, ext.unsqueeze(0).expand(t_len, n, states))
    pos = torch.arange(states, device=dev)
    prev2 = torch.cat([ext.new_full((n, 2), blank), ext[:, :-2]], 1) if states > 2 else ext
    skip = (pos >= 2) & (ext != blank) & (ext != prev2)
    neg = lp.new_full((n, 1), _CTC_NEG)
    alpha = torch.where(pos < 2, lp_ext[0], _CTC_NEG)
    for t in range(1, t_len):
        a1 = torch.cat([neg, alpha[:, :-1]], 1)
        a2 = torch.where(skip, torch.cat([neg, neg, alpha[:, :-2]], 1), _CTC_NEG) if states > 2 else a1
        new = torch.logsumexp(torch.stack([alpha, a1, a2]), 0) + lp_ext[t]
        alpha = torch.where((t < in_len).unsqueeze(1), new, alpha)
    last = alpha.gather(1, (2 * tg_len).unsqueeze(1)).squeeze(1)
    before = alpha.gather(1, (2 * tg_len - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    before = torch.where(tg_len > 0, before, _CTC_NEG)
    loss = -torch.logsumexp(torch.stack([last, before]), 0)
    infeasible = loss > -_CTC_NEG / 2
    if zero_infinity:
        loss = torch.where(infeasible, 0.0, loss)
    if reduction == "mean":
        return (loss / tg_len.clamp_min(1).to(loss.dtype)).mean()
    if reduction == "sum":
        return loss.sum()
    return loss


@rrule(F.ctc_loss)
def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean", zero_infinity=False):
    """loss = -log of the total probability of the alignments of targets (with blanks) to the
    frames, by the forward (alpha) recursion: alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1),
    alpha_{t-1}(s-2) where a skip is allowed) + log_probs[t, ext(s)];  dlog_probs through the rules of
    gather, logsumexp and where (torch's value is kept for the forward)."""
    unbatched = log_probs.dim() == 2

    def decomposition(lp):
        out = _ctc_decomposition(lp, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)
        return out.squeeze(0) if unbatched and reduction == "none" else out

    y, back = _via_rules(decomposition, log_probs,
                         value=lambda: F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, reduction,
                                                  zero_infinity))
    return y, lambda dy: back(dy) + nondiff(6)
