"""Rules of zygote_torch/rules/pooling.py against torch.autograd (float64), finite differences and
second derivatives through the rules."""
import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt
import zygote_torch.rules.pooling  # noqa: F401
from helpers import check_gradient, check_hvp, gradcheck, noncontiguous, rand

aten = torch.ops.aten


X1, X2, X3 = rand(2, 3, 11), rand(2, 3, 9, 8), rand(1, 2, 5, 6, 7)

# ---------------------------------------------------------------------------------------------
# max pooling

MAX_POOL = [
    (lambda x: F.max_pool1d(x, 3), X1),
    (lambda x: F.max_pool1d(x, 3, 2, 1, 2, True), X1),
    (lambda x: F.max_pool1d(x, kernel_size=4, stride=1, ceil_mode=True), X1),
    (lambda x: F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True), X2),
    (lambda x: F.max_pool2d(x, (3, 2), (1, 2), (1, 0), (2, 1)), X2),
    (lambda x: F.max_pool2d(x, (3, 2), return_indices=True), X2),
    (lambda x: F.max_pool2d(x, 2, return_indices=True)[0], X2),
    (lambda x: F.max_pool2d(input=x, kernel_size=2, return_indices=False), X2),
    (lambda x: F.max_pool2d_with_indices(x, 2, 1), X2),
    (lambda x: F.max_pool1d_with_indices(x, 2), X1),
    (lambda x: F.max_pool3d_with_indices(x, 2, padding=1), X3),
    (lambda x: torch.max_pool1d(x, 2, 1), X1),
    (lambda x: torch.max_pool2d(x, 2, 1, 1, 1, True), X2),
    (lambda x: torch.max_pool3d(x, (2, 3, 2)), X3),
    (lambda x: torch.max_pool1d_with_indices(x, 3, 2), X1),
    (lambda x: torch._C._nn.max_pool2d_with_indices(x, 3, 2, 1), X2),
    (lambda x: torch._C._nn.max_pool3d_with_indices(x, 2), X3),
    (lambda x: F.max_pool3d(x, 2, padding=1, dilation=2), X3),
    (lambda x: F.max_pool3d(x, (3, 2, 2), stride=(1, 2, 3), ceil_mode=True), X3),
    (lambda x: torch.nn.MaxPool2d(3, 2, 1)(x), X2),
]


@pytest.mark.parametrize("f,x", MAX_POOL)
def test_max_pool(f, x):
    check_gradient(f, x)


@pytest.mark.parametrize("f,x", [
    (lambda x: F.max_pool1d(x, 3), X1[0]),
    (lambda x: F.max_pool2d(x, 3, 2, 1, return_indices=True), X2[0]),
    (lambda x: F.max_pool3d(x, 2), X3[0]),
])
def test_max_pool_unbatched(f, x):
    check_gradient(f, x)


def test_max_pool_ties_go_to_the_recorded_index():
    """Ties (flat input, overlapping windows): each window's cotangent goes to the index torch
    recorded, and windows sharing an argmax accumulate there."""
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    x[:, :, 2:4, 2:4] = 1.0
    for f in (lambda x: F.max_pool2d(x, 3, 1), lambda x: F.max_pool2d(x, 2, 2, 1), lambda x: F.max_pool1d(x[0], 4, 1),
              lambda x: F.adaptive_max_pool2d(x, 4)):
        check_gradient(f, x)
    y, back = zt.pullback(lambda x: F.max_pool2d(x, 3, 1, return_indices=True), x)
    dx = back((torch.ones_like(y[0]), None))[0]
    expected = torch.zeros(1, 2, 36, dtype=torch.float64).scatter_add(
        -1, y[1].flatten(2), torch.ones(1, 2, 16, dtype=torch.float64)).reshape(x.shape)
    assert torch.equal(dx, expected)


def test_max_pool_indices_output():
    (y, idx), back = zt.pullback(lambda x: F.max_pool2d(x, 2, return_indices=True), X2)
    ry, ridx = F.max_pool2d(X2, 2, return_indices=True)
    assert torch.equal(idx, ridx) and torch.equal(y, ry)
    dx = back((torch.ones_like(y), torch.zeros_like(idx)))[0]
    assert dx.shape == X2.shape and dx.sum() == y.numel()


