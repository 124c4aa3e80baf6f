"""Rule-side tools, Zygote-style dynamism (control flow, recursion, closures, dicts, exceptions), and
staleness traps: a gradient always reflects the state at the time of the call."""
import pytest
import torch
import torch.nn as nn

import zygote_torch as zt
from helpers import check_gradient, rand


# -- rule-side tools --------------------------------------------------------------------------------
def test_ignore_derivatives_and_dropgrad():
    x = rand(3)
    (g,) = zt.gradient(lambda x: (x * zt.ignore_derivatives(x)).sum(), x)
    torch.testing.assert_close(g, x)
    (g,) = zt.gradient(lambda x: (x * zt.dropgrad(x * 2)).sum(), x)
    torch.testing.assert_close(g, 2 * x)


def test_hook_transforms_the_cotangent():
    x = rand(3)
    (g,) = zt.gradient(lambda x: (zt.hook(lambda d: d * 10, x) ** 2).sum(), x)
    torch.testing.assert_close(g, 20 * x)
    (g,) = zt.gradient(lambda x: (zt.hook(lambda d: d.clamp(-0.1, 0.1), x) * 5).sum(), x)
    torch.testing.assert_close(g, torch.full((3,), 0.1, dtype=torch.float64))


def test_checkpointed_recomputes_and_matches():
    x, w = rand(4), rand(4, seed=2)
    f = lambda x, w: torch.tanh(x * w).exp()
    g_ref = zt.gradient(lambda x, w: f(x, w).sum(), x, w)
    g_ckpt = zt.gradient(lambda x, w: zt.checkpointed(f, x, w).sum(), x, w)
    for a, b in zip(g_ckpt, g_ref):
        torch.testing.assert_close(a, b)


def test_thunk_cotangents_are_computed_lazily():
    calls = []

    def twice(x, y):
        return x * 2 + y

    @zt.rrule(twice)
    def _(x, y):
        def pb(dy):
            return zt.NoTangent(), zt.Thunk(lambda: calls.append("x") or dy * 2), zt.Thunk(lambda: calls.append("y") or dy)
        return twice(x, y), pb

    x = rand(3)
    (g,) = zt.gradient(lambda x: twice(x, torch.ones(3, dtype=torch.float64)).sum(), x)
    torch.testing.assert_close(g, torch.full((3,), 2.0, dtype=torch.float64))
    assert calls == ["x"]  # the constant's cotangent was never computed


# -- dynamism ---------------------------------------------------------------------------------------
def test_loops_and_data_dependent_control_flow():
    def f(x):
        y = x
        for _ in range(3):
            y = torch.sin(y) * 2 if y.sum() > 0 else y * y
        while y.norm() < 10:
            y = y * 1.5
        return y.sum()
    for seed in range(4):
        check_gradient(f, rand(3, seed=seed), staged_too=False)


def test_recursion():
    def power(x, n):
        return x if n == 1 else x * power(x, n - 1)
    assert zt.derivative(lambda x: power(x, 5))(2.0) == pytest.approx(80.0)

    def fib(x, n):  # recursion depending on data
        return x if x.sum() > n else fib(x * 1.3 + 0.1, n)
    check_gradient(lambda x: fib(x, 20.0).sum(), rand(3, positive=True), staged_too=False)


def test_closures_and_dicts_and_structs():
    a = rand(3, seed=7)
    ops = {"scale": lambda v: v * a, "shift": lambda v: v + a}
    for name in ops:
        check_gradient(lambda x: ops[name](x).pow(2).sum(), rand(3))


def test_builtins_over_tensors():
    xs = [rand(3, seed=i) for i in range(3)]
    check_gradient(lambda a, b, c: sum([a, b, c]).pow(2).sum(), *xs)
    check_gradient(lambda a, b, c: max(a.sum(), b.sum(), c.sum()), *xs, staged_too=False)


