"""Rules for the rest of torch's and torch.special's elementwise math, and for complex numbers.

Unary special functions (entr, ndtr, ndtri, log_ndtr, i0/i0e/i1/i1e, erfcx, polygamma, mvlgamma),
binary ones (xlogy, xlog1py, logaddexp2, copysign, fmod, remainder, float_power, ldexp,
igamma/igammac, zeta), the fused lerp / addcmul / addcdiv, nan_to_num, positive, and the complex
toolkit: real, imag, conj (and conj_physical / resolve_conj / resolve_neg), sgn, angle,
view_as_real, view_as_complex, torch.complex and torch.polar.

Every formula is torch.autograd's (``tools/autograd/derivatives.yaml``), including its choices
at special points: xlogy's ``dx = log(y)`` (0 where ``x = 0`` and ``y <= 0``), copysign's
``dx = 0`` at ``x = 0``, ``i1'(0) = i1e'(0) = 1/2``, zero derivatives for ``angle`` and ``sgn``
of real tensors, and fmod/remainder passing ``-dy * (x div y)`` (rounded as the op rounds) to y.
One deliberate exception: ``ldexp(x, e)`` with a negative integer ``e`` gets ``dx = dz 2^e``;
torch.autograd returns 0 there (it rounds ``2^e`` to an integer; its own gradcheck fails).
Where torch has no derivative (igamma/igammac and zeta with respect to their first argument,
remainder with a number as the dividend) the cotangent raises ``NotImplementedError`` when it
is needed, as torch does, instead of silently returning a wrong zero. heaviside is declared
non-differentiable.

Complex functions use torch's convention: the cotangent of z is ``dL/dRe z + i dL/dIm z``; a
real argument of a complex result gets the real part of its cotangent.
"""
from __future__ import annotations

import math

import torch

from ..ad.registry import non_differentiable, rrule
from ..ad.tangents import Thunk
from ._util import NoTangent, ZeroTangent, grad_like, is_float_tensor, materialize, no_out, nondiff

Tensor = torch.Tensor
special = torch.special

_SQRT_2PI = math.sqrt(2 * math.pi)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _c(t):
    """conj(t) for complex tensors and numbers, t itself otherwise."""
    if isinstance(t, Tensor):
        return t.conj() if t.is_complex() else t
    return t.conjugate() if isinstance(t, complex) else t


def _grad(g, x):
    """The cotangent of argument x: unbroadcast (real part for a real x), NoTangent for numbers
    and integer tensors."""
    if not is_float_tensor(x):
        return NoTangent()
    if g.is_complex() and not x.is_complex():
        g = g.real
    return grad_like(g, x)


def _not_implemented(x, what):
    """A cotangent that raises when some input actually needs it (torch has no formula)."""
    if not is_float_tensor(x):
        return NoTangent()

    def fail():
        raise NotImplementedError(f"the derivative of {what} is not implemented (nor is it in torch.autograd)")

    return Thunk(fail)


def _zero(like):
    return torch.zeros((), dtype=like.dtype, device=like.device)


# -- unary functions, table-driven ----------------------------------------------------------------

def _i1_grad(dy, x, y):
    eps = torch.finfo(x.dtype).eps
    not_tiny = x.abs() > eps
    safe = torch.where(not_tiny, x, torch.full((), eps, dtype=x.dtype, device=x.device))
    g = torch.i0(safe) - y * torch.reciprocal(safe)
    return dy * torch.where(not_tiny, g, torch.full((), 0.5, dtype=x.dtype, device=x.device))


def _i1e_grad(dy, x, y):
    eps = torch.finfo(x.dtype).eps
    not_tiny = x.abs() > eps
    safe = torch.where(not_tiny, x, torch.full((), eps, dtype=x.dtype, device=x.device))
    g = special.i0e(safe) - y * (torch.sgn(safe) + torch.reciprocal(safe))
    return dy * torch.where(not_tiny, g, torch.full((), 0.5, dtype=x.dtype, device=x.device))


