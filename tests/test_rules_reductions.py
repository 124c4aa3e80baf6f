"""Reduction rules against torch.autograd (float64), finite differences, and fake tensors."""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import zygote_torch as zt
from zygote_torch.ad.registry import REGISTRY
from zygote_torch.rules import reductions as red
from helpers import check_gradient, fd_check, noncontiguous, rand

Tensor = torch.Tensor
inf = math.inf


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
    """zt.pullback equals torch.autograd, NaN and inf included."""
    refs = [x.detach().clone().requires_grad_() for x in xs]
    y_ref = f(*refs)
    dy = torch.ones_like(y_ref)
    ref = torch.autograd.grad(y_ref, refs, dy)
    y, back = zt.pullback(f, *xs)
    torch.testing.assert_close(y, y_ref.detach(), equal_nan=True)
    for g, r in zip(back(dy), ref):
        torch.testing.assert_close(g, r, equal_nan=True)


def ties(*shape):
    """Values with many repeats (ties for max/min/amax)."""
    return torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(5)).double()


# -- sum, mean, nansum, nanmean ----------------------------------------------------------------------

SUM_MEAN = [
    lambda r, x: r(x),
    lambda r, x: r(x, 1),
    lambda r, x: r(x, -1),
    lambda r, x: r(x, dim=0),
    lambda r, x: r(x, (0, 2)),
    lambda r, x: r(x, [2, 0]),
    lambda r, x: r(x, dim=(-1,), keepdim=True),
    lambda r, x: r(x, 1, True),
    lambda r, x: r(x, dim=()),
    lambda r, x: r(x, dtype=torch.float32),
    lambda r, x: r(x, 1, dtype=torch.float32),
    lambda r, x: r(x, axis=1),
    lambda r, x: r(x, axis=(0, 1), keepdims=True),
    lambda r, x: r(x, None, True),
]


@pytest.mark.parametrize("r", [torch.sum, Tensor.sum, torch.mean, Tensor.mean, torch.nansum, Tensor.nansum,
                               torch.nanmean, Tensor.nanmean],
                         ids=["sum", "Tensor.sum", "mean", "Tensor.mean", "nansum", "Tensor.nansum", "nanmean",
                              "Tensor.nanmean"])
@pytest.mark.parametrize("i", range(len(SUM_MEAN)))
def test_sum_mean_forms(r, i):
    form = SUM_MEAN[i]
    x = rand(2, 3, 4)
    atol = 1e-6 if i in (9, 10) else 1e-7  # float32 results
    check_gradient(lambda x: form(r, x), noncontiguous(x) if r.__name__.startswith("nan") else x,
                   atol=atol, rtol=1e-5)


@pytest.mark.parametrize("r", [torch.sum, torch.mean, torch.nansum, torch.nanmean])
def test_sum_mean_0d_and_empty(r):
    check_gradient(lambda x: r(x), torch.tensor(1.5, dtype=torch.float64))
    check_gradient(lambda x: r(x, 0), torch.tensor(1.5, dtype=torch.float64))
    check_gradient(lambda x: r(x, -1, keepdim=True), torch.tensor(1.5, dtype=torch.float64))
    check_gradient(lambda x: r(x, 1), rand(0, 3))
    if r in (torch.sum, torch.nansum):
        check_gradient(lambda x: r(x, 0), rand(0, 3))
        check_gradient(lambda x: r(x), rand(0, 3))


@pytest.mark.parametrize("r", [torch.nansum, torch.nanmean])
def test_nan_reductions_with_nans(r):
    x = rand(3, 4)
    x[0, 1] = x[2, 3] = x[2, 0] = math.nan
    check_gradient(lambda x: r(x), x)
    check_gradient(lambda x: r(x, 1), x)
    check_gradient(lambda x: r(x, 0, keepdim=True), x)


