"""Rules for reading elements by index: ``x[index]`` with every index torch accepts, select,
gather, index_select, take_along_dim, take and masked_select; and for their out-of-place writing
counterparts: masked_fill, index_put, scatter, scatter_add, index_add, index_copy, index_fill and
masked_scatter.

Each reading pullback writes the output's cotangent back where the elements came from, into zeros,
out of place, accumulating where an index repeats (``x[[0, 0]]`` sends both cotangents to
``x[0]``). Each writing pullback zeroes the overwritten positions of ``dx`` and reads the written
values' cotangent back with the matching read (gather, index_select, ``dy[indices]``).

``x[index]`` is split the way torch evaluates it: first the basic part (ints, slices with steps,
None, Ellipsis), which gives a view ``v`` of ``x``, then the advanced part (integer tensors and
lists, bool masks) applied to ``v``. The pullback reverses both steps:

* advanced, when its indices are adjacent (``x[idx]``, ``x[:, i, j]``, ``x[mask]``):
  ``dv = zeros(v.shape).index_put(indices, dy, accumulate=True)`` (dimensions before the indices
  are moved behind them first, then back);
* basic: ``dx = as_strided_scatter(zeros(x.shape), dv, <v's sizes, strides and offset>)``;
* anything else (advanced indices split by a slice, 0-d bool or uint8 indices, Python bools): the
  same index applied to ``arange(x.numel())`` says which element of ``x`` each output element is,
  and ``dx = zeros(x.numel()).index_put((positions,), dy, accumulate=True)``.

Nothing here reads tensor data into Python; bool masks only ever reach torch ops.
"""
from __future__ import annotations

import numbers

import torch

from ..ad.registry import rrule
from ._util import NoTangent, TensorSpec, spec, unbroadcast

Tensor = torch.Tensor

_FULL = slice(None)
_OTHER = object()  # an index element handled only by the generic path


# -- x[index] ---------------------------------------------------------------------------------------

def _treat_as_tuple(seq) -> bool:
    """torch's (NumPy's) rule for a list index: a sequence of indices rather than one index array
    when it holds a tensor, a sequence, a slice, Ellipsis or None (and is shorter than 32)."""
    if len(seq) >= 32:
        return False
    return any(isinstance(e, (Tensor, list, tuple, slice)) or e is None or e is Ellipsis for e in seq)


def _is_int(e) -> bool:
    """A Python (or NumPy) integer, not a bool."""
    return isinstance(e, (numbers.Integral, torch.SymInt)) and not isinstance(e, bool)


def _leaves_are_numbers(seq) -> bool:
    return all(_leaves_are_numbers(e) if isinstance(e, (list, tuple)) else isinstance(e, bool) or _is_int(e)
               for e in seq)


def _token(e, device):
    """('int', i) | ('slice', s) | ('none',) | ('ellipsis',) | ('tensor', t, dims consumed) | _OTHER."""
    if isinstance(e, Tensor):
        if e.dtype == torch.bool and e.dim() > 0:
            return ("tensor", e, e.dim())
        if e.dtype in (torch.int64, torch.int32, torch.int16, torch.int8):
            return ("tensor", e, 1)
        return _OTHER  # 0-d bool, uint8 masks, anything else: the generic path (or torch's error)
    if e is None:
        return ("none",)
    if e is Ellipsis:
        return ("ellipsis",)
    if isinstance(e, bool):
        return _OTHER
    if isinstance(e, slice):
        return ("slice", e)
    if _is_int(e):
        return ("int", e)
    if isinstance(e, (list, tuple)) and _leaves_are_numbers(e):
        t = torch.tensor(e, device=device)
        if t.dtype.is_floating_point:  # an empty list
            t = t.long()
        return _token(t, device) if t.dim() > 0 or t.dtype != torch.bool else _OTHER
    return _OTHER


