"""Rules for + - * / ** and negation, in every form users write them: torch functions, Tensor
methods and operators (``x + y`` reaches capture as ``Tensor.add``), with broadcasting and
Python-number operands.
"""
from __future__ import annotations

import torch

from ..ad.registry import rrule
from ._util import NoTangent, grad_like, is_float_tensor, no_out, spec

Tensor = torch.Tensor


@rrule(torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__)
def add(input, other, *, alpha=1, out=None):
    """z = x + alpha*y;  dx = unbroadcast(dz),  dy = unbroadcast(alpha*dz)."""
    no_out(out)
    z = input + other if alpha == 1 else torch.add(input, other, alpha=alpha)
    x, y = spec(input), spec(other)
    return z, lambda dz: (NoTangent(), grad_like(dz, x), grad_like(dz * alpha if alpha != 1 else dz, y))


@rrule(torch.sub, torch.subtract, Tensor.sub, Tensor.subtract, Tensor.__sub__)
def sub(input, other, *, alpha=1, out=None):
    """z = x - alpha*y;  dx = unbroadcast(dz),  dy = unbroadcast(-alpha*dz)."""
    no_out(out)
    z = input - other if alpha == 1 else torch.sub(input, other, alpha=alpha)
    x, y = spec(input), spec(other)
    return z, lambda dz: (NoTangent(), grad_like(dz, x), grad_like(dz * -alpha, y))


@rrule(torch.rsub, Tensor.__rsub__)
def rsub(input, other, *, alpha=1):
    """z = y - alpha*x (``2 - x`` is ``x.__rsub__(2)``);  dx = -alpha*dz,  dy = dz."""
    z = torch.rsub(input, other, alpha=alpha) if isinstance(other, Tensor) or alpha != 1 else other - input
    x, y = spec(input), spec(other)
    return z, lambda dz: (NoTangent(), grad_like(dz * -alpha, x), grad_like(dz, y))


@rrule(torch.neg, torch.negative, Tensor.neg, Tensor.negative, Tensor.__neg__)
def neg(input):
    """z = -x;  dx = -dz."""
    return -input, lambda dz: (NoTangent(), -dz)


@rrule(torch.mul, torch.multiply, Tensor.mul, Tensor.multiply, Tensor.__mul__, Tensor.__rmul__)
def mul(input, other, *, out=None):
    """z = x*y;  dx = unbroadcast(dz*conj(y)),  dy = unbroadcast(dz*conj(x))."""
    no_out(out)
    z = input * other
    dx_wanted, dy_wanted = is_float_tensor(input), is_float_tensor(other)
    x_spec, y_spec = spec(input), spec(other)
    x = input if dy_wanted else None  # each operand is kept only if the other's cotangent reads it
    y = other if dx_wanted or not isinstance(other, Tensor) else None

    def pullback(dz):
        dx = grad_like(dz * _conj(y), x_spec) if dx_wanted else NoTangent()
        dy = grad_like(dz * _conj(x), y_spec) if dy_wanted else NoTangent()
        return NoTangent(), dx, dy

    return z, pullback


def _conj(x):
    if isinstance(x, Tensor):
        return x.conj() if x.is_complex() else x
    return x.conjugate() if isinstance(x, complex) else x


@rrule(torch.div, torch.divide, torch.true_divide, Tensor.div, Tensor.divide, Tensor.true_divide,
       Tensor.__truediv__)
def div(input, other, *, rounding_mode=None, out=None):
    """z = x/y;  dx = unbroadcast(dz/y),  dy = unbroadcast(-dz*z/y). With a rounding mode z is
    piecewise constant: zero cotangents."""
    no_out(out)
    if rounding_mode is not None:
        z = torch.div(input, other, rounding_mode=rounding_mode)
        return z, lambda dz: (NoTangent(), _zeros_like_arg(input), _zeros_like_arg(other))
    z = input / other
    dx_wanted, dy_wanted = is_float_tensor(input), is_float_tensor(other)
    x_spec, y_spec = spec(input), spec(other)
    quotient = z if dy_wanted else None

    def pullback(dz):
        dx = grad_like(dz / _conj(other), x_spec) if dx_wanted else NoTangent()
        dy = grad_like(-dz * _conj(quotient) / _conj(other), y_spec) if dy_wanted else NoTangent()
        return NoTangent(), dx, dy

    return z, pullback


def _zeros_like_arg(x):
    return torch.zeros_like(x) if is_float_tensor(x) else NoTangent()


@rrule(Tensor.__rtruediv__)
def rtruediv(input, other):
    """z = y/x (``2 / x``);  dx = -dz*conj(z/x),  dy = unbroadcast(dz/conj(x))."""
    z = other / input
    return z, lambda dz: (NoTangent(), grad_like(-dz * _conj(z / input), input), grad_like(dz / _conj(input), other))


@rrule(torch.pow, Tensor.pow, Tensor.__pow__)
def pow(input, exponent):
    """z = x^p;  dx = dz * p * x^(p-1) (zero where p == 0),  dp = dz * z * log(x) (zero where x == 0
    and p >= 0, as torch defines it)."""
    z = input ** exponent

    def pullback(dz):
        if isinstance(exponent, Tensor):
            dx_local = torch.where(exponent == 0, 0.0, exponent * input ** (exponent - 1))
        elif exponent == 0:
            dx_local = torch.zeros_like(z)
        elif exponent == 1:
            return NoTangent(), grad_like(dz, input), NoTangent()
        elif exponent == 2:
            dx_local = 2 * input
        else:
            dx_local = exponent * input ** (exponent - 1)
        dx = grad_like(dz * _conj(dx_local), input) if is_float_tensor(input) else NoTangent()
        dp = NoTangent()
        if is_float_tensor(exponent):
            log_x = torch.log(input) if isinstance(input, Tensor) else torch.log(torch.as_tensor(input, dtype=z.dtype))
            safe = torch.where((input == 0) & (exponent >= 0), 0.0, z * log_x)
            dp = grad_like(dz * _conj(safe), exponent)
        return NoTangent(), dx, dp

    return z, pullback


@rrule(Tensor.__rpow__)
def rpow(input, other):
    """z = c^x (``2 ** x``; ``x.__rpow__(c)``);  dx = dz * conj(z * log(c)),  and for a tensor base
    dc = dz * conj(x * c^(x-1))."""
    z = torch.pow(other, input)

    def pullback(dz):
        log_c = torch.log(other) if isinstance(other, Tensor) else torch.log(torch.as_tensor(other, dtype=z.dtype))
        dx = grad_like(dz * _conj(z * log_c), input)
        dc = grad_like(dz * _conj(input * torch.pow(other, input - 1)), other) if is_float_tensor(other) else NoTangent()
        return NoTangent(), dx, dc

    return z, pullback
