"""Rules for neural-network building blocks: softmax and log_softmax, activations (GELU, SiLU, ELU,
leaky ReLU, softplus, Mish, hardtanh, ReLU6, log-sigmoid), dropout and embedding. (The norms,
layer_norm and rms_norm included, are in :mod:`.norms`.)

Each rule is registered under every spelling that reaches capture (``torch.softmax``,
``Tensor.softmax``, ``F.softmax``, ``torch.special.softmax``, ...) and mirrors the signature of the
callable it stands for, so keyword calls bind. Subgradients follow torch.autograd at the kinks
(``hardtanh'(min) = 0``, ``leaky_relu'(0) = slope``, ``elu'(0) = alpha``).

``inplace=True`` (F.silu, F.elu, ...) is honoured as far as the returned value goes: the result is
computed out of place and returned, the input is left unchanged, because an in-place mutation cannot
be differentiated. ``x = F.silu(x, inplace=True)`` (what ``nn.SiLU(inplace=True)`` does) is exact.

``F.tanh`` and ``F.sigmoid`` are not here: they call ``Tensor.tanh`` / ``Tensor.sigmoid`` without
announcing themselves to ``__torch_function__``, so capture sees (and differentiates) the method.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ..errors import ZygoteError
from .. import ops
from ..ops import use_kernels
from ..ops.activations import gelu_derivative, silu_derivative
from ..ops.softmax import softmax_backward_formula
from ._util import NoTangent, grad_like, nondiff, reference_pullback

aten = torch.ops.aten

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax

def _implicit_softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    """F.softmax's legacy choice for ``dim=None`` (with torch's deprecation warning)."""
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. "
                  "Change the call to include dim=X as an argument.", stacklevel=stacklevel)
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_rule(input, dim, dtype):
    """y = softmax(x, dim);  dx = y * (dy - sum(dy * y, dim)), by torch's fused kernel."""
    y = torch.softmax(input, dim, dtype=dtype)
    if use_kernels(y, "softmax"):
        return y, lambda dy: ops.softmax_backward(dy, y, dim)
    return y, lambda dy: aten._softmax_backward_data(dy, y, dim, y.dtype)


def _log_softmax_rule(input, dim, dtype):
    """y = log_softmax(x, dim);  dx = dy - exp(y) * sum(dy, dim), by torch's fused kernel."""
    y = torch.log_softmax(input, dim, dtype=dtype)
    if use_kernels(y, "log_softmax"):
        return y, lambda dy: ops.log_softmax_backward(dy, y, dim)
    return y, lambda dy: aten._log_softmax_backward_data(dy, y, dim, y.dtype)


@rrule(aten._softmax_backward_data, aten._softmax_backward_data.default)
def softmax_backward_data(grad_output, output, dim, input_dtype):
    """The softmax pullback as an op: out = y * (g - sum_dim(g * y)); differentiated through that
    formula (second derivatives)."""
    out = aten._softmax_backward_data(grad_output, output, dim, input_dtype)
    back = reference_pullback(lambda g, y: softmax_backward_formula(g, y, dim), (grad_output, output))
    return out, lambda dout: (NoTangent(), *back(dout), NoTangent(), NoTangent())


@rrule(torch.softmax, Tensor.softmax, torch.special.softmax)
def softmax(input, dim, dtype=None):
    """y_i = exp(x_i) / sum_j exp(x_j) along ``dim`` (computed in ``dtype`` when given);
    dx = y * (dy - sum(dy * y, dim))."""
    y, back = _softmax_rule(input, dim, dtype)
    return y, lambda dy: (NoTangent(), grad_like(back(dy), input), NoTangent(), NoTangent())


@rrule(torch.log_softmax, Tensor.log_softmax, torch.special.log_softmax)
def log_softmax(input, dim, dtype=None):
    """y = x - logsumexp(x, dim) (computed in ``dtype`` when given);  dx = dy - softmax(x) * sum(dy, dim)."""
    y, back = _log_softmax_rule(input, dim, dtype)
    return y, lambda dy: (NoTangent(), grad_like(back(dy), input), NoTangent(), NoTangent())


@rrule(F.softmax)
def f_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """F.softmax: as torch.softmax; ``dim=None`` takes torch's legacy implicit dimension (0 for 0-,
    1- and 3-d input, else 1) with its deprecation warning."""
    if dim is None:
        dim = _implicit_softmax_dim("softmax", input.dim(), _stacklevel + 1)
    y, back = _softmax_rule(input, dim, dtype)
    return y, lambda dy: (NoTangent(), grad_like(back(dy), input)) + nondiff(3)


@rrule(F.log_softmax)
def f_log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """F.log_softmax: as torch.log_softmax; ``dim=None`` takes torch's legacy implicit dimension."""
    if dim is None:
        dim = _implicit_softmax_dim("log_softmax", input.dim(), _stacklevel + 1)
    y, back = _log_softmax_rule(input, dim, dtype)
    return y, lambda dy: (NoTangent(), grad_like(back(dy), input)) + nondiff(3)


