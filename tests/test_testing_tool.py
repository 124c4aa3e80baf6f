"""zt.test_rrule (issue 14 item 7): passes correct rules, and names what is wrong in broken ones."""
import pytest
import torch

import zygote_torch as zt
from helpers import rand
from zygote_torch.ad.registry import REGISTRY


@pytest.fixture
def registry():
    """Rules registered in a test are removed after it."""
    rules = dict(REGISTRY._rules)
    yield
    REGISTRY._rules = rules
    REGISTRY.version += 1


def smooth_relu(x, beta=2.0):
    return torch.nn.functional.softplus(x, beta)


def test_a_correct_rule_passes_and_gives_its_cotangents(registry):
    @zt.rrule(smooth_relu)
    def _(x, beta=2.0):
        y = smooth_relu(x, beta)
        return y, lambda dy: (zt.NoTangent(), dy * torch.sigmoid(beta * x), zt.NoTangent())

    x = rand(5)
    (g, _) = zt.test_rrule(smooth_relu, x, 2.0, constants=(1,))
    assert g.shape == x.shape


def test_a_wrong_derivative_is_caught_by_finite_differences(registry):
    @zt.rrule(smooth_relu)
    def _(x, beta=2.0):
        return smooth_relu(x, beta), lambda dy: (zt.NoTangent(), dy * torch.sigmoid(x), zt.NoTangent())

    with pytest.raises(AssertionError, match="argument 0: the pullback differs from finite differences"):
        zt.test_rrule(smooth_relu, rand(5), 2.0, constants=(1,))


def test_the_contract_is_checked_with_clear_messages(registry):
    def scale(x, k):
        return x * k

    @zt.rrule(scale)
    def _(x, k):
        return scale(x, k), lambda dy: (zt.NoTangent(), dy * k)   # k's cotangent is missing

    with pytest.raises(AssertionError, match="returned 2 cotangents; it must return a tuple of 3"):
        zt.test_rrule(scale, rand(3), rand(3, seed=1))

    @zt.rrule(scale)
    def _(x, k):
        return scale(x, k), lambda dy: (zt.NoTangent(), (dy * k).sum(), dy * x)

    with pytest.raises(AssertionError, match=r"argument 0: cotangent of shape \(\) for an argument of shape \(3,\)"):
        zt.test_rrule(scale, rand(3), rand(3, seed=1))

    @zt.rrule(scale)
    def _(x, k):
        return scale(x, k) + 1, lambda dy: (zt.NoTangent(), dy * k, dy * x)

    with pytest.raises(AssertionError, match="value differs"):
        zt.test_rrule(scale, rand(3), rand(3, seed=1))

    with pytest.raises(AssertionError, match="no rrule is registered"):
        zt.test_rrule(lambda x: x, rand(3))


def test_a_rule_that_differs_from_its_body_on_purpose(registry):
    def straight_through_round(x):
        return torch.round(x)

    @zt.rrule(straight_through_round)
    def _(x):
        return torch.round(x), lambda dy: (zt.NoTangent(), dy)

    with pytest.raises(AssertionError, match="finite differences"):
        zt.test_rrule(straight_through_round, rand(4))  # rounding's true derivative is zero


def test_built_in_rules_and_structured_outputs_pass():
    x, y = rand(3, 4), rand(4, seed=1)
    zt.test_rrule(torch.atan2, x, y.expand(3, 4).contiguous())
    zt.test_rrule(torch.sort, rand(6), check_staged=False)   # a tuple output (values, indices)
    zt.test_rrule(torch.nn.functional.layer_norm, x, (4,), y, rand(4, seed=2))
