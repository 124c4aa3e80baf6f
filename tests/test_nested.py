"""Nested differentiation to any order (issue 14 item 2): closures over outer floats and tensors,
modules, in-place ops, dynamic and staged, against torch.autograd with create_graph=True."""
import math

import pytest
import torch

import zygote_torch as zt
from helpers import rand


def autograd_derivatives(f, x, order: int):
    """[f'(x), f''(x), ...] of a scalar function summed over elements, by torch.autograd."""
    x = x.detach().clone().requires_grad_()
    out, y = [], f(x)
    for _ in range(order):
        (y,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        out.append(y.detach())
    return out


def test_derivative_of_a_derivative_closing_over_a_float():
    # d/da [d/dy (a * y^3)](y = 1) = 3, d/da [d/dy (a^2 * y)] = 2a
    assert zt.derivative(lambda a: zt.derivative(lambda y: a * y ** 3)(1.0))(2.0) == pytest.approx(3.0)
    assert zt.derivative(lambda a: zt.derivative(lambda y: a ** 2 * y)(1.0))(3.0) == pytest.approx(6.0)
    inner = zt.derivative(lambda y: math.e ** 0 * y * y)
    assert zt.derivative(lambda a: inner(a) * a)(2.0) == pytest.approx(8.0)


def test_third_derivative_of_numbers_and_tensors():
    f = lambda x: x.sin() * x ** 3 if isinstance(x, torch.Tensor) else math.sin(x) * x ** 3  # noqa: E731
    d3 = zt.derivative(zt.derivative(zt.derivative(lambda x: torch.as_tensor(x).sin() * x ** 3)))
    x = 0.7
    exact = (-math.cos(x) * x ** 3 - 9 * math.sin(x) * x ** 2 + 18 * math.cos(x) * x + 6 * math.sin(x))
    assert d3(x) == pytest.approx(exact)
    t = rand(4)
    g3 = zt.gradient(lambda x: zt.gradient(lambda x: zt.gradient(lambda x: f(x).sum(), x)[0].sum(), x)[0].sum(), t)[0]
    torch.testing.assert_close(g3, autograd_derivatives(f, t, 3)[2])


def test_gradient_of_a_gradient_closing_over_an_outer_tensor():
    x0, w0 = rand(3), rand(3, seed=1)

    def outer(w):
        (gx,) = zt.gradient(lambda x: (x * w).sin().sum(), x0)
        return gx.pow(2).sum()

    (g,) = zt.gradient(outer, w0)
    w = w0.clone().requires_grad_()
    x = x0.clone().requires_grad_()
    (gx,) = torch.autograd.grad((x * w).sin().sum(), x, create_graph=True)
    (r,) = torch.autograd.grad(gx.pow(2).sum(), w)
    torch.testing.assert_close(g, r)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.GELU(), torch.nn.LayerNorm(5),
                               torch.nn.Linear(5, 1)).double()


def test_hessian_of_a_module_with_gelu_and_layernorm_with_respect_to_its_input():
    model = mlp()
    for x in (rand(3), rand(2, 3)):
        f = lambda x: model(x).sum()  # noqa: E731
        reference = torch.autograd.functional.hessian(f, x)
        torch.testing.assert_close(zt.hessian(f, x).detach(), reference)


def test_mixed_second_derivative_of_a_module_all_in_zt():
    """d/dθ of |d/dx model(x)|^2 (a gradient penalty), by zt twice, against autograd."""
    model, x = mlp(), rand(4, 3)
    (g,) = zt.gradient(lambda m: zt.gradient(lambda x: m(x).sum(), x)[0].pow(2).sum(), model)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(model(xr).sum(), xr, create_graph=True)
    names = [n for n, _ in model.named_parameters()]
    reference = torch.autograd.grad(gx.pow(2).sum(), list(model.parameters()), allow_unused=True)
    for name, r in zip(names, reference):
        if r is None:  # the last bias does not change d/dx
            assert g[name] is None or not g[name].any()
        else:
            torch.testing.assert_close(g[name], r)


def inplace(x):
    y = x * 1.0
    y.mul_(x)          # x^2
    y.add_(x.sin())    # x^2 + sin x
    y[0] = y[0] * 3    # a write through an index
    return (y * x).sum()


def out_of_place(x):
    y = x * x + x.sin()
    y = torch.cat([y[:1] * 3, y[1:]])
    return (y * x).sum()


def test_derivatives_of_in_place_ops_to_third_order():
    x = rand(4)
    reference = autograd_derivatives(out_of_place, x, 3)
    torch.testing.assert_close(zt.gradient(inplace, x)[0], reference[0])
    torch.testing.assert_close(zt.hessian(inplace, x), torch.autograd.functional.hessian(out_of_place, x))
    g2 = zt.gradient(lambda x: zt.gradient(inplace, x)[0].sum(), x)[0]
    torch.testing.assert_close(g2, reference[1])
    g3 = zt.gradient(lambda x: zt.gradient(lambda x: zt.gradient(inplace, x)[0].sum(), x)[0].sum(), x)[0]
    torch.testing.assert_close(g3, reference[2])


def test_nested_gradients_staged():
    f = lambda x: (x.exp() * x.cos()).sum()  # noqa: E731
    x = rand(5)
    second = zt.compile(lambda x: zt.gradient(lambda x: zt.gradient(f, x)[0].sum(), x)[0])
    torch.testing.assert_close(second(x), autograd_derivatives(f, x, 2)[1])
    model = mlp()
    penalty = zt.compile(lambda x: zt.gradient(lambda x: model(x).sum(), x)[0].pow(2).sum())
    xr = rand(2, 3).requires_grad_()
    (gx,) = torch.autograd.grad(model(xr).sum(), xr, create_graph=True)
    torch.testing.assert_close(penalty(xr.detach()), gx.pow(2).sum().detach())
