"""Rules for shape and layout operations: reshape/view/flatten/squeeze and friends, expand and
broadcast_to, cat/stack (and hstack/vstack/dstack/column_stack), split/chunk/unbind/tensor_split,
transposes and permutations (t, transpose, permute, movedim, ``.T``, ``.mT``, ``.H``, ``.mH``),
copies and casts (contiguous, clone, to, float/double/half/bfloat16, chalf, type_as, cpu/cuda), flip,
roll, repeat, tile and narrow; diagonals and triangles (diagonal, diag, diag_embed, tril, triu). The
``*_copy`` versions of the views, unsafe_split/unsafe_chunk, h/v/dsplit, atleast_1d/2d/3d,
block_diag, meshgrid, cartesian_prod, combinations, rot90, diagflat, aten.slice, as_strided,
unfold, kron, repeat_interleave and sum_to_size. ``detach`` is declared non-differentiable.

All of these move or copy elements without arithmetic, so each pullback is the adjoint movement:
reshapes reshape the cotangent back, permutations apply the inverse permutation, broadcasting sums
(``unbroadcast``), joins split and splits join (absent cotangents of split pieces are zeros), casts
cast the cotangent back to the input's dtype and device (the real part for a real input cast to
complex), repeat/tile sum over the copies.

Tensor methods that take their sizes as varargs (``x.reshape(2, 3)``, ``x.permute(1, 0)``,
``x.expand(4, -1)``, ``x.flip(0, 1)``) have their own rule with ``*args`` (also accepting the tuple
form and the keyword form ``x.reshape(shape=(2, 3))``) and return one NoTangent per vararg.
"""
from __future__ import annotations

import torch

from ..ad.registry import non_differentiable, rrule
from ._util import (NoTangent, _via_rules, conj, grad_like, is_float_tensor, is_zero, materialize, no_out,
                    nondiff, spec, unbroadcast, unthunk)

Tensor = torch.Tensor

non_differentiable(torch.detach, Tensor.detach)


def _sizes(args, kwargs, name):
    """The size/dims argument of a varargs Tensor method: ``f(2, 3)``, ``f((2, 3))`` or ``f(name=(2, 3))``."""
    if name in kwargs:
        return tuple(kwargs[name]) if isinstance(kwargs[name], (tuple, list, torch.Size)) else (kwargs[name],)
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0])
    return tuple(args)


# -- reshapes ---------------------------------------------------------------------------------------

@rrule(torch.reshape)
def reshape(input, shape):
    """y = reshape(x, shape);  dx = reshape(dy, x.shape)."""
    return torch.reshape(input, shape), lambda dy: (NoTangent(), dy.reshape(input.shape), NoTangent())


@rrule(Tensor.reshape)
def tensor_reshape(input, *shape, **kwargs):
    """y = x.reshape(*shape);  dx = reshape(dy, x.shape)."""
    y = input.reshape(_sizes(shape, kwargs, "shape"))
    x_shape = input.shape
    return y, lambda dy: (NoTangent(), dy.reshape(x_shape)) + nondiff(len(shape))


@rrule(Tensor.view)
def view(input, *shape, **kwargs):
    """y = x.view(*shape);  dx = reshape(dy, x.shape). ``x.view(dtype)`` reinterprets the bits and,
    as in torch.autograd, is not differentiable (even to the same dtype)."""
    if "dtype" in kwargs or (len(shape) == 1 and isinstance(shape[0], torch.dtype)):
        y = input.view(kwargs["dtype"] if "dtype" in kwargs else shape[0])
        return y, lambda dy: (NoTangent(), NoTangent()) + nondiff(len(shape))
    y = input.view(_sizes(shape, kwargs, "size"))
    x_shape = input.shape
    return y, lambda dy: (NoTangent(), dy.reshape(x_shape)) + nondiff(len(shape))


@rrule(Tensor.view_as, Tensor.reshape_as)
def view_as(input, other):
    """y = x reshaped like other;  dx = reshape(dy, x.shape)."""
    return input.reshape(other.shape), lambda dy: (NoTangent(), dy.reshape(input.shape), NoTangent())