@pytest.mark.parametrize("form", [
    lambda x: torch.prod(x, axis=1), lambda x: x.prod(axis=0, keepdims=True), lambda x: torch.amax(x, axis=(0, 1)),
    lambda x: x.amin(axis=1, keepdims=True), lambda x: torch.max(x, axis=1).values, lambda x: x.min(axis=0)[0],
    lambda x: torch.logsumexp(x, axis=1), lambda x: torch.var(x, axis=1, keepdims=True), lambda x: x.std(axis=0),
    lambda x: torch.var_mean(x, axis=1)[0], lambda x: torch.std_mean(x, axis=0, keepdims=True)[1],
    lambda x: torch.mean(x, 1, keepdims=True), lambda x: torch.amax(x, keepdims=True),
])
def test_numpy_style_keywords(form):
    check_gradient(form, rand(3, 4))


def test_dim_and_axis_together_is_an_error():
    with pytest.raises(TypeError):
        zt.gradient(lambda x: torch.sum(x, 0, axis=1).sum(), rand(3, 4))


def test_mean_sum_fd():
    fd_check(lambda x: torch.mean(x, 1) * torch.sum(x, 1), rand(3, 4))


# -- prod -------------------------------------------------------------------------------------------

def _zeros(*positions, shape=(3, 4)):
    x = rand(*shape, seed=11)
    for p in positions:
        x[p] = 0.0
    return x


PROD_INPUTS = {
    "random": rand(3, 4),
    "one zero": _zeros((1, 2)),
    "two zeros same row": _zeros((1, 0), (1, 3)),
    "two zeros same column": _zeros((0, 2), (2, 2)),
    "zeros everywhere": _zeros((0, 0), (1, 1), (2, 2), (2, 3)),
    "all zero": torch.zeros(3, 4, dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(PROD_INPUTS))
@pytest.mark.parametrize("form", [
    lambda x: torch.prod(x),
    lambda x: x.prod(),
    lambda x: torch.prod(x, 1),
    lambda x: torch.prod(x, dim=0),
    lambda x: x.prod(-1, keepdim=True),
    lambda x: torch.prod(x, 0, True),
    lambda x: torch.prod(x, dtype=torch.float64),
    lambda x: torch.prod(x, 1, dtype=torch.float64),
])
def test_prod_with_zeros(name, form):
    check_gradient(form, PROD_INPUTS[name])


def test_prod_single_zero_full_and_edge_shapes():
    check_gradient(torch.prod, torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64))
    check_gradient(torch.prod, torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64))
    check_gradient(torch.prod, torch.tensor(0.0, dtype=torch.float64))
    check_gradient(lambda x: torch.prod(x, 0), torch.tensor(2.5, dtype=torch.float64))
    check_gradient(lambda x: torch.prod(x, 0), rand(0, 3))
    check_gradient(lambda x: torch.prod(x, 1), rand(0, 3))
    check_gradient(torch.prod, rand(0, 3))
    check_gradient(lambda x: torch.prod(x, 1), noncontiguous(_zeros((1, 2))))
    check_gradient(lambda x: torch.prod(x, 1, dtype=torch.float32), rand(3, 4), atol=1e-5, rtol=1e-5)
    fd_check(lambda x: torch.prod(x, 1), _zeros((1, 2), (2, 0), (2, 3)))


# -- amax / amin / max / min ------------------------------------------------------------------------

EXTREMA = [
    lambda r, x: r(x),
    lambda r, x: r(x, 1),
    lambda r, x: r(x, dim=0),
    lambda r, x: r(x, (0, 2)),
    lambda r, x: r(x, [-1], keepdim=True),
    lambda r, x: r(x, (), True),
    lambda r, x: r(x, 2, True),
]


@pytest.mark.parametrize("r", [torch.amax, Tensor.amax, torch.amin, Tensor.amin])
@pytest.mark.parametrize("i", range(len(EXTREMA)))
@pytest.mark.parametrize("data", ["random", "ties"])
def test_amax_amin(r, i, data):
    x = rand(2, 3, 4) if data == "random" else ties(2, 3, 4)
    check_gradient(lambda x: EXTREMA[i](r, x), noncontiguous(x) if r is torch.amin else x)


