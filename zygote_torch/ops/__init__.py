"""Fused pullbacks (custom ops) for the rules: cross-entropy, linear + cross-entropy, layer_norm,
rms_norm, softmax, log_softmax, GELU, SiLU, SwiGLU, embedding.

Each function below runs ``torch.ops.zygote_torch.<op>`` (C++ kernels on CPU, CUDA kernels on a
GPU; csrc/) when the compiled extension is loaded and the inputs are supported, and otherwise the
pure-torch formula of ``zygote_torch.ops.reference`` (same math, same results up to rounding).
Supported by the kernels: float32 / float64 / bfloat16 / float16, all tensors of one dtype and
device; anything else (other dtypes, mixed dtypes, inputs that require grad while grad mode is on,
so that higher-order AD differentiates the formula, functorch-wrapped tensors, forward-mode AD
dual numbers) takes the formula.
Non-contiguous inputs are made contiguous. Results are computed in float32 for bfloat16/float16
(float64 for float64) and returned in the input dtype; per-row statistics (lse) stay float32.

``available()`` says which compiled extension is loaded: ``{"cpu": bool, "cuda": bool}``.
``ZYGOTE_TORCH_NO_EXT=1`` in the environment (read at import) forces the pure-torch path.

The ops also have fake (meta) kernels, so they trace under ``torch.compile`` / FakeTensorMode.
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

from ..capture.leaves import announces
from . import _loader, grouped_mm, reference
from .reference import acc_dtype, loss_grad_scale, reduce_loss

__all__ = [
    "available", "cross_entropy_forward", "cross_entropy_backward",
    "linear_cross_entropy_forward", "linear_cross_entropy_backward", "linear_cross_entropy",
    "layer_norm_backward", "rms_norm_backward", "softmax_backward", "log_softmax_backward",
    "gelu_backward", "silu_backward", "swiglu_forward", "swiglu_backward", "embedding_backward",
    "reference",
]

_loader.load()
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

try:
    _is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
except AttributeError:  # pragma: no cover
    def _is_wrapped(t):
        return False


def available() -> dict:
    """``{"cpu": bool, "cuda": bool}``: whether the compiled CPU / CUDA kernels are loaded."""
    return dict(_loader.LOADED)


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    """Whether the compiled op may run on these tensors (the float ones must share a dtype)."""
    t0 = tensors[0]
    dev = t0.device.type
    if not _loader.has_kernels(dev) or t0.dtype not in _FLOATS or _forward_ad._current_level >= 0:
        return False  # (under forward-mode AD the formula carries the tangents; the kernels do not)
    grad_on = torch.is_grad_enabled()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device != t0.device:
            return False
        if t.is_floating_point() and t.dtype != t0.dtype:
            return False
        if (grad_on and t.requires_grad) or _is_wrapped(t):
            return False
    return True


def _ops():
    return torch.ops.zygote_torch


# ---------------------------------------------------------------------------------------------
# cross-entropy

def _ce_rows(logits, target, ignore_index, label_smoothing):
    """Per-row losses (accumulation dtype) and lse [N] of cross-entropy on [N, C] logits."""
    if _kernel_ok(logits, target) and not target.is_floating_point():
        return _ops().cross_entropy_fwd(logits, target, int(ignore_index), float(label_smoothing))
    x = logits.to(acc_dtype(logits.dtype))
    rows, lse = reference.cross_entropy_forward(x, target, ignore_index, label_smoothing, "none")
    return rows, lse


def _ce_grad(g, logits, target, lse, ignore_index, label_smoothing):
    """dlogits of cross-entropy given the per-row (or single) factor g."""
    if _kernel_ok(logits, target) and not target.is_floating_point():
        return _ops().cross_entropy_bwd(g, logits, target, lse, int(ignore_index), float(label_smoothing))
    return reference.cross_entropy_backward(g.expand(logits.shape[0]).contiguous(), logits, target, lse,
                                            ignore_index, label_smoothing, "none")


@announces
def cross_entropy_forward(logits, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                          reduction: str = "mean"):
    """Cross-entropy over class indices for logits [N, C] and target [N]; returns (loss, lse).

    lse_i = log sum_c exp(x_ic) (float32; float64 for float64 logits), saved for the backward;
    loss_i = (1 - eps) (lse_i - x_{i,t_i}) + eps (lse_i - mean_c x_ic)   (eps = label_smoothing),
    0 where t_i == ignore_index; reduction 'none' (loss [N]), 'sum', or 'mean' (sum over the
    number of non-ignored rows), as ``F.cross_entropy`` without class weights. The loss has the
    dtype of the logits.
    """
    rows, lse = _ce_rows(logits, target, ignore_index, label_smoothing)
    return reduce_loss(rows, target, ignore_index, reduction).to(logits.dtype), lse


@announces
def cross_entropy_backward(dloss, logits, target, lse, ignore_index: int = -100, label_smoothing: float = 0.0,
                           reduction: str = "mean"):
    """dlogits = g_i (softmax(x_i) - eps / C - (1 - eps) onehot(t_i)), 0 for ignored rows, with
    g_i = dloss_i ('none'), dloss ('sum'), dloss / #non-ignored ('mean'); one read of the logits
    and one write of the gradient (lse from ``cross_entropy_forward``)."""
    g = loss_grad_scale(dloss, target, ignore_index, reduction, acc_dtype(logits.dtype))
    return _ce_grad(g, logits, target, lse, ignore_index, label_smoothing)


# ---------------------------------------------------------------------------------------------
# linear + cross-entropy, chunked over rows

def _chunk_rows(n, v, chunk_size):
    if chunk_size is None:
        chunk_size = max(1, (1 << 26) // max(v, 1))  # about 64M logits per chunk
    return max(1, min(int(chunk_size), max(n, 1)))


def linear_cross_entropy_forward(x, weight, bias, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                                 reduction: str = "mean", chunk_size: int | None = None):
    """loss = cross_entropy(x @ weight.T + bias, target) for x [N, H], weight [V, H], bias [V] or
    None, computed ``chunk_size`` rows at a time so that only one chunk of logits ever exists.
    Returns (loss, lse [N]); the backward recomputes each chunk's logits from x and uses lse."""
    n, v = x.shape[0], weight.shape[0]
    cs = _chunk_rows(n, v, chunk_size)
    rows, lses = [], []
    for s in range(0, n, cs):
        logits = F.linear(x[s:s + cs], weight, bias)
        r, lse = _ce_rows(logits, target[s:s + cs], ignore_index, label_smoothing)
        rows.append(r)
        lses.append(lse)
    if not rows:
        rows = [x.new_zeros(0, dtype=acc_dtype(x.dtype))]
        lses = [x.new_zeros(0, dtype=acc_dtype(x.dtype))]
    rows, lse = torch.cat(rows), torch.cat(lses)
    return reduce_loss(rows, target, ignore_index, reduction).to(x.dtype), lse