@rrule(torch.flatten, Tensor.flatten)
def flatten(input, start_dim=0, end_dim=-1):
    """y = flatten(x, start_dim, end_dim);  dx = reshape(dy, x.shape)."""
    y = torch.flatten(input, start_dim, end_dim)
    return y, lambda dy: (NoTangent(), dy.reshape(input.shape), NoTangent(), NoTangent())


@rrule(torch.ravel, Tensor.ravel)
def ravel(input):
    """y = ravel(x);  dx = reshape(dy, x.shape)."""
    return torch.ravel(input), lambda dy: (NoTangent(), dy.reshape(input.shape))


@rrule(torch.unflatten, Tensor.unflatten)
def unflatten(input, dim, sizes):
    """y = unflatten(x, dim, sizes);  dx = reshape(dy, x.shape)."""
    y = torch.unflatten(input, dim, sizes)
    return y, lambda dy: (NoTangent(), dy.reshape(input.shape), NoTangent(), NoTangent())


@rrule(torch.squeeze, Tensor.squeeze)
def squeeze(input, dim=None):
    """y = squeeze(x, dim);  dx = reshape(dy, x.shape)."""
    y = torch.squeeze(input) if dim is None else torch.squeeze(input, dim)
    return y, lambda dy: (NoTangent(), dy.reshape(input.shape), NoTangent())


@rrule(torch.unsqueeze, Tensor.unsqueeze)
def unsqueeze(input, dim):
    """y = unsqueeze(x, dim);  dx = reshape(dy, x.shape)."""
    y = torch.unsqueeze(input, dim)
    return y, lambda dy: (NoTangent(), dy.reshape(input.shape), NoTangent())


# -- broadcasting ---------------------------------------------------------------------------------

@rrule(Tensor.expand)
def expand(input, *sizes, **kwargs):
    """y = x.expand(*sizes) (-1 keeps a dimension);  dx = dy summed over the broadcast dimensions."""
    y = input.expand(_sizes(sizes, kwargs, "size"), implicit=kwargs.get("implicit", False))
    return y, lambda dy: (NoTangent(), unbroadcast(dy, input.shape)) + nondiff(len(sizes))


@rrule(Tensor.expand_as)
def expand_as(input, other):
    """y = x expanded to other's shape;  dx = dy summed over the broadcast dimensions."""
    y = input.expand_as(other)
    return y, lambda dy: (NoTangent(), unbroadcast(dy, input.shape), NoTangent())


@rrule(torch.broadcast_to, Tensor.broadcast_to)
def broadcast_to(input, size):
    """y = broadcast_to(x, size);  dx = dy summed over the broadcast dimensions."""
    y = torch.broadcast_to(input, size)
    return y, lambda dy: (NoTangent(), unbroadcast(dy, input.shape), NoTangent())


@rrule(torch.broadcast_tensors)
def broadcast_tensors(*tensors):
    """(y_1, ..., y_n) = broadcast_tensors(x_1, ..., x_n);  dx_i = dy_i summed to x_i's shape."""
    ys = torch.broadcast_tensors(*tensors)

    def pullback(dys):
        return (NoTangent(),) + tuple(grad_like(materialize(d, like=y), x) if is_float_tensor(x) else NoTangent()
                                      for d, y, x in zip(dys, ys, tensors))

    return ys, pullback


# -- joins ------------------------------------------------------------------------------------------

def _cast_like(g, x):
    """``g`` for floating tensor ``x`` in x's dtype; NoTangent for anything else."""
    if not is_float_tensor(x):
        return NoTangent()
    if g.is_complex() and not x.is_complex():
        g = g.real
    return g.to(x.dtype) if g.dtype != x.dtype else g


def _cat_cotangents(tensors, dy, dim):
    """The pieces of ``dy`` along ``dim`` for each member of a cat. 1-D empty members, which cat
    skips whatever the other members' shapes, get empty cotangents."""
    out, offset = [], 0
    d = dim % dy.dim() if dy.dim() else 0
    for t in tensors:
        if t.dim() == 1 and t.shape[0] == 0:
            out.append(_cast_like(torch.zeros_like(t, dtype=dy.dtype), t))
            continue
        n = t.shape[d]
        out.append(_cast_like(dy.narrow(d, offset, n), t))
        offset += n
    return out


