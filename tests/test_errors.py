"""Bad input gets a clear error naming the op and the user's line."""
import pytest
import torch

import zygote_torch as zt
from helpers import rand
from zygote_torch.runtime import staged


def test_gradient_of_non_scalar_output_points_to_pullback_and_jacobian():
    with pytest.raises(zt.ZygoteError, match=r"shape \(3,\).*zt.pullback.*zt.jacobian"):
        zt.gradient(lambda x: x * 2, rand(3))


def test_output_that_is_not_a_tensor_or_number():
    with pytest.raises(zt.ZygoteError, match="returned a str"):
        zt.gradient(lambda x: "loss", rand(3))


def test_integer_output_has_no_gradient():
    with pytest.raises(zt.ZygoteError, match="torch.int64"):
        zt.gradient(lambda x: x.argmax(), rand(3))


def bad_arity(x):
    return x * 2


@zt.rrule(bad_arity)
def _bad_arity_rule(x):
    return x * 2, lambda dy: (dy * 2,)  # forgot the function's own cotangent


def bad_shape(x):
    return x * 2


@zt.rrule(bad_shape)
def _bad_shape_rule(x):
    return x * 2, lambda dy: (zt.NoTangent(), dy.sum())


def test_wrong_number_of_cotangents_names_rule_and_user_line():
    with pytest.raises(zt.RuleError) as info:
        zt.gradient(lambda x: bad_arity(x).sum(), rand(3))
    message = str(info.value)
    assert "_bad_arity_rule" in message and "expected a tuple of 2" in message
    assert "test_errors.py" in message and "bad_arity(x).sum()" in message


def test_wrongly_shaped_cotangent_names_rule_and_user_line():
    with pytest.raises(zt.RuleError) as info:
        zt.gradient(lambda x: bad_shape(x).sum(), rand(3))
    message = str(info.value)
    assert "_bad_shape_rule" in message and "shape ()" in message and "shape (3,)" in message
    assert "test_errors.py" in message


def test_rule_must_return_value_and_pullback():
    def no_pullback(x):
        return x

    @zt.rrule(no_pullback)
    def _(x):
        return x

    with pytest.raises(zt.RuleError, match="must return \\(value, pullback\\)"):
        zt.gradient(lambda x: no_pullback(x).sum(), rand(3))


def test_staged_capture_of_data_dependent_branch_names_the_line():
    def f(x):
        if x.sum() > 0:
            return x.sum()
        return -x.sum()

    with pytest.raises(zt.TraceError) as info:
        staged.build(f, (rand(3),), seeded=False)
    assert "Tensor.__bool__" in str(info.value) and "if x.sum() > 0" in str(info.value)
    # ... while the dynamic path simply follows the branch taken
    x = rand(3)
    (g,) = zt.gradient(f, x)
    torch.testing.assert_close(g, torch.sign(x.sum()) * torch.ones(3, dtype=torch.float64))


def test_pullback_cotangent_shape_mismatch():
    _, back = zt.pullback(lambda x: x * 2, rand(3))
    with pytest.raises(zt.ZygoteError, match="shape"):
        back(torch.ones(4, dtype=torch.float64))