# name: (callables, forward, dx(dy, x, y), math)
UNARY = {
    "entr": ((special.entr,), special.entr,
             lambda dy, x, y: dy * -(1 + torch.log(x)),
             "y = -x log x (0 at 0, -inf below);  dx = -dy (1 + log x)."),
    "ndtr": ((special.ndtr,), special.ndtr,
             lambda dy, x, y: dy * torch.exp(-0.5 * x * x) / _SQRT_2PI,
             "y = Phi(x) (standard normal CDF);  dx = dy exp(-x^2/2) / sqrt(2 pi)."),
    "ndtri": ((special.ndtri,), special.ndtri,
              lambda dy, x, y: dy * _SQRT_2PI * torch.exp(0.5 * y * y),
              "y = Phi^{-1}(x);  dx = dy sqrt(2 pi) exp(y^2/2)."),
    "log_ndtr": ((special.log_ndtr,), special.log_ndtr,
                 lambda dy, x, y: dy / _SQRT_2PI * torch.exp(-(y + 0.5 * x * x)),
                 "y = log Phi(x);  dx = dy exp(-x^2/2 - y) / sqrt(2 pi)."),
    "i0": ((torch.i0, Tensor.i0, special.i0), torch.i0,
           lambda dy, x, y: dy * special.i1(x),
           "y = I_0(x) (modified Bessel);  dx = dy I_1(x)."),
    "i0e": ((special.i0e,), special.i0e,
            lambda dy, x, y: dy * (special.i1e(x) - torch.sgn(x) * y),
            "y = exp(-|x|) I_0(x);  dx = dy (i1e(x) - sgn(x) y)."),
    "i1": ((special.i1,), special.i1, _i1_grad,
           "y = I_1(x);  dx = dy (I_0(x) - y/x), 1/2 at x = 0 (torch's guard below eps)."),
    "i1e": ((special.i1e,), special.i1e, _i1e_grad,
            "y = exp(-|x|) I_1(x);  dx = dy (i0e(x) - y (sgn(x) + 1/x)), 1/2 at x = 0."),
    "erfcx": ((special.erfcx,), special.erfcx,
              lambda dy, x, y: dy * (2 * x * y - _TWO_OVER_SQRT_PI),
              "y = exp(x^2) erfc(x);  dx = dy (2 x y - 2/sqrt(pi))."),
}


def _make_unary(name, forward, grad, doc):
    def rule(input, *, out=None):
        no_out(out)
        y = forward(input)
        return y, lambda dy: (NoTangent(), grad(dy, input, y))

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = doc
    return rule


for _name, (_fns, _fwd, _grad_fn, _doc) in UNARY.items():
    globals()[_name] = rrule(*_fns)(_make_unary(_name, _fwd, _grad_fn, _doc))
del _name, _fns, _fwd, _grad_fn, _doc

non_differentiable(torch.heaviside, Tensor.heaviside, special.round)


@rrule(torch.polygamma, special.polygamma)
def polygamma(n, input, *, out=None):
    """y = psi^(n)(x);  dx = dy psi^(n+1)(x)."""
    no_out(out)
    y = torch.polygamma(n, input)
    return y, lambda dy: (NoTangent(), NoTangent(), dy * torch.polygamma(n + 1, input))


@rrule(Tensor.polygamma)
def polygamma_method(input, n):
    """y = x.polygamma(n) = psi^(n)(x);  dx = dy psi^(n+1)(x)."""
    y = input.polygamma(n)
    return y, lambda dy: (NoTangent(), dy * torch.polygamma(n + 1, input), NoTangent())


@rrule(torch.mvlgamma, Tensor.mvlgamma, special.multigammaln)
def mvlgamma(input, p, *, out=None):
    """y = log Gamma_p(x) (multivariate);  dx = dy sum_{j=0}^{p-1} digamma(x - j/2)."""
    no_out(out)
    y = torch.mvlgamma(input, p)

    def pullback(dy):
        offsets = torch.arange(-p / 2 + 0.5, 0.5, 0.5, dtype=input.dtype, device=input.device)
        return NoTangent(), dy * torch.digamma(input.unsqueeze(-1) + offsets).sum(-1), NoTangent()

    return y, pullback