def linear_cross_entropy_backward(dloss, x, weight, bias, target, lse, ignore_index: int = -100,
                                  label_smoothing: float = 0.0, reduction: str = "mean",
                                  chunk_size: int | None = None):
    """(dx, dweight, dbias) of ``linear_cross_entropy_forward``: per chunk, logits are recomputed,
    dlogits = cross_entropy_backward(...), dx = dlogits @ weight, dweight += dlogits.T @ x,
    dbias += sum_rows dlogits (dweight, dbias accumulated in float32; dbias None without bias)."""
    n, v = x.shape[0], weight.shape[0]
    acc = acc_dtype(x.dtype)
    g = loss_grad_scale(dloss, target, ignore_index, reduction, acc)
    cs = _chunk_rows(n, v, chunk_size)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    db = torch.zeros(v, dtype=acc, device=weight.device) if bias is not None else None
    for s in range(0, n, cs):
        xc = x[s:s + cs]
        logits = F.linear(xc, weight, bias)
        gc = g if g.numel() == 1 else g[s:s + cs]
        dl = _ce_grad(gc, logits, target[s:s + cs], lse[s:s + cs], ignore_index, label_smoothing)
        torch.mm(dl, weight, out=dx[s:s + cs])
        if dl.dtype == acc:
            dw.addmm_(dl.t(), xc)
        else:
            dw += torch.mm(dl.t(), xc).to(acc)
        if db is not None:
            db += dl.sum(0, dtype=acc)
    return dx, dw.to(weight.dtype), (db.to(bias.dtype) if db is not None else None)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, label_smoothing, reduction, chunk_size):
        loss, lse = linear_cross_entropy_forward(x, weight, bias, target, ignore_index, label_smoothing,
                                                 reduction, chunk_size)
        ctx.save_for_backward(x, weight, bias, target, lse)
        ctx.args = (ignore_index, label_smoothing, reduction, chunk_size)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        x, weight, bias, target, lse = ctx.saved_tensors
        dx, dw, db = linear_cross_entropy_backward(dloss, x, weight, bias, target, lse, *ctx.args)
        return dx, dw, db, None, None, None, None, None