def test_max_pool_noncontiguous_and_empty():
    check_gradient(lambda x: F.max_pool2d(x, 2, 1), noncontiguous(X2))
    check_gradient(lambda x: F.max_pool2d(x, 2, 1), X2.to(memory_format=torch.channels_last))
    check_gradient(lambda x: F.max_pool2d(x, 2), rand(0, 3, 4, 4))
    check_gradient(lambda x: F.max_pool1d(x, 2, return_indices=True), rand(0, 3, 4))
    check_gradient(lambda x: F.adaptive_max_pool2d(x, 2), rand(0, 3, 4, 4))


@pytest.mark.parametrize("nd,x,args", [(2, X2, ([3, 2], [2, 1], [1, 0], [1, 2], True)),
                                       (3, X3, ([2, 2, 2], [1, 2, 2], [1, 0, 1], [1, 1, 1], False))])
def test_max_pool_backward_op(nd, x, args):
    """The max-pooling backward op (linear in its cotangent; adjoint: gather at the indices)."""
    fwd = torch._C._nn.max_pool2d_with_indices if nd == 2 else torch._C._nn.max_pool3d_with_indices
    bwd = getattr(aten, f"max_pool{nd}d_with_indices_backward")
    y, idx = fwd(x, *args)
    check_gradient(lambda g: bwd(g, x, *args, idx), rand(*y.shape, seed=3))
    check_gradient(lambda g: bwd.default(g, x, *args, idx), rand(*y.shape, seed=3))
    check_hvp(lambda x: (F.max_pool2d(x, 2, 1) ** 3).sum(), X2)


MAX_UNPOOL = [
    (1, lambda y, i: F.max_unpool1d(y, i, 2), lambda x: F.max_pool1d(x, 2, return_indices=True), X1),
    (1, lambda y, i: F.max_unpool1d(y, i, 3, stride=2, padding=1, output_size=[11]),
     lambda x: F.max_pool1d(x, 3, 2, 1, return_indices=True), X1),
    (2, lambda y, i: F.max_unpool2d(y, i, 2), lambda x: F.max_pool2d(x, 2, return_indices=True), X2),
    (2, lambda y, i: F.max_unpool2d(y, i, (3, 2), (2, 1), (1, 0), output_size=X2.shape),
     lambda x: F.max_pool2d(x, (3, 2), (2, 1), (1, 0), return_indices=True), X2),
    (2, lambda y, i: torch.nn.MaxUnpool2d(2)(y, i), lambda x: F.max_pool2d(x, 2, return_indices=True), X2),
    (3, lambda y, i: F.max_unpool3d(y, i, 2, output_size=X3.shape[2:]),
     lambda x: F.max_pool3d(x, 2, return_indices=True), X3),
    (2, lambda y, i: F.max_unpool2d(y, i, 2), lambda x: F.max_pool2d(x, 2, return_indices=True), X2[0]),
]


@pytest.mark.parametrize("nd,unpool,pool,x", MAX_UNPOOL)
def test_max_unpool(nd, unpool, pool, x):
    y, idx = pool(x)
    check_gradient(lambda y: unpool(y, idx), y.clone())
    check_gradient(lambda x: unpool(*pool(x)), x)


FRACTIONAL = [
    lambda x, s: F.fractional_max_pool2d(x, 2, output_size=(4, 3), _random_samples=s),
    lambda x, s: F.fractional_max_pool2d(x, (3, 2), output_ratio=(0.5, 0.6), _random_samples=s),
    lambda x, s: F.fractional_max_pool2d(x, 2, (4, 3), None, True, s),
    lambda x, s: F.fractional_max_pool2d_with_indices(x, 2, output_size=3, _random_samples=s),
    lambda x, s: torch.nn.FractionalMaxPool2d(2, output_size=3, _random_samples=s)(x),
]


