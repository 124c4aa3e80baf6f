"""The guarantee: torch.autograd's gradient or a ZygoteError naming the op and the line.

Here: torch.no_grad() inside f, Python's math module on differentiated numbers, values cut from the
tape (.item(), float(), .numpy()), the dispatch-level safety net, and views of a base that became
tracked through an in-place op. Each against torch.autograd in float64, dynamically and staged
(``check_gradient``), or the error named.
"""
import math
from math import sin as sin_imported_by_name

import numpy as np
import pytest
import torch

import zygote_torch as zt
from zygote_torch.capture import grad_mode
from helpers import check_gradient, rand


# -- torch.no_grad() inside f ------------------------------------------------------------------

def no_grad_reduction(x):
    with torch.no_grad():
        s = x.sum()
    return (x * s).sum()


def no_grad_mutation(x):
    t = x * 1.0
    v = t[0]
    with torch.no_grad():
        t.mul_(2)          # changes t's value; its derivative stays the identity, as in torch
    return (t * t).sum() + (v * x[1]).sum()


@torch.no_grad()
def _decorated_helper(x):
    return x.exp()


def no_grad_decorator_and_enable_grad(x):
    c = _decorated_helper(x)
    with torch.no_grad():
        with torch.enable_grad():
            d = x.sin()
        e = x.cos()
    assert torch.is_grad_enabled()   # f sees the grad mode torch would give it
    return (x * c).sum() + d.sum() + (e * x).sum()


def set_grad_enabled_function(x):
    torch.set_grad_enabled(False)
    s = x.sum()
    torch.set_grad_enabled(True)
    return (x * s).sum()


@pytest.mark.parametrize("f", [no_grad_reduction, no_grad_mutation, no_grad_decorator_and_enable_grad,
                               set_grad_enabled_function], ids=lambda f: f.__name__)
def test_no_grad_inside_f_matches_autograd(f):
    check_gradient(f, rand(3, 3))


def test_gradient_under_an_outer_no_grad_still_differentiates():
    x = rand(3)
    with torch.no_grad():
        (g,) = zt.gradient(lambda x: (x * x).sum(), x)
    torch.testing.assert_close(g, 2 * x)
    assert torch.is_grad_enabled()


def test_grad_mode_is_restored_after_an_error_inside_f():
    def f(x):
        with torch.no_grad():
            raise ValueError("boom")

    with pytest.raises(ValueError):
        zt.gradient(f, rand(3))
    assert torch.is_grad_enabled()
    assert torch.is_grad_enabled is grad_mode.real_is_grad_enabled        # torch's own functions are back
    assert torch._C._set_grad_enabled is grad_mode.real_set_grad_enabled
    check_gradient(no_grad_reduction, rand(3))


# -- Python's math module ----------------------------------------------------------------------

def test_math_functions_on_differentiated_numbers():
    def f(x, y):
        return (math.sin(x) * math.exp(y) + math.log(x, 2.0) + math.sqrt(x * y) + math.atan2(y, x)
                + math.hypot(x, y) + math.tanh(x) ** 2 + math.pow(x, y) + math.log1p(y) + math.erf(x))

    x, y = 0.7, 1.3
    xt, yt = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, y))
    ref = (torch.sin(xt) * torch.exp(yt) + torch.log(xt) / math.log(2.0) + torch.sqrt(xt * yt) + torch.atan2(yt, xt)
           + torch.hypot(xt, yt) + torch.tanh(xt) ** 2 + xt ** yt + torch.log1p(yt) + torch.erf(xt))
    expected = torch.autograd.grad(ref, (xt, yt))
    value, grads = zt.withgradient(f, x, y)
    assert isinstance(value, float) and value == pytest.approx(ref.item())
    assert grads == pytest.approx(tuple(g.item() for g in expected))
    assert zt.derivative(lambda x: math.cos(3 * x))(0.5) == pytest.approx(-3 * math.sin(1.5))
    assert math.sin is not None and math.sin(0.5) == pytest.approx(0.479425538604203)  # restored