@pytest.mark.parametrize("r", [torch.amax, torch.amin, torch.max, torch.min, Tensor.max, Tensor.min])
def test_extrema_0d_and_empty(r):
    check_gradient(lambda x: r(x), torch.tensor(1.5, dtype=torch.float64))
    if r in (torch.amax, torch.amin):
        check_gradient(lambda x: r(x, 1), rand(0, 3))
        check_gradient(lambda x: r(x, 0), torch.tensor(1.5, dtype=torch.float64))


MAX_DIM = [
    lambda r, x: r(x, 1),
    lambda r, x: r(x, 0),
    lambda r, x: r(x, -1, True),
    lambda r, x: r(x, dim=2, keepdim=True),
    lambda r, x: r(x, 1).values,
    lambda r, x: r(x, 1)[0] * 2,
    lambda r, x: r(x, dim=0).values + r(x, dim=0).indices,
]


@pytest.mark.parametrize("r", [torch.max, Tensor.max, torch.min, Tensor.min])
@pytest.mark.parametrize("i", range(len(MAX_DIM)))
@pytest.mark.parametrize("data", ["random", "ties"])
def test_max_min_with_dim(r, i, data):
    x = rand(2, 3, 4) if data == "random" else ties(2, 3, 4)
    check_gradient(lambda x: MAX_DIM[i](r, x), x)


@pytest.mark.parametrize("r,rt", [(torch.max, torch.return_types.max), (Tensor.max, torch.return_types.max),
                                  (torch.min, torch.return_types.min), (Tensor.min, torch.return_types.min)])
def test_max_min_with_dim_returns_named_tuple(r, rt):
    x = rand(3, 4)
    y, back = zt.pullback(lambda x: r(x, 1), x)
    assert isinstance(y, rt)
    ref = r(x, 1)
    assert torch.equal(y.values, ref.values) and torch.equal(y.indices, ref.indices)
    dx, = back((torch.ones(3, dtype=torch.float64), None))
    expected = torch.zeros(3, 4, dtype=torch.float64).scatter(1, ref.indices[:, None], 1.0)
    torch.testing.assert_close(dx, expected)
    g, = zt.gradient(lambda x: r(x, 1).values.sum(), x)
    torch.testing.assert_close(g, expected)


def test_max_with_dim_0d_and_noncontiguous():
    check_gradient(lambda x: torch.max(x, 0).values, torch.tensor(2.0, dtype=torch.float64))
    check_gradient(lambda x: torch.min(x, -1, True).values, torch.tensor(2.0, dtype=torch.float64))
    check_gradient(lambda x: torch.max(x, 1).values, noncontiguous(rand(3, 4)))
    check_gradient(lambda x: torch.max(x, 1).values, rand(0, 4))


@pytest.mark.parametrize("r", [torch.max, Tensor.max, torch.min, Tensor.min])
@pytest.mark.parametrize("data", ["random", "ties", "all equal"])
def test_full_max_min_split_ties(r, data):
    x = {"random": rand(3, 4), "ties": ties(3, 4), "all equal": torch.ones(3, 4, dtype=torch.float64)}[data]
    check_gradient(lambda x: r(x), x)
    check_gradient(lambda x: r(x), noncontiguous(x))


def test_full_max_with_nan_like_torch():
    x = torch.tensor([1.0, math.nan, 3.0, math.nan], dtype=torch.float64)
    check_nan_aware(torch.max, x)
    check_nan_aware(torch.min, x)