# -- binary functions ------------------------------------------------------------------------------

@rrule(torch.xlogy, Tensor.xlogy, special.xlogy)
def xlogy(input, other, *, out=None):
    """z = x log y (0 where x = 0);  dx = dz log y (0 where x = 0 and y <= 0),  dy = dz x / y."""
    no_out(out)
    z = torch.xlogy(input, other)

    def pullback(dz):
        dx = dy = NoTangent()
        if is_float_tensor(input):
            g = torch.xlogy(dz, other)
            dx = _grad(torch.where((input == 0) & (other <= 0), _zero(g), g), input)
        if is_float_tensor(other):
            dy = _grad(dz * input / other, other)
        return NoTangent(), dx, dy

    return z, pullback


@rrule(special.xlog1py)
def xlog1py(input, other, *, out=None):
    """z = x log(1 + y) (0 where x = 0);  dx = dz log(1 + y) (0 where x = 0 and y <= -1),
    dy = dz x / (1 + y)."""
    no_out(out)
    z = special.xlog1py(input, other)

    def pullback(dz):
        dx = dy = NoTangent()
        if is_float_tensor(input):
            g = special.xlog1py(dz, other)
            dx = _grad(torch.where((input == 0) & (other <= -1), _zero(g), g), input)
        if is_float_tensor(other):
            dy = _grad(dz * input / (other + 1), other)
        return NoTangent(), dx, dy

    return z, pullback


@rrule(torch.logaddexp2, Tensor.logaddexp2)
def logaddexp2(input, other, *, out=None):
    """z = log2(2^x + 2^y);  dx = dz / (1 + 2^(y - x)),  dy = dz / (1 + 2^(x - y))."""
    no_out(out)
    z = torch.logaddexp2(input, other)

    def pullback(dz):
        return (NoTangent(), _grad(dz / (1 + torch.pow(2, other - input)), input),
                _grad(dz / (1 + torch.pow(2, input - other)), other))

    return z, pullback


@rrule(torch.copysign, Tensor.copysign)
def copysign(input, other, *, out=None):
    """z = |x| sign(y);  dx = dz z / x (0 where x = 0),  dy = 0."""
    no_out(out)
    z = torch.copysign(input, other)

    def pullback(dz):
        dx = NoTangent()
        if is_float_tensor(input):
            ratio = torch.where(input == 0, _zero(z), z / input)
            dx = _grad(dz * ratio, input)
        return NoTangent(), dx, (ZeroTangent() if is_float_tensor(other) else NoTangent())

    return z, pullback


@rrule(torch.fmod, Tensor.fmod)
def fmod(input, other, *, out=None):
    """z = x - trunc(x / y) y;  dx = dz,  dy = -dz trunc(x / y)."""
    no_out(out)
    z = torch.fmod(input, other)

    def pullback(dz):
        dy = NoTangent()
        if is_float_tensor(other):
            dy = _grad(-dz * torch.div(input, other, rounding_mode="trunc"), other)
        return NoTangent(), _grad(dz, input), dy

    return z, pullback


@rrule(torch.remainder, Tensor.remainder, Tensor.__mod__)
def remainder(input, other, *, out=None):
    """z = x - floor(x / y) y;  dx = dz,  dy = -dz floor(x / y). (With a number as x, torch has no
    derivative for y; neither do we.)"""
    no_out(out)
    z = torch.remainder(input, other)

    def pullback(dz):
        dy = NoTangent()
        if is_float_tensor(other):
            if isinstance(input, Tensor):
                dy = _grad(-dz * torch.div(input, other, rounding_mode="floor"), other)
            else:
                dy = _not_implemented(other, "remainder(Scalar, Tensor)")
        return NoTangent(), _grad(dz, input), dy

    return z, pullback