def linear_cross_entropy(x, weight, bias, target, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean", chunk_size: int | None = None):
    """``F.cross_entropy(F.linear(x, weight, bias), target, ...)`` as a torch.autograd.Function whose
    forward and backward never hold more than one chunk of logits (see the two functions above)."""
    return _LinearCrossEntropy.apply(x, weight, bias, target, ignore_index, label_smoothing, reduction, chunk_size)


# ---------------------------------------------------------------------------------------------
# normalisation

def _trailing_numel(x, mean):
    """N (the normalised size) and the normalised shape, from a keepdim statistic such as the mean
    of ``torch.native_layer_norm``: the trailing dims where the statistic has size 1 (leading
    size-1 dims of x among them are taken as not normalised; pass normalized_shape to be exact)."""
    if mean.dim() == x.dim():
        k = 0
        while k < x.dim() and mean.shape[x.dim() - 1 - k] == 1:
            k += 1
        while k > 1 and x.shape[x.dim() - k] == 1:  # ambiguous size-1 dims: not normalised
            k -= 1
        shape = tuple(x.shape[x.dim() - k:])
        return math.prod(shape), shape
    if mean.numel():
        n = x.numel() // mean.numel()
        return n, (n,)
    return x.shape[-1], (x.shape[-1],)


@announces
def layer_norm_backward(dy, x, mean, rstd, weight=None, normalized_shape=None):
    """Backward of y = xhat * w + b, xhat = (x - mean) * rstd over the trailing normalised dims:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w;
    dw = sum over rows of dy * xhat;  db = sum over rows of dy.

    ``mean`` / ``rstd`` as returned by ``torch.native_layer_norm`` (any shape with one entry per
    row). The normalised size is taken from ``normalized_shape``, else weight, else mean's shape.
    Returns (dx, dw, db): dw None without weight; dw, db in weight's dtype (x's without weight).
    One pass over x and dy.
    """
    if normalized_shape is not None:
        shape = tuple(normalized_shape)
        n = math.prod(shape)
    elif weight is not None:
        shape, n = tuple(weight.shape), weight.numel()
    else:
        n, shape = _trailing_numel(x, mean)
    m = x.numel() // n if n else mean.numel()
    if _kernel_ok(x, dy, *( [weight] if weight is not None else [])) and n and mean.numel() == m:
        dx, dw, db = _ops().layer_norm_bwd(dy.reshape(m, n), x.reshape(m, n), mean.reshape(m), rstd.reshape(m),
                                           weight.reshape(n) if weight is not None else None)
    else:
        dx, dw, db = reference.layer_norm_backward(dy, x, mean, rstd, weight, m, n)
    pdtype = weight.dtype if weight is not None else x.dtype
    dw = dw.to(pdtype).reshape(shape) if weight is not None else None
    return dx.reshape(x.shape), dw, db.to(pdtype).reshape(shape)


@announces
def rms_norm_backward(dy, x, normalized_shape, weight=None, eps=None, rstd=None):
    """Backward of y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) over the trailing
    ``normalized_shape`` dims (eps None: the dtype's machine epsilon, as torch.rms_norm):

    dx = rstd * (g - xhat * mean(g * xhat)),  xhat = x * rstd,  g = dy * w;
    dw = sum over rows of dy * xhat.

    ``rstd`` (one entry per row) is recomputed from x when not given. Returns (dx, dw), dw None
    without weight. One pass over x and dy.
    """
    shape = tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)
    n = math.prod(shape)
    m = x.numel() // n if n else 0
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    ts = [x, dy] + ([weight] if weight is not None else [])
    if _kernel_ok(*ts) and n and (rstd is None or rstd.numel() == m) and \
            (rstd is None or (rstd.device == x.device and not (torch.is_grad_enabled() and rstd.requires_grad))):
        dx, dw = _ops().rms_norm_bwd(dy.reshape(m, n), x.reshape(m, n),
                                     rstd.reshape(m) if rstd is not None else None,
                                     weight.reshape(n) if weight is not None else None, float(eps))
    else:
        dx, dw = reference.rms_norm_backward(dy, x, rstd, weight, eps, m, n)
    return dx.reshape(x.shape), (dw.to(weight.dtype).reshape(shape) if weight is not None else None)


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax

def _softmax_like(op, ref, dy, y, dim):
    if y.dim() == 0 or dy.shape != y.shape or not _kernel_ok(y, dy) or y.numel() == 0:
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
    return _softmax_like(_ops().softmax_bwd if _loader.MODULE else None, reference.softmax_backward, dy, y, dim)


@announces
def log_softmax_backward(dy, y, dim):
    """y = log_softmax(x, dim):  dx = dy - exp(y) * sum(dy, dim). In y's dtype."""
    return _softmax_like(_ops().log_softmax_bwd if _loader.MODULE else None, reference.log_softmax_backward,
                         dy, y, dim)


# ---------------------------------------------------------------------------------------------
# elementwise

def _same(*ts):
    return all(t.shape == ts[0].shape for t in ts) and _kernel_ok(*ts)


@announces
def gelu_backward(dy, x, approximate: str = "none"):
    """dx = dy * gelu'(x): exact, gelu'(x) = Phi(x) + x phi(x); 'tanh', with
    t = tanh(sqrt(2/pi) (x + 0.044715 x^3)): gelu'(x) = (1 + t) / 2 + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if _same(dy, x):
        return _ops().gelu_bwd(dy, x, approximate)
    return reference.gelu_backward(dy, x, approximate)


@announces
def silu_backward(dy, x):
    """dx = dy * s * (1 + x (1 - s)),  s = sigmoid(x)."""
    if _same(dy, x):
        return _ops().silu_bwd(dy, x)
    return reference.silu_backward(dy, x)


def swiglu_forward(a, b):
    """y = silu(a) * b = a * sigmoid(a) * b (a: the gate, b: the up projection)."""
    if _same(a, b):
        return _ops().swiglu_fwd(a, b)
    return reference.swiglu_forward(a, b)


def swiglu_backward(dy, a, b):
    """(da, db) = (dy * b * silu'(a), dy * silu(a)),  silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)."""
    if _same(dy, a, b):
        return tuple(_ops().swiglu_bwd(dy, a, b))
    return reference.swiglu_backward(dy, a, b)


# ---------------------------------------------------------------------------------------------
# embedding

@announces
def embedding_backward(dy, indices, num_weights: int, padding_idx: int | None = None):
    """dW [num_weights, D] = sum over positions k with indices[k] == w of dy[k] (float32
    accumulation, positions summed in order: deterministic), row padding_idx zero. dy has shape
    indices.shape + (D,); a negative padding_idx counts from the end, as in F.embedding."""
    if padding_idx is not None and padding_idx < 0:
        padding_idx += num_weights
    d = dy.shape[-1]
    if _kernel_ok(dy, indices) and not indices.is_floating_point() and dy.shape[:-1] == indices.shape:
        return _ops().embedding_bwd(dy.reshape(-1, d), indices.reshape(-1), int(num_weights),
                                    -1 if padding_idx is None else int(padding_idx))
    return reference.embedding_backward(dy, indices, num_weights, padding_idx)