@pytest.mark.parametrize("form", [
    lambda x, y: torch.max(x, y), lambda x, y: x.max(y), lambda x, y: torch.max(x, other=y),
    lambda x, y: torch.min(x, y), lambda x, y: Tensor.min(x, y), lambda x, y: torch.min(x, other=y),
])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 1), (1, 4)), ((), (2,))])
def test_binary_max_min(form, shapes):
    check_gradient(form, rand(*shapes[0], seed=1), rand(*shapes[1], seed=2))
    check_gradient(form, ties(*shapes[0]), ties(*shapes[1]) if shapes[1] else torch.tensor(1.0, dtype=torch.float64))


def test_extrema_fd():
    fd_check(lambda x: torch.amax(x, 1) + torch.max(x, 0).values.sum() + torch.min(x), rand(3, 4))


# -- logsumexp --------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", [
    lambda x: torch.logsumexp(x, 1),
    lambda x: torch.logsumexp(x, dim=0),
    lambda x: torch.logsumexp(x, (0, 2)),
    lambda x: torch.logsumexp(x, [-1], keepdim=True),
    lambda x: x.logsumexp(2, True),
    lambda x: torch.special.logsumexp(x, 1),
])
def test_logsumexp(form):
    check_gradient(form, rand(2, 3, 4))
    check_gradient(form, noncontiguous(rand(2, 3, 4)))
    check_gradient(form, rand(2, 3, 4) * 300)  # large values: stable


def test_logsumexp_edge_cases():
    x = rand(3, 4)
    x[0, 1] = -inf
    check_gradient(lambda x: torch.logsumexp(x, 1), x)
    check_gradient(lambda x: torch.logsumexp(x, 0), torch.tensor(0.7, dtype=torch.float64))
    check_gradient(lambda x: torch.logsumexp(x, 1), rand(0, 4))
    fd_check(lambda x: torch.logsumexp(x, 1), rand(3, 4))


# -- var / std --------------------------------------------------------------------------------------

VAR_FORMS = [
    lambda r, x: r(x),
    lambda r, x: r(x, False),
    lambda r, x: r(x, unbiased=False),
    lambda r, x: r(x, 1),
    lambda r, x: r(x, dim=(0, 2)),
    lambda r, x: r(x, 1, False),
    lambda r, x: r(x, 1, True, True),
    lambda r, x: r(x, 1, unbiased=False, keepdim=True),
    lambda r, x: r(x, dim=1, correction=0),
    lambda r, x: r(x, dim=[0, 1], correction=2, keepdim=True),
    lambda r, x: r(x, correction=0),
    lambda r, x: r(x, None, correction=3),
    lambda r, x: r(x, dim=-1, keepdim=True),
]


@pytest.mark.parametrize("r", [torch.var, Tensor.var, torch.std, Tensor.std])
@pytest.mark.parametrize("i", range(len(VAR_FORMS)))
def test_var_std_forms(r, i):
    x = rand(2, 3, 4)
    check_gradient(lambda x: VAR_FORMS[i](r, x), noncontiguous(x) if r in (torch.var, torch.std) else x)


@pytest.mark.parametrize("r", [torch.var_mean, torch.std_mean])
@pytest.mark.parametrize("i", range(len(VAR_FORMS)))
def test_var_mean_std_mean(r, i):
    check_gradient(lambda x: VAR_FORMS[i](r, x), rand(2, 3, 4))


@pytest.mark.parametrize("r", [torch.var_mean, torch.std_mean])
def test_var_mean_one_output_used(r):
    x = rand(3, 4)
    check_gradient(lambda x: r(x, 1)[0], x)
    check_gradient(lambda x: r(x, 1)[1], x)


@pytest.mark.parametrize("r", [torch.var, torch.std])
def test_var_std_degenerate_like_torch(r):
    # N <= correction: torch gives NaN/inf gradients with specific conventions
    check_nan_aware(lambda x: r(x), torch.tensor([1.5], dtype=torch.float64))
    check_nan_aware(lambda x: r(x, 1), rand(3, 1))
    check_nan_aware(lambda x: r(x, correction=5), rand(4))
    check_nan_aware(lambda x: r(x), torch.tensor(2.0, dtype=torch.float64))
    # constant input: std's gradient is 0 where std == 0
    check_gradient(lambda x: r(x, 1), torch.ones(3, 4, dtype=torch.float64))