def _join_result(tensors, grads):
    return type(tensors)(grads) if isinstance(tensors, (list, tuple)) else tuple(grads)


@rrule(torch.cat, torch.concat)
def cat(tensors, dim=0, *, axis=None, out=None):
    """y = cat(xs, dim);  dx_i = the slice of dy along dim where x_i was placed."""
    no_out(out)
    dim = axis if axis is not None else dim
    y = torch.cat(tensors, dim)
    return y, lambda dy: (NoTangent(), _join_result(tensors, _cat_cotangents(tensors, dy, dim)), NoTangent())


@rrule(torch.concatenate)
def concatenate(tensors, axis=0, *, dim=None, out=None):
    """y = concatenate(xs, axis);  dx_i = the slice of dy along axis where x_i was placed."""
    no_out(out)
    axis = dim if dim is not None else axis
    y = torch.cat(tensors, axis)
    return y, lambda dy: (NoTangent(), _join_result(tensors, _cat_cotangents(tensors, dy, axis)), NoTangent())


@rrule(torch.stack)
def stack(tensors, dim=0, *, axis=None, out=None):
    """y = stack(xs, dim);  dx_i = dy.select(dim, i)."""
    no_out(out)
    dim = axis if axis is not None else dim
    y = torch.stack(tensors, dim)
    return y, lambda dy: (NoTangent(), _join_result(tensors, [_cast_like(g, t) for g, t in
                                                                zip(dy.unbind(dim), tensors)]), NoTangent())


def _promoted_join(fn, promote, dim_of):
    """A rule for hstack/vstack/dstack/column_stack: each member is reshaped (``promote``: shape ->
    shape) and concatenated along ``dim_of(promoted shapes)``; the pullback splits and reshapes back."""
    def rule(tensors, *, out=None):
        no_out(out)
        y = fn(tensors)
        shapes = [promote(tuple(t.shape)) for t in tensors]
        dim = dim_of(shapes)

        def pullback(dy):
            pieces = torch.split(dy, [s[dim] for s in shapes], dim)
            return NoTangent(), _join_result(tensors, [_cast_like(p.reshape(t.shape), t)
                                                       for p, t in zip(pieces, tensors)])

        return y, pullback

    rule.__name__ = rule.__qualname__ = fn.__name__
    rule.__doc__ = (f"y = {fn.__name__}(xs): the members, reshaped to at least the joined rank, concatenated; "
                    "dx_i = its piece of dy reshaped back to x_i's shape.")
    return rule


def _atleast(n):
    def promote(shape):
        if len(shape) >= n:
            return shape
        if n == 3 and len(shape) == 1:
            return (1,) + shape + (1,)
        if n == 3 and len(shape) == 2:
            return shape + (1,)
        return (1,) * (n - len(shape)) + shape
    return promote


def _column(shape):
    return (shape[0] if shape else 1, 1) if len(shape) <= 1 else shape


rrule(torch.hstack)(_promoted_join(torch.hstack, _atleast(1), lambda shapes: 0 if len(shapes[0]) == 1 else 1))
rrule(torch.vstack, torch.row_stack)(_promoted_join(torch.vstack, _atleast(2), lambda shapes: 0))
rrule(torch.dstack)(_promoted_join(torch.dstack, _atleast(3), lambda shapes: 2))
rrule(torch.column_stack)(_promoted_join(torch.column_stack, _column, lambda shapes: 1))


# -- splits ---------------------------------------------------------------------------------------

def _split_pullback(input, ys, dim, n_extra):
    """Pullback of a split into consecutive pieces covering ``dim``: concatenate the pieces'
    cotangents (zeros for pieces that received none)."""
    pieces, x = [spec(y) for y in ys], spec(input)

    def pullback(dys):
        parts = [y.zeros() if is_zero(unthunk(d)) else unthunk(d) for d, y in zip(dys, pieces)]
        dx = torch.cat(parts, dim) if parts else x.zeros()
        return (NoTangent(), dx) + nondiff(n_extra)
    return pullback


