"""Elementwise rules against torch.autograd (float64), finite differences, and fake tensors."""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import zygote_torch as zt
from zygote_torch.ad.registry import REGISTRY
from zygote_torch.rules import elementwise as ew
from helpers import check_gradient, fd_check, noncontiguous, rand

Tensor = torch.Tensor


# -- helpers ----------------------------------------------------------------------------------------

def domain(name, shape, seed=0):
    """An input inside the op's domain, away from its singularities."""
    x = rand(*shape, seed=seed)
    if name in ("log", "log2", "log10", "sqrt", "rsqrt", "log1p", "digamma", "lgamma", "reciprocal"):
        return x.abs() + 0.5
    if name in ("asin", "acos", "atanh", "erfinv"):
        return torch.tanh(x) * 0.9
    if name == "acosh":
        return x.abs() + 1.5
    if name == "tan":
        return torch.tanh(x)
    return x


def fake_check(f, *xs):
    """Rules and pullbacks run on FakeTensors (no data-dependent Python), with the right shapes."""
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(x) if isinstance(x, Tensor) else x for x in xs]
    with mode:
        y, back = zt.pullback(f, *fakes)
        grads = back(torch.ones_like(y))
    for x, g in zip(fakes, grads):
        if isinstance(x, Tensor) and g is not None:
            assert g.shape == x.shape


def check_nan_aware(f, *xs):
    """zt.pullback equals torch.autograd where NaN/inf gradients are expected (check_gradient
    compares without equal_nan)."""
    refs = [x.detach().clone().requires_grad_() for x in xs]
    y_ref = f(*refs)
    dy = torch.ones_like(y_ref)
    ref = torch.autograd.grad(y_ref, refs, dy)
    y, back = zt.pullback(f, *xs)
    torch.testing.assert_close(y, y_ref.detach(), equal_nan=True)
    for g, r in zip(back(dy), ref):
        torch.testing.assert_close(g, r, equal_nan=True)


def complex_check(f, z):
    zr = z.detach().clone().requires_grad_()
    y = f(zr)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=gen)
    ref, = torch.autograd.grad(y, zr, dy)
    _, back = zt.pullback(f, z)
    torch.testing.assert_close(back(dy)[0], ref)


# -- unary table ------------------------------------------------------------------------------------

UNARY_CASES = [(name, fn) for name, (fns, *_rest) in ew.UNARY.items() for fn in fns]
CONSTANT_CASES = [(name, fn) for name, (fns, *_rest) in ew.PIECEWISE_CONSTANT.items() for fn in fns]


def _id(case):
    name, fn = case
    return f"{name}-{getattr(fn, '__module__', None) or 'Tensor'}.{fn.__name__}"


@pytest.mark.parametrize("case", UNARY_CASES, ids=[_id(c) for c in UNARY_CASES])
@pytest.mark.parametrize("shape", [(3, 4), (), (0, 3)])
def test_unary_every_alias(case, shape):
    name, fn = case
    check_gradient(lambda x: fn(x), domain(name, shape))


@pytest.mark.parametrize("name", list(ew.UNARY))
def test_unary_noncontiguous_and_fd(name):
    x = noncontiguous(domain(name, (4, 3), seed=3))
    check_gradient(getattr(torch, name) if hasattr(torch, name) else getattr(Tensor, name), x)
    fn = ew.UNARY[name][0][0]
    fd_check(fn, domain(name, (5,), seed=4))


ROUNDING = [torch.floor, Tensor.floor, torch.ceil, Tensor.ceil, torch.trunc, torch.fix, Tensor.trunc, torch.round,
            Tensor.round]  # declared non-differentiable in rules/nondiff.py


@pytest.mark.parametrize("fn", [fn for _, fn in CONSTANT_CASES] + ROUNDING,
                         ids=[_id(c) for c in CONSTANT_CASES] + [f"rounding{i}" for i in range(len(ROUNDING))])
def test_piecewise_constant(fn):
    x = rand(3, 4) * 3
    check_gradient(lambda x: fn(x) * x, x)
    check_gradient(lambda x: fn(x), x)


def test_round_decimals_and_frac():
    x = rand(3, 4) * 3
    check_gradient(lambda x: torch.round(x, decimals=1) + x, x)
    check_gradient(lambda x: torch.frac(x) * x, x)