@pytest.mark.parametrize("f", FRACTIONAL)
def test_fractional_max_pool(f):
    samples = torch.rand(2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check_gradient(lambda x: f(x, samples), X2)
    check_gradient(lambda x: f(x, samples[:1]), X2[0])  # unbatched


def test_fractional_max_pool_3d_and_drawn_samples():
    samples = torch.rand(1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check_gradient(lambda x: F.fractional_max_pool3d(x, 2, output_size=(3, 3, 4), _random_samples=samples), X3)
    check_gradient(lambda x: F.fractional_max_pool3d(x, 2, output_ratio=0.5, return_indices=True,
                                                     _random_samples=samples), X3)
    # samples drawn by torch inside the forward: the pullback uses that forward's windows
    (y, idx), back = zt.pullback(lambda x: F.fractional_max_pool2d(x, 2, output_size=3, return_indices=True), X2)
    dx = back((torch.ones_like(y), None))[0]
    expected = torch.zeros(2, 3, 72, dtype=torch.float64).scatter_add(-1, idx.flatten(2), torch.ones(2, 3, 9,
                                                                      dtype=torch.float64)).reshape(X2.shape)
    assert torch.equal(dx, expected)
    assert torch.equal(y, X2.flatten(2).gather(-1, idx.flatten(2)).reshape(y.shape))


# ---------------------------------------------------------------------------------------------
# average pooling

AVG_POOL = [
    (lambda x: F.avg_pool1d(x, 3), X1),
    (lambda x: F.avg_pool1d(x, 3, 2, 1, True, False), X1),
    (lambda x: F.avg_pool1d(x, kernel_size=4, stride=3, padding=2, ceil_mode=True), X1),
    (lambda x: torch.avg_pool1d(x, 2), X1),
    (lambda x: F.avg_pool2d(x, 3), X2),
    (lambda x: F.avg_pool2d(x, 3, 2, 1, True, False, None), X2),
    (lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=True), X2),
    (lambda x: F.avg_pool2d(x, (3, 2), (2, 1), (1, 0), divisor_override=2), X2),
    (lambda x: F.avg_pool2d(input=x, kernel_size=2, stride=None), X2),
    (lambda x: torch._C._nn.avg_pool2d(x, [2, 3], [], 1), X2),
    (lambda x: F.avg_pool3d(x, 2, ceil_mode=True), X3),
    (lambda x: F.avg_pool3d(x, (3, 2, 2), 2, 1, count_include_pad=False, divisor_override=3), X3),
    (lambda x: torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)(x), X2),
]


@pytest.mark.parametrize("f,x", AVG_POOL)
def test_avg_pool(f, x):
    check_gradient(f, x)


@pytest.mark.parametrize("f,x", [
    (lambda x: F.avg_pool1d(x, 3, 2, 1), X1[0]),
    (lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True), X2[0]),
    (lambda x: F.avg_pool3d(x, 2), X3[0]),
])
def test_avg_pool_unbatched(f, x):
    check_gradient(f, x)


def test_avg_pool_noncontiguous_and_empty():
    check_gradient(lambda x: F.avg_pool2d(x, 2, 1, 1, count_include_pad=False), noncontiguous(X2))
    check_gradient(lambda x: F.avg_pool1d(x, 2), noncontiguous(X1))
    check_gradient(lambda x: F.avg_pool2d(x, 2), rand(0, 3, 4, 4))


@pytest.mark.parametrize("nd,x,args", [
    (2, X2, ([3, 3], [2, 2], [1, 1], True, False, None)),
    (2, X2, ([2, 3], [1, 2], [0, 1], False, True, 4)),
    (3, X3, ([2, 2, 2], [2, 1, 2], [1, 0, 1], True, True, None)),
])
def test_avg_pool_backward_op(nd, x, args):
    """The backward op's own rule (linear in the output cotangent; its adjoint is the pooling)."""
    fwd, bwd = (F.avg_pool2d, aten.avg_pool2d_backward) if nd == 2 else (F.avg_pool3d, aten.avg_pool3d_backward)
    g = fwd(x, *args)
    check_gradient(lambda g: bwd(g, x, *args), g.clone())
    check_gradient(lambda g: bwd.default(g, x, *args), g.clone())


