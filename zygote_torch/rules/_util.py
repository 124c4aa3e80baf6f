"""Small helpers shared by the rules: unbroadcasting, dimension normalisation, refusing ``out=``, and
differentiating a reference formula or a decomposition through the rules of its ops.

Composite ops (most losses and distances, quantile, cov, ...) are rules *via rules*:
``_via_rules(decomposition, *args)`` differentiates the decomposition, written with ops that have
rules, with zygote_torch itself (ChainRules' ``rrule_via_ad``), so the op is one node of the tape
whose pullback is the composition of those rules' pullbacks. It refuses a decomposition that
reaches the torch.func fallback, so no fallback hides inside a rule.
"""
from __future__ import annotations

import torch

from ..ad.tangents import NoTangent, ZeroTangent, is_differentiable, is_zero, materialize, unthunk  # noqa: F401 (re-exported for rules)
from ..ad.via_ad import rrule_via_ad


def unbroadcast(grad, shape) -> torch.Tensor:
    """Sum ``grad`` down to ``shape``: the adjoint of broadcasting a tensor of ``shape``.

    Leading dimensions that broadcasting added are summed away; dimensions of size 1 that were
    expanded are summed with keepdim.
    """
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(tuple(range(lead)))
    dims = [i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1]
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad


class TensorSpec:
    """Shape, dtype and device of a tensor: what a pullback keeps of an argument whose values it
    does not read (``torch.autograd`` keeps sizes, not tensors, for ``x + y``), so the tensor can be
    freed as soon as the forward is done with it."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device

    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


def spec(x):
    """The :class:`TensorSpec` of a tensor; any other value as it is."""
    return TensorSpec(x) if isinstance(x, torch.Tensor) else x


def grad_like(grad, x):
    """The cotangent for argument ``x`` (a tensor or its :class:`TensorSpec`): unbroadcast to its
    shape if it is a tensor, NoTangent for anything else."""
    if isinstance(x, (torch.Tensor, TensorSpec)):
        g = unbroadcast(grad, x.shape)
        if g.is_complex() and not x.is_complex():
            g = g.real  # a real argument's cotangent is the real part
        if g.dtype != x.dtype and x.is_floating_point():
            g = g.to(x.dtype)
        return g
    return NoTangent()


is_float_tensor = is_differentiable  # the name the rules use


def conj(t):
    """conj(t) for complex tensors, t itself otherwise (no copy for real tensors: ``Tensor.conj`` of
    a real tensor returns the same object, which staged recording must not see)."""
    return t.conj() if isinstance(t, torch.Tensor) and t.is_complex() else t


def normalize_dims(dim, ndim: int) -> tuple:
    """``dim`` (None, int or sequence) as a sorted tuple of non-negative dimensions."""
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = (dim,)
    if ndim == 0:
        return ()
    return tuple(sorted(d % ndim for d in dim))


def expand_reduced(grad, shape, dims, keepdim: bool):
    """Broadcast a cotangent of a reduction over ``dims`` back to the input ``shape``."""
    if not keepdim and len(shape):
        for d in dims:
            grad = grad.unsqueeze(d)
    return grad.expand(shape)


def no_out(out) -> None:
    """Refuse ``out=``: writing into a given tensor is not differentiable."""
    if out is not None:
        raise TypeError("out= is not differentiable; assign the result instead")


def nondiff(n: int) -> tuple:
    """``n`` NoTangents, for trailing non-differentiable arguments."""
    return (NoTangent(),) * n


def reference_pullback(reference, args: tuple):
    """The pullback of ``reference(*args)``, differentiated through the rules of its ops.

    For the rule of a fused backward kernel (``aten.native_layer_norm_backward``, ...): the value
    comes from the kernel, the derivative from the same math written in differentiable ops, so
    second derivatives stay exact. Returns ``pullback(dout) -> cotangents of args``."""
    _, back = rrule_via_ad(reference, *args)
    return lambda dout: back(dout)[1:]


def _via_rules(decomposition, *args, value=None):
    """``rrule_via_ad(decomposition, *args, strict=True, value=value)``: the rule of a composite op
    (``(y, pullback)`` like a rule's), whose decomposition must reach rules only."""
    return rrule_via_ad(decomposition, *args, strict=True, value=value)