def test_var_std_fd():
    fd_check(lambda x: torch.var(x, 1) + torch.std(x, 0, correction=0).sum(), rand(3, 4))


# -- norms ------------------------------------------------------------------------------------------

NORM_P = [2, 1, inf, -inf, 3, 1.5, 0.5, 0]


@pytest.mark.parametrize("p", NORM_P)
@pytest.mark.parametrize("form", [
    lambda p, x: torch.norm(x, p),
    lambda p, x: torch.norm(x, p=p, dim=1),
    lambda p, x: torch.norm(x, p, (0, 1), True),
    lambda p, x: x.norm(p, -1),
    lambda p, x: x.norm(p=p, dim=0, keepdim=True),
    lambda p, x: torch.linalg.vector_norm(x, p),
    lambda p, x: torch.linalg.vector_norm(x, ord=p, dim=(1, 2)),
    lambda p, x: torch.linalg.vector_norm(x, p, 0, True),
])
def test_norms(p, form):
    x = rand(2, 3, 4)
    check_gradient(lambda x: form(p, x), x)
    check_gradient(lambda x: form(p, x), noncontiguous(x))


@pytest.mark.parametrize("form", [
    lambda x: torch.norm(x), lambda x: x.norm(), lambda x: torch.norm(x, dim=1), lambda x: torch.norm(x, "fro"),
    lambda x: torch.norm(x, "fro", (0, 1)), lambda x: x.norm("fro", 1, True), lambda x: torch.norm(x, None, 0),
    lambda x: torch.linalg.vector_norm(x),
])
@pytest.mark.parametrize("data", ["random", "zero", "zero rows"])
def test_two_norm_defaults_and_zero(form, data):
    x = {"random": rand(3, 4), "zero": torch.zeros(3, 4, dtype=torch.float64),
         "zero rows": torch.cat([torch.zeros(1, 4, dtype=torch.float64), rand(2, 4)])}[data]
    check_gradient(form, x, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("p", [2, 1, inf, 3])
@pytest.mark.parametrize("form", [lambda x, p: torch.norm(x, p, dtype=torch.float64),
                                  lambda x, p: x.norm(p, 1, False, torch.float64),
                                  lambda x, p: torch.linalg.vector_norm(x, p, 1, dtype=torch.float64)])
def test_norm_dtype(p, form):
    # torch only widens here (float32 -> float64); the cotangent comes back as float32
    x = rand(3, 4).float()
    check_gradient(lambda x: form(x, p), x, atol=1e-5, rtol=1e-5)
    g, = zt.gradient(lambda x: form(x, p).sum(), x)
    assert g.dtype == torch.float32


@pytest.mark.parametrize("p", [1, inf, -inf, 3, 1.5, 0.5, 0])
def test_norm_at_zero_and_ties(p):
    x = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, -2.0]], dtype=torch.float64)
    check_gradient(lambda x: torch.norm(x, p, dim=1), x)
    check_gradient(lambda x: torch.linalg.vector_norm(x, p), x)


def test_norm_0d_and_empty():
    check_gradient(lambda x: torch.norm(x), torch.tensor(-1.5, dtype=torch.float64))
    check_gradient(lambda x: torch.linalg.vector_norm(x, 1), torch.tensor(-1.5, dtype=torch.float64))
    check_gradient(lambda x: torch.norm(x, dim=1), rand(0, 3))


@pytest.mark.parametrize("form,shape", [
    (lambda x: torch.norm(x, "nuc"), (4, 3)),
    (lambda x: x.norm("nuc"), (3, 5)),
    (lambda x: torch.norm(x, "nuc", (0, 2)), (3, 4, 5)),
    (lambda x: torch.norm(x, "nuc", (2, 0), True), (3, 4, 5)),
    (lambda x: x.norm(p="nuc", dim=(1, 2)), (2, 3, 4)),
])
def test_nuclear_norm(form, shape):
    check_gradient(form, rand(*shape))


