"""Rules for the activations of torch.nn.functional beyond those of :mod:`.nn`: softmin, hardswish,
hardsigmoid, CELU, SELU, softsign, tanhshrink, hardshrink, softshrink, threshold, GLU, PReLU, RReLU,
and torch's ``_safe_softmax``. (softmax, log_softmax, GELU, SiLU, ELU, leaky ReLU, softplus, Mish,
hardtanh, ReLU6 and log-sigmoid are in :mod:`.nn`, next to their fused kernels; relu, sigmoid and
tanh in :mod:`.elementwise`.)

The pointwise ones whose other parameters are numbers are registered from one table,
:data:`ACTIVATIONS`, as :mod:`.elementwise` registers its :data:`UNARY` functions: one line per
function with its callables, its parameters after the input (the rule's signature, so keyword
calls bind; each gets a NoTangent), the forward, the cotangent ``dx`` as a function of
``(dy, x, *parameters)`` and the math. ``inplace`` is a parameter of the signature only: the
result is computed out of place and returned, as in :mod:`.nn`. Subgradients at the kinks are
torch's.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ._util import NoTangent, _via_rules, conj, grad_like, is_float_tensor, nondiff, unbroadcast

Tensor = torch.Tensor


# -- softmin and the safe softmax ------------------------------------------------------------------

def _softmax_dim(ndim: int) -> int:
    return 0 if ndim in (0, 1, 3) else 1


@rrule(F.softmin)
def softmin(input, dim=None, _stacklevel=3, dtype=None):
    """y = softmax(-x);  dx = -y * (dy - sum(dy * y, dim))."""
    if dim is None:
        dim = _softmax_dim(input.dim())
    y = F.softmin(input, dim, dtype=dtype)

    def pullback(dy):
        dx = -(y * (dy - (dy * y).sum(dim, keepdim=True)))
        return NoTangent(), grad_like(dx, input), NoTangent(), NoTangent(), NoTangent()

    return y, pullback


@rrule(torch._safe_softmax, torch.ops.aten._safe_softmax, torch.ops.aten._safe_softmax.default)
def safe_softmax(input, dim, dtype=None):
    """y = softmax(x, dim), 0 on slices that are -inf throughout;  dx = y * (dy - sum(dy * y, dim))."""
    y = torch.ops.aten._safe_softmax(input, dim, dtype)
    return y, lambda dy: (NoTangent(), grad_like(y * (dy - (dy * y).sum(dim, keepdim=True)), input),
                          NoTangent(), NoTangent())


# -- pointwise activations with number parameters --------------------------------------------------

_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717

_INPLACE = ("inplace", False)
_REQUIRED = inspect.Parameter.empty


def _shrink_grad(dy, x, lambd):
    """dx of hardshrink and softshrink: dy where |x| > lambd, else 0."""
    return torch.where(x.abs() > lambd, dy, 0.0).to(dy.dtype)


# name: (callables, parameters after the input ((name, default), ...), forward(x, *parameters),
#        dx(dy, x, *parameters), math).  The parameters passed on leave out ``inplace``.
ACTIVATIONS = {
    "hardswish": ((F.hardswish,), (_INPLACE,), F.hardswish,
                  lambda dy, x: torch.where(x < -3, 0.0, torch.where(x <= 3, dy * (x / 3 + 0.5), dy)).to(x.dtype),
                  "y = x * relu6(x + 3) / 6;  dx = 0 for x < -3, dy * (x/3 + 1/2) for -3 <= x <= 3, dy above "
                  "(torch's convention at the kinks)."),
    "hardsigmoid": ((F.hardsigmoid,), (_INPLACE,), F.hardsigmoid,
                    lambda dy, x: torch.where((x > -3) & (x < 3), dy / 6, 0.0).to(x.dtype),
                    "y = relu6(x + 3) / 6;  dx = dy / 6 for -3 < x < 3, else 0."),
    "celu": ((F.celu, torch.celu), (("alpha", 1.0), _INPLACE), torch.celu,
             lambda dy, x, alpha: torch.where(x > 0, dy, dy * torch.exp(x / alpha)),
             "y = max(0, x) + min(0, alpha * (exp(x / alpha) - 1));  dx = dy for x > 0, dy * exp(x / alpha) "
             "otherwise."),
    "selu": ((F.selu, torch.selu), (_INPLACE,), torch.selu,
             lambda dy, x: torch.where(x > 0, dy * _SELU_SCALE, dy * (_SELU_SCALE * _SELU_ALPHA) * torch.exp(x)),
             "y = scale * (max(0, x) + min(0, alpha * (exp(x) - 1)));  dx = scale * dy for x > 0, "
             "scale * alpha * exp(x) * dy otherwise."),
    "hardshrink": ((F.hardshrink, torch.hardshrink, Tensor.hardshrink), (("lambd", 0.5),), torch.hardshrink,
                   _shrink_grad, "y = x where |x| > lambd, else 0;  dx = dy where |x| > lambd, else 0."),
    "softshrink": ((F.softshrink,), (("lambd", 0.5),), F.softshrink, _shrink_grad,
                   "y = x - lambd for x > lambd, x + lambd for x < -lambd, else 0;  dx = dy where |x| > lambd."),
    "threshold": ((F.threshold, F._threshold, torch.threshold), (("threshold", _REQUIRED), ("value", _REQUIRED),
                                                                  _INPLACE), torch.threshold,
                  lambda dy, x, threshold, value: torch.where(x > threshold, dy, 0.0).to(dy.dtype),
                  "y = x where x > threshold, else value;  dx = dy where x > threshold, else 0."),
}


def _signature(parameters) -> inspect.Signature:
    """``(input, *parameters)`` as a signature: what the registry binds a call to."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter("input", kind)]
                             + [inspect.Parameter(name, kind, default=default) for name, default in parameters])