def test_math_functions_looked_up_while_f_runs():
    def f(x, name):
        fs = {"sin": math.sin, "cos": math.cos}  # looked up from the module while f records: rules
        return fs[name](x) * x

    assert zt.gradient(f, 1.0, "cos")[0] == pytest.approx(math.cos(1.0) - math.sin(1.0))


def test_math_functions_bound_before_the_call_are_refused_naming_the_line():
    # the seed README's dict of functions, built before the call: math.sin itself converts its
    # argument with float(), which no Python code can intercept, so the cut is refused
    fs = {"sin": math.sin, "imported": sin_imported_by_name}
    for name in fs:
        with pytest.raises(zt.ZygoteError, match=r"__float__ at .*test_trust.py:\d+"):
            zt.gradient(lambda x: fs[name](x), 1.0)


# -- values cut from the tape ------------------------------------------------------------------

def test_item_times_a_number_is_refused():
    with pytest.raises(zt.ZygoteError, match=r"item\(\) at .*test_trust.py:\d+"):
        zt.gradient(lambda x: x.sum().item() * 2.0, rand(3))


def test_item_fed_back_into_a_tensor_op_is_refused_naming_both_lines():
    def f(x):
        scale = x.std().item()
        return (x / scale).sum()

    with pytest.raises(zt.ZygoteError, match=r"Tensor.div at .*test_trust.py:\d+.*item\(\) at .*test_trust.py:\d+"):
        zt.gradient(f, rand(4))


def test_items_for_control_flow_printing_and_aux_are_fine(capsys):
    def f(x):
        s = x.sum()
        print(f"{s.item():.3f}", x.tolist()[0] > 0)
        y = (x * 2).sum() if s.item() > 0 else (x * 3).sum()
        return y, {"s": s.item()}

    x = rand(3)
    (g,), aux = zt.gradient(f, x, has_aux=True)
    torch.testing.assert_close(g, torch.full_like(x, 2.0 if x.sum() > 0 else 3.0))
    assert aux["s"] == pytest.approx(x.sum().item())


def test_a_detached_item_is_a_constant_on_purpose():
    x = rand(4)
    (g,) = zt.gradient(lambda x: (x / x.std().detach().item()).sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 1 / x.std().item()))


def test_an_item_from_an_earlier_call_is_a_constant():
    x = rand(3)
    earlier = zt.withgradient(lambda x: x.sum(), x)[0]
    logged = torch.tensor(2.0, dtype=torch.float64).item()
    (g,) = zt.gradient(lambda x: (x * earlier * logged).sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 2.0 * float(earlier)))


def test_numpy_of_a_differentiated_tensor_is_refused_as_torch_refuses_it():
    with pytest.raises(RuntimeError, match="requires grad"):
        rand(3).requires_grad_().numpy()
    with pytest.raises(zt.ZygoteError, match=r"numpy at .*test_trust.py:\d+"):
        zt.gradient(lambda x: float(np.sin(x.numpy()).sum()), rand(3))
    with pytest.raises(zt.ZygoteError, match=r"__array__ at .*test_trust.py:\d+"):
        zt.gradient(lambda x: (torch.as_tensor(np.sin(x)) + x).sum(), rand(3))   # np.sin on a tensor


def test_float_of_a_tracked_scalar_into_a_tracked_output_is_a_constant_as_in_torch():
    x = rand(3)
    (g,) = zt.gradient(lambda x: x.sum() * float(x[0]), x)
    torch.testing.assert_close(g, torch.full_like(x, x[0].item()))


# -- the safety net under the recorder ---------------------------------------------------------

@torch.jit.script
def _scripted(a):
    return (a * a).sum()


def _unseen_product(x):
    with torch._C.DisableTorchFunction():  # the recorder cannot see this multiplication
        y = x * 2
    return y.sum() + x.sum()


