"""Special functions, binary elementwise math and complex numbers (rules/special.py) against
torch.autograd (float64 / complex128, dynamic and staged), finite differences, and torch's
"not implemented" derivatives."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch

import zygote_torch as zt
import zygote_torch.rules.special as sp  # noqa: F401  (registers the rules)
from zygote_torch.ad.registry import REGISTRY
from helpers import check_second_derivatives, check_gradient, fd_check, noncontiguous

Tensor = torch.Tensor
S = torch.special
F64, C128 = torch.float64, torch.complex128
VR = torch.view_as_real


def R(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed + 100 * len(shape))
    return torch.randn(shape, dtype=dtype, generator=g)


def P(*shape, seed=0):
    return R(*shape, seed=seed).abs() + 0.5


def with_specials(x, *values):
    """x (1-D) with some entries replaced by special points (0, inf, nan ...)."""
    return torch.cat([x, torch.tensor(values, dtype=x.dtype)])


# -- unary special functions -----------------------------------------------------------------------

def _domain(name, shape, seed=0):
    x = R(*shape, seed=seed)
    if name in ("entr", "polygamma", "mvlgamma"):
        return x.abs() + 0.6 + (1.5 if name == "mvlgamma" else 0)
    if name == "ndtri":
        return torch.sigmoid(x)
    return x


UNARY = {
    "entr": [S.entr], "ndtr": [S.ndtr], "ndtri": [S.ndtri], "log_ndtr": [S.log_ndtr],
    "i0": [torch.i0, Tensor.i0, S.i0], "i0e": [S.i0e], "i1": [S.i1], "i1e": [S.i1e], "erfcx": [S.erfcx],
    "polygamma": [lambda x: torch.polygamma(2, x), lambda x: S.polygamma(1, input=x), lambda x: x.polygamma(3)],
    "mvlgamma": [lambda x: torch.mvlgamma(x, 3), lambda x: x.mvlgamma(p=2), lambda x: S.multigammaln(x, 4)],
}


@pytest.mark.parametrize("name", list(UNARY))
@pytest.mark.parametrize("shape", [(3, 4), (), (0, 2)])
def test_unary(name, shape):
    x = _domain(name, shape)
    for f in UNARY[name]:
        check_gradient(f, x)
    if x.dim():
        check_gradient(UNARY[name][0], noncontiguous(x))


def test_unary_special_points():
    # entr at 0 (-inf slope, torch's value) and below 0 (NaN); i1 / i1e at 0 (1/2, torch's guard)
    check_gradient(S.entr, with_specials(P(3), 0.0, -1.0))
    check_gradient(S.i1, with_specials(R(3), 0.0, 1e-20))
    check_gradient(S.i1e, with_specials(R(3), 0.0, -1e-20))
    check_gradient(S.ndtri, with_specials(torch.rand(3, dtype=F64), 0.0, 1.0))
    check_gradient(S.log_ndtr, with_specials(R(3), -30.0, 30.0))


@pytest.mark.parametrize("name", ["entr", "ndtr", "ndtri", "log_ndtr", "i0", "i0e", "i1", "i1e", "erfcx",
                                  "polygamma", "mvlgamma"])
def test_unary_finite_differences(name):
    fd_check(UNARY[name][0], _domain(name, (4,), seed=3))


# -- binary functions ------------------------------------------------------------------------------

BINARY = {
    "xlogy": [torch.xlogy, Tensor.xlogy, S.xlogy],
    "xlog1py": [S.xlog1py],
    "logaddexp2": [torch.logaddexp2, Tensor.logaddexp2],
    "copysign": [torch.copysign, Tensor.copysign],
    "fmod": [torch.fmod, Tensor.fmod],
    "remainder": [torch.remainder, Tensor.remainder, lambda x, y: x % y],
    "float_power": [torch.float_power, Tensor.float_power],
    "igamma": [torch.igamma, Tensor.igamma, S.gammainc],
    "igammac": [torch.igammac, Tensor.igammac, S.gammaincc],
    "zeta": [S.zeta],
}


def _binary_inputs(name, xs, ys):
    x, y = R(*xs), R(*ys, seed=1)
    if name in ("xlogy", "float_power", "igamma", "igammac"):
        y = y.abs() + 0.5
        if name != "xlogy":
            x = x.abs() + 0.5
    if name == "xlog1py":
        y = y.abs()
    if name == "zeta":
        x, y = x.abs() + 1.5, y.abs() + 0.5
    if name in ("fmod", "remainder"):
        y = y.abs() + 0.3
    return x, y


@pytest.mark.parametrize("name", list(BINARY))
@pytest.mark.parametrize("xs,ys", [((3, 4), (3, 4)), ((3, 1), (4,)), ((), (2, 3)), ((0, 3), (3,))])
def test_binary(name, xs, ys):
    x, y = _binary_inputs(name, xs, ys)
    differentiable_x = name not in ("igamma", "igammac", "zeta")  # torch has no derivative in x
    for f in BINARY[name]:
        if differentiable_x:
            check_gradient(f, x, y)
        check_gradient(lambda y: f(x, y), y)
    if x.dim():
        check_gradient(lambda y: BINARY[name][0](x, y), noncontiguous(y))
        if differentiable_x:
            check_gradient(BINARY[name][0], noncontiguous(x), y)
    second = "exponent" if name == "float_power" else "other"
    check_gradient(lambda x, y: BINARY[name][0](input=x, **{second: y}), x, y) if differentiable_x else None


@pytest.mark.parametrize("name", ["xlogy", "xlog1py", "copysign"])
def test_binary_special_points(name):
    f = BINARY[name][0]
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, -0.0, 2.0, 0.0], dtype=F64)
    y = torch.tensor([0.0, 2.0, -1.0, 0.0, 3.0, float("nan"), float("nan")], dtype=F64)
    if name == "xlog1py":
        y = y - 1  # the special points of log1p
    check_gradient(f, x, y)


@pytest.mark.parametrize("name,number_first", [
    ("xlogy", False), ("xlogy", True), ("xlog1py", False), ("copysign", False), ("fmod", False),
    ("remainder", False), ("float_power", False), ("float_power", True)])
def test_binary_with_numbers(name, number_first):
    f = BINARY[name][0]
    x = P(3, 4) if name in ("xlogy", "float_power") else R(3, 4)
    if number_first:
        check_gradient(lambda x: f(2.5, x), x)
    else:
        check_gradient(lambda x: f(x, 0.7), x)
        check_gradient(lambda x: f(x, -2), x)


def test_mod_operator_and_rmod():
    x, y = R(3, 4), P(4, seed=1)
    check_gradient(lambda x, y: x % y, x, y)
    check_gradient(lambda x: x % 0.3, x)
    _, back = zt.pullback(lambda x: 2.0 % x, y)  # torch has no derivative here either
    with pytest.raises(NotImplementedError, match="remainder"):
        back(torch.ones(4, dtype=F64))


def test_not_implemented_where_torch_has_none():
    a, x = P(3), P(3, seed=1)
    for f, what in [(torch.igamma, "igamma"), (torch.igammac, "igammac"), (S.zeta, "zeta")]:
        aa = a + 1.0 if f is S.zeta else a
        _, back = zt.pullback(f, aa, x)
        with pytest.raises(NotImplementedError, match=what):
            back(torch.ones(3, dtype=F64))
        g = zt.gradient(lambda x: f(aa, x).sum(), x)[0]  # the other argument works
        assert g is not None and torch.isfinite(g).all()


def test_float_power_dtypes_and_zeros():
    check_gradient(torch.float_power, P(3, 4).float(), R(4).float(), atol=1e-5, rtol=1e-5)
    x = torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=F64)
    p = torch.tensor([0.0, 2.0, 0.0, -1.0], dtype=F64)
    check_gradient(torch.float_power, x, p)
    check_gradient(lambda x, p: VR(torch.float_power(x, p)), R(3, dtype=C128), R(3, dtype=C128, seed=1))


def test_ldexp():
    x = R(4)
    check_gradient(lambda x: torch.ldexp(x, torch.tensor([1, 2, 3, 0])), x)
    check_gradient(torch.ldexp, x, R(4, seed=1))  # a floating exponent is differentiated too
    check_gradient(lambda x, e: x.ldexp(e), R(3, 1), R(4, seed=1))
    check_gradient(lambda x, e: VR(torch.ldexp(x, e)), R(3, 1, dtype=C128), R(4, dtype=C128, seed=1))
    # negative integer exponents: torch.autograd returns 0 here (its gradcheck fails); we return 2^e
    e = torch.tensor([-1, -2, 3, 0])
    (g,) = zt.gradient(lambda x: torch.ldexp(x, e).sum(), x)
    torch.testing.assert_close(g, torch.tensor([0.5, 0.25, 8.0, 1.0], dtype=F64))
    fd_check(lambda x: torch.ldexp(x, e), x)


@pytest.mark.parametrize("name", ["xlogy", "xlog1py", "logaddexp2", "copysign", "fmod", "remainder",
                                  "float_power"])
def test_binary_finite_differences(name):
    x, y = _binary_inputs(name, (4,), (4,))
    if name == "copysign":
        fd_check(lambda x: torch.copysign(x, y), x)  # dy = 0 except at y = 0
    elif name in ("fmod", "remainder"):
        fd_check(lambda x: BINARY[name][0](x, y), x)  # piecewise in y; away from the jumps
    else:
        fd_check(BINARY[name][0], x, y)


def test_igamma_zeta_finite_differences():
    a = P(4)
    fd_check(lambda x: torch.igamma(a, x), P(4, seed=1))
    fd_check(lambda x: torch.igammac(a, x), P(4, seed=1))
    fd_check(lambda q: S.zeta(a + 1.0, q), P(4, seed=1))


# -- fused forms, nan_to_num, positive -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, C128])
def test_lerp(dtype):
    x, e, w = R(3, 1, dtype=dtype), R(4, dtype=dtype, seed=1), R(3, 4, dtype=dtype, seed=2)
    o = VR if dtype == C128 else (lambda t: t)
    check_gradient(lambda x, e, w: o(torch.lerp(x, e, w)), x, e, w)
    check_gradient(lambda x, e: o(x.lerp(e, 0.3)), x, e)
    check_gradient(lambda x, e, w: o(torch.lerp(input=x, end=e, weight=w)), noncontiguous(x), e, w)
    check_gradient(lambda x, e, w: o(torch.lerp(x, e, w)), R(dtype=dtype), R(2, dtype=dtype), R(dtype=dtype))


@pytest.mark.parametrize("dtype", [F64, C128])
@pytest.mark.parametrize("fn", ["addcmul", "addcdiv"])
def test_addcmul_addcdiv(dtype, fn):
    x, a, b = R(3, 1, dtype=dtype), R(4, dtype=dtype, seed=1), R(3, 4, dtype=dtype, seed=2)
    if fn == "addcdiv":
        b = b + (3 if dtype == F64 else 3 + 1j) * torch.sign(b.real)
    o = VR if dtype == C128 else (lambda t: t)
    f = getattr(torch, fn)
    check_gradient(lambda x, a, b: o(f(x, a, b)), x, a, b)
    check_gradient(lambda x, a, b: o(f(x, a, b, value=0.5)), x, a, noncontiguous(b))
    check_gradient(lambda x, a, b: o(getattr(x, fn)(a, b, value=-2)), x, a, b)
    check_gradient(lambda x, a, b: o(f(input=x, tensor1=a, tensor2=b)), x, a, b)
    check_gradient(lambda x, a, b: o(f(x, a, b)), R(0, 4, dtype=dtype), a, b[:1])


def test_nan_to_num_and_positive():
    x = with_specials(R(3), float("nan"), float("inf"), -float("inf"))
    check_gradient(torch.nan_to_num, x)
    check_gradient(lambda x: torch.nan_to_num(x, nan=1.0, posinf=2.0, neginf=-2.0), x)
    check_gradient(lambda x: x.nan_to_num(0.5), x)
    check_gradient(lambda x: torch.positive(x) * x, R(3, 4))
    check_gradient(lambda x: (+x) * x.positive(), noncontiguous(R(3, 4)))


def test_heaviside_is_not_differentiable():
    x, v = R(4), R(4, seed=1)
    assert REGISTRY.is_non_differentiable(torch.heaviside)
    g = zt.gradient(lambda x: (torch.heaviside(x, v) * x).sum(), x)[0]
    torch.testing.assert_close(g, torch.heaviside(x, v))  # only the explicit factor x contributes


# -- complex numbers -------------------------------------------------------------------------------

def C(*shape, seed=0):
    return R(*shape, dtype=C128, seed=seed)


def test_real_imag_conj():
    z = C(3, 4)
    check_gradient(lambda z: torch.real(z) * z.imag, z)
    check_gradient(lambda z: z.real ** 2 + torch.imag(z), noncontiguous(z))
    check_gradient(lambda z: VR(torch.conj(z) * z.conj_physical() * 1j), z)
    check_gradient(lambda z: VR(torch.conj_physical(z).resolve_conj() * 2 + z.conj().resolve_neg()), z)
    x = R(3, 4)  # real tensors: real and conj are the identity
    check_gradient(lambda x: torch.real(x) * x.conj() + torch.conj(x), x)
    check_gradient(lambda x: torch.real(x) * 2, R())


def test_sgn_angle_abs():
    z = torch.cat([C(4), torch.zeros(1, dtype=C128)])
    check_gradient(lambda z: VR(torch.sgn(z)), z)
    check_gradient(lambda z: VR(z.sgn()), noncontiguous(z))
    check_gradient(torch.angle, z)
    check_gradient(lambda z: z.angle() * z.abs(), z)
    x = with_specials(R(3), 0.0, -0.0)  # real: sgn and angle are locally constant
    check_gradient(lambda x: torch.sgn(x) * x + torch.angle(x), x)
    fd_check(lambda z: VR(torch.sgn(z)), C(3))
    fd_check(torch.angle, C(3))


def test_view_as_real_complex_and_constructors():
    check_gradient(lambda z: VR(z) * 2, C(3, 4))
    check_gradient(lambda x: VR(torch.view_as_complex(x).exp()), R(3, 4, 2))
    check_gradient(lambda x: VR(torch.view_as_complex(x)), R(0, 2))
    check_gradient(lambda a, b: VR(torch.complex(a, b).exp()), R(3, 1), R(4, seed=1))
    check_gradient(lambda a, b: VR(torch.complex(real=a, imag=b)), R(3, 4), noncontiguous(R(3, 4, seed=1)))
    check_gradient(lambda r, t: VR(torch.polar(r, t)), P(3, 1), R(4, seed=1))
    check_gradient(lambda r, t: VR(torch.polar(abs=r, angle=t)), P(), R(3, seed=1))
    fd_check(lambda a, b: VR(torch.polar(a, b)), P(3), R(3, seed=1))
    fd_check(lambda z: VR(torch.view_as_complex(z).exp()), R(2, 2))


# -- aliases -----------------------------------------------------------------------------------------

ALIASES = {
    "entr": [S.entr], "ndtr": [S.ndtr], "ndtri": [S.ndtri], "log_ndtr": [S.log_ndtr],
    "i0": [torch.i0, Tensor.i0, S.i0], "i0e": [S.i0e], "i1": [S.i1], "i1e": [S.i1e], "erfcx": [S.erfcx],
    "polygamma": [torch.polygamma, S.polygamma], "polygamma_method": [Tensor.polygamma],
    "mvlgamma": [torch.mvlgamma, Tensor.mvlgamma, S.multigammaln],
    "xlogy": [torch.xlogy, Tensor.xlogy, S.xlogy], "xlog1py": [S.xlog1py],
    "logaddexp2": [torch.logaddexp2, Tensor.logaddexp2], "copysign": [torch.copysign, Tensor.copysign],
    "fmod": [torch.fmod, Tensor.fmod], "remainder": [torch.remainder, Tensor.remainder, Tensor.__mod__],
    "rmod": [Tensor.__rmod__], "float_power": [torch.float_power, Tensor.float_power],
    "ldexp": [torch.ldexp, Tensor.ldexp], "igamma": [torch.igamma, Tensor.igamma, S.gammainc],
    "igammac": [torch.igammac, Tensor.igammac, S.gammaincc], "zeta": [S.zeta],
    "lerp": [torch.lerp, Tensor.lerp], "addcmul": [torch.addcmul, Tensor.addcmul],
    "addcdiv": [torch.addcdiv, Tensor.addcdiv], "nan_to_num": [torch.nan_to_num, Tensor.nan_to_num],
    "positive": [torch.positive, Tensor.positive, Tensor.__pos__], "real": [torch.real, Tensor.real],
    "imag": [torch.imag, Tensor.imag],
    "conj": [torch.conj, Tensor.conj, torch.conj_physical, Tensor.conj_physical],
    "resolve": [torch.resolve_conj, Tensor.resolve_conj, torch.resolve_neg, Tensor.resolve_neg],
    "sgn": [torch.sgn, Tensor.sgn], "angle": [torch.angle, Tensor.angle], "view_as_real": [torch.view_as_real],
    "view_as_complex": [torch.view_as_complex], "complex_": [torch.complex], "polar": [torch.polar],
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_registered_under_every_alias(name):
    rule = getattr(sp, name)
    for fn in ALIASES[name]:
        assert REGISTRY.lookup(fn).fn is rule, fn


# -- second derivatives: the pullbacks themselves only call ops with rules ------------------------

SECOND_ORDER = {
    "xlogy": (lambda x: torch.xlogy(x, x.abs() + 1).sum(), R(4)),
    "i1": (lambda x: S.i1(x).sum(), R(4)),
    "i1e": (lambda x: S.i1e(x).sum(), R(4)),
    "ndtri": (lambda x: S.ndtri(torch.sigmoid(x)).pow(3).sum(), R(4)),
    "log_ndtr": (lambda x: S.log_ndtr(x).sum(), R(4)),
    "polygamma": (lambda x: torch.polygamma(1, x.abs() + 1).sum(), R(4)),
    "lerp": (lambda x: torch.lerp(x, x ** 2, x.sigmoid()).sum(), R(4)),
    "addcdiv": (lambda x: torch.addcdiv(x, x.sin(), x.exp()).pow(2).sum(), R(4)),
    "float_power": (lambda x: torch.float_power(x.abs() + 1, x).sum(), R(4)),
    "complex": (lambda x: torch.sgn(torch.complex(x, x.sin())).angle().pow(2).sum(), R(4)),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_second_derivatives_through_rules(name):
    check_second_derivatives(*SECOND_ORDER[name])