def test_operator_abs_and_subgradients_at_zero():
    x = torch.tensor([-2.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    check_gradient(lambda x: abs(x), x)
    check_gradient(lambda x: torch.absolute(x), x)
    check_gradient(lambda x: x.abs(), x)
    check_gradient(lambda x: torch.sign(x) + x, x)
    g, = zt.gradient(lambda x: abs(x).sum(), x)
    assert g.tolist() == [-1.0, 0.0, 1.0, 0.0]


def test_sqrt_at_zero_is_inf_like_torch():
    check_nan_aware(torch.sqrt, torch.tensor([0.0, 4.0], dtype=torch.float64))


def test_sinc_at_zero():
    check_gradient(torch.sinc, torch.tensor([0.0, 0.3, -1.5], dtype=torch.float64))


@pytest.mark.parametrize("fn", [torch.logit, Tensor.logit, torch.special.logit])
def test_logit(fn):
    x = torch.sigmoid(rand(3, 4))
    check_gradient(lambda x: fn(x), x)
    check_gradient(lambda x: fn(x, eps=0.2), x)
    check_gradient(lambda x: fn(x, 0.3), x)
    check_nan_aware(lambda x: fn(x), torch.tensor([-0.5, 0.5, 1.5], dtype=torch.float64))


@pytest.mark.parametrize("f", [torch.exp, torch.log, torch.sin, torch.cos, torch.tanh, torch.sigmoid, torch.sqrt,
                               torch.abs, torch.reciprocal, torch.square, torch.tan, torch.expm1, torch.asin])
def test_complex(f):
    z = torch.complex(rand(5, seed=1), rand(5, seed=2)) * 0.5
    complex_check(f, z)


# -- relu -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [torch.relu, Tensor.relu, F.relu, lambda x: F.relu(x, inplace=False),
                                lambda x: F.relu(x, False)])
def test_relu(fn):
    x = rand(3, 4)
    check_gradient(fn, x)
    check_gradient(fn, noncontiguous(x))
    check_gradient(fn, rand(0, 2))
    check_gradient(fn, torch.tensor(0.0, dtype=torch.float64))
    check_gradient(fn, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))  # relu'(0) = 0


def test_relu_inplace_flag_mutates_intermediates_and_refuses_arguments():
    x = rand(3, 4)
    # torch refuses relu_ on a leaf, so the reference applies it to an intermediate
    check_gradient(lambda x: F.relu(x * 2, inplace=True), x)

    def discard_result(x):
        h = x * 2
        F.relu(h, inplace=True)
        return h + x
    y, back = zt.pullback(discard_result, x)
    torch.testing.assert_close(y, F.relu(x * 2) + x)
    torch.testing.assert_close(back(torch.ones(3, 4, dtype=torch.float64))[0], 2 * (x > 0).double() + 1)
    with pytest.raises(zt.ZygoteError, match="mutates a tensor being differentiated"):
        zt.pullback(lambda x: F.relu(x, inplace=True) + x, x)


# -- clamp ------------------------------------------------------------------------------------------

CLAMP_NUMBER = [
    lambda x: torch.clamp(x, -0.5, 0.5),
    lambda x: torch.clamp(x, min=-0.5),
    lambda x: torch.clamp(x, max=0.5),
    lambda x: torch.clip(x, -0.5, 0.5),
    lambda x: x.clamp(-0.5, 0.5),
    lambda x: x.clamp(min=0.0),
    lambda x: x.clamp(max=0.0),
    lambda x: x.clip(0.1, 0.2),
    lambda x: x.clip(max=0.2),
    lambda x: torch.clamp_min(x, 0.0),
    lambda x: torch.clamp_max(x, 0.0),
    lambda x: x.clamp_min(0.2),
    lambda x: x.clamp_max(0.2),
    lambda x: torch.clamp(x, 0.5, -0.5),  # min > max: everything is max
]


@pytest.mark.parametrize("i", range(len(CLAMP_NUMBER)))
def test_clamp_numbers(i):
    f = CLAMP_NUMBER[i]
    x = rand(4, 5)
    check_gradient(f, x)
    check_gradient(f, noncontiguous(x))
    check_gradient(f, torch.tensor(0.3, dtype=torch.float64))
    check_gradient(f, rand(0, 5))


def test_clamp_at_bounds_passes_gradient():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    check_gradient(lambda x: torch.clamp(x, -0.5, 0.5), x)
    check_gradient(lambda x: torch.clamp_min(x, 0.5), x)
    check_gradient(lambda x: torch.clamp_max(x, -0.5), x)


CLAMP_TENSOR = [
    lambda x, lo, hi: torch.clamp(x, lo, hi),
    lambda x, lo, hi: torch.clamp(x, min=lo, max=hi),
    lambda x, lo, hi: torch.clip(x, lo, hi),
    lambda x, lo, hi: x.clamp(lo, hi),
    lambda x, lo, hi: x.clip(min=lo, max=hi),
    lambda x, lo, hi: torch.clamp(x, min=lo),
    lambda x, lo, hi: torch.clamp(x, max=hi),
    lambda x, lo, hi: torch.clamp_min(x, lo),
    lambda x, lo, hi: torch.clamp_max(x, hi),
    lambda x, lo, hi: x.clamp_min(lo) * x.clamp_max(hi),
    lambda x, lo, hi: torch.clamp(x, hi, lo),  # min > max in places
]