# ---------------------------------------------------------------------------------------------
# activations

@rrule(F.gelu)
def gelu(input, *, approximate="none"):
    """(``approximate`` is keyword-only, as in torch's ``gelu(input, *, approximate='none')``.)
    approximate='none':  y = x * Phi(x),  dx = dy * (Phi(x) + x * phi(x));
    approximate='tanh':  y = x/2 * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 x^3),
    dx = dy * (1/2 (1 + tanh(u)) + x/2 (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2))."""
    y = F.gelu(input, approximate=approximate)
    if use_kernels(input, "gelu"):
        return y, lambda dy: (NoTangent(), ops.gelu_backward(dy, input, approximate))
    return y, lambda dy: (NoTangent(), aten.gelu_backward(dy, input, approximate=approximate))


@rrule(aten.gelu_backward, aten.gelu_backward.default)
def gelu_backward(grad_output, self, *, approximate="none"):
    """The gelu pullback as an op: out = g * gelu'(x); differentiated through that formula."""
    out = aten.gelu_backward(grad_output, self, approximate=approximate)
    back = reference_pullback(lambda g, x: g * gelu_derivative(x, approximate), (grad_output, self))
    return out, lambda dout: (NoTangent(), *back(dout))


@rrule(F.silu)
def silu(input, inplace=False):
    """y = x * sigmoid(x);  dx = dy * s * (1 + x * (1 - s)),  s = sigmoid(x). ``inplace`` returns
    the result out of place (see the module docs)."""
    s = torch.sigmoid(input)
    y = input * s
    if use_kernels(input, "silu"):
        return y, lambda dy: (NoTangent(), ops.silu_backward(dy, input), NoTangent())
    return y, lambda dy: (NoTangent(), dy * silu_derivative(input, s), NoTangent())


@rrule(F.mish)
def mish(input, inplace=False):
    """y = x * tanh(softplus(x));  dx = dy * (t + x * sigmoid(x) * (1 - t^2)),  t = tanh(softplus(x))."""
    t = torch.tanh(F.softplus(input))
    y = input * t
    return y, lambda dy: (NoTangent(), dy * (t + input * torch.sigmoid(input) * (1 - t * t)), NoTangent())


@rrule(F.elu)
def elu(input, alpha=1.0, inplace=False):
    """y = x for x > 0, alpha * (exp(x) - 1) otherwise;  dx = dy for x > 0, dy * alpha * exp(x)
    otherwise (torch's choice at 0)."""
    y = F.elu(input, alpha)

    def pullback(dy):
        return NoTangent(), torch.where(input > 0, dy, dy * (alpha * torch.exp(input))), NoTangent(), NoTangent()

    return y, pullback


@rrule(F.leaky_relu)
def leaky_relu(input, negative_slope=0.01, inplace=False):
    """y = x for x > 0, slope * x otherwise;  dx = dy for x > 0, slope * dy otherwise."""
    y = F.leaky_relu(input, negative_slope)
    return y, lambda dy: (NoTangent(), torch.where(input > 0, dy, dy * negative_slope)) + nondiff(2)


@rrule(F.softplus)
def softplus(input, beta=1.0, threshold=20.0):
    """y = log(1 + exp(beta x)) / beta, linear (y = x) where beta x > threshold;
    dx = dy * sigmoid(beta x), dy where beta x > threshold."""
    y = F.softplus(input, beta, threshold)

    def pullback(dy):
        bx = input * beta
        return NoTangent(), torch.where(bx > threshold, dy, dy * torch.sigmoid(bx)), NoTangent(), NoTangent()

    return y, pullback


def _hardtanh_pullback(input, min_val, max_val):
    def pullback(dy):
        inside = (input > min_val) & (input < max_val)
        return torch.where(inside, dy, torch.zeros_like(dy))
    return pullback


@rrule(F.hardtanh)
def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    """y = clamp(x, min_val, max_val);  dx = dy strictly inside (min_val, max_val), 0 elsewhere."""
    y = F.hardtanh(input, min_val, max_val)
    back = _hardtanh_pullback(input, min_val, max_val)
    return y, lambda dy: (NoTangent(), back(dy)) + nondiff(3)


@rrule(F.relu6)
def relu6(input, inplace=False):
    """y = clamp(x, 0, 6);  dx = dy strictly inside (0, 6), 0 elsewhere."""
    y = F.relu6(input)
    back = _hardtanh_pullback(input, 0.0, 6.0)
    return y, lambda dy: (NoTangent(), back(dy), NoTangent())


@rrule(F.logsigmoid)
def logsigmoid(input):
    """y = log(sigmoid(x)) = -softplus(-x);  dx = dy * sigmoid(-x)."""
    y = F.logsigmoid(input)
    return y, lambda dy: (NoTangent(), dy * torch.sigmoid(-input))