@rrule(torch.split)
def split(tensor, split_size_or_sections, dim=0):
    """(y_1, ..., y_k) = split(x, size or sizes, dim);  dx = cat(dy_1, ..., dy_k, dim)."""
    ys = torch.split(tensor, split_size_or_sections, dim)
    return ys, _split_pullback(tensor, ys, dim, 2)


@rrule(Tensor.split)
def tensor_split_method(input, split_size, dim=0):
    """(y_1, ..., y_k) = x.split(size or sizes, dim);  dx = cat(dy_1, ..., dy_k, dim)."""
    ys = input.split(split_size, dim)
    return ys, _split_pullback(input, ys, dim, 2)


@rrule(torch.split_with_sizes, Tensor.split_with_sizes)
def split_with_sizes(input, split_sizes, dim=0):
    """(y_1, ..., y_k) = split_with_sizes(x, sizes, dim);  dx = cat(dy_1, ..., dy_k, dim)."""
    ys = torch.split_with_sizes(input, split_sizes, dim)
    return ys, _split_pullback(input, ys, dim, 2)


@rrule(torch.chunk, Tensor.chunk)
def chunk(input, chunks, dim=0):
    """(y_1, ..., y_k) = chunk(x, chunks, dim);  dx = cat(dy_1, ..., dy_k, dim)."""
    ys = torch.chunk(input, chunks, dim)
    return ys, _split_pullback(input, ys, dim, 2)


@rrule(torch.tensor_split, Tensor.tensor_split)
def tensor_split(input, indices_or_sections, dim=0):
    """(y_1, ..., y_k) = tensor_split(x, sections or split indices, dim);  dx = the pieces' cotangents
    placed back where the pieces came from (concatenated when they tile ``dim``, as they do for
    increasing indices)."""
    ys = torch.tensor_split(input, indices_or_sections, dim)
    d = dim % input.dim()
    if sum(y.shape[d] for y in ys) == input.shape[d]:
        return ys, _split_pullback(input, ys, dim, 2)
    if isinstance(indices_or_sections, Tensor):
        raise NotImplementedError("tensor_split with decreasing tensor indices is not differentiable here")
    starts = [0] + [min(max(i if i >= 0 else i + input.shape[d], 0), input.shape[d])
                    for i in indices_or_sections]

    def pullback(dys):
        dx = torch.zeros_like(input)
        for dyi, y, s in zip(dys, ys, starts):
            if y.shape[d]:
                dx = dx + torch.slice_scatter(torch.zeros_like(input), materialize(dyi, like=y), d, s, s + y.shape[d])
        return NoTangent(), dx, NoTangent(), NoTangent()

    return ys, pullback


@rrule(torch.unbind, Tensor.unbind)
def unbind(input, dim=0):
    """(y_1, ..., y_n) = unbind(x, dim);  dx = stack(dy_1, ..., dy_n, dim)."""
    ys = torch.unbind(input, dim)

    def pullback(dys):
        if not ys:
            return NoTangent(), torch.zeros_like(input), NoTangent()
        return NoTangent(), torch.stack([materialize(d, like=y) for d, y in zip(dys, ys)], dim), NoTangent()

    return ys, pullback


# -- permutations -----------------------------------------------------------------------------------

@rrule(torch.t, Tensor.t)
def t(input):
    """y = x^T (a no-op below 2-D);  dx = dy^T."""
    return torch.t(input), lambda dy: (NoTangent(), dy.t())


@rrule(torch.transpose, Tensor.transpose, torch.swapdims, Tensor.swapdims)
def transpose(input, dim0, dim1):
    """y = x with dims dim0, dim1 swapped;  dx = dy with them swapped back."""
    y = torch.transpose(input, dim0, dim1)
    return y, lambda dy: (NoTangent(), dy.transpose(dim0, dim1), NoTangent(), NoTangent())


