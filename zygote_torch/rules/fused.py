"""Rules of the fused pullback kernels (``zygote_torch.ops``).

Each fused op is a leaf with a rule here: its value comes from the kernel, its derivative from the
pure-torch formula of the op's family module in ``zygote_torch.ops`` (second derivatives stay
exact). When the other rules call these ops instead of torch's kernels is ``ops.use_kernels``
(``zygote_torch/ops/kernel_choice.py``).
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ..ad.registry import rrule
from ..ops.activations import gelu_backward_reference, silu_backward_reference
from ..ops.cross_entropy import cross_entropy_backward_reference, row_lse
from ..ops.embedding import embedding_backward_reference
from ..ops.norms import layer_norm_backward_formula, rms_norm_backward_reference
from ..ops.softmax import log_softmax_backward_reference, softmax_backward_reference
from ._util import NoTangent, is_zero, materialize, nondiff, reference_pullback


@rrule(ops.cross_entropy_forward)
def cross_entropy_forward(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """(loss, lse) = fused cross-entropy;  dlogits = cross_entropy_backward(dloss) (lse is a
    statistic for the backward: a cotangent reaching it is refused)."""
    loss, lse = ops.cross_entropy_forward(logits, target, ignore_index, label_smoothing, reduction)

    def pullback(dout):
        if not is_zero(dout[1]):
            raise NotImplementedError("ops.cross_entropy_forward: its lse output is not differentiable")
        dlogits = ops.cross_entropy_backward(materialize(dout[0], like=loss), logits, target, lse,
                                             ignore_index, label_smoothing, reduction)
        return (NoTangent(), dlogits) + nondiff(4)

    return (loss, lse), pullback


@rrule(ops.cross_entropy_backward)
def cross_entropy_backward(dloss, logits, target, lse, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """The fused cross-entropy pullback; differentiated through its reference formula."""
    out = ops.cross_entropy_backward(dloss, logits, target, lse, ignore_index, label_smoothing, reduction)
    back = reference_pullback(
        lambda d, x: cross_entropy_backward_reference(d, x, target, row_lse(x), ignore_index, label_smoothing,
                                                      reduction), (dloss, logits))
    return out, lambda dout: (NoTangent(), *back(dout), NoTangent(), NoTangent()) + nondiff(3)


@rrule(ops.softmax_backward)
def softmax_backward(dy, y, dim):
    """Fused y * (dy - sum(dy * y, dim)); differentiated through that formula."""
    back = reference_pullback(lambda g, y: softmax_backward_reference(g, y, dim), (dy, y))
    return ops.softmax_backward(dy, y, dim), lambda dout: (NoTangent(), *back(dout), NoTangent())


@rrule(ops.log_softmax_backward)
def log_softmax_backward(dy, y, dim):
    """Fused dy - exp(y) * sum(dy, dim); differentiated through that formula."""
    back = reference_pullback(lambda g, y: log_softmax_backward_reference(g, y, dim), (dy, y))
    return ops.log_softmax_backward(dy, y, dim), lambda dout: (NoTangent(), *back(dout), NoTangent())


@rrule(ops.gelu_backward)
def gelu_backward(dy, x, approximate="none"):
    """Fused dy * gelu'(x); differentiated through the formula."""
    back = reference_pullback(lambda g, x: gelu_backward_reference(g, x, approximate), (dy, x))
    return ops.gelu_backward(dy, x, approximate), lambda dout: (NoTangent(), *back(dout), NoTangent())


@rrule(ops.layer_norm_backward)
def layer_norm_backward(dy, x, mean, rstd, weight=None, normalized_shape=None):
    """Fused (dx, dw, db) of layer norm; differentiated through its differentiable formula (mean and
    rstd recomputed from x)."""
    out = ops.layer_norm_backward(dy, x, mean, rstd, weight, normalized_shape)
    shape = normalized_shape if normalized_shape is not None else tuple(weight.shape)
    back = reference_pullback(lambda g, x, w: layer_norm_backward_formula(g, x, w, shape, rstd), (dy, x, weight))

    def pullback(dout):
        douts = tuple(materialize(d, like=o) if isinstance(o, torch.Tensor) else None for d, o in zip(dout, out))
        dg, dx, dw = back(douts)
        return NoTangent(), dg, dx, NoTangent(), NoTangent(), dw, NoTangent()

    return out, pullback


@rrule(ops.silu_backward)
def silu_backward(dy, x):
    """Fused dy * silu'(x); differentiated through the formula."""
    back = reference_pullback(silu_backward_reference, (dy, x))
    return ops.silu_backward(dy, x), lambda dout: (NoTangent(), *back(dout))


@rrule(ops.rms_norm_backward)
def rms_norm_backward(dy, x, normalized_shape, weight=None, eps=None, rstd=None):
    """Fused (dx, dw) of rms norm; differentiated through the reference formula with rstd recomputed
    from x (its dependence on x matters for second derivatives)."""
    out = ops.rms_norm_backward(dy, x, normalized_shape, weight, eps, rstd)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    n = math.prod(shape)
    m = x.numel() // n
    e = torch.finfo(x.dtype).eps if eps is None else eps

    def formula(g, x, w=None):
        dx, dw = rms_norm_backward_reference(g, x, None, w, e, m, n)
        return (dx.reshape(x.shape), dw.to(w.dtype).reshape(shape)) if w is not None else dx.reshape(x.shape)

    back = reference_pullback(formula, (dy, x) if weight is None else (dy, x, weight))

    def pullback(dout):
        if weight is None:
            dg, dx = back(materialize(dout[0], like=out[0]))
            return (NoTangent(), dg, dx) + nondiff(4)
        dg, dx, dw = back(tuple(materialize(d, like=o) for d, o in zip(dout, out)))
        return NoTangent(), dg, dx, NoTangent(), dw, NoTangent(), NoTangent()

    return out, pullback


@rrule(ops.embedding_backward)
def embedding_backward(dy, indices, num_weights, padding_idx=None):
    """Fused dW = sum of dy rows per index (row padding_idx zero); linear in dy, so its pullback
    gathers:  ddy = dW_cotangent[indices] (zero at padding_idx)."""
    back = reference_pullback(lambda g: embedding_backward_reference(g, indices, num_weights, padding_idx), (dy,))
    return (ops.embedding_backward(dy, indices, num_weights, padding_idx),
            lambda dout: (NoTangent(), *back(dout)) + nondiff(3))