@rrule(Tensor.__rmod__)
def rmod(input, other):
    """z = other % x = remainder(other, x).  With a tensor ``other``, as torch differentiates
    remainder(t, x): dt = dz, dx = -dz * floor(t / x). With a number ``other`` torch has no
    derivative for x, so neither do we."""
    z = torch.remainder(other, input)
    if not isinstance(other, Tensor):
        return z, lambda dz: (NoTangent(), _not_implemented(input, "remainder(Scalar, Tensor)"), NoTangent())

    def pullback(dz):
        dx = _grad(-dz * torch.floor(torch.div(other, input)), input) if is_float_tensor(input) else NoTangent()
        dt = _grad(dz, other) if is_float_tensor(other) else NoTangent()
        return NoTangent(), dx, dt

    return z, pullback


def _pow_grads(x, p, z, dz):
    """(dx, dp) for z = x^p computed in z's dtype (torch's pow_backward_self/_exponent)."""
    dx = dp = NoTangent()
    xd = x.to(z.dtype) if isinstance(x, Tensor) else x
    pd = p.to(z.dtype) if isinstance(p, Tensor) else p
    if is_float_tensor(x):
        local = torch.where(torch.as_tensor(pd == 0, device=z.device), _zero(z), pd * torch.pow(xd, pd - 1))
        dx = _grad(dz * _c(local), x)
    if is_float_tensor(p):
        base = xd if isinstance(xd, Tensor) else torch.as_tensor(xd, dtype=z.dtype, device=z.device)
        if pd.is_complex():
            cond = (base == 0) & (pd.imag == 0) & (pd.real >= 0)
        else:
            cond = (base == 0) & (pd >= 0)
        dp = _grad(dz * torch.where(cond, _zero(z), _c(z * torch.log(base))), p)
    return dx, dp


@rrule(torch.float_power, Tensor.float_power)
def float_power(input, exponent, *, out=None):
    """z = x^p in double precision (complex128 for complex operands);  dx = dz p x^(p-1) (0 where
    p = 0),  dp = dz z log(x) (0 where x = 0 and p >= 0), cast back to each operand's dtype."""
    no_out(out)
    z = torch.float_power(input, exponent)
    return z, lambda dz: (NoTangent(), *_pow_grads(input, exponent, z, dz))


@rrule(torch.ldexp, Tensor.ldexp)
def ldexp(input, other, *, out=None):
    """z = x 2^e;  dx = dz conj(2^e) (also for negative integer e, where torch.autograd returns 0),
    de = dz conj(z log 2) (for a floating or complex e)."""
    no_out(out)
    z = torch.ldexp(input, other)

    def pullback(dz):
        dx = _grad(dz * _c(torch.ldexp(torch.ones_like(z), other)), input)
        de = _grad(dz * _c(z) * math.log(2.0), other) if is_float_tensor(other) else NoTangent()
        return NoTangent(), dx, de

    return z, pullback


def _igamma_grad(a, x, dz, sign):
    return _grad(sign * dz * torch.exp((a - 1) * torch.log(x) - x - torch.lgamma(a)), x)


@rrule(torch.igamma, Tensor.igamma, special.gammainc)
def igamma(input, other, *, out=None):
    """z = P(a, x) (regularised lower incomplete gamma);  dx = dz x^(a-1) e^(-x) / Gamma(a);
    no derivative in a (as torch)."""
    no_out(out)
    z = torch.igamma(input, other)
    return z, lambda dz: (NoTangent(), _not_implemented(input, "igamma with respect to its first argument"),
                          _igamma_grad(input, other, dz, 1))


@rrule(torch.igammac, Tensor.igammac, special.gammaincc)
def igammac(input, other, *, out=None):
    """z = Q(a, x) = 1 - P(a, x);  dx = -dz x^(a-1) e^(-x) / Gamma(a); no derivative in a."""
    no_out(out)
    z = torch.igammac(input, other)
    return z, lambda dz: (NoTangent(), _not_implemented(input, "igammac with respect to its first argument"),
                          _igamma_grad(input, other, dz, -1))