@rrule(torch.swapaxes, Tensor.swapaxes)
def swapaxes(input, axis0, axis1):
    """y = x with axes axis0, axis1 swapped;  dx = dy with them swapped back."""
    y = torch.transpose(input, axis0, axis1)
    return y, lambda dy: (NoTangent(), dy.transpose(axis0, axis1), NoTangent(), NoTangent())


def _inverse_permutation(dims, ndim):
    dims = [d % ndim for d in dims] if ndim else []
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return inverse


@rrule(torch.permute)
def permute(input, dims):
    """y = permute(x, dims);  dx = permute(dy, inverse(dims))."""
    y = torch.permute(input, dims)
    inverse = _inverse_permutation(dims, input.dim())
    return y, lambda dy: (NoTangent(), dy.permute(inverse), NoTangent())


@rrule(Tensor.permute)
def tensor_permute(input, *dims, **kwargs):
    """y = x.permute(*dims);  dx = dy.permute(inverse(dims))."""
    dims_ = _sizes(dims, kwargs, "dims")
    y = input.permute(dims_)
    inverse = _inverse_permutation(dims_, input.dim())
    return y, lambda dy: (NoTangent(), dy.permute(inverse)) + nondiff(len(dims))


@rrule(torch.movedim, Tensor.movedim, torch.moveaxis, Tensor.moveaxis)
def movedim(input, source, destination):
    """y = movedim(x, source, destination);  dx = movedim(dy, destination, source)."""
    y = torch.movedim(input, source, destination)
    return y, lambda dy: (NoTangent(), torch.movedim(dy, destination, source), NoTangent(), NoTangent())


@rrule(Tensor.T)
def T(input):
    """y = x.T (all dimensions reversed);  dx = dy with its dimensions reversed."""
    rev = list(range(input.dim() - 1, -1, -1))
    return input.permute(rev), lambda dy: (NoTangent(), dy.permute(rev))


@rrule(Tensor.mT)
def mT(input):
    """y = x.mT (last two dimensions swapped);  dx = dy.mT."""
    return input.mT, lambda dy: (NoTangent(), dy.mT)


@rrule(Tensor.H)
def H(input):
    """y = x.H = conj(x.T) (matrices);  dx = conj(dy).T."""
    return input.H, lambda dy: (NoTangent(), dy.H)


@rrule(Tensor.mH, torch.adjoint, Tensor.adjoint)
def mH(input):
    """y = conj(x.mT);  dx = conj(dy).mT."""
    return input.mH, lambda dy: (NoTangent(), dy.mH)


@rrule(torch.flip)
def flip(input, dims):
    """y = flip(x, dims);  dx = flip(dy, dims)."""
    return torch.flip(input, dims), lambda dy: (NoTangent(), dy.flip(dims), NoTangent())


@rrule(Tensor.flip)
def tensor_flip(input, *dims, **kwargs):
    """y = x.flip(*dims);  dx = dy.flip(*dims)."""
    dims_ = _sizes(dims, kwargs, "dims")
    return input.flip(dims_), lambda dy: (NoTangent(), dy.flip(dims_)) + nondiff(len(dims))


@rrule(torch.fliplr, Tensor.fliplr)
def fliplr(input):
    """y = fliplr(x);  dx = fliplr(dy)."""
    return torch.fliplr(input), lambda dy: (NoTangent(), torch.fliplr(dy))


@rrule(torch.flipud, Tensor.flipud)
def flipud(input):
    """y = flipud(x);  dx = flipud(dy)."""
    return torch.flipud(input), lambda dy: (NoTangent(), torch.flipud(dy))


@rrule(torch.roll, Tensor.roll)
def roll(input, shifts, dims=None):
    """y = roll(x, shifts, dims);  dx = roll(dy, -shifts, dims)."""
    y = torch.roll(input, shifts, dims) if dims is not None else torch.roll(input, shifts)
    back = -shifts if isinstance(shifts, int) else [-s for s in shifts]
    return y, lambda dy: (NoTangent(), torch.roll(dy, back, dims) if dims is not None else torch.roll(dy, back),
                          NoTangent(), NoTangent())


# -- copies and casts -------------------------------------------------------------------------------

