"""The examples of Zygote.jl's README that this project starts from."""
import torch

import zygote_torch as zt


def f(x):
    return 5 * x + 3


def test_derivative_of_affine_function():
    assert f(10) == 53
    assert zt.derivative(f)(10) == 5.0
    assert isinstance(zt.derivative(f)(10), float)


def test_withgradient_on_python_numbers():
    assert zt.withgradient(f, 10.0) == (53.0, (5.0,))


def test_code_backward_is_the_constant_five():
    text = zt.code(f, 10.0)
    forward, backward = text.split("# backward")
    assert "x * 5" in forward and "+ 3" in forward
    body = [line.strip() for line in backward.strip().splitlines()[1:]]
    assert body == ["return (5.0,)"], backward


def add(a, b):
    return a + b


@zt.rrule(add)
def _add_rrule(a, b):
    def add_pb(dy):
        return zt.NoTangent(), dy, dy
    return add(a, b), add_pb


def test_custom_rrule_for_add():
    a, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    ga, gb = zt.gradient(lambda a, b: add(a, b).sum(), a, b)
    torch.testing.assert_close(ga, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(gb, torch.ones(3, dtype=torch.float64))
    assert zt.fallbacks(lambda a, b: add(a, b).sum(), a, b) == []


def test_custom_rrule_is_a_leaf_in_generated_code():
    a = torch.randn(3, dtype=torch.float64)
    text = zt.code(lambda a, b: add(a, b).sum(), a, a.clone())
    assert "add(a, b)" in text


def test_dict_of_functions_chosen_at_run_time():
    fs = {"sin": torch.sin, "cos": torch.cos, "tan": torch.tan}
    for name, expected in [("sin", torch.cos(torch.tensor(1.0, dtype=torch.float64))),
                           ("cos", -torch.sin(torch.tensor(1.0, dtype=torch.float64)))]:
        (g,) = zt.gradient(lambda x: fs[name](x), 1.0)
        assert abs(g - expected.item()) < 1e-12