# ---------------------------------------------------------------------------------------------
# adaptive pooling

ADAPTIVE = [
    (lambda x: F.adaptive_avg_pool1d(x, 4), X1),
    (lambda x: F.adaptive_avg_pool1d(x, output_size=13), X1),
    (lambda x: torch.adaptive_avg_pool1d(x, (3,)), X1),
    (lambda x: F.adaptive_avg_pool2d(x, (4, None)), X2),
    (lambda x: F.adaptive_avg_pool2d(x, 1), X2),
    (lambda x: F.adaptive_avg_pool2d(x, (5, 3)), X2),
    (lambda x: torch._C._nn.adaptive_avg_pool2d(x, (2, 7)), X2),
    (lambda x: F.adaptive_avg_pool3d(x, (2, 3, 4)), X3),
    (lambda x: F.adaptive_avg_pool3d(x, (None, 1, 5)), X3),
    (lambda x: torch.nn.AdaptiveAvgPool2d((3, 3))(x), X2),
    (lambda x: F.adaptive_max_pool1d(x, 4), X1),
    (lambda x: F.adaptive_max_pool1d(x, 4, return_indices=True), X1),
    (lambda x: torch.adaptive_max_pool1d(x, 5), X1),
    (lambda x: F.adaptive_max_pool2d(x, (4, 3), return_indices=True), X2),
    (lambda x: F.adaptive_max_pool2d(x, (None, 3)), X2),
    (lambda x: F.adaptive_max_pool2d_with_indices(x, 3), X2),
    (lambda x: torch._C._nn.adaptive_max_pool2d(x, (3, 2)), X2),
    (lambda x: F.adaptive_max_pool3d(x, 2), X3),
    (lambda x: F.adaptive_max_pool3d(x, (2, 4, 3), True), X3),
    (lambda x: torch.nn.AdaptiveMaxPool2d(2)(x), X2),
]


@pytest.mark.parametrize("f,x", ADAPTIVE)
def test_adaptive_pool(f, x):
    check_gradient(f, x)


@pytest.mark.parametrize("f,x", [
    (lambda x: F.adaptive_avg_pool1d(x, 3), X1[0]),
    (lambda x: F.adaptive_avg_pool2d(x, (2, 3)), X2[0]),
    (lambda x: F.adaptive_avg_pool3d(x, 2), X3[0]),
    (lambda x: F.adaptive_max_pool2d(x, (2, 3)), X2[0]),
    (lambda x: F.adaptive_max_pool1d(x, 3), X1[0]),
])
def test_adaptive_pool_unbatched(f, x):
    check_gradient(f, x)


def test_adaptive_pool_noncontiguous_and_empty():
    check_gradient(lambda x: F.adaptive_avg_pool2d(x, 3), noncontiguous(X2))
    check_gradient(lambda x: F.adaptive_max_pool1d(x, 3), noncontiguous(X1))
    check_gradient(lambda x: F.adaptive_avg_pool2d(x, 3), rand(0, 3, 4, 4))


@pytest.mark.parametrize("nd,x,size", [(2, X2, (3, 5)), (3, X3, (2, 4, 3))])
def test_adaptive_avg_pool_backward_op(nd, x, size):
    fwd, bwd = (F.adaptive_avg_pool2d, aten._adaptive_avg_pool2d_backward) if nd == 2 else \
        (F.adaptive_avg_pool3d, aten._adaptive_avg_pool3d_backward)
    g = fwd(x, size)
    check_gradient(lambda g: bwd(g, x), g.clone())


# ---------------------------------------------------------------------------------------------
# power-average pooling

