"""The rules of rules/norms.py against torch.autograd (dynamic and staged) and finite differences.

F.batch_norm: batch and running statistics, with and without affine parameters, 2-D to 4-D
inputs; running statistics updated exactly once. torch._weight_norm. F.group_norm, F.instance_norm
and F.local_response_norm; instance_norm's running statistics are updated exactly once. (Layer
norm and RMS norm are tested in test_rules_nn.py, the native kernels in test_rules_opinfo_gaps.py.)"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt
import zygote_torch.rules.norms as gn  # noqa: F401  (registers the rules)
from zygote_torch.ad.registry import REGISTRY
from helpers import check_second_derivatives, check_gradient, fd_check, noncontiguous, rand

F64 = torch.float64


def R(*shape, seed=0):
    g = torch.Generator().manual_seed(seed + 100 * len(shape))
    return torch.randn(shape, dtype=F64, generator=g)


# -- group norm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,groups", [((3, 4, 5), 2), ((2, 6, 3, 2), 3), ((2, 4), 4), ((2, 6, 2, 2, 2), 1),
                                          ((0, 4, 3), 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm(shape, groups, affine):
    x = R(*shape)
    c = shape[1]
    w, b = (R(c, seed=1), R(c, seed=2)) if affine else (None, None)
    check_gradient(lambda x, w, b: F.group_norm(x, groups, w, b), x, w, b)
    check_gradient(lambda x, w, b: F.group_norm(x, groups, weight=w, bias=b, eps=1e-3), noncontiguous(x), w, b)
    check_gradient(lambda x, w, b: torch.group_norm(x, groups, w, b, 1e-5, False), x, w, b)
    if affine:
        check_gradient(lambda x, w: F.group_norm(input=x, num_groups=groups, weight=w), x, w)  # weight only


def test_group_norm_constant_input():
    # zero variance: xhat = 0, the gradient passes through rstd = 1/sqrt(eps)
    check_gradient(lambda x, w, b: F.group_norm(x, 2, w, b), torch.ones(2, 4, 3, dtype=F64), R(4), R(4, seed=1))


# -- instance norm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 2), (2, 2, 2, 3, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_batch_statistics(shape, affine):
    x = R(*shape)
    c = shape[1]
    w, b = (R(c, seed=1), R(c, seed=2)) if affine else (None, None)
    check_gradient(lambda x, w, b: F.instance_norm(x, weight=w, bias=b), x, w, b)
    check_gradient(lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.1, 1e-3), noncontiguous(x), w, b)
    check_gradient(lambda x, w, b: torch.instance_norm(x, w, b, None, None, True, 0.1, 1e-5, False), x, w, b)
    rm, rv = R(c, seed=3) * 0.1, R(c, seed=4).abs() + 0.5

    def with_running(x, w, b):  # the running statistics move at each call; the output ignores them
        return F.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.3)

    check_gradient(with_running, x, w, b)


@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_running_statistics(affine):
    x = R(3, 4, 5)
    w, b = (R(4, seed=1), R(4, seed=2)) if affine else (None, None)
    rm, rv = R(4, seed=3) * 0.1, R(4, seed=4).abs() + 0.5
    check_gradient(lambda x, w, b: F.instance_norm(x, rm, rv, w, b, use_input_stats=False), x, w, b)
    check_gradient(lambda x, w, b: torch.instance_norm(x, w, b, rm, rv, False, 0.1, 1e-5, False), x, w, b)


def test_instance_norm_running_statistics_updated_once():
    x = R(4, 3, 6)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    zt.gradient(lambda x: F.instance_norm(x, rm, rv, use_input_stats=True).pow(2).sum(), x)
    F.instance_norm(x, rm_ref, rv_ref, use_input_stats=True)
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)


# -- local response norm ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 5, 4), (2, 6, 3, 2), (2, 3, 2, 2, 2), (0, 3, 4)])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_local_response_norm(shape, size):
    x = R(*shape)
    check_gradient(lambda x: F.local_response_norm(x, size), x)
    check_gradient(lambda x: F.local_response_norm(x, size, alpha=0.3, beta=0.6, k=2.0), noncontiguous(x))
    check_gradient(lambda x: F.local_response_norm(input=x, size=size, alpha=1.0, beta=1.5), x)


# -- finite differences, aliases -------------------------------------------------------------------

FD_CASES = {
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), [R(2, 4, 3), R(4, seed=1), R(4, seed=2)]),
    "instance_norm": (lambda x, w: F.instance_norm(x, weight=w), [R(2, 3, 4), R(3, seed=1)]),
    "local_response_norm": (lambda x: F.local_response_norm(x, 3, alpha=0.5, beta=0.7, k=1.5), [R(2, 5, 3)]),
}


@pytest.mark.parametrize("name", list(FD_CASES))
def test_finite_differences(name):
    f, xs = FD_CASES[name]
    fd_check(f, *xs)


@pytest.mark.parametrize("fn,rule", [(F.group_norm, gn.group_norm), (torch.group_norm, gn.group_norm_),
                                     (F.instance_norm, gn.instance_norm), (torch.instance_norm, gn.instance_norm_),
                                     (F.local_response_norm, gn.local_response_norm)])
def test_registered(fn, rule):
    assert REGISTRY.lookup(fn).fn is rule


# -- second derivatives: the pullbacks themselves only call ops with rules ------------------------

SECOND_ORDER = {
    "group_norm": (lambda x: F.group_norm(x.reshape(1, 4, 2), 2).pow(3).sum(), R(8)),
    "instance_norm": (lambda x: F.instance_norm(x.reshape(2, 2, 2)).pow(3).sum(), R(8)),
    "lrn": (lambda x: F.local_response_norm(x.reshape(1, 4, 2), 3).pow(3).sum(), R(8)),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_second_derivatives_through_rules(name):
    check_second_derivatives(*SECOND_ORDER[name])


# -- batch norm and weight norm (were tests/test_rules_normalization.py) ---------------------------

@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 4)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm(shape, training, affine):
    x = rand(*shape)
    w, b = (rand(3, seed=1), rand(3, seed=2)) if affine else (None, None)
    rm, rv = rand(3, seed=3) * 0.1, rand(3, positive=True, seed=4)

    def f(x, w, b):  # in training the running statistics move at each call; the output ignores them
        return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-3)
    check_gradient(f, x, w, b)
    check_gradient(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), noncontiguous(x), w, b)


def test_running_statistics_updated_once():
    import zygote_torch as zt
    x = rand(8, 3)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    zt.gradient(lambda x: F.batch_norm(x, rm, rv, training=True).pow(2).sum(), x)
    F.batch_norm(x, rm_ref, rv_ref, training=True)
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_second_derivatives(training):
    """The pullback is torch's backward kernel; its own rule differentiates the formula."""
    from helpers import check_hvp
    rm, rv = rand(3, seed=3) * 0.1, rand(3, positive=True, seed=4)
    check_hvp(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=training).pow(3).sum(),
              rand(4, 3, 5), rand(3, seed=1), rand(3, seed=2))


@pytest.mark.parametrize("shape,dim", [((4, 3, 5), 0), ((4, 3, 5), 2), ((4, 3, 5), -1), ((4, 3, 5), -2), ((6, 5), 1)])
def test_weight_norm(shape, dim):
    """torch._weight_norm, what nn.utils.weight_norm and parametrizations.weight_norm call
    (wav2vec2's positional convolution reached the fallback through it)."""
    v = rand(*shape)
    g_shape = () if dim == -1 else [n if d == dim % len(shape) else 1 for d, n in enumerate(shape)]
    check_gradient(lambda v, g: torch._weight_norm(v, g, dim), v, rand(*g_shape, seed=1))


def test_weight_norm_parametrization_in_a_module():
    torch.manual_seed(0)
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(4, 6, 3), dim=2).double()
    x = rand(2, 4, 9)
    (ours,) = zt.gradient(lambda m: m(x).square().sum(), conv)
    conv(x).square().sum().backward()
    for n, p in conv.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, msg=n)
    assert not zt.fallbacks(lambda m: m(x).square().sum(), conv)
