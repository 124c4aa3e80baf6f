"""Rules for reading elements by index: ``x[index]`` with every index torch accepts, select,
gather, index_select, take_along_dim, take and masked_select; and for their out-of-place writing
counterparts: masked_fill, index_put, scatter, scatter_add, index_add, index_copy, index_fill,
masked_scatter, put, fill and the ``*_scatter`` ops (diagonal, select, slice, as_strided); for
scatter_reduce and index_reduce (torch's own cotangents); for torch's ``_unsafe_masked_index`` pair;
and for F.embedding_bag (a gather and a reduction per bag, a rule via rules).

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
import torch.nn.functional as F

from ..ad.registry import rrule
from ._util import NoTangent, TensorSpec, _via_rules, grad_like, is_float_tensor, nondiff, spec, unbroadcast

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


# -- the *_scatter ops, put and fill ---------------------------------------------------------------

@rrule(torch.fill)
def fill(input, value):
    """y = value everywhere (out of place);  dx = 0,  dvalue = sum(dy) for a tensor value."""
    y = torch.fill(input, value)
    return y, lambda dy: (NoTangent(), torch.zeros_like(dy) if is_float_tensor(input) else NoTangent(),
                          grad_like(dy.sum(), value) if is_float_tensor(value) else NoTangent())


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


# -- scatter_reduce and index_reduce ---------------------------------------------------------------

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


# -- _unsafe_masked_index --------------------------------------------------------------------------

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


# -- embedding_bag ---------------------------------------------------------------------------------

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