def test_exceptions_caught_inside_f():
    def f(x):
        try:
            if x.sum() > -100:
                raise ValueError("skip")
            y = x * 100
        except ValueError:
            y = x * 3
        return y.sum()
    (g,) = zt.gradient(f, rand(3))
    torch.testing.assert_close(g, torch.full((3,), 3.0, dtype=torch.float64))


def test_repeated_indices_accumulate():
    idx = torch.tensor([0, 0, 2, 0])
    check_gradient(lambda x: x[idx].pow(2).sum(), rand(3))


# -- staleness traps: each would return a stale gradient if a graph were reused naively --------------
SCALE = 2.0


def test_trap_global_rebound():
    global SCALE
    x = rand(3)
    f = lambda x: (x * SCALE).sum()
    SCALE = 2.0
    assert zt.gradient(f, x)[0][0].item() == 2.0
    SCALE = 3.0
    assert zt.gradient(f, x)[0][0].item() == 3.0


def test_trap_closure_over_new_data():
    x = rand(3)
    for k in (1.0, 5.0):
        w = torch.full((3,), k, dtype=torch.float64)
        (g,) = zt.gradient(lambda x: (x * w).sum(), x)
        torch.testing.assert_close(g, w)


def test_trap_inplace_parameter_update_between_calls():
    W = rand(3)
    x = rand(3, seed=1)
    ps = zt.Params([x])
    g1 = zt.gradient(lambda: (W * x).sum(), ps)[x].clone()
    with torch.no_grad():
        W.mul_(-2)
    g2 = zt.gradient(lambda: (W * x).sum(), ps)[x]
    torch.testing.assert_close(g2, -2 * g1)


def test_trap_python_state_selects_the_op():
    state = {"op": torch.sin}
    x = rand(3)
    (g1,) = zt.gradient(lambda x: state["op"](x).sum(), x)
    state["op"] = torch.cos
    (g2,) = zt.gradient(lambda x: state["op"](x).sum(), x)
    torch.testing.assert_close(g1, torch.cos(x))
    torch.testing.assert_close(g2, -torch.sin(x))


def test_trap_branch_flips_with_data():
    f = lambda x: (x * 2).sum() if x.sum() > 0 else (x * -5).sum()
    assert zt.gradient(f, torch.ones(2, dtype=torch.float64))[0][0].item() == 2.0
    assert zt.gradient(f, -torch.ones(2, dtype=torch.float64))[0][0].item() == -5.0


def test_trap_shapes_and_dtypes_change():
    f = lambda x: (x * x).sum()
    for x in (rand(3), rand(5), rand(2, 2), torch.randn(3, dtype=torch.float32)):
        (g,) = zt.gradient(f, x)
        assert g.shape == x.shape and g.dtype == x.dtype
        torch.testing.assert_close(g, 2 * x)


def test_trap_module_attribute_swapped():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh()).double()
    x = rand(2, 3)
    (g1,) = zt.gradient(lambda m: m(x).sum(), model)
    model[1] = nn.Identity()
    (g2,) = zt.gradient(lambda m: m(x).sum(), model)
    torch.testing.assert_close(g2["0.bias"], torch.full((3,), 2.0, dtype=torch.float64))
    assert not torch.allclose(g1["0.bias"], g2["0.bias"])


def test_trap_list_length_changes():
    f = lambda xs: sum(x.sum() for x in xs)
    assert len(zt.gradient(f, [rand(2), rand(2)])[0]) == 2
    assert len(zt.gradient(f, [rand(2), rand(2), rand(2)])[0]) == 3


def test_trap_random_numbers_differ_between_calls():
    x = torch.ones(1000, dtype=torch.float64)
    f = lambda x: torch.nn.functional.dropout(x, 0.5, training=True).sum()
    g1, g2 = zt.gradient(f, x)[0], zt.gradient(f, x)[0]
    assert not torch.equal(g1, g2)
