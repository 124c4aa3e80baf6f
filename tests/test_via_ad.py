"""rrule_via_ad (zygote_torch/ad/via_ad.py): a function's (y, pullback) differentiated by the
project's rules on a fresh tape, as a rule's. Against torch.autograd in float64: a reference formula
with a list argument and a non-tensor argument, symbolic-zero seeds, strict mode naming an op with
no rule, and use inside a rule under zt.gradient, zt.hessian and zt.compile."""
import pytest
import torch
from torch.overrides import handle_torch_function, has_torch_function

import zygote_torch as zt
from zygote_torch.ad.via_ad import rrule_via_ad
from zygote_torch.ad.tangents import NoTangent, ZeroTangent


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g)


def reference(x, ws, alpha, mode):
    """A formula with a list argument, a number and a flag (the last two passed through)."""
    assert isinstance(alpha, float) and mode == "sum"
    return (x * ws[0]).tanh() * alpha + (x * ws[1]).sin()


def autograd_pullback(f, tensors, dy):
    """torch.autograd's cotangents of ``tensors`` for ``f(*tensors)`` seeded with ``dy``."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = f(*leaves)
    return torch.autograd.grad(y, leaves, dy, allow_unused=True)


def no_rule_op(x):
    """An op the recorder sees as one call and that has no rule: its pullback is the fallback."""
    if has_torch_function((x,)):
        return handle_torch_function(no_rule_op, (x,), x)
    return x.sin() * 2


def test_list_and_non_tensor_arguments_against_autograd():
    x, w0, w1, dy = rand(5), rand(5, seed=1), rand(5, seed=2), rand(5, seed=3)
    y, back = rrule_via_ad(reference, x, [w0, w1], 2.0, "sum")
    torch.testing.assert_close(y, reference(x, [w0, w1], 2.0, "sum"))
    d_self, dx, dws, dalpha, dmode = back(dy)
    assert d_self == NoTangent() and dalpha == NoTangent() and dmode == NoTangent()
    ref = autograd_pullback(lambda x, a, b: reference(x, [a, b], 2.0, "sum"), (x, w0, w1), dy)
    torch.testing.assert_close(dx, ref[0])
    assert isinstance(dws, list) and len(dws) == 2
    torch.testing.assert_close(dws[0], ref[1])
    torch.testing.assert_close(dws[1], ref[2])
    again = back(2 * dy)  # a pullback may be called again
    torch.testing.assert_close(again[1], 2 * ref[0])


def test_an_argument_not_reached_is_no_tangent():
    x, w = rand(3), rand(3, seed=1)
    _, back = rrule_via_ad(lambda x, ws: x.exp() * ws[0], x, [w, rand(3, seed=2)])
    _, dx, (dw0, dw1) = back(torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(dx, x.exp() * w)
    torch.testing.assert_close(dw0, x.exp())
    assert dw1 == NoTangent()


def test_symbolic_zeros_seed_nothing():
    x, d = rand(4), rand(4, seed=1)
    f = lambda x: (x.sin(), x.exp())  # noqa: E731
    _, back = rrule_via_ad(f, x)
    torch.testing.assert_close(back((ZeroTangent(), d))[1], autograd_pullback(lambda x: f(x)[1], (x,), d)[0])
    torch.testing.assert_close(back((d, None))[1], autograd_pullback(lambda x: f(x)[0], (x,), d)[0])
    assert back((ZeroTangent(), NoTangent())) == (NoTangent(), NoTangent())
    assert back(ZeroTangent()) == (NoTangent(), NoTangent())


def test_value_replaces_the_primal():
    x = rand(3)
    y, back = rrule_via_ad(lambda x: x * 3, x, value=lambda: torch.full((3,), 7.0, dtype=torch.float64))
    torch.testing.assert_close(y, torch.full((3,), 7.0, dtype=torch.float64))
    torch.testing.assert_close(back(torch.ones(3, dtype=torch.float64))[1], torch.full((3,), 3.0, dtype=torch.float64))


def test_strict_names_an_op_without_a_rule():
    x = rand(3)
    f = lambda x: no_rule_op(x.exp()).sum()  # noqa: E731
    with pytest.raises(zt.RuleError, match="no_rule_op"):
        rrule_via_ad(f, x, strict=True)
    _, back = rrule_via_ad(f, x)  # not strict: the fallback differentiates it as torch.autograd does
    torch.testing.assert_close(back(torch.tensor(1.0, dtype=torch.float64))[1],
                               autograd_pullback(f, (x,), torch.tensor(1.0, dtype=torch.float64))[0])


# -- inside a rule -----------------------------------------------------------------------------------

def smooth(x, ws, alpha):
    """A user function whose rule differentiates ``reference`` by rrule_via_ad (a leaf of capture)."""
    return reference(x, ws, alpha, "sum")


@zt.rrule(smooth)
def _smooth_rule(x, ws, alpha):
    y, back = rrule_via_ad(reference, x, ws, alpha, "sum")
    return y, lambda dy: back(dy)[:4]  # (NoTangent, dx, dws, dalpha): the mode is not an argument of smooth


W = [rand(4, seed=5), rand(4, seed=6)]


def loss(x):
    return smooth(x, W, 0.5).pow(2).sum()


def loss_reference(x):
    return reference(x, W, 0.5, "sum").pow(2).sum()


def test_inside_a_rule_under_gradient():
    x = rand(4)
    (g,) = zt.gradient(loss, x)
    torch.testing.assert_close(g, autograd_pullback(loss_reference, (x,), torch.tensor(1.0, dtype=torch.float64))[0])
    assert not zt.fallbacks(loss, x)


def test_inside_a_rule_under_hessian():
    x = rand(4)
    torch.testing.assert_close(zt.hessian(loss, x), torch.autograd.functional.hessian(loss_reference, x))


def test_inside_a_rule_staged_under_compile():
    x = rand(4)
    step = zt.compile(lambda x: zt.gradient(loss, x)[0])
    expected = autograd_pullback(loss_reference, (x,), torch.tensor(1.0, dtype=torch.float64))[0]
    torch.testing.assert_close(step(x), expected)
    torch.testing.assert_close(step(x), expected)  # the cached program