# ---------------------------------------------------------------------------------------------
# dropout, embedding

def _dropout_rule(input, p, training):
    """y = x * m / (1 - p) with m ~ Bernoulli(1 - p) drawn once in the forward (the same stream
    torch's dropout draws from), identity when not training;  dx = dy * m / (1 - p)."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0:
        return input, lambda dy: dy  # torch returns the input itself
    if p == 1:
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return input * zero, lambda dy: dy * zero
    scale = 1.0 / (1.0 - p)
    noise = torch.empty_like(input).bernoulli_(1.0 - p) * scale  # drawn in input's memory order, as torch's
    return input * noise, lambda dy: dy * noise


@rrule(F.dropout)
def dropout(input, p=0.5, training=True, inplace=False):
    """F.dropout; see ``_dropout_rule``. ``inplace`` returns the result out of place."""
    y, back = _dropout_rule(input, p, training)
    return y, lambda dy: (NoTangent(), back(dy)) + nondiff(3)


@rrule(torch.dropout)
def torch_dropout(input, p, train):
    """torch.dropout(input, p, train); see ``_dropout_rule``."""
    y, back = _dropout_rule(input, p, train)
    return y, lambda dy: (NoTangent(), back(dy)) + nondiff(2)


def _embedding_rule(weight, indices, padding_idx, scale_grad_by_freq):
    """y = weight[indices];  dweight[k] = sum of dy over the positions where indices == k
    (divided by that count with ``scale_grad_by_freq``), zero for row ``padding_idx`` (< 0: none)."""
    y = torch.embedding(weight, indices, padding_idx, scale_grad_by_freq)

    def pullback(dy):
        if not scale_grad_by_freq and weight.dim() == 2 and use_kernels(dy, "embedding"):
            return ops.embedding_backward(dy, indices, weight.shape[0], padding_idx if padding_idx >= 0 else None)
        flat = indices.reshape(-1)
        g = dy.reshape((flat.shape[0],) + tuple(weight.shape[1:]))
        if padding_idx >= 0 or scale_grad_by_freq:
            keep = torch.ones_like(flat, dtype=g.dtype)
            if scale_grad_by_freq:
                counts = torch.zeros(weight.shape[0], dtype=g.dtype, device=g.device).index_add(0, flat, keep)
                keep = keep / counts.index_select(0, flat)
            if padding_idx >= 0:
                keep = torch.where(flat == padding_idx, torch.zeros_like(keep), keep)
            g = g * keep.reshape((-1,) + (1,) * (g.dim() - 1))
        dw = torch.zeros(weight.shape, dtype=g.dtype, device=g.device).index_add(0, flat, g)
        return dw.reshape(weight.shape)

    return y, pullback


def _dense_only(sparse):
    if sparse:
        warnings.warn("zygote_torch: sparse=True in an embedding: the weight's cotangent is dense",
                      stacklevel=3)


@rrule(F.embedding)
def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
              sparse=False):
    """F.embedding: rows of ``weight`` at the integer ``input``; see ``_embedding_rule``."""
    if max_norm is not None:
        raise ZygoteError("F.embedding(..., max_norm=...) renormalises the weight in place, which cannot "
                          "be differentiated; renormalise the weight explicitly before the lookup")
    _dense_only(sparse)
    n = weight.shape[0]
    if padding_idx is None:
        pad = -1
    else:
        if not -n <= padding_idx < n:
            raise AssertionError("Padding_idx must be within num_embeddings")
        pad = padding_idx % n
    y, back = _embedding_rule(weight, input, pad, scale_grad_by_freq)
    return y, lambda dy: (NoTangent(), NoTangent(), back(dy)) + nondiff(5)


@rrule(torch.embedding)
def torch_embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """torch.embedding(weight, indices, ...): see ``_embedding_rule``."""
    _dense_only(sparse)
    y, back = _embedding_rule(weight, indices, padding_idx, scale_grad_by_freq)
    return y, lambda dy: (NoTangent(), back(dy)) + nondiff(4)


@rrule(torch.ops.aten._log_softmax_backward_data, torch.ops.aten._log_softmax_backward_data.default)
def log_softmax_backward_data(grad_output, output, dim, input_dtype):
    """The log_softmax pullback as an op: out = g - p * sum_dim(g), p = exp(output);
    dg = dout - sum_dim(p * dout),  doutput = -dout * p * sum_dim(g)."""
    out = torch.ops.aten._log_softmax_backward_data(grad_output, output, dim, input_dtype)

    def pullback(dout):
        p = torch.exp(output)
        dg = dout - (p * dout).sum(dim, keepdim=True)
        doutput = -dout * p * grad_output.sum(dim, keepdim=True)
        return NoTangent(), dg, doutput, NoTangent(), NoTangent()

    return out, pullback