@pytest.mark.parametrize("i", range(len(CLAMP_TENSOR)))
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4), (3, 4)), ((3, 4), (4,), (3, 1)), ((3, 4), (1, 4), ()),
                                    ((), (), ())])
def test_clamp_tensors_broadcasting(i, shapes):
    f = CLAMP_TENSOR[i]
    x, lo, hi = rand(*shapes[0], seed=1), rand(*shapes[1], seed=2) - 0.5, rand(*shapes[2], seed=3) + 0.5
    check_gradient(f, x, lo, hi)


@pytest.mark.parametrize("f", [torch.clamp, Tensor.clamp, torch.clip])
def test_clamp_input_smaller_than_output(f):
    # torch.autograd itself fails here ("output with shape [4] doesn't match the broadcast shape
    # [3, 4]" in ClampBackward), so the reference is the equivalent clamp_min/clamp_max chain.
    x, lo, hi = rand(4, seed=1), rand(3, 4, seed=2) - 0.5, rand(1, seed=3) + 0.5
    dy = rand(3, 4, seed=4)
    refs = [t.clone().requires_grad_() for t in (x, lo, hi)]
    ref = torch.autograd.grad(torch.clamp_max(torch.clamp_min(refs[0], refs[1]), refs[2]), refs, dy)
    y, back = zt.pullback(lambda x, lo, hi: f(x, lo, hi), x, lo, hi)
    torch.testing.assert_close(y, torch.clamp(x, lo, hi))
    for g, r in zip(back(dy), ref):
        torch.testing.assert_close(g, r)


def test_clamp_tensor_ties():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    lo = torch.tensor([0.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 3.0, 2.0, 3.0], dtype=torch.float64)
    check_gradient(lambda x, lo, hi: torch.clamp(x, lo, hi), x, lo, hi)
    check_gradient(lambda x, lo, hi: torch.clamp(x, hi, lo), x, lo, hi)


# -- where ------------------------------------------------------------------------------------------

WHERE = [
    lambda c, x, y: torch.where(c, x, y),
    lambda c, x, y: torch.where(c, x, other=y),
    lambda c, x, y: x.where(c, y),
    lambda c, x, y: Tensor.where(x, c, y),
    lambda c, x, y: torch.where(c, x, 0.0),
    lambda c, x, y: torch.where(c, 1.5, y),
    lambda c, x, y: x.where(c, 2.0),
    lambda c, x, y: torch.where(c, x, x * y),
]


@pytest.mark.parametrize("f", WHERE)
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4), (3, 4)), ((3, 4), (4,), (3, 1)), ((1, 4), (3, 1), (4,)),
                                    ((), (), ()), ((0, 2), (0, 2), (2,))])
def test_where(f, shapes):
    c = rand(*shapes[0], seed=7) > 0
    x, y = rand(*shapes[1], seed=1), rand(*shapes[2], seed=2)
    check_gradient(f, c, x, y)


@pytest.mark.parametrize("f", [lambda c, x, y: torch.where(c, input=x, other=y),
                               lambda c, x, y: torch.where(condition=c, input=x, other=y),
                               lambda c, x, y: torch.clamp(c.double(), min=x, max=y + 1)])
def test_tracked_tensors_only_in_keywords(f):
    check_gradient(f, rand(3, 4, seed=7) > 0, rand(3, 4, seed=1), rand(4, seed=2))


def test_where_noncontiguous_and_single_argument():
    c, x, y = rand(3, 4, seed=7) > 0, noncontiguous(rand(3, 4, seed=1)), noncontiguous(rand(3, 4, seed=2))
    check_gradient(lambda c, x, y: torch.where(c, x, y), c, x, y)
    # torch.where(c) returns indices: differentiating through it is a no-op, not an error
    g, = zt.gradient(lambda x: x[torch.where(x > 0)].sum(), x)
    torch.testing.assert_close(g, (x > 0).double())


# -- binary -----------------------------------------------------------------------------------------

BINARY = {
    "maximum": [torch.maximum, Tensor.maximum, lambda x, y: torch.max(x, y), lambda x, y: x.max(y),
                lambda x, y: torch.max(x, other=y)],
    "minimum": [torch.minimum, Tensor.minimum, lambda x, y: torch.min(x, y), lambda x, y: x.min(y),
                lambda x, y: torch.min(x, other=y)],
    "fmax": [torch.fmax, Tensor.fmax],
    "fmin": [torch.fmin, Tensor.fmin],
    "atan2": [torch.atan2, torch.arctan2, Tensor.atan2, Tensor.arctan2],
    "hypot": [torch.hypot, Tensor.hypot],
    "logaddexp": [torch.logaddexp, Tensor.logaddexp],
}
BINARY_CASES = [(k, i) for k, fns in BINARY.items() for i in range(len(fns))]