def _plan(x, index):
    """(basic index, advanced entries on the basic view) for ``x[index]``, or None when only the
    generic path applies. Advanced entries are ``_FULL`` (one dimension of the view) or an index
    tensor (as many dimensions as it consumes)."""
    if isinstance(index, tuple):
        items = index
    elif isinstance(index, list) and _treat_as_tuple(index):
        items = tuple(index)
    else:
        items = (index,)
    tokens = [_token(e, x.device) for e in items]
    if any(t is _OTHER for t in tokens) or sum(t[0] == "ellipsis" for t in tokens) > 1:
        return None
    consumed = sum(1 if t[0] in ("int", "slice") else t[2] if t[0] == "tensor" else 0 for t in tokens)
    basic, adv = [], []
    for t in tokens:
        kind = t[0]
        if kind == "int":
            basic.append(t[1])
        elif kind == "slice":
            basic.append(t[1])
            adv.append(_FULL)
        elif kind == "none":
            basic.append(None)
            adv.append(_FULL)
        elif kind == "ellipsis":
            n = max(x.dim() - consumed, 0)
            basic += [_FULL] * n
            adv += [_FULL] * n
        else:
            basic += [_FULL] * t[2]
            adv.append(t[1])
    return tuple(basic), adv


def _is_trivial(basic) -> bool:
    return all(isinstance(b, slice) and b == _FULL for b in basic)


def _scatter_basic(x, basic, dv, base=None, view=None):
    """dx for ``v = x[basic]`` (a view) from dv: dv written into zeros at the view's positions."""
    if _is_trivial(basic):
        return dv.reshape(x.shape)
    if base is None:
        base = x.new_zeros(x.shape)
        view = base[basic]
    return torch.as_strided_scatter(base, dv, view.size(), view.stride(), view.storage_offset())


def _scatter_advanced(x, view_shape, adv, dy):
    """dv for ``y = v[adv]`` with adjacent advanced indices, or None when they are not adjacent."""
    positions = [i for i, e in enumerate(adv) if isinstance(e, Tensor)]
    if positions != list(range(positions[0], positions[-1] + 1)):
        return None
    indices = [adv[i] for i in positions]
    k = positions[0]  # dimensions of v before the indexed ones (each _FULL entry is one)
    m = len(view_shape) - (len(adv) - len(indices))  # dimensions the indices consume
    if k == 0:
        return x.new_zeros(view_shape).index_put(indices, dy, accumulate=True)
    nb = dy.dim() - (len(view_shape) - m)  # dimensions of the broadcast index shape
    shape = tuple(view_shape[k:k + m]) + tuple(view_shape[:k]) + tuple(view_shape[k + m:])
    g = dy.movedim(tuple(range(k, k + nb)), tuple(range(nb)))
    dv = x.new_zeros(shape).index_put(indices, g, accumulate=True)
    return dv.movedim(tuple(range(m)), tuple(range(k, k + m)))


def _scatter_generic(x, index, dy):
    """dx for ``y = x[index]``, any index: the index applied to element numbers says where each
    element of y came from."""
    positions = torch.arange(x.numel(), device=x.device).view(x.shape)[index]
    dx = x.new_zeros(x.numel()).index_put((positions.reshape(-1),), dy.reshape(-1), accumulate=True)
    return dx.view(x.shape)


def getitem_cotangent(x, index, dy):
    """The cotangent of ``x`` for ``y = x[index]``."""
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    plan = _plan(x, index)
    if plan is None:
        return _scatter_generic(x, index, dy)
    basic, adv = plan
    if not any(isinstance(e, Tensor) for e in adv):
        return _scatter_basic(x, basic, dy)
    base = view = None
    if not _is_trivial(basic):
        base = x.new_zeros(x.shape)  # contiguous: the view's strides are those of x[basic] in it
        view = base[basic]
    dv = _scatter_advanced(x, x.shape if view is None else view.shape, adv, dy)
    if dv is None:
        return _scatter_generic(x, index, dy)
    return _scatter_basic(x, basic, dv, base, view)


