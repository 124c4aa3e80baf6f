"""Rules for the out-of-place forms of in-place ops (see ``ad/mutation.py``)."""
from __future__ import annotations

import torch

from ..ad import mutation
from ..ad.registry import rrule
from ._util import NoTangent, grad_like, is_float_tensor


@rrule(mutation.index_assign)
def index_assign(input, index, value):
    """y = x with y[i] = v;  dx = dy with dx[i] = 0,  dv = unbroadcast(dy[i])."""
    y = mutation.index_assign(input, index, value)

    def pullback(dy):
        dx = mutation.index_assign(dy, index, 0.0) if is_float_tensor(input) else NoTangent()
        dv = grad_like(dy[index], value) if is_float_tensor(value) else NoTangent()
        return NoTangent(), dx, NoTangent(), dv

    return y, pullback


@rrule(mutation.copy_into)
def copy_into(input, src):
    """y = broadcast(src);  dx = 0,  dsrc = unbroadcast(dy)."""
    y = mutation.copy_into(input, src)
    return y, lambda dy: (NoTangent(), torch.zeros_like(dy) if is_float_tensor(input) else NoTangent(),
                          grad_like(dy, src) if is_float_tensor(src) else NoTangent())


@rrule(mutation.fill)
def fill(input, value):
    """y = full(value);  dx = 0,  dvalue = sum(dy) for a tensor value."""
    y = mutation.fill(input, value)
    return y, lambda dy: (NoTangent(), torch.zeros_like(dy) if is_float_tensor(input) else NoTangent(),
                          grad_like(dy, value) if is_float_tensor(value) else NoTangent())


@rrule(mutation.zero)
def zero(input):
    """y = 0;  dx = 0."""
    return mutation.zero(input), lambda dy: (NoTangent(), torch.zeros_like(dy))


@rrule(mutation.view_gather)
def view_gather(base, index):
    """y = base.flatten()[index];  dbase = zeros.index_add(index, dy), shaped like base (elements
    a view reads more than once, as an expanded view does, add up)."""
    y = mutation.view_gather(base, index)
    shape = base.shape

    def pullback(dy):
        flat = dy.new_zeros(shape.numel()).index_add(0, index.reshape(-1), dy.reshape(-1))
        return NoTangent(), flat.reshape(shape), NoTangent()

    return y, pullback


@rrule(mutation.view_scatter)
def view_scatter(base, src, index):
    """y = base with y.flatten()[index] = src;  dbase = dy with those elements zeroed,
    dsrc = dy.flatten()[index]."""
    y = mutation.view_scatter(base, src, index)
    base_is_float, src_dtype = is_float_tensor(base), src.dtype if is_float_tensor(src) else None

    def pullback(dy):
        dbase = mutation.view_scatter(dy, dy.new_zeros(index.shape), index) if base_is_float else NoTangent()
        dsrc = torch.take(dy, index).to(src_dtype) if src_dtype is not None else NoTangent()
        return NoTangent(), dbase, dsrc, NoTangent()

    return y, pullback