POS1, POS2, POS3 = X1.abs() + 0.1, X2.abs() + 0.1, X3.abs() + 0.1
LP_POOL = [
    (lambda x: F.lp_pool1d(x, 2, 3), X1),
    (lambda x: F.lp_pool1d(x, 3, 2, stride=1, ceil_mode=True), POS1),
    (lambda x: F.lp_pool2d(x, 2, 2), X2),
    (lambda x: F.lp_pool2d(x, 1.5, (3, 2), stride=2, ceil_mode=True), POS2),
    (lambda x: F.lp_pool2d(x, norm_type=3, kernel_size=2), POS2),
    (lambda x: F.lp_pool2d(x, float("inf"), 2), X2),
    (lambda x: F.lp_pool2d(x, -float("inf"), 2), X2),
    (lambda x: F.lp_pool1d(x, float("inf"), 3, 2), X1),
    (lambda x: torch.nn.LPPool2d(2, 3, stride=2)(x), X2),
]
if hasattr(F, "lp_pool3d"):
    LP_POOL += [(lambda x: F.lp_pool3d(x, 2, 2), X3), (lambda x: F.lp_pool3d(x, 1.5, (2, 3, 2), ceil_mode=True), POS3)]


@pytest.mark.parametrize("f,x", LP_POOL)
def test_lp_pool(f, x):
    check_gradient(f, x)


# ---------------------------------------------------------------------------------------------
# finite differences and second order

@pytest.mark.parametrize("f,x", [
    (lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), rand(1, 2, 5, 6)),
    (lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False), rand(1, 2, 5, 6)),
    (lambda x: F.avg_pool1d(x, 2, 1, 1), rand(2, 2, 5)),
    (lambda x: F.adaptive_avg_pool3d(x, (2, 3, 2)), rand(1, 1, 3, 4, 5)),
    (lambda x: F.adaptive_max_pool1d(x, 3), rand(2, 2, 7)),
    (lambda x: F.lp_pool2d(x, 2, 2), rand(1, 2, 4, 4)),
    (lambda x: F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2), rand(1, 2, 4, 4)),
])
def test_pooling_gradcheck(f, x):
    gradcheck(f, x)


@pytest.mark.parametrize("f,x", [
    (lambda x: (F.max_pool2d(x ** 2, 3, 2, 1) ** 2).sum(), X2),
    (lambda x: (F.avg_pool2d(x ** 2, 3, 2, 1, ceil_mode=True) ** 2).sum(), X2),
    (lambda x: (F.avg_pool1d(x ** 2, 3, 2, 1) ** 2).sum(), X1),
    (lambda x: (F.avg_pool3d(x ** 2, 2, count_include_pad=False, padding=1) ** 2).sum(), X3),
    (lambda x: (F.adaptive_avg_pool2d(x ** 2, (4, 3)) ** 2).sum(), X2),
    (lambda x: (F.adaptive_avg_pool1d(x ** 2, 4) ** 2).sum(), X1),
    (lambda x: (F.adaptive_max_pool2d(x ** 2, (4, 3)) ** 2).sum(), X2),
    (lambda x: (F.lp_pool2d(x, 2, 2) ** 2).sum(), X2),
    (lambda x: (F.lp_pool1d(x, 3, 2) ** 2).sum(), POS1),
    (lambda x: (F.max_unpool2d(*F.max_pool2d(x ** 2, 2, return_indices=True), 2) ** 2).sum(), X2),
])
def test_pooling_second_order(f, x):
    check_hvp(f, x)


def test_avg_pool_third_order():
    """avg_pool -> its backward op -> avg_pool again: every order stays on rules."""
    x = rand(1, 1, 4, 5)
    f = lambda x: (F.avg_pool2d(x, 2, 1) ** 3).sum()  # noqa: E731
    h = zt.hessian(f, x)
    ref = torch.autograd.functional.hessian(f, x)
    torch.testing.assert_close(h, ref)
    v = rand(1, 1, 4, 5, seed=3)

    def third(x):
        return (zt.gradient(lambda x: (zt.gradient(f, x)[0] * v).sum(), x)[0] * v).sum()

    assert not zt.fallbacks(third, x)
    xr = x.clone().requires_grad_()
    g1 = torch.autograd.grad(f(xr), xr, create_graph=True)[0]
    g2 = torch.autograd.grad((g1 * v).sum(), xr, create_graph=True)[0]
    g3 = torch.autograd.grad((g2 * v).sum(), xr)[0]
    torch.testing.assert_close(zt.gradient(third, x)[0], g3)
