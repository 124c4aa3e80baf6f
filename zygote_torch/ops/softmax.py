"""Softmax and log_softmax backward: the compiled ops ``softmax_bwd`` / ``log_softmax_bwd``, their
fake kernels, the wrappers and the formulas (written once: the rules of torch's own
``_softmax_backward_data`` and of the loss functions use them too).

    y = softmax(x, dim):      dx = y * (dy - sum(dy * y, dim))
    y = log_softmax(x, dim):  dx = dy - exp(y) * sum(dy, dim)
"""
from __future__ import annotations

import torch

from ..capture.leaves import announces
from . import _loader, kernel_choice
from ._common import compiled, fake, kernel_ok, to_acc

# float32, 1 thread: log_softmax backward 6.1 vs 5.3 us (ours vs torch's) at 128x128, 13.9 vs 15.6 us
# at 256x256. softmax keeps torch's, a memory-bound tie: AVX512 1.00-1.08 (float32), 1.01-1.04
# (bfloat16); AVX2 0.92-0.93 / 1.03-1.04
kernel_choice.measured("log_softmax", kernel_choice.FAST, min_numel=65536)
kernel_choice.measured("softmax", frozenset(), min_numel=65536)


fake("softmax_bwd")(lambda dy, y: y.new_empty(y.shape))
fake("log_softmax_bwd")(lambda dy, y: y.new_empty(y.shape))


def softmax_backward_formula(dy, y, dim):
    """dx = y * (dy - sum(dy * y, dim)), in the inputs' dtype."""
    return y * (dy - (dy * y).sum(dim, keepdim=True))


def log_softmax_backward_formula(dy, y, dim):
    """dx = dy - exp(y) * sum(dy, dim), in the inputs' dtype."""
    return dy - torch.exp(y) * dy.sum(dim, keepdim=True)


def softmax_backward_reference(dy, y, dim):
    """The softmax formula in the accumulation dtype, in y's dtype."""
    return softmax_backward_formula(to_acc(dy), to_acc(y), dim).to(y.dtype)


def log_softmax_backward_reference(dy, y, dim):
    """The log_softmax formula in the accumulation dtype, in y's dtype."""
    return log_softmax_backward_formula(to_acc(dy), to_acc(y), dim).to(y.dtype)


def _softmax_like(op, ref, dy, y, dim):
    """The kernel ``op`` on [M, N] rows (``dim`` moved last), or the formula ``ref``."""
    if y.dim() == 0 or dy.shape != y.shape or not kernel_ok(y, dy) or y.numel() == 0:
        return ref(dy, y, dim)
    d = dim % y.dim()
    last = d == y.dim() - 1
    if last and y.dim() == 2:  # already [M, N] (no reshapes: they cost more than the kernel at small sizes)
        return op(dy, y)
    yt, gt = (y, dy) if last else (y.movedim(d, -1), dy.movedim(d, -1))
    n = yt.shape[-1]
    out = op(gt.reshape(-1, n), yt.reshape(-1, n)).reshape(yt.shape)
    return out if last else out.movedim(-1, d)


@announces
def softmax_backward(dy, y, dim):
    """y = softmax(x, dim):  dx = y * (dy - sum(dy * y, dim)). In y's dtype."""
    return _softmax_like(compiled().softmax_bwd if _loader.MODULE else None, softmax_backward_reference, dy, y, dim)


@announces
def log_softmax_backward(dy, y, dim):
    """y = log_softmax(x, dim):  dx = dy - exp(y) * sum(dy, dim). In y's dtype."""
    return _softmax_like(compiled().log_softmax_bwd if _loader.MODULE else None, log_softmax_backward_reference,
                         dy, y, dim)
