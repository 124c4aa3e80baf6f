"""Rules for elementwise math: unary functions (exp, log, trigonometric, hyperbolic, error
functions, sigmoid, abs, sign ...), relu, clamp/clip, where, and the binary elementwise
functions maximum/minimum, fmax/fmin, atan2, hypot and logaddexp.

Every rule is registered under all the names users write (``torch.exp``, ``Tensor.exp``,
``torch.special.expm1``, ``Tensor.__abs__``, ``F.relu`` ...). Subgradients at kinks follow
torch.autograd: ``abs'(0) = 0``, ``relu'(0) = 0``, ``sign' = 0``, clamp passes the gradient where
``min <= x <= max`` (bounds included), and maximum/minimum split the gradient in half on ties.

For complex inputs the holomorphic ones use torch's convention ``dx = dy * conj(f'(x))``.

The plain unary functions are registered from one table, :data:`UNARY`: one line per function
with its aliases, the cotangent ``dx`` as a function of ``(dy, x, y)`` and the math as a docstring.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ._util import NoTangent, ZeroTangent, grad_like, is_float_tensor, nondiff
from ._util import conj as _c

Tensor = torch.Tensor
special = torch.special

_LN2 = math.log(2.0)
_LN10 = math.log(10.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_HALF_SQRT_PI = 0.5 * math.sqrt(math.pi)


def _sinc_grad(dy, x, y):
    px = x * math.pi
    pxx = x * x * math.pi
    g = dy * _c((px * torch.cos(px) - torch.sin(px)) / pxx)
    return torch.where(pxx == 0, torch.zeros((), dtype=g.dtype, device=g.device), g)


# name: (callables, forward, dx(dy, x, y), math).  The forward is the torch function itself.
UNARY = {
    "exp": ((torch.exp, Tensor.exp), torch.exp,
            lambda dy, x, y: dy * _c(y), "y = exp(x);  dx = dy * y."),
    "exp2": ((torch.exp2, Tensor.exp2, special.exp2), torch.exp2,
             lambda dy, x, y: dy * _c(y) * _LN2, "y = 2^x;  dx = dy * y * log(2)."),
    "expm1": ((torch.expm1, Tensor.expm1, special.expm1), torch.expm1,
              lambda dy, x, y: dy * (_c(y) + 1), "y = exp(x) - 1;  dx = dy * (y + 1)."),
    "log": ((torch.log, Tensor.log), torch.log,
            lambda dy, x, y: dy / _c(x), "y = log(x);  dx = dy / x."),
    "log2": ((torch.log2, Tensor.log2), torch.log2,
             lambda dy, x, y: dy / (_c(x) * _LN2), "y = log2(x);  dx = dy / (x * log(2))."),
    "log10": ((torch.log10, Tensor.log10), torch.log10,
              lambda dy, x, y: dy / (_c(x) * _LN10), "y = log10(x);  dx = dy / (x * log(10))."),
    "log1p": ((torch.log1p, Tensor.log1p, special.log1p), torch.log1p,
              lambda dy, x, y: dy / (_c(x) + 1), "y = log(1 + x);  dx = dy / (1 + x)."),
    "sqrt": ((torch.sqrt, Tensor.sqrt), torch.sqrt,
             lambda dy, x, y: dy / (2 * _c(y)), "y = sqrt(x);  dx = dy / (2y)  (inf at x = 0, like torch)."),
    "rsqrt": ((torch.rsqrt, Tensor.rsqrt), torch.rsqrt,
              lambda dy, x, y: -0.5 * dy * _c(y.pow(3)), "y = 1/sqrt(x);  dx = -dy * y^3 / 2."),
    "square": ((torch.square, Tensor.square), torch.square,
               lambda dy, x, y: dy * 2 * _c(x), "y = x^2;  dx = 2 x dy."),
    "reciprocal": ((torch.reciprocal, Tensor.reciprocal), torch.reciprocal,
                   lambda dy, x, y: -dy * _c(y * y), "y = 1/x;  dx = -dy * y^2."),
    "sin": ((torch.sin, Tensor.sin), torch.sin,
            lambda dy, x, y: dy * _c(torch.cos(x)), "y = sin(x);  dx = dy * cos(x)."),
    "cos": ((torch.cos, Tensor.cos), torch.cos,
            lambda dy, x, y: dy * -_c(torch.sin(x)), "y = cos(x);  dx = -dy * sin(x)."),
    "tan": ((torch.tan, Tensor.tan), torch.tan,
            lambda dy, x, y: dy * _c(1 + y * y), "y = tan(x);  dx = dy * (1 + y^2)."),
    "sinh": ((torch.sinh, Tensor.sinh), torch.sinh,
             lambda dy, x, y: dy * _c(torch.cosh(x)), "y = sinh(x);  dx = dy * cosh(x)."),
    "cosh": ((torch.cosh, Tensor.cosh), torch.cosh,
             lambda dy, x, y: dy * _c(torch.sinh(x)), "y = cosh(x);  dx = dy * sinh(x)."),
    "tanh": ((torch.tanh, Tensor.tanh, F.tanh), torch.tanh,
             lambda dy, x, y: dy * _c(1 - y * y), "y = tanh(x);  dx = dy * (1 - y^2)."),
    "asin": ((torch.asin, torch.arcsin, Tensor.asin, Tensor.arcsin), torch.asin,
             lambda dy, x, y: dy * _c(torch.rsqrt(1 - x * x)), "y = asin(x);  dx = dy / sqrt(1 - x^2)."),
    "acos": ((torch.acos, torch.arccos, Tensor.acos, Tensor.arccos), torch.acos,
             lambda dy, x, y: dy * -_c(torch.rsqrt(1 - x * x)), "y = acos(x);  dx = -dy / sqrt(1 - x^2)."),
    "atan": ((torch.atan, torch.arctan, Tensor.atan, Tensor.arctan), torch.atan,
             lambda dy, x, y: dy / _c(x * x + 1), "y = atan(x);  dx = dy / (1 + x^2)."),
    "asinh": ((torch.asinh, torch.arcsinh, Tensor.asinh, Tensor.arcsinh), torch.asinh,
              lambda dy, x, y: dy * _c(torch.rsqrt(x * x + 1)), "y = asinh(x);  dx = dy / sqrt(x^2 + 1)."),
    "acosh": ((torch.acosh, torch.arccosh, Tensor.acosh, Tensor.arccosh), torch.acosh,
              lambda dy, x, y: dy * _c(torch.rsqrt(x * x - 1)), "y = acosh(x);  dx = dy / sqrt(x^2 - 1)."),
    "atanh": ((torch.atanh, torch.arctanh, Tensor.atanh, Tensor.arctanh), torch.atanh,
              lambda dy, x, y: dy / _c(1 - x * x), "y = atanh(x);  dx = dy / (1 - x^2)."),
    "sigmoid": ((torch.sigmoid, Tensor.sigmoid, special.expit, F.sigmoid), torch.sigmoid,
                lambda dy, x, y: dy * _c((1 - y) * y), "y = 1/(1 + exp(-x));  dx = dy * y * (1 - y)."),
    "erf": ((torch.erf, Tensor.erf, special.erf), torch.erf,
            lambda dy, x, y: _TWO_OVER_SQRT_PI * torch.exp(-(x * x)) * dy,
            "y = erf(x);  dx = dy * 2/sqrt(pi) * exp(-x^2)."),
    "erfc": ((torch.erfc, Tensor.erfc, special.erfc), torch.erfc,
             lambda dy, x, y: -_TWO_OVER_SQRT_PI * torch.exp(-(x * x)) * dy,
             "y = erfc(x);  dx = -dy * 2/sqrt(pi) * exp(-x^2)."),
    "erfinv": ((torch.erfinv, Tensor.erfinv, special.erfinv), torch.erfinv,
               lambda dy, x, y: _HALF_SQRT_PI * torch.exp(y * y) * dy,
               "y = erfinv(x);  dx = dy * sqrt(pi)/2 * exp(y^2)."),
    "lgamma": ((torch.lgamma, Tensor.lgamma, special.gammaln), torch.lgamma,
               lambda dy, x, y: dy * torch.digamma(x), "y = log|gamma(x)|;  dx = dy * digamma(x)."),
    "digamma": ((torch.digamma, Tensor.digamma, special.digamma, special.psi), torch.digamma,
                lambda dy, x, y: dy * torch.polygamma(1, x), "y = digamma(x);  dx = dy * trigamma(x)."),
    "sinc": ((torch.sinc, Tensor.sinc, special.sinc), torch.sinc, _sinc_grad,
             "y = sin(pi x)/(pi x);  dx = dy * (pi x cos(pi x) - sin(pi x)) / (pi x^2), 0 at x = 0."),
    "deg2rad": ((torch.deg2rad, Tensor.deg2rad), torch.deg2rad,
                lambda dy, x, y: dy * (math.pi / 180), "y = x * pi/180;  dx = dy * pi/180."),
    "rad2deg": ((torch.rad2deg, Tensor.rad2deg), torch.rad2deg,
                lambda dy, x, y: dy * (180 / math.pi), "y = x * 180/pi;  dx = dy * 180/pi."),
    "frac": ((torch.frac, Tensor.frac), torch.frac,
             lambda dy, x, y: dy, "y = x - trunc(x);  dx = dy."),
    "abs": ((torch.abs, torch.absolute, Tensor.abs, Tensor.absolute, Tensor.__abs__), torch.abs,
            lambda dy, x, y: dy * torch.sgn(x), "y = |x|;  dx = dy * sgn(x)  (0 at x = 0)."),
}

# Piecewise-constant functions: the cotangent is a symbolic zero. (floor, ceil, round, trunc and
# fix are declared non-differentiable in :mod:`.nondiff`, which has the same effect.)
PIECEWISE_CONSTANT = {
    "sign": ((torch.sign, Tensor.sign), torch.sign, "y = sign(x);  dx = 0."),
}


def _make_unary(name, forward, grad, doc):
    def rule(input):
        y = forward(input)
        return y, lambda dy: (NoTangent(), grad(dy, input, y))

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = doc
    return rule


def _make_constant(name, forward, doc):
    def rule(input):
        return forward(input), lambda dy: (NoTangent(), ZeroTangent())

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = doc
    return rule


for _name, (_fns, _fwd, _grad, _doc) in UNARY.items():
    globals()[_name] = rrule(*_fns)(_make_unary(_name, _fwd, _grad, _doc))

for _name, (_fns, _fwd, _doc) in PIECEWISE_CONSTANT.items():
    globals()[_name] = rrule(*_fns)(_make_constant(_name, _fwd, _doc))

del _name, _fns, _fwd, _grad, _doc


@rrule(torch.logit, Tensor.logit, special.logit)
def logit(input, eps=None):
    """y = log(z/(1-z)) with z = clamp(x, eps, 1-eps);  dx = dy / (x(1-x)) inside [eps, 1-eps],
    0 outside it; without eps, NaN outside [0, 1] (as torch)."""
    y = torch.logit(input, eps)

    def pullback(dy):
        g = dy / (input * (1 - input))
        if eps is None:
            outside, fill = (input < 0) | (input > 1), math.nan
        else:
            outside, fill = (input < eps) | (input > 1 - eps), 0.0
        g = torch.where(outside, torch.full((), fill, dtype=g.dtype, device=g.device), g)
        return NoTangent(), g, NoTangent()

    return y, pullback


# -- relu ----------------------------------------------------------------------------------------

def _relu_grad(dy, y):
    return torch.ops.aten.threshold_backward(dy, y, 0)


@rrule(torch.ops.aten.threshold_backward, torch.ops.aten.threshold_backward.default)
def threshold_backward(grad_output, self, threshold):
    """The relu pullback as an op: out = g where self > threshold, else 0; linear in g:
    dg = threshold_backward(dout, self, threshold); self only selects (no cotangent)."""
    out = torch.ops.aten.threshold_backward(grad_output, self, threshold)
    return out, lambda dout: (NoTangent(), torch.ops.aten.threshold_backward(dout, self, threshold),
                              NoTangent(), NoTangent())


@rrule(torch.relu, Tensor.relu)
def relu(input):
    """y = max(x, 0);  dx = dy where y > 0, else 0 (relu'(0) = 0)."""
    y = torch.relu(input)
    return y, lambda dy: (NoTangent(), _relu_grad(dy, y))


@rrule(F.relu)
def relu_functional(input, inplace=False):
    """F.relu: y = max(x, 0);  dx = dy where y > 0, else 0. ``inplace=True`` is computed out of
    place (the input is not modified under differentiation)."""
    y = torch.relu(input)
    return y, lambda dy: (NoTangent(), _relu_grad(dy, y), NoTangent())


# -- clamp ---------------------------------------------------------------------------------------

def _clamp_pullback(input, min, max):
    """Cotangents of (input, min, max) for y = clamp(x, min, max), torch's subgradients:
    dx = dy where min <= x <= max; dmin = dy where x < min (and min < max when both are given);
    dmax = dy where x > max (or max < min)."""
    def pullback(dy):
        zero = torch.zeros((), dtype=dy.dtype, device=dy.device)
        if min is not None and max is not None:
            pred = (input >= min) & (input <= max)
        elif min is not None:
            pred = input >= min
        else:
            pred = input <= max
        dx = grad_like(torch.where(pred, dy, zero), input)
        dmin = dmax = NoTangent()
        if is_float_tensor(min):
            lo = (input < min) & (min < max) if max is not None else input < min
            dmin = grad_like(torch.where(lo, dy, zero), min)
        if is_float_tensor(max):
            hi = (input > max) | (max < min) if min is not None else input > max
            dmax = grad_like(torch.where(hi, dy, zero), max)
        return dx, dmin, dmax
    return pullback


@rrule(torch.clamp, torch.clip, Tensor.clamp, Tensor.clip)
def clamp(input, min=None, max=None):
    """y = min(max(x, lo), hi) (numbers or broadcastable tensors);  dx = dy where lo <= x <= hi,
    dlo = dy where x < lo < hi, dhi = dy where x > hi or hi < lo (unbroadcast)."""
    y = torch.clamp(input, min, max)
    back = _clamp_pullback(input, min, max)
    return y, lambda dy: (NoTangent(), *back(dy))


@rrule(torch.clamp_min, Tensor.clamp_min)
def clamp_min(input, min):
    """y = max(x, lo);  dx = dy where x >= lo, dlo = dy where x < lo."""
    y = torch.clamp_min(input, min)
    back = _clamp_pullback(input, min, None)
    return y, lambda dy: (NoTangent(), *back(dy)[:2])


@rrule(torch.clamp_max, Tensor.clamp_max)
def clamp_max(input, max):
    """y = min(x, hi);  dx = dy where x <= hi, dhi = dy where x > hi."""
    y = torch.clamp_max(input, max)

    def pullback(dy):
        dx, _, dmax = _clamp_pullback(input, None, max)(dy)
        return NoTangent(), dx, dmax

    return y, pullback


# -- where ---------------------------------------------------------------------------------------

def _where_grads(condition, input, other, dy):
    zero = torch.zeros((), dtype=dy.dtype, device=dy.device)
    dx = grad_like(torch.where(condition, dy, zero), input) if is_float_tensor(input) else NoTangent()
    do = grad_like(torch.where(condition, zero, dy), other) if is_float_tensor(other) else NoTangent()
    return dx, do


@rrule(torch.where)
def where(condition, input=None, other=None):
    """z = where(c, x, y) (broadcasting, numbers allowed);  dx = unbroadcast(dz where c),
    dy = unbroadcast(dz where not c). ``torch.where(c)`` (indices) is not differentiable."""
    if input is None and other is None:
        return torch.where(condition), lambda dz: nondiff(4)
    z = torch.where(condition, input, other)
    return z, lambda dz: (NoTangent(), NoTangent(), *_where_grads(condition, input, other, dz))


@rrule(Tensor.where)
def where_method(input, condition, other):
    """z = x.where(c, y) = where(c, x, y);  dx = unbroadcast(dz where c), dy = unbroadcast(dz where not c)."""
    z = input.where(condition, other)

    def pullback(dz):
        dx, do = _where_grads(condition, input, other, dz)
        return NoTangent(), dx, NoTangent(), do

    return z, pullback


# -- binary elementwise --------------------------------------------------------------------------

def maximum_pullback(input, other, dz, larger: bool):
    """Cotangents of z = maximum(x, y) (``larger``) or minimum(x, y): the gradient goes to the
    selected argument, halved on ties (torch's convention); NaNs pass the gradient to both."""
    half = torch.where(input == other, dz / 2, dz)
    zero = torch.zeros((), dtype=dz.dtype, device=dz.device)
    x_loses = input < other if larger else input > other
    y_loses = input > other if larger else input < other
    dx = grad_like(torch.where(x_loses, zero, half), input) if is_float_tensor(input) else NoTangent()
    dy = grad_like(torch.where(y_loses, zero, half), other) if is_float_tensor(other) else NoTangent()
    return dx, dy


@rrule(torch.maximum, Tensor.maximum)
def maximum(input, other):
    """z = max(x, y) elementwise (broadcasting);  dx = dz where x > y, dz/2 where x == y, else 0;
    dy symmetric."""
    z = torch.maximum(input, other)
    return z, lambda dz: (NoTangent(), *maximum_pullback(input, other, dz, True))


@rrule(torch.minimum, Tensor.minimum)
def minimum(input, other):
    """z = min(x, y) elementwise (broadcasting);  dx = dz where x < y, dz/2 where x == y, else 0;
    dy symmetric."""
    z = torch.minimum(input, other)
    return z, lambda dz: (NoTangent(), *maximum_pullback(input, other, dz, False))


def _fmax_pullback(input, other, dz, larger: bool):
    zero = torch.zeros((), dtype=dz.dtype, device=dz.device)
    x_wins = ((input >= other) if larger else (input <= other)) | torch.isnan(other)
    dx = grad_like(torch.where(x_wins, dz, zero), input) if is_float_tensor(input) else NoTangent()
    dy = grad_like(torch.where(x_wins, zero, dz), other) if is_float_tensor(other) else NoTangent()
    return dx, dy


@rrule(torch.fmax, Tensor.fmax)
def fmax(input, other):
    """z = fmax(x, y) (NaN-ignoring maximum);  dx = dz where x >= y or y is NaN, dy = dz elsewhere
    (ties go to x, as torch)."""
    z = torch.fmax(input, other)
    return z, lambda dz: (NoTangent(), *_fmax_pullback(input, other, dz, True))


@rrule(torch.fmin, Tensor.fmin)
def fmin(input, other):
    """z = fmin(x, y) (NaN-ignoring minimum);  dx = dz where x <= y or y is NaN, dy = dz elsewhere."""
    z = torch.fmin(input, other)
    return z, lambda dz: (NoTangent(), *_fmax_pullback(input, other, dz, False))


@rrule(torch.atan2, torch.arctan2, Tensor.atan2, Tensor.arctan2)
def atan2(input, other):
    """z = atan2(x, y);  dx = dz * y / (x^2 + y^2),  dy = -dz * x / (x^2 + y^2), both 0 where
    x = y = 0 (as torch)."""
    z = torch.atan2(input, other)

    def pullback(dz):
        r2 = input * input + other * other
        origin = r2 == 0
        r = dz / torch.where(origin, torch.ones_like(r2), r2) * ~origin  # no 0/0 at the origin
        return NoTangent(), grad_like(r * other, input), grad_like(-r * input, other)

    return z, pullback


@rrule(torch.hypot, Tensor.hypot)
def hypot(input, other):
    """z = sqrt(x^2 + y^2);  dx = dz * x / z,  dy = dz * y / z."""
    z = torch.hypot(input, other)
    return z, lambda dz: (NoTangent(), grad_like(dz * input / z, input), grad_like(dz * other / z, other))


@rrule(torch.logaddexp, Tensor.logaddexp)
def logaddexp(input, other):
    """z = log(exp(x) + exp(y));  dx = dz / (1 + exp(y - x)),  dy = dz / (1 + exp(x - y))."""
    z = torch.logaddexp(input, other)

    def pullback(dz):
        dx = grad_like(dz / (1 + torch.exp(other - input)), input)
        dy = grad_like(dz / (1 + torch.exp(input - other)), other)
        return NoTangent(), dx, dy

    return z, pullback