@pytest.mark.parametrize("case", BINARY_CASES, ids=[f"{k}-{i}" for k, i in BINARY_CASES])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 3), (4, 1)), ((), (3,)),
                                    ((0, 3), (3,))])
def test_binary_broadcasting(case, shapes):
    f = BINARY[case[0]][case[1]]
    check_gradient(f, rand(*shapes[0], seed=1), rand(*shapes[1], seed=2))


@pytest.mark.parametrize("name", list(BINARY))
def test_binary_noncontiguous_and_fd(name):
    f = BINARY[name][0]
    x, y = rand(3, 4, seed=3), rand(3, 4, seed=4)
    check_gradient(f, noncontiguous(x), noncontiguous(y))
    fd_check(f, rand(5, seed=5), rand(5, seed=6) + 0.1)


@pytest.mark.parametrize("f", BINARY["maximum"] + BINARY["minimum"] + BINARY["fmax"] + BINARY["fmin"])
def test_max_min_ties_split_like_torch(f):
    x = torch.tensor([1.0, 2.0, 3.0, 2.0], dtype=torch.float64)
    y = torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float64)
    check_gradient(f, x, y)
    check_gradient(f, x, torch.tensor(2.0, dtype=torch.float64))  # broadcast ties sum up


def test_maximum_tie_is_half():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    gx, gy = zt.gradient(lambda x, y: torch.maximum(x, y).sum(), x, x.clone())
    assert gx.tolist() == [0.5, 0.5] and gy.tolist() == [0.5, 0.5]


def test_fmax_with_nan():
    x = torch.tensor([1.0, math.nan, 3.0], dtype=torch.float64)
    y = torch.tensor([math.nan, 2.0, 1.0], dtype=torch.float64)
    check_gradient(torch.fmax, x, y)
    check_gradient(torch.fmin, x, y)


def test_python_number_mixed():
    x = rand(3)
    check_gradient(lambda x: torch.clamp(x * 2.0, -1.0, 1.0) + torch.where(x > 0, x, 1.0), x)


# -- whole-program use, docs, fake tensors -----------------------------------------------------------

def test_composed_program():
    x, w = rand(4, 3, seed=1), rand(3, seed=2)

    def f(x, w):
        h = torch.tanh(x * w) + torch.sigmoid(x).log1p() - torch.sqrt(x.abs() + 1)
        h = torch.where(h > 0, F.relu(h), torch.expm1(h)).clamp(-0.9, 0.9)
        return torch.maximum(h, torch.sin(x)).sum()

    check_gradient(f, x, w)
    fd_check(f, x, w)


def test_every_rule_has_docstring_and_all_aliases_registered():
    rules = list({id(r): r for r in REGISTRY._rules.values() if r.fn.__module__ == ew.__name__}.values())
    assert len(rules) >= 45
    for r in rules:
        assert r.fn.__doc__ and "d" in r.fn.__doc__, r.name
    for fns, *_ in list(ew.UNARY.values()) + list(ew.PIECEWISE_CONSTANT.values()):
        for fn in fns:
            assert REGISTRY.lookup(fn) is not None, fn
    for fn in [F.relu, torch.relu, Tensor.relu, torch.clamp, torch.clip, Tensor.clamp, Tensor.clip,
               torch.clamp_min, torch.clamp_max, Tensor.clamp_min, Tensor.clamp_max, torch.where,
               Tensor.where, torch.maximum, torch.minimum, Tensor.maximum, Tensor.minimum, Tensor.__abs__,
               torch.special.expit, F.sigmoid]:
        assert REGISTRY.lookup(fn) is not None, fn


FAKE = [
    (lambda x: torch.exp(x) + torch.log(x.abs() + 1) + torch.sigmoid(x) + torch.special.expit(x), 1),
    (lambda x: abs(x) + torch.sign(x) + torch.relu(x) + F.relu(x * 1, inplace=True) + torch.sinc(x), 1),
    (lambda x: torch.clamp(x, -0.5, 0.5) + x.clamp_min(0.1) + torch.logit(torch.sigmoid(x), 0.1), 1),
    (lambda x, y: torch.clamp(x, y, y + 1) + torch.where(x > 0, x, y) + x.where(x < 0, 1.0), 2),
    (lambda x, y: torch.maximum(x, y) + torch.minimum(x, y) + torch.fmax(x, y) + torch.atan2(x, y), 2),
    (lambda x, y: torch.hypot(x, y) + torch.logaddexp(x, y) + torch.max(x, y) + torch.round(x), 2),
]


@pytest.mark.parametrize("i", range(len(FAKE)))
def test_rules_run_on_fake_tensors(i):
    f, n = FAKE[i]
    args = [rand(3, 4, seed=s) for s in range(n)]
    fake_check(f, *args)
    check_gradient(f, *args)