@rrule(Tensor.__getitem__)
def getitem(input, index):
    """y = x[index] (ints, slices, None, ..., integer tensors/lists, bool masks, any mix);
    dx = zeros with dy written back at the indexed positions, repeated indices accumulating."""
    y = input[index]
    return y, lambda dy: (NoTangent(), getitem_cotangent(input, index, dy), NoTangent())


# -- index functions ---------------------------------------------------------------------------------

@rrule(torch.select, Tensor.select)
def select(input, dim, index):
    """y = x.select(dim, index);  dx = zeros with dy at that index along dim."""
    y = torch.select(input, dim, index)
    return y, lambda dy: (NoTangent(), torch.select_scatter(input.new_zeros(input.shape), dy, dim, index),
                          NoTangent(), NoTangent())


@rrule(torch.gather, Tensor.gather)
def gather(input, dim, index, *, sparse_grad=False, out=None):
    """y[..i..] = x[..index[..i..]..] along dim;  dx = zeros.scatter_add(dim, index, dy)."""
    if out is not None:
        raise TypeError("out= is not differentiable; assign the result instead")
    y = torch.gather(input, dim, index, sparse_grad=sparse_grad)
    return y, lambda dy: (NoTangent(), input.new_zeros(input.shape).scatter_add(dim, index, dy),
                          NoTangent(), NoTangent())


@rrule(torch.index_select, Tensor.index_select)
def index_select(input, dim, index, *, out=None):
    """y = x.index_select(dim, index);  dx = zeros.index_add(dim, index, dy)."""
    if out is not None:
        raise TypeError("out= is not differentiable; assign the result instead")
    y = torch.index_select(input, dim, index)

    def pullback(dy):
        if input.dim() == 0:
            dx = dy.reshape(()) if index.numel() else input.new_zeros(())
            return NoTangent(), dx, NoTangent(), NoTangent()
        return NoTangent(), input.new_zeros(input.shape).index_add(dim, index.reshape(-1), dy), NoTangent(), NoTangent()

    return y, pullback


@rrule(torch.take_along_dim, Tensor.take_along_dim)
def take_along_dim(input, indices, dim=None, *, out=None):
    """y = take_along_dim(x, indices, dim) (gather after broadcasting x and indices, or on the
    flattened x when dim is None);  dx = zeros.scatter_add(dim, indices, dy), summed back to x's shape."""
    if out is not None:
        raise TypeError("out= is not differentiable; assign the result instead")
    y = torch.take_along_dim(input, indices, dim) if dim is not None else torch.take_along_dim(input, indices)
    size = input.numel() if dim is None else input.shape[dim]
    indices = torch.where(indices < 0, indices + size, indices)  # torch accepts negative indices

    def pullback(dy):
        if dim is None:
            dx = input.new_zeros(input.numel()).scatter_add(0, indices.reshape(-1), dy.reshape(-1))
            return NoTangent(), dx.reshape(input.shape), NoTangent(), NoTangent()
        d = dim % input.dim()
        index_shape = list(indices.shape)
        index_shape[d] = input.shape[d]
        x_shape = torch.broadcast_shapes(tuple(index_shape), tuple(input.shape))
        y_shape = list(x_shape)
        y_shape[d] = indices.shape[d]
        idx = indices.broadcast_to(y_shape)
        dx = input.new_zeros(x_shape).scatter_add(d, idx, dy)
        return NoTangent(), unbroadcast(dx, input.shape), NoTangent(), NoTangent()

    return y, pullback


@rrule(torch.take, Tensor.take)
def take(input, index):
    """y = x.flatten()[index] (index of any shape, negative entries wrap);
    dx = zeros.index_put(index, dy, accumulate=True), reshaped like x."""
    y = torch.take(input, index)

    def pullback(dy):
        dx = input.new_zeros(input.numel()).index_put((index.reshape(-1),), dy.reshape(-1), accumulate=True)
        return NoTangent(), dx.reshape(input.shape), NoTangent()

    return y, pullback