def _make_activation(name, parameters, forward, grad, doc):
    """The rule of one row of :data:`ACTIVATIONS`, named ``name``, with the row's signature."""
    passed = [i for i, (p, _) in enumerate(parameters) if p != "inplace"]

    def rule(input, *args):
        values = [args[i] for i in passed]
        y = forward(input, *values)
        return y, lambda dy: (NoTangent(), grad(dy, input, *values)) + nondiff(len(args))

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = doc
    rule.__signature__ = _signature(parameters)
    return rule


for _name, (_fns, _params, _fwd, _grad, _doc) in ACTIVATIONS.items():
    globals()[_name] = rrule(*_fns)(_make_activation(_name, _params, _fwd, _grad, _doc))


# -- softsign, tanhshrink, glu, prelu, rrelu -------------------------------------------------------

@rrule(F.softsign)
def softsign(input):
    """y = x / (1 + |x|);  dx = dy / (1 + |x|)^2 (complex x: through the rules of abs and division)."""
    if input.is_complex():
        return _via_rules(lambda x: x / (x.abs() + 1), input)
    d = 1 + input.abs()
    return input / d, lambda dy: (NoTangent(), dy / (d * d))


@rrule(F.tanhshrink)
def tanhshrink(input):
    """y = x - tanh(x);  dx = dy * tanh(x)^2."""
    t = torch.tanh(input)
    return input - t, lambda dy: (NoTangent(), dy * conj(t * t))


@rrule(F.glu)
def glu(input, dim=-1):
    """a, b = halves of x along dim;  y = a * sigmoid(b);  da = dy * s,  db = dy * a * s * (1 - s)."""
    a, b = input.chunk(2, dim)
    s = torch.sigmoid(b)
    y = a * s

    def pullback(dy):
        return NoTangent(), torch.cat([dy * s, dy * a * s * (1 - s)], dim), NoTangent()

    return y, pullback


@rrule(F.prelu, torch.prelu)
def prelu(input, weight):
    """y = x for x > 0, w * x otherwise (w per channel, dim 1);  dx = dy or w * dy,
    dw = sum of dy * x over the non-positive x of each channel."""
    y = torch.prelu(input, weight)
    if weight.numel() == 1:
        w = weight.reshape(())
    elif input.dim() > 1:
        w = weight.reshape((weight.numel(),) + (1,) * (input.dim() - 2))
    else:
        w = weight

    def pullback(dy):
        pos = input > 0
        dx = torch.where(pos, dy, w * dy) if is_float_tensor(input) else NoTangent()
        dw = unbroadcast(torch.where(pos, 0.0, input * dy), w.shape).reshape(weight.shape) \
            if is_float_tensor(weight) else NoTangent()
        return NoTangent(), dx, dw

    return y, pullback


@rrule(F.rrelu, torch.rrelu)
def rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    """y = x for x >= 0, a * x otherwise, a ~ U(lower, upper) per element when training, else
    (lower + upper) / 2;  dx = dy * slope.  The slopes torch drew are read back as y / x."""
    y = torch.rrelu(input, lower, upper, training)
    mid = (lower + upper) / 2
    if training:
        safe = torch.where(input == 0, 1.0, input)
        slope = torch.where(input > 0, 1.0, torch.where(input == 0, mid, y / safe))
    else:
        slope = torch.where(input > 0, 1.0, mid)
    slope = slope.to(input.dtype)
    return y, lambda dy: (NoTangent(), dy * slope) + nondiff(4)