@rrule(Tensor.contiguous)
def contiguous(input, memory_format=torch.contiguous_format):
    """y = x (a contiguous copy if needed);  dx = dy."""
    return input.contiguous(memory_format=memory_format), lambda dy: (NoTangent(), dy, NoTangent())


@rrule(torch.clone, Tensor.clone)
def clone(input, *, memory_format=torch.preserve_format):
    """y = copy of x;  dx = dy."""
    return torch.clone(input, memory_format=memory_format), lambda dy: (NoTangent(), dy)


def cast_back(dy, x):
    """The cotangent of ``x`` from that of a cast of it: dy in x's dtype and on x's device (its
    real part when x is real); NoTangent when x is not floating."""
    if not is_float_tensor(x):
        return NoTangent()
    if dy.is_complex() and not x.is_complex():
        dy = dy.real
    if dy.dtype != x.dtype or dy.device != x.device:
        dy = dy.to(device=x.device, dtype=x.dtype)
    return dy


@rrule(Tensor.to)
def to(input, *args, **kwargs):
    """y = x.to(dtype / device / other tensor, ...);  dx = dy cast back to x's dtype and device."""
    y = input.to(*args, **kwargs)
    return y, lambda dy: (NoTangent(), cast_back(dy, input)) + nondiff(len(args))


def _method_cast(name):
    method = getattr(Tensor, name)

    def rule(input, *args, **kwargs):
        y = method(input, *args, **kwargs)
        return y, lambda dy: (NoTangent(), cast_back(dy, input)) + nondiff(len(args))

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = f"y = x.{name}(...) (a cast or move);  dx = dy cast back to x's dtype and device."
    return rrule(method)(rule)


for _name in ("float", "double", "half", "bfloat16", "cfloat", "cdouble", "cpu", "cuda"):
    if hasattr(Tensor, _name):
        _method_cast(_name)


@rrule(Tensor.type_as)
def type_as(input, other):
    """y = x cast to other's dtype;  dx = dy cast back to x's dtype."""
    return input.type_as(other), lambda dy: (NoTangent(), cast_back(dy, input), NoTangent())


@rrule(Tensor.chalf)
def chalf(input, memory_format=torch.preserve_format):
    """y = x as complex32;  dx = dy cast back (its real part for a real x)."""
    y = input.chalf(memory_format=memory_format)

    def pullback(dy):
        d = dy if input.is_complex() else dy.real
        return NoTangent(), d.to(input.dtype), NoTangent()

    return y, pullback


# -- repetition and slicing -------------------------------------------------------------------------

def _repeat_pullback(input, reps):
    """Cotangent of x.repeat(*reps): dy viewed as (r_0, s_0, r_1, s_1, ...) summed over the r's."""
    shape = (1,) * (len(reps) - input.dim()) + tuple(input.shape)

    def cotangent(dy):
        interleaved = [n for pair in zip(reps, shape) for n in pair]
        g = dy.reshape(interleaved).sum(list(range(0, 2 * len(reps), 2))) if reps else dy
        return g.reshape(input.shape)

    return cotangent


@rrule(Tensor.repeat)
def repeat(input, *repeats, **kwargs):
    """y = x.repeat(*reps) (x tiled reps times along each dimension);  dx = sum of dy over the copies."""
    reps = _sizes(repeats, kwargs, "repeats")
    y = input.repeat(reps)
    cotangent = _repeat_pullback(input, reps)
    return y, lambda dy: (NoTangent(), cotangent(dy)) + nondiff(len(repeats))


def _tile_reps(input, dims):
    dims = tuple(dims)
    return (1,) * (input.dim() - len(dims)) + dims


@rrule(torch.tile)
def tile(input, dims):
    """y = tile(x, dims) (repeat, with dims padded by leading 1s);  dx = sum of dy over the copies."""
    y = torch.tile(input, dims)
    cotangent = _repeat_pullback(input, _tile_reps(input, dims))
    return y, lambda dy: (NoTangent(), cotangent(dy), NoTangent())


