"""Rules of the fused pullback kernels (``zygote_torch.ops``), and when the other rules use them.

The rules of cross-entropy, softmax, log_softmax, GELU, SiLU, layer norm, RMS norm and embedding
call the custom ops (csrc/) where ``use_kernels(t, op)`` says so, and torch's own kernels (or the
formula) otherwise; SwiGLU is not a torch op, so its kernels serve code that calls
``zygote_torch.ops`` directly:

- CUDA tensors: always (when the CUDA extension is loaded): the kernels move the fewest bytes.
- CPU tensors: per op and dtype, from ``CPU_KERNELS``: where ``benchmarks/cpu_kernels.py`` measured
  our vectorised CPU kernel (the op's Python wrapper included) at least as fast as the eager aten
  kernel of the same pullback: ratio ours / torch <= 1.0 at every size it runs (cross-entropy
  2048x256 and 1024x32000 logits, forward + backward, as the rule switches both; norms and softmax
  4096x128 and 1024x1024; elementwise 1M elements; embedding 1024 -> 256x128, 8192 -> 32000x512), in
  float32 and bfloat16, 1 thread (2 threads agree). Measured on a 2-core AMD EPYC with AVX512, torch
  2.13.0, with torch and our kernels both on AVX512 and both on AVX2 (ATEN_CPU_CAPABILITY=avx2);
  the tables are keyed by the instruction set our kernels run (``cpu_capability()``, which follows
  torch's). Result: cross_entropy, layer_norm, rms_norm, log_softmax, gelu, silu and embedding take
  our kernels; softmax keeps aten's, a memory-bound tie
  (1.00-1.08 on AVX512); float64 and float16 keep aten's (not what the table was measured for), as
  does the baseline instruction set (``"default"``: our generic-vector build is slower there).
  Small problems keep torch's kernels too (``CPU_MIN_NUMEL``: the wrappers' Python decides there).

``USE_KERNELS_ON_CPU``: None (default) follows ``CPU_KERNELS``; True runs every kernel on the CPU
(the tests set it to check the wiring); False none.

Each fused op is a leaf with a rule here: its value comes from the kernel, its derivative from the
pure-torch reference formula of ``zygote_torch.ops.reference`` (second derivatives stay exact).
"""
from __future__ import annotations

import math
import sys

import torch

from .. import ops
from ..ad.registry import rrule
from ..ops import _loader
from ._util import NoTangent, is_zero, materialize, nondiff, reference_pullback

USE_KERNELS_ON_CPU: bool | None = None

_FAST = frozenset({torch.float32, torch.bfloat16})
_MEASURED = {  # op -> the dtypes where our kernel was at least as fast as torch's (see the module docs)
    "cross_entropy": _FAST, "layer_norm": _FAST, "log_softmax": _FAST, "gelu": _FAST,
    "rms_norm": _FAST, "silu": _FAST, "swiglu": _FAST, "embedding": _FAST,
    "softmax": frozenset(),  # AVX512: 1.00-1.08 (float32), 1.01-1.04 (bfloat16); AVX2: 0.92-0.93 / 1.03-1.04
}
CPU_KERNELS: dict[str, dict[str, frozenset]] = {"avx512": _MEASURED, "avx2": _MEASURED, "default": {}}
# Below these sizes (elements of the op's main tensor) the Python of our ops' wrappers costs more
# than the kernel saves: torch's kernel is faster (crossovers measured on the same machine, float32,
# 1 thread: cross-entropy forward + backward at 128x128 logits 31.5 vs 16.1 us, at 512x256 84.9 vs
# 86.7 us; layer norm backward 16.1 vs 7.9 us at 128x128, 32.1 vs 36.3 us at 512x256; log_softmax
# backward 6.1 vs 5.3 us at 128x128, 13.9 vs 15.6 us at 256x256; GELU's is faster at every size).
CPU_MIN_NUMEL = {"cross_entropy": 131072, "layer_norm": 131072, "log_softmax": 65536, "softmax": 65536,
                 "silu": 32768, "embedding": 16384}  # (silu 6.6 vs 6.2 us at 128x128; embedding's dy
# 6.6 vs 5.5 us at 64x64, 7.0 vs 8.7 us at 128x128; rms_norm's kernel is faster at every size)

_cpu_isa: str | None = None


def cpu_capability() -> str | None:
    """The instruction set of the loaded CPU kernels ("avx512", "avx2", "default"), None without them."""
    global _cpu_isa
    if _cpu_isa is None and _loader.MODULE is not None:
        get = getattr(sys.modules.get(_loader.MODULE), "cpu_capability", None)
        _cpu_isa = get() if get is not None else "default"
    return _cpu_isa


def use_kernels(t: torch.Tensor, op: str) -> bool:
    """Whether a rule should call the custom op ``op`` (a key of ``CPU_KERNELS[...]``) for tensors
    like ``t`` (see the module docs)."""
    device = t.device.type
    if not _loader.has_kernels(device):
        return False
    if device != "cpu":
        return device == "cuda"
    if USE_KERNELS_ON_CPU is not None:
        return bool(USE_KERNELS_ON_CPU)
    return t.dtype in CPU_KERNELS.get(cpu_capability(), {}).get(op, ()) and t.numel() >= CPU_MIN_NUMEL.get(op, 0)


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
    from .norms import _layer_norm_backward_reference, _norm_dims  # the formula lives with layer_norm's rule

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


@rrule(ops.silu_backward)
def silu_backward(dy, x):
    """Fused dy * silu'(x); differentiated through the formula."""
    back = reference_pullback(ops.reference.silu_backward, (dy, x))
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
        dx, dw = ops.reference.rms_norm_backward(g, x, None, w, e, m, n)
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
    back = reference_pullback(lambda g: ops.reference.embedding_backward(g, indices, num_weights, padding_idx), (dy,))
    return (ops.embedding_backward(dy, indices, num_weights, padding_idx),
            lambda dout: (NoTangent(), *back(dout)) + nondiff(3))
