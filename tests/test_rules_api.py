"""The rrule contract: registration, overriding, leaves, late registration, keyword binding."""
import pytest
import torch

import zygote_torch as zt
from helpers import rand


def scaled(x):
    return x * 1.0


def test_user_rule_overrides_tracing_and_takes_effect_on_next_call():
    x = rand(4)
    (before,) = zt.gradient(lambda x: scaled(x).sum(), x)
    torch.testing.assert_close(before, torch.ones(4, dtype=torch.float64))

    @zt.rrule(scaled)
    def _(x):
        return scaled(x), lambda dy: (zt.NoTangent(), 3 * dy)

    (after,) = zt.gradient(lambda x: scaled(x).sum(), x)
    torch.testing.assert_close(after, 3 * torch.ones(4, dtype=torch.float64))
    _, back = zt.pullback(lambda x: scaled(x), x)
    torch.testing.assert_close(back(torch.ones(4, dtype=torch.float64))[0], 3 * torch.ones(4, dtype=torch.float64))
    assert "scaled(x)" in zt.code(lambda x: scaled(x).sum(), x)


def test_user_rule_overrides_builtin_rule():
    from zygote_torch.ad.registry import REGISTRY
    rules = dict(REGISTRY._rules)
    try:
        @zt.rrule(torch.mul, torch.Tensor.mul)
        def _(a, b):
            return torch.mul(a, b), lambda dy: (zt.NoTangent(), 7 * dy * b, 7 * dy * a)
        x = rand(3)
        (g,) = zt.gradient(lambda x: (x * 2.0).sum(), x)
        torch.testing.assert_close(g, 14 * torch.ones(3, dtype=torch.float64))
    finally:  # the builtin rule itself back (a re-registration would count as a user's)
        REGISTRY._rules = rules
        REGISTRY.version += 1


def test_rule_leaf_seen_through_closure_and_attribute():
    calls = []

    def inner(x):
        calls.append("traced")
        return x * 2

    @zt.rrule(inner)
    def _(x):
        return x * 2, lambda dy: (zt.NoTangent(), 5 * dy)

    class Holder:
        fn = staticmethod(inner)

    fns = {"inner": inner}
    x = rand(2)
    for f in (lambda x: inner(x).sum(), lambda x: Holder.fn(x).sum(), lambda x: fns["inner"](x).sum()):
        (g,) = zt.gradient(f, x)
        torch.testing.assert_close(g, 5 * torch.ones(2, dtype=torch.float64))
    assert calls == []  # the leaf's body never ran under capture: its rule did


def test_closure_variables_survive_the_leaf_trampoline():
    k = 4.0

    def with_closure(x):
        return x * k

    @zt.rrule(with_closure)
    def _(x):
        return with_closure(x), lambda dy: (zt.NoTangent(), dy * k)

    x = rand(3)
    (g,) = zt.gradient(lambda x: with_closure(x).sum(), x)
    torch.testing.assert_close(g, 4 * torch.ones(3, dtype=torch.float64))
    assert with_closure(torch.ones(1)).item() == 4.0  # original code restored after capture


def test_keyword_arguments_bind_to_the_rule_signature():
    x = rand(3, 4)
    g1 = zt.gradient(lambda x: torch.add(x, other=x, alpha=2.0).sum(), x)[0]
    torch.testing.assert_close(g1, 3 * torch.ones(3, 4, dtype=torch.float64))


def test_rrule_requires_callables():
    with pytest.raises(TypeError):
        zt.rrule()


def test_complex_python_scalar_operand():
    import zygote_torch as zt
    z = torch.randn(3, dtype=torch.complex128)
    dy = torch.randn(3, dtype=torch.complex128)
    _, back = zt.pullback(lambda z: z * (1 + 2j), z)
    zr = z.clone().requires_grad_()
    (ref,) = torch.autograd.grad(zr * (1 + 2j), zr, dy)
    torch.testing.assert_close(back(dy)[0], ref)
