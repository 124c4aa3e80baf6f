"""Implicit parameters (Params/Grads) and higher-order derivatives, against torch.autograd."""
import pytest
import torch

import zygote_torch as zt
from helpers import rand


def test_seed_example_implicit_params():
    W, b = rand(2, 3), rand(2, seed=1)

    def predict(x):
        return W @ x + b

    g = zt.gradient(lambda: predict(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum(), zt.Params([W, b]))
    assert isinstance(g, zt.Grads)
    torch.testing.assert_close(g[W], torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(g[b], torch.ones(2, dtype=torch.float64))


def test_params_is_an_ordered_identity_set():
    a, b = torch.zeros(2), torch.zeros(2)
    ps = zt.Params([a, b, a])
    assert len(ps) == 2 and list(ps)[0] is a and b in ps and torch.zeros(2) not in ps
    ps.remove(a)
    assert a not in ps and len(ps) == 1
    ps.add(a)
    assert list(ps) == [b, a]
    with pytest.raises(KeyError):
        ps.remove(torch.zeros(1))


def test_params_vector_round_trip():
    model = torch.nn.Linear(3, 2)
    ps = zt.Params(model)
    v = ps.to_vector()
    assert v.shape == (8,)
    ps.from_vector(torch.arange(8.0))
    torch.testing.assert_close(model.weight.detach().reshape(-1), torch.arange(6.0))
    torch.testing.assert_close(ps.to_vector(), torch.arange(8.0))


def test_grads_of_module_params_equal_backward_and_drive_an_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    x, y = rand(16, 4), torch.randint(0, 3, (16,))
    ps = zt.Params(model)
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y)
    gs = zt.gradient(loss, ps)
    model.zero_grad()
    loss().backward()
    for p in model.parameters():
        torch.testing.assert_close(gs[p], p.grad)
    expected = [p.detach() - 0.1 * p.grad for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gs.to_grad()
    opt.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_grads_arithmetic_and_map():
    W, b = rand(2, 2), rand(2)
    ps = zt.Params([W, b])
    g1 = zt.gradient(lambda: (W * 2).sum(), ps)
    assert g1[b] is None
    g2 = zt.gradient(lambda: (W.sum() + b.sum()), ps)
    total = g1 + g2
    torch.testing.assert_close(total[W], torch.full((2, 2), 3.0, dtype=torch.float64))
    torch.testing.assert_close(total[b], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close((total * 2)[W], torch.full((2, 2), 6.0, dtype=torch.float64))
    torch.testing.assert_close((total - g2)[W], g1[W])
    torch.testing.assert_close(total.map(torch.neg)[b], -torch.ones(2, dtype=torch.float64))
    total += g2
    torch.testing.assert_close(total[W], torch.full((2, 2), 4.0, dtype=torch.float64))
    assert [p is W for p in total.keys()] == [True, False]


def test_jacobian_of_cumsum():
    x = rand(5)
    (J,) = zt.jacobian(lambda x: torch.cumsum(x, 0), x)
    torch.testing.assert_close(J, torch.tril(torch.ones(5, 5, dtype=torch.float64)))


def test_jacobian_matches_autograd_for_several_arguments():
    x, w = rand(3), rand(2, 3)
    y, (jx, jw) = zt.withjacobian(lambda x, w: torch.tanh(w @ x), x, w)
    rx, rw = torch.autograd.functional.jacobian(lambda x, w: torch.tanh(w @ x), (x, w))
    torch.testing.assert_close(jx, rx)
    torch.testing.assert_close(jw, rw)


def test_hessian_of_quadratic_form():
    A = rand(4, 4)
    x = rand(4, seed=3)
    H = zt.hessian(lambda x: x @ A @ x, x)
    torch.testing.assert_close(H, A + A.T)


def test_hessian_matches_autograd():
    x = rand(3)
    f = lambda x: (torch.sin(x) * x.exp()).sum() + (x ** 3).prod()
    torch.testing.assert_close(zt.hessian(f, x), torch.autograd.functional.hessian(f, x))


def test_nested_derivative_and_gradient():
    assert zt.derivative(zt.derivative(lambda x: x ** 3))(2.0) == pytest.approx(12.0)
    x = rand(3)
    # gradient of a function that itself takes a gradient
    (g,) = zt.gradient(lambda x: zt.gradient(lambda y: (y ** 3).sum(), x)[0].sum(), x)
    torch.testing.assert_close(g, 6 * x)


def test_diaghessian():
    x = rand(3)
    d, dy = zt.diaghessian(lambda x, y: (x ** 3).sum() * y, x, 2.0)
    torch.testing.assert_close(d, 12 * x)
    assert dy == 0.0


def test_jacobian_with_a_number_and_structured_arguments():
    x = rand(3)
    ja, jd = zt.jacobian(lambda a, d: a * d["w"] + d["b"], 2.0, {"w": x, "b": rand(3, seed=1)})
    torch.testing.assert_close(ja, x)
    torch.testing.assert_close(jd["w"], 2.0 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(jd["b"], torch.eye(3, dtype=torch.float64))