@rrule(special.zeta)
def zeta(input, other, *, out=None):
    """z = zeta(s, q) (Hurwitz);  dq = -dz s zeta(s + 1, q); no derivative in s (as torch)."""
    no_out(out)
    z = special.zeta(input, other)

    def pullback(dz):
        dq = _grad(-dz * input * special.zeta(input + 1.0, other), other) if is_float_tensor(other) else NoTangent()
        return NoTangent(), _not_implemented(input, "zeta with respect to its first argument"), dq

    return z, pullback


# -- fused forms -----------------------------------------------------------------------------------

@rrule(torch.lerp, Tensor.lerp)
def lerp(input, end, weight, *, out=None):
    """z = x + w (e - x);  dx = dz conj(1 - w),  de = dz conj(w),  dw = dz conj(e - x)."""
    no_out(out)
    z = torch.lerp(input, end, weight)

    def pullback(dz):
        dw = _grad(dz * _c(end - input), weight) if is_float_tensor(weight) else NoTangent()
        return NoTangent(), _grad(dz * _c(1 - weight), input), _grad(dz * _c(weight), end), dw

    return z, pullback


@rrule(torch.addcmul, Tensor.addcmul)
def addcmul(input, tensor1, tensor2, *, value=1, out=None):
    """z = x + v t1 t2;  dx = dz,  dt1 = dz conj(v t2),  dt2 = dz conj(v t1)."""
    no_out(out)
    z = torch.addcmul(input, tensor1, tensor2, value=value)

    def pullback(dz):
        return (NoTangent(), _grad(dz, input), _grad(dz * _c(tensor2 * value), tensor1),
                _grad(dz * _c(tensor1 * value), tensor2))

    return z, pullback


@rrule(torch.addcdiv, Tensor.addcdiv)
def addcdiv(input, tensor1, tensor2, *, value=1, out=None):
    """z = x + v t1 / t2;  dx = dz,  dt1 = dz conj(v / t2),  dt2 = -dz conj(v t1 / t2^2)."""
    no_out(out)
    z = torch.addcdiv(input, tensor1, tensor2, value=value)

    def pullback(dz):
        return (NoTangent(), _grad(dz, input), _grad(dz * _c(value / tensor2), tensor1),
                _grad(-dz * _c(value * tensor1 / (tensor2 * tensor2)), tensor2))

    return z, pullback


@rrule(torch.nan_to_num, Tensor.nan_to_num)
def nan_to_num(input, nan=0.0, posinf=None, neginf=None, *, out=None):
    """z = x with NaN / +inf / -inf replaced by numbers;  dx = dz where x is finite, 0 elsewhere."""
    no_out(out)
    z = torch.nan_to_num(input, nan, posinf, neginf)
    return z, lambda dz: (NoTangent(), torch.where(torch.isfinite(input), dz, _zero(dz)), *nondiff(3))


@rrule(torch.positive, Tensor.positive, Tensor.__pos__)
def positive(input):
    """z = +x (x itself);  dx = dz."""
    return torch.positive(input), lambda dz: (NoTangent(), dz)


# -- complex numbers -------------------------------------------------------------------------------

@rrule(torch.real, Tensor.real)
def real(input):
    """z = Re x (x itself for a real x);  dx = dz (as a complex number with zero imaginary part)."""
    return torch.real(input), lambda dz: (NoTangent(), dz.to(input.dtype) if input.is_complex() else dz)


@rrule(torch.imag, Tensor.imag)
def imag(input):
    """z = Im x (complex x only);  dx = i dz."""
    z = torch.imag(input)
    return z, lambda dz: (NoTangent(), torch.complex(torch.zeros_like(dz), dz))


@rrule(torch.conj, Tensor.conj, torch.conj_physical, Tensor.conj_physical)
def conj(input):
    """z = conj(x) (x itself when real);  dx = conj(dz)."""
    z = torch.conj(input)
    return z, lambda dz: (NoTangent(), _c(dz))