@rrule(torch.masked_select, Tensor.masked_select)
def masked_select(input, mask, *, out=None):
    """y = the elements of x (broadcast with mask) where mask is True, as a 1-D tensor;
    dx = zeros.masked_scatter(mask, dy), summed back to x's shape."""
    if out is not None:
        raise TypeError("out= is not differentiable; assign the result instead")
    y = torch.masked_select(input, mask)

    def pullback(dy):
        shape = torch.broadcast_shapes(tuple(input.shape), tuple(mask.shape))
        dx = input.new_zeros(shape).masked_scatter(mask.broadcast_to(shape), dy)
        return NoTangent(), unbroadcast(dx, input.shape), NoTangent()

    return y, pullback


# -- writing by index (out of place) -----------------------------------------------------------------

def _zero(like):
    return torch.zeros((), dtype=like.dtype, device=like.device)


def _float_or_no(x, compute):
    return compute() if isinstance(x, (Tensor, TensorSpec)) and (x.is_floating_point() or x.is_complex()) \
        else NoTangent()


def _pad_to(g, shape):
    """``g`` (shaped like an index) zero-padded at the end of each dimension to ``shape`` (a source
    tensor that scatter only partly reads)."""
    if tuple(g.shape) == tuple(shape):
        return g
    pad = []
    for have, want in zip(reversed(g.shape), reversed(shape)):
        pad += [0, want - have]
    return torch.nn.functional.pad(g, pad)


@rrule(torch.masked_fill, Tensor.masked_fill)
def masked_fill(input, mask, value):
    """y = where(mask, value, x) (broadcast);  dx = where(mask, 0, dy) summed to x's shape,
    dvalue = sum of dy where mask (for a tensor value)."""
    y = torch.masked_fill(input, mask, value)
    x, v = spec(input), spec(value)

    def pullback(dy):
        dx = _float_or_no(x, lambda: unbroadcast(torch.where(mask, _zero(dy), dy), x.shape))
        dv = _float_or_no(v, lambda: torch.where(mask, dy, _zero(dy)).sum().reshape(v.shape))
        return NoTangent(), dx, NoTangent(), dv

    return y, pullback


@rrule(torch.index_put, Tensor.index_put)
def index_put(input, indices, values, accumulate=False):
    """y = x with x[indices] = values (or += with accumulate);  dx = dy (zeroed at indices unless
    accumulate),  dvalues = dy[indices] summed to values' shape."""
    y = torch.index_put(input, indices, values, accumulate)

    def dvalues(dy):
        if len(indices) == 1 and indices[0].dtype == torch.bool and values.numel() == 1:
            # one mask, one value (``x[mask] = v``): a sum that needs no data-dependent shape
            m = indices[0].reshape(indices[0].shape + (1,) * (dy.dim() - indices[0].dim()))
            return torch.where(m, dy, _zero(dy)).sum().reshape(values.shape)
        return unbroadcast(dy[tuple(indices)], values.shape)

    def pullback(dy):
        dx = _float_or_no(input, lambda: dy if accumulate else dy.index_put(indices, _zero(dy)))
        return NoTangent(), dx, NoTangent(), _float_or_no(values, lambda: dvalues(dy)), NoTangent()

    return y, pullback


@rrule(torch.scatter, Tensor.scatter)
def scatter(input, dim, index, src=None, *, value=None, reduce=None):
    """y = x with y[..index[i]..] = src[i] along dim (or a number ``value``);  dx = dy zeroed where
    written,  dsrc = dy.gather(dim, index) (zero where src is not read)."""
    if reduce is not None:
        raise NotImplementedError("scatter(..., reduce=...) has no rule; use scatter_add or scatter_reduce")
    fill = src if src is not None else value
    y = torch.scatter(input, dim, index, fill)

    def pullback(dy):
        dx = _float_or_no(input, lambda: dy.scatter(dim, index, 0.0))
        dsrc = _float_or_no(src, lambda: _pad_to(dy.gather(dim, index), src.shape))
        return NoTangent(), dx, NoTangent(), NoTangent(), dsrc

    return y, pullback


