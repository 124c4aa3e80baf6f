"""Scans and order statistics (rules/scans.py) against torch.autograd (dynamic and staged): cumprod
with zeros, cummax/cummin, logcumsumexp, sort/msort, topk, kthvalue, median/nanmedian, mode; ties,
NaNs, 0-d, empty and non-contiguous inputs, keyword forms, finite differences."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch

import zygote_torch as zt
import zygote_torch.rules.scans as sc  # noqa: F401  (registers the rules)
import zygote_torch.rules.special  # noqa: F401  (view_as_real, for complex results)
from zygote_torch.ad.registry import REGISTRY
from helpers import check_second_derivatives, check_gradient, fd_check, noncontiguous

Tensor = torch.Tensor
F64, C128 = torch.float64, torch.complex128
NAN = float("nan")


def R(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed + 100 * len(shape))
    return torch.randn(shape, dtype=dtype, generator=g)


def T(rows):
    return torch.tensor(rows, dtype=F64)


SHAPES = [(3, 5), (2, 3, 4), (), (0, 4), (3, 0)]


def _dims(shape):
    return [0] if not shape else list(range(-len(shape), len(shape)))


# -- cumprod ---------------------------------------------------------------------------------------

def _with_zeros():
    x = R(4, 6).clone()
    x[0, 2] = 0  # one zero
    x[1, 1] = x[1, 4] = 0  # two zeros
    x[2, 0] = 0  # a zero first
    x[3, 5] = 0  # a zero last
    return x


@pytest.mark.parametrize("shape", SHAPES)
def test_cumprod(shape):
    x = R(*shape)
    for d in _dims(shape):
        check_gradient(lambda x: torch.cumprod(x, d), x)
        check_gradient(lambda x: x.cumprod(dim=d), noncontiguous(x))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cumprod_with_zeros(dim):
    x = _with_zeros()
    check_gradient(lambda x: torch.cumprod(x, dim), x)
    z = torch.zeros(3, 4, dtype=F64)
    check_gradient(lambda x: torch.cumprod(x, dim), z)  # every element zero
    c = R(3, 4).clone()
    c[:, 1] = 0  # a whole column of zeros
    check_gradient(lambda x: torch.cumprod(input=x, dim=dim), c)


def test_cumprod_complex_and_dtype():
    z = R(3, 4, dtype=C128).clone()
    z[1, 2] = 0
    check_gradient(lambda x: torch.view_as_real(torch.cumprod(x, 1)), z)
    check_gradient(lambda x: torch.cumprod(x, 0, dtype=F64), R(3, 4).float(), atol=1e-5, rtol=1e-5)
    check_gradient(lambda x: torch.cumprod(x, 1), R(3, 1))  # a dimension of size 1


def test_cumprod_finite_differences():
    fd_check(lambda x: torch.cumprod(x, 1), _with_zeros())
    fd_check(lambda x: torch.cumprod(x, 0), R(4, 3))


# -- cummax / cummin -------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["cummax", "cummin"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cummax_cummin(fn, shape):
    x = R(*shape)
    for d in _dims(shape):
        check_gradient(lambda x: tuple(getattr(torch, fn)(x, d)), x)
        check_gradient(lambda x: getattr(x, fn)(dim=d).values, noncontiguous(x))


@pytest.mark.parametrize("fn", ["cummax", "cummin"])
def test_cummax_cummin_ties_and_nan(fn):
    x = T([[1.0, 1.0, 0.0, 2.0, 2.0, 1.0], [0.0, NAN, 1.0, -1.0, NAN, 3.0]])
    check_gradient(lambda x: getattr(torch, fn)(x, 1).values, x)
    res = zt.pullback(lambda x: getattr(torch, fn)(x, 1), x)[0]
    assert type(res) is type(getattr(torch, fn)(x, 1))  # torch.return_types.cummax / cummin


# -- logcumsumexp ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_logcumsumexp(shape):
    x = R(*shape)
    for d in _dims(shape):
        check_gradient(lambda x: torch.logcumsumexp(x, d), x)
        check_gradient(lambda x: x.logcumsumexp(dim=d), noncontiguous(x))


def test_logcumsumexp_extremes_and_complex():
    x = T([[-1000.0, 0.0, 1000.0, -float("inf")], [5.0, 5.0, 5.0, 5.0]])
    check_gradient(lambda x: torch.logcumsumexp(x, 1), x)
    check_gradient(lambda x: torch.view_as_real(torch.logcumsumexp(x, 1)), R(3, 4, dtype=C128))
    fd_check(lambda x: torch.logcumsumexp(x, 1), R(2, 4))


# -- sort, msort, topk, kthvalue -------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("descending", [False, True])
def test_sort(shape, descending):
    x = R(*shape)
    for d in _dims(shape):
        check_gradient(lambda x: tuple(torch.sort(x, d, descending)), x)
        check_gradient(lambda x: x.sort(dim=d, descending=descending, stable=True).values, noncontiguous(x))
    if len(shape) >= 1:
        check_gradient(torch.msort, x)
        check_gradient(lambda x: x.msort(), noncontiguous(x))


def test_sort_ties_follow_the_returned_permutation():
    x = T([[1.0, 2.0, 1.0, 0.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    check_gradient(lambda x: torch.sort(x, stable=True).values, x)
    check_gradient(lambda x: torch.sort(x, dim=1, descending=True, stable=True).values, x)
    check_gradient(lambda x: torch.sort(x.mT, dim=0, stable=True).values, x)
    res = zt.pullback(lambda x: torch.sort(x), x)[0]
    assert type(res) is torch.return_types.sort


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("sorted_", [True, False])
def test_topk(largest, sorted_):
    x = R(3, 6)
    check_gradient(lambda x: tuple(torch.topk(x, 3, largest=largest, sorted=sorted_)), x)
    check_gradient(lambda x: x.topk(2, dim=0, largest=largest, sorted=sorted_).values, noncontiguous(x))
    check_gradient(lambda x: torch.topk(input=x, k=0, dim=1).values, x)  # nothing selected
    check_gradient(lambda x: torch.topk(x, 1).values, R())


@pytest.mark.parametrize("keepdim", [False, True])
def test_kthvalue(keepdim):
    x = R(3, 6)
    check_gradient(lambda x: tuple(torch.kthvalue(x, 2, 1, keepdim)), x)
    check_gradient(lambda x: x.kthvalue(3, dim=0, keepdim=keepdim).values, noncontiguous(x))
    check_gradient(lambda x: torch.kthvalue(x, 1).values, R())
    check_gradient(lambda x: torch.kthvalue(x, 2, 1).values, T([[1.0, 1.0, 1.0], [2.0, 0.0, 2.0]]))


# -- median, nanmedian, mode -----------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["median", "nanmedian"])
def test_median_full(fn):
    f = getattr(torch, fn)
    check_gradient(f, R(3, 5))
    check_gradient(f, R())
    check_gradient(lambda x: getattr(x, fn)(), noncontiguous(R(3, 4)))
    check_gradient(f, T([1.0, 2.0, 2.0, 3.0, 2.0]))  # ties: the gradient is split evenly
    check_gradient(f, T([1.0, NAN, 2.0, NAN, 3.0]))  # median: NaN, split among the NaNs
    check_gradient(f, T([NAN, NAN]))


@pytest.mark.parametrize("fn", ["median", "nanmedian"])
@pytest.mark.parametrize("keepdim", [False, True])
def test_median_dim(fn, keepdim):
    f = getattr(torch, fn)
    x = R(4, 5)
    check_gradient(lambda x: tuple(f(x, 1, keepdim)), x)
    check_gradient(lambda x: getattr(x, fn)(dim=0, keepdim=keepdim).values, noncontiguous(x))
    check_gradient(lambda x: f(input=x, dim=-1).values, T([[1.0, NAN, 2.0], [NAN, NAN, NAN], [2.0, 2.0, 1.0]]))
    check_gradient(lambda x: f(x, 0).values, R())
    res = zt.pullback(lambda x: f(x, 1), x)[0]
    assert type(res) is type(f(x, 1))


@pytest.mark.parametrize("keepdim", [False, True])
def test_mode(keepdim):
    x = T([[1.0, 2.0, 2.0, 3.0], [3.0, 3.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    check_gradient(lambda x: tuple(torch.mode(x, 1, keepdim)), x)
    check_gradient(lambda x: x.mode(dim=0, keepdim=keepdim).values, noncontiguous(x))
    check_gradient(lambda x: torch.mode(x).values, R(3, 4))


FD_CASES = {
    "cummax": (lambda x: torch.cummax(x, 1).values, R(2, 5)),
    "sort": (lambda x: torch.sort(x, 0).values, R(4, 3)),
    "topk": (lambda x: torch.topk(x, 2).values, R(3, 5)),
    "kthvalue": (lambda x: torch.kthvalue(x, 2, 0).values, R(4, 3)),
    "median": (torch.median, R(5)),
    "median_dim": (lambda x: torch.median(x, 1).values, R(3, 5)),
    "nanmedian": (lambda x: torch.nanmedian(x, 0).values, R(5, 2)),
}


@pytest.mark.parametrize("name", list(FD_CASES))
def test_finite_differences(name):
    f, x = FD_CASES[name]
    fd_check(f, x)


ALIASES = {
    "cumprod": [torch.cumprod, Tensor.cumprod], "cummax": [torch.cummax, Tensor.cummax],
    "cummin": [torch.cummin, Tensor.cummin], "logcumsumexp": [torch.logcumsumexp, Tensor.logcumsumexp],
    "sort": [torch.sort, Tensor.sort], "msort": [torch.msort, Tensor.msort], "topk": [torch.topk, Tensor.topk],
    "kthvalue": [torch.kthvalue, Tensor.kthvalue], "median": [torch.median, Tensor.median],
    "nanmedian": [torch.nanmedian, Tensor.nanmedian], "mode": [torch.mode, Tensor.mode],
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_registered_under_every_alias(name):
    for fn in ALIASES[name]:
        assert REGISTRY.lookup(fn).fn is getattr(sc, name), fn


# -- second derivatives: the pullbacks themselves only call ops with rules ------------------------

SECOND_ORDER = {
    "cumprod": (lambda x: torch.cumprod(x, 0).sum(), R(5)),
    "cumprod_zero": (lambda x: (torch.cumprod(x, 0) * T([1.0, -2.0, 0.5, 3.0, 1.5])).sum(),
                     T([1.0, 2.0, 0.0, 3.0, -1.0])),
    "cumprod_two_zeros": (lambda x: (torch.cumprod(x, 0) * T([1.0, -2.0, 0.5, 3.0, 1.5, 2.0])).sum(),
                          T([1.0, 0.0, 2.0, 0.0, 3.0, -1.0])),
    "cumprod_three_zeros": (lambda x: (torch.cumprod(x, 0) * T([1.0, -2.0, 0.5, 3.0, 1.5, 2.0])).sum(),
                            T([0.0, 2.0, 0.0, 0.0, 3.0, -1.0])),
    "cumprod_zero_2d": (lambda x: torch.cumprod(x.reshape(2, 3), 1).pow(2).sum(), T([1.0, 0.0, 2.0, 0.0, 3.0, 0.0])),
    "logcumsumexp": (lambda x: torch.logcumsumexp(x, 0).pow(2).sum(), R(5)),
    "sort": (lambda x: (torch.sort(x).values ** 3 * torch.arange(5.0, dtype=F64)).sum(), R(5)),
    "cummax": (lambda x: (torch.cummax(x, 0).values ** 3).sum(), R(5)),
    "median": (lambda x: (torch.median(x.reshape(2, 3), 1).values ** 3).sum(), R(6)),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_second_derivatives_through_rules(name):
    check_second_derivatives(*SECOND_ORDER[name])