@rrule(torch.resolve_conj, Tensor.resolve_conj, torch.resolve_neg, Tensor.resolve_neg)
def resolve(input):
    """z = x with a lazy conjugation / negation bit materialised (same value);  dx = dz."""
    return torch.resolve_neg(torch.resolve_conj(input)), lambda dz: (NoTangent(), dz)


@rrule(torch.sgn, Tensor.sgn)
def sgn(input, *, out=None):
    """z = x / |x| (0 at 0; sign(x) for real x);  real x: dx = 0;  complex x:
    dx = (dz - z Re(conj(z) dz)) / |x| (0 at x = 0)."""
    no_out(out)
    z = torch.sgn(input)

    def pullback(dz):
        if not input.is_complex():
            return NoTangent(), ZeroTangent()
        r = input.abs()
        g = (dz - z * (_c(z) * dz).real) / r
        return NoTangent(), torch.where(r == 0, _zero(g), g)

    return z, pullback


@rrule(torch.angle, Tensor.angle)
def angle(input, *, out=None):
    """z = arg x (0 or pi for real x);  real x: dx = 0;  complex x: dx = i dz x / |x|^2 (0 at 0)."""
    no_out(out)
    z = torch.angle(input)

    def pullback(dz):
        if not input.is_complex():
            return NoTangent(), ZeroTangent()
        g = dz * input / input.abs().pow(2) * 1j
        return NoTangent(), torch.where(input == 0, _zero(g), g)

    return z, pullback


@rrule(torch.view_as_real)
def view_as_real(input):
    """z = x as (..., 2) real pairs;  dx = dz[..., 0] + i dz[..., 1]."""
    z = torch.view_as_real(input)
    return z, lambda dz: (NoTangent(), torch.complex(dz[..., 0], dz[..., 1]))


@rrule(torch.view_as_complex)
def view_as_complex(input):
    """z = (..., 2) real pairs as complex numbers;  dx = stack(Re dz, Im dz)."""
    z = torch.view_as_complex(input)
    return z, lambda dz: (NoTangent(), torch.stack([dz.real, dz.imag], -1))


@rrule(torch.complex)
def complex_(real, imag, *, out=None):
    """z = a + i b;  da = Re dz,  db = Im dz."""
    no_out(out)
    z = torch.complex(real, imag)
    return z, lambda dz: (NoTangent(), grad_like(dz.real, real), grad_like(dz.imag, imag))


@rrule(torch.polar)
def polar(abs, angle, *, out=None):
    """z = r e^{i theta};  dr = Re(dz conj(e^{i theta})),  dtheta = Re(dz conj(i z))."""
    no_out(out)
    z = torch.polar(abs, angle)

    def pullback(dz):
        unit = torch.polar(torch.ones_like(abs), angle)
        return (NoTangent(), grad_like((dz * unit.conj()).real, abs),
                grad_like((dz * (z * 1j).conj()).real, angle))

    return z, pullback


# -- nextafter, frexp ------------------------------------------------------------------------------

@rrule(torch.nextafter, Tensor.nextafter)
def nextafter(input, other, *, out=None):
    """y = the next float after x towards other;  dx = dy (y - x is below rounding), dother = 0, as
    torch defines it."""
    y = torch.nextafter(input, other)
    return y, lambda dy: (NoTangent(), grad_like(dy, input) if is_float_tensor(input) else NoTangent(), NoTangent())


@rrule(torch.frexp, Tensor.frexp)
def frexp(input, *, out=None):
    """(mantissa, exponent) with x = mantissa * 2^exponent;  dx = dmantissa / 2^exponent."""
    y = torch.frexp(input)

    def pullback(dy):
        dm = materialize(dy[0], like=y.mantissa)
        return NoTangent(), dm / torch.exp2(y.exponent.to(dm.dtype))

    return y, pullback