@rrule(torch.scatter_add, Tensor.scatter_add)
def scatter_add(input, dim, index, src):
    """y = x with src[i] added at y[..index[i]..] along dim;  dx = dy,  dsrc = dy.gather(dim, index)."""
    y = torch.scatter_add(input, dim, index, src)

    def pullback(dy):
        return (NoTangent(), _float_or_no(input, lambda: dy), NoTangent(), NoTangent(),
                _float_or_no(src, lambda: _pad_to(dy.gather(dim, index), src.shape)))

    return y, pullback


@rrule(torch.index_add, Tensor.index_add)
def index_add(input, dim, index, source, *, alpha=1, out=None):
    """y = x with alpha*source added at index along dim;  dx = dy,
    dsource = conj(alpha) * dy.index_select(dim, index)."""
    if out is not None:
        raise TypeError("out= is not differentiable; assign the result instead")
    y = torch.index_add(input, dim, index, source, alpha=alpha)

    def pullback(dy):
        def dsource():
            g = dy.index_select(dim, index.reshape(-1)) if dy.dim() else dy
            a = alpha.conjugate() if isinstance(alpha, complex) else alpha
            return (g * a if a != 1 else g).reshape(source.shape)
        return NoTangent(), _float_or_no(input, lambda: dy), NoTangent(), NoTangent(), _float_or_no(source, dsource)

    return y, pullback


@rrule(torch.index_copy, Tensor.index_copy)
def index_copy(input, dim, index, source, *, out=None):
    """y = x with source copied in at index along dim;  dx = dy zeroed at index,
    dsource = dy.index_select(dim, index)."""
    if out is not None:
        raise TypeError("out= is not differentiable; assign the result instead")
    y = torch.index_copy(input, dim, index, source)

    def pullback(dy):
        return (NoTangent(), _float_or_no(input, lambda: dy.index_fill(dim, index, 0)), NoTangent(), NoTangent(),
                _float_or_no(source, lambda: (dy.index_select(dim, index.reshape(-1)) if dy.dim() else dy)
                             .reshape(source.shape)))

    return y, pullback


@rrule(torch.index_fill, Tensor.index_fill)
def index_fill(input, dim, index, value):
    """y = x with value written at index along dim;  dx = dy zeroed at index,
    dvalue = sum of dy over the filled positions, each once (for a tensor value)."""
    y = torch.index_fill(input, dim, index, value)

    def pullback(dy):
        dv = _float_or_no(value, lambda: (dy - dy.index_fill(dim, index, 0)).sum().reshape(value.shape))
        return NoTangent(), _float_or_no(input, lambda: dy.index_fill(dim, index, 0)), NoTangent(), NoTangent(), dv

    return y, pullback


@rrule(torch.masked_scatter, Tensor.masked_scatter)
def masked_scatter(input, mask, source):
    """y = x with the leading elements of source written, in order, where mask (broadcast) is True;
    dx = where(mask, 0, dy) summed to x's shape,  dsource = dy's masked elements in order, then 0.
    The positions come from a cumulative sum of the mask, so no shape depends on data."""
    y = torch.masked_scatter(input, mask, source)

    def pullback(dy):
        m = mask.broadcast_to(dy.shape)
        dx = _float_or_no(input, lambda: unbroadcast(torch.where(m, _zero(dy), dy), input.shape))

        def dsource():
            flat = m.reshape(-1)
            pos = (torch.cumsum(flat.to(torch.int64), 0) - 1).clamp(min=0)
            vals = torch.where(flat, dy.reshape(-1), _zero(dy))
            return source.new_zeros(source.numel()).scatter_add(0, pos, vals).reshape(source.shape)

        return NoTangent(), dx, NoTangent(), _float_or_no(source, dsource)

    return y, pullback
