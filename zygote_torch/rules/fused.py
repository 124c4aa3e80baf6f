"""Rules of the fused pullback kernels (``zygote_torch.ops``), and when the other rules use them.

The rules of cross-entropy, softmax, log_softmax, GELU and layer norm call the custom ops on CUDA
tensors, where they move the fewest bytes (csrc/); on the CPU torch's own fused kernels are faster
than ours (measured, see benchmarks/RESULTS.md), so the rules take those unless
``USE_KERNELS_ON_CPU`` is set (the tests set it to check the wiring). Each fused op is a leaf with a
rule here: its value comes from the kernel, its derivative from the pure-torch reference formula of
``zygote_torch.ops.reference`` (second derivatives stay exact).
"""
from __future__ import annotations

import torch

from .. import ops
from ..ad.registry import rrule
from ._util import NoTangent, is_zero, materialize, nondiff, reference_pullback

USE_KERNELS_ON_CPU = False


def use_kernels(t: torch.Tensor) -> bool:
    """Whether the rules should call the custom ops for tensors like ``t``."""
    device = t.device.type
    return ops.available().get(device, False) and (device == "cuda" or USE_KERNELS_ON_CPU)


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
        lambda d, x: ops.reference.cross_entropy_backward(d, x, target, _lse(x), ignore_index, label_smoothing,
                                                          reduction), (dloss, logits))
    return out, lambda dout: (NoTangent(), *back(dout), NoTangent(), NoTangent()) + nondiff(3)


def _lse(x):
    """lse recomputed from the logits, so its dependence on them is differentiated."""
    return torch.logsumexp(x.to(ops.reference.acc_dtype(x.dtype)), 1)


@rrule(ops.softmax_backward)
def softmax_backward(dy, y, dim):
    """Fused y * (dy - sum(dy * y, dim)); differentiated through that formula."""
    back = reference_pullback(lambda g, y: ops.reference.softmax_backward(g, y, dim), (dy, y))
    return ops.softmax_backward(dy, y, dim), lambda dout: (NoTangent(), *back(dout), NoTangent())


@rrule(ops.log_softmax_backward)
def log_softmax_backward(dy, y, dim):
    """Fused dy - exp(y) * sum(dy, dim); differentiated through that formula."""
    back = reference_pullback(lambda g, y: ops.reference.log_softmax_backward(g, y, dim), (dy, y))
    return ops.log_softmax_backward(dy, y, dim), lambda dout: (NoTangent(), *back(dout), NoTangent())


@rrule(ops.gelu_backward)
def gelu_backward(dy, x, approximate="none"):
    """Fused dy * gelu'(x); differentiated through the formula."""
    back = reference_pullback(lambda g, x: ops.reference.gelu_backward(g, x, approximate), (dy, x))
    return ops.gelu_backward(dy, x, approximate), lambda dout: (NoTangent(), *back(dout), NoTangent())


@rrule(ops.layer_norm_backward)
def layer_norm_backward(dy, x, mean, rstd, weight=None, normalized_shape=None):
    """Fused (dx, dw, db) of layer norm; differentiated through the reference formula of the
    layer-norm rule (mean and rstd recomputed from x)."""
    from .nn import _layer_norm_backward_reference, _norm_dims  # the formula lives with layer_norm's rule

    out = ops.layer_norm_backward(dy, x, mean, rstd, weight, normalized_shape)
    shape = normalized_shape if normalized_shape is not None else tuple(weight.shape)
    dims = _norm_dims(x, shape)
    low = x.dtype in (torch.float16, torch.bfloat16)
    back = reference_pullback(lambda g, x, w: _layer_norm_backward_reference(g, x, w, dims, rstd, low),
                              (dy, x, weight))

    def pullback(dout):
        douts = tuple(materialize(d, like=o) if isinstance(o, torch.Tensor) else None for d, o in zip(dout, out))
        dg, dx, dw = back(douts)
        return NoTangent(), dg, dx, NoTangent(), NoTangent(), dw, NoTangent()

    return out, pullback