def test_a_kernel_reading_a_tracked_tensor_unseen_is_refused(monkeypatch):
    monkeypatch.setenv("ZYGOTE_TORCH_CHECK_UNSEEN", "1")
    with pytest.raises(zt.ZygoteError, match=r"aten.mul.Tensor at .*test_trust.py:\d+"):
        zt.gradient(_unseen_product, rand(3))


def test_safety_net_lets_printing_and_detached_reads_through(monkeypatch, capsys):
    monkeypatch.setenv("ZYGOTE_TORCH_CHECK_UNSEEN", "1")

    def f(x):
        print(x)
        d = x.detach()
        return (x * _scripted(d)).sum()

    x = rand(3)
    (g,) = zt.gradient(f, x)
    torch.testing.assert_close(g, torch.full_like(x, (x * x).sum().item()))


# -- views of a base that became tracked --------------------------------------------------------

def view_of_untracked_base_sees_a_tracked_write(x0, x1):
    # fuzzer seed 163: v8 was made of b6 before b6 became tracked through v9.mul_
    b5 = torch.full((5,), 0.5, dtype=torch.float64)
    b6 = torch.full((5,), 0.5, dtype=torch.float64)
    b5[0] = x1[0]
    v8 = b6[:]
    v9 = v8.view(-1)
    v9.mul_(b5.sin())
    return v8.sum() + (v9 * x0).sum() + (b6 * torch.arange(5.0, dtype=torch.float64)).sum()


def test_view_of_untracked_base_sees_a_tracked_write():
    check_gradient(view_of_untracked_base_sees_a_tracked_write, rand(5), rand(5, seed=1))


def view_made_under_no_grad_stays_constant(x):
    t = x * 1.0
    with torch.no_grad():
        v = t[0]
    t.mul_(3)
    return (v * x).sum() + t.sum()


def view_made_under_no_grad_stays_constant_reference(x):
    t = x * 3.0
    return (t[0].detach() * x).sum() + t.sum()


def test_view_made_under_no_grad_stays_constant():
    # torch.autograd forbids this program (a no_grad view whose base is then modified in place);
    # we give the gradient of the view as a constant holding its value when read
    x = rand(3, 3)
    with pytest.raises(RuntimeError, match="no_grad mode"):
        view_made_under_no_grad_stays_constant(x.clone().requires_grad_()).sum().backward()
    check_gradient(view_made_under_no_grad_stays_constant, x,
                   reference=view_made_under_no_grad_stays_constant_reference)


# -- staged programs name every callable they call ----------------------------------------------

class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def function_on_a_constant_then_mutated(x):
    # fuzzer seeds 5001, 5864: staged, Function.apply on an untracked tensor was written as
    # torch.autograd.function.apply, which does not exist
    t = _Square.apply(x.detach())
    t.mul_(t)
    return (x * t).sum()


def test_function_on_a_constant_then_mutated():
    check_gradient(function_on_a_constant_then_mutated, rand(3))


def view_read_after_recorded_then_no_grad_mutation(x0):
    # fuzzer seed 6687: t1.double() of a float64 tensor is t1 itself; v2 is stale after a recorded
    # write (t1[0] = -1) and a no_grad one: it is read from its base's current value
    t1 = x0 + 0.25
    v2 = t1[::2]
    v2.sin_()
    t1[:, 1:] += t1[:, :1]
    v3 = t1.double()
    t1[0] = -1.0
    t4 = v3 + v3
    with torch.no_grad():
        v3.add_(2.0)
    t4.div_(v2.sin() * v2.sin() + 1)
    return (t4 * x0).sum() + v2.mul(v2).add(v2).sum() + (v3 * x0).sum()


def test_view_read_after_recorded_then_no_grad_mutation():
    check_gradient(view_read_after_recorded_then_no_grad_mutation, rand(2, 4))