@rrule(Tensor.tile)
def tensor_tile(input, *dims, **kwargs):
    """y = x.tile(*dims);  dx = sum of dy over the copies."""
    dims_ = _sizes(dims, kwargs, "dims")
    y = input.tile(dims_)
    cotangent = _repeat_pullback(input, _tile_reps(input, dims_))
    return y, lambda dy: (NoTangent(), cotangent(dy)) + nondiff(len(dims))


@rrule(torch.narrow, Tensor.narrow, torch.narrow_copy, Tensor.narrow_copy)
def narrow(input, dim, start, length):
    """y = x.narrow(dim, start, length);  dx = zeros with dy placed at [start, start + length) along
    dim. A tensor ``start`` is used as an index tensor, never read back into Python."""
    y = torch.narrow(input, dim, start, length)

    def pullback(dy):
        d = dim % input.dim()
        if isinstance(start, Tensor):
            idx = torch.arange(length, device=input.device) + torch.remainder(start, input.shape[d])
            dx = input.new_zeros(input.shape).index_add(d, idx, dy)
        else:
            s = start + input.shape[d] if start < 0 else start
            dx = torch.slice_scatter(input.new_zeros(input.shape), dy, d, s, s + length)
        return NoTangent(), dx, NoTangent(), NoTangent(), NoTangent()

    return y, pullback


# -- diagonals and triangles ------------------------------------------------------------------------

@rrule(torch.diagonal, Tensor.diagonal)
def diagonal(input, offset=0, dim1=0, dim2=1):
    """y = the offset diagonal of x over (dim1, dim2), as its last dimension;
    dx = zeros with dy written on that diagonal."""
    y = torch.diagonal(input, offset, dim1, dim2)
    return y, lambda dy: (NoTangent(), torch.diagonal_scatter(input.new_zeros(input.shape), dy, offset, dim1, dim2),
                          NoTangent(), NoTangent(), NoTangent())


@rrule(torch.linalg.diagonal)
def linalg_diagonal(A, *, offset=0, dim1=-2, dim2=-1):
    """y = the offset diagonal of A over (dim1, dim2);  dA = zeros with dy written on it."""
    y = torch.linalg.diagonal(A, offset=offset, dim1=dim1, dim2=dim2)
    return y, lambda dy: (NoTangent(), torch.diagonal_scatter(A.new_zeros(A.shape), dy, offset, dim1, dim2))


@rrule(torch.diag, Tensor.diag)
def diag(input, diagonal=0, *, out=None):
    """y = diag(x): a vector on the offset diagonal of a square matrix, or a matrix's offset diagonal;
    dx = dy's offset diagonal, or zeros with dy written on it."""
    no_out(out)
    y = torch.diag(input, diagonal)
    if input.dim() == 1:
        return y, lambda dy: (NoTangent(), torch.diagonal(dy, diagonal), NoTangent())
    return y, lambda dy: (NoTangent(), torch.diagonal_scatter(input.new_zeros(input.shape), dy, diagonal),
                          NoTangent())


@rrule(torch.diag_embed, Tensor.diag_embed)
def diag_embed(input, offset=0, dim1=-2, dim2=-1):
    """y = x's last dimension written on the offset diagonal of new dims (dim1, dim2);
    dx = that diagonal of dy."""
    y = torch.diag_embed(input, offset, dim1, dim2)
    return y, lambda dy: (NoTangent(), torch.diagonal(dy, offset, dim1, dim2), NoTangent(), NoTangent(), NoTangent())


@rrule(torch.tril, Tensor.tril)
def tril(input, diagonal=0, *, out=None):
    """y = lower triangle of x (on and below the offset diagonal);  dx = tril(dy)."""
    no_out(out)
    return torch.tril(input, diagonal), lambda dy: (NoTangent(), torch.tril(dy, diagonal), NoTangent())


@rrule(torch.triu, Tensor.triu)
def triu(input, diagonal=0, *, out=None):
    """y = upper triangle of x (on and above the offset diagonal);  dx = triu(dy)."""
    no_out(out)
    return torch.triu(input, diagonal), lambda dy: (NoTangent(), torch.triu(dy, diagonal), NoTangent())


# -- the *_copy views, and more splits -------------------------------------------------------------

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