def test_norm_fd():
    fd_check(lambda x: torch.norm(x, dim=1) + torch.linalg.vector_norm(x, 3, 1) + x.norm(1, 1), rand(3, 4))


# -- cumsum -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", [
    lambda x: torch.cumsum(x, 1), lambda x: torch.cumsum(x, dim=0), lambda x: x.cumsum(-1),
    lambda x: x.cumsum(dim=2, dtype=torch.float32), lambda x: torch.cumsum(x, 1, dtype=torch.float64),
])
def test_cumsum(form):
    check_gradient(form, rand(2, 3, 4), atol=1e-5, rtol=1e-5)
    check_gradient(form, noncontiguous(rand(2, 3, 4)), atol=1e-5, rtol=1e-5)


def test_cumsum_edge_cases():
    check_gradient(lambda x: torch.cumsum(x, 0), torch.tensor(1.5, dtype=torch.float64))
    check_gradient(lambda x: torch.cumsum(x, 1), rand(0, 3))
    fd_check(lambda x: torch.cumsum(x, 1), rand(3, 4))


# -- registry, docs, fake tensors -------------------------------------------------------------------

def test_every_rule_has_docstring_and_aliases():
    rules = list({id(r): r for r in REGISTRY._rules.values() if r.fn.__module__ == red.__name__}.values())
    assert len(rules) >= 18
    for r in rules:
        assert r.fn.__doc__ and "d" in r.fn.__doc__, r.name
    for fn in [torch.sum, Tensor.sum, torch.mean, Tensor.mean, torch.prod, Tensor.prod, torch.amax, Tensor.amax,
               torch.amin, Tensor.amin, torch.max, Tensor.max, torch.min, Tensor.min, torch.logsumexp,
               Tensor.logsumexp, torch.var, Tensor.var, torch.std, Tensor.std, torch.norm, Tensor.norm,
               torch.linalg.vector_norm, torch.cumsum, Tensor.cumsum]:
        assert REGISTRY.lookup(fn) is not None, fn


FAKE = [
    (lambda x, y: torch.sum(x, 1) + x.mean(0).sum() + torch.nansum(x) + torch.nanmean(x, 1, keepdim=True).sum(), 0),
    (lambda x, y: torch.prod(x, 1) + torch.prod(x) + x.prod(0, keepdim=True).sum() + torch.prod(y), 0),
    (lambda x, y: torch.amax(x, 1) + torch.max(x) + torch.max(x, 1).values + torch.min(x, dim=1)[0] + torch.amin(x), 0),
    (lambda x, y: torch.logsumexp(x, 1) + torch.var(x, 1) + torch.std(x) + torch.var(y, 0).sum(), 1),
    (lambda x, y: torch.norm(x, dim=1) + torch.norm(x, inf) + torch.linalg.vector_norm(x, 3) + x.norm(1, 1), 0),
    (lambda x, y: torch.cumsum(x, 1).sum(0) + torch.var_mean(x, 0)[0] + torch.std_mean(x, 0)[1]
     + torch.norm(x, "nuc"), 0),
    (lambda x, y: torch.max(x, y).sum(0) + torch.min(x, other=y).sum(1) + torch.var(y, correction=1), 1),
]


@pytest.mark.parametrize("i", range(len(FAKE)))
def test_rules_run_on_fake_tensors(i):
    f, degenerate = FAKE[i]
    x, y = rand(4, 4, seed=1), rand(1, 4, seed=2)
    fake_check(f, x, y)
    if degenerate:  # var over one element: NaN/inf gradients (torch's convention)
        check_nan_aware(f, x, y)
    else:
        check_gradient(f, x, y)
