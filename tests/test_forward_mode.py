"""Forward mode (issue 14 item 4): zt.jvp / zt.pushforward / zt.hvp against torch.func, frules."""
import pytest
import torch

import zygote_torch as zt
from helpers import rand


def test_jvp_equals_torch_func_jvp():
    x, v = rand(4), rand(4, seed=1)
    W = rand(3, 4, seed=2)
    for f in (lambda x: torch.tanh(W @ x).exp(), lambda x: (x.sin() * x.cumsum(0), x.norm()),
              lambda x: torch.softmax(x, 0) * torch.nn.functional.gelu(x)):
        y, dy = zt.jvp(f, (x,), (v,))
        ry, rdy = torch.func.jvp(f, (x,), (v,))
        torch.testing.assert_close(y, ry)
        torch.testing.assert_close(dy, rdy)


def test_jvp_of_several_structured_and_number_arguments():
    a, b = rand(3), rand(3, seed=1)
    f = lambda d, s: d["a"] * d["b"].exp() * s  # noqa: E731
    y, dy = zt.jvp(f, ({"a": a, "b": b}, 2.0), ({"a": torch.ones(3), "b": torch.zeros(3)}, 1.0))
    torch.testing.assert_close(dy, b.exp() * 2.0 + a * b.exp())


def test_jvp_through_in_place_ops_and_views():
    def f(x):
        y = x * 1.0
        y[1:].mul_(x[:-1])
        y.add_(x.sin())
        return y
    x, v = rand(4), rand(4, seed=1)

    def reference(x):
        y = torch.cat([x[:1], x[1:] * x[:-1]])
        return y + x.sin()
    torch.testing.assert_close(zt.jvp(f, (x,), (v,))[1], torch.func.jvp(reference, (x,), (v,))[1])


def test_pushforward_as_zygote():
    x = rand(3)
    push = zt.pushforward(lambda x, k: x ** 3 * k, x, 2.0)
    torch.testing.assert_close(push(torch.ones(3), 0.0), 6 * x ** 2)


def test_a_user_frule_replaces_the_function_body():
    calls = []

    def softclip(x):
        raise AssertionError("the body of a function with an frule must not run under zt.jvp")

    @zt.frule(softclip)
    def _(dargs, x):
        _, dx = dargs
        calls.append(1)
        return torch.tanh(x), dx * (1 - torch.tanh(x) ** 2)

    x, v = rand(3), rand(3, seed=1)
    y, dy = zt.jvp(lambda x: softclip(x) * 2, (x,), (v,))
    assert calls
    torch.testing.assert_close(y, 2 * torch.tanh(x))
    torch.testing.assert_close(dy, 2 * v * (1 - torch.tanh(x) ** 2))


def test_an_frule_for_a_torch_function_is_used():
    seen = []

    @zt.frule(torch.special.erf)
    def _(dargs, x):
        seen.append(1)
        return torch.special.erf(x), dargs[1] * 2 / torch.pi ** 0.5 * torch.exp(-x * x)

    try:
        x, v = rand(3), rand(3, seed=1)
        dy = zt.jvp(lambda x: torch.special.erf(x).sum(), (x,), (v,))[1]
        assert seen
        torch.testing.assert_close(dy, torch.func.jvp(lambda x: torch.special.erf(x).sum(), (x,), (v,))[1])
    finally:
        from zygote_torch import forward
        forward._FRULES.pop(torch.special.erf, None)


def test_a_broken_frule_is_a_clear_error():
    def g(x):
        return x

    @zt.frule(g)
    def _(dargs, x):
        return x, torch.zeros(5)

    with pytest.raises(zt.RuleError, match="tangent"):
        zt.jvp(lambda x: g(x), (rand(3),), (rand(3),))


def test_hessian_vector_products_forward_over_reverse():
    x, v = rand(4), rand(4, seed=1)
    f = lambda x: (x.exp() * x.roll(1)).sum() / (1 + x.norm())  # noqa: E731
    _, reference = torch.autograd.functional.hvp(f, x, v)
    torch.testing.assert_close(zt.hvp(f, x, v), reference)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    g = lambda x: model(x).sum()  # noqa: E731
    _, reference = torch.autograd.functional.hvp(g, x, v)
    torch.testing.assert_close(zt.hvp(g, x, v), reference)


def test_hvp_through_fused_kernels_float32():
    """Regression: the CPU/CUDA kernels carry no tangents, so under forward mode the rules must take
    the formula (the Hessian-vector product was silently 0 for a float32 LayerNorm/GELU/cross-entropy)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.LayerNorm(1024),
                                torch.nn.Linear(1024, 512))
    x, y, v = torch.randn(64, 256), torch.randint(0, 512, (64,)), torch.randn(64, 256)
    f = lambda x: F.cross_entropy(model(x), y)  # noqa: E731
    _, reference = torch.autograd.functional.hvp(f, x, v)
    torch.testing.assert_close(zt.hvp(f, x, v), reference, rtol=1e-4, atol=1e-7)
