"""In-place ops on intermediates differentiate correctly; mutating inputs is a clear error."""
import pytest
import torch

import zygote_torch as zt
from helpers import check_gradient, rand
from zygote_torch.runtime import staged


def f_iadd(x):
    y = x * 2
    y += 1
    return (y * y).sum()


def f_saved_then_mutated(x, w):
    y = x * w          # mul saves x and w ... and y is saved by the next line
    z = y.exp()        # exp's pullback holds its output z
    z.mul_(3)          # mutates z: exp's pullback must still see the old z
    y.add_(1)          # mutates y after it was used
    return (z * y).sum()


def f_saved_then_mutated_reference(x, w):
    y = x * w
    z = y.exp() * 3
    return (z * (y + 1)).sum()


def f_setitem(x, v):
    y = x * 1.5
    y[1] = v[0] * 2
    y[:, 0] = 0.0
    return (y ** 2).sum()


def f_relu_masked(x):
    h = x @ x.T
    h.relu_()
    h.masked_fill_(h > 1.0, 1.0)
    return h.sum()


def f_relu_masked_reference(x):
    h = (x @ x.T).relu()
    return h.masked_fill(h > 1.0, 1.0).sum()


def f_pow_inplace(x):
    y = x + 0.5
    y.pow_(3)
    return y.sum()


def f_copy_into_buffer(x):
    buf = torch.zeros(3, 4, dtype=torch.float64)
    buf.copy_(x * 2)
    buf[0] = x[1]
    return (buf * x).sum()


@pytest.mark.parametrize("f, shapes", [
    (f_iadd, [(3, 4)]), (f_setitem, [(3, 4), (4,)]),
    (f_pow_inplace, [(3,)]), (f_copy_into_buffer, [(3, 4)]),
])
def test_inplace_on_intermediates_matches_autograd(f, shapes):
    args = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    check_gradient(f, *args)


def test_mutating_a_value_a_pullback_holds_beyond_autograd():
    # torch.autograd refuses this ("modified by an inplace operation"); we differentiate it
    x, w = rand(3, 4), rand(4, seed=1)
    with pytest.raises(RuntimeError, match="inplace"):
        xr = x.clone().requires_grad_()
        f_saved_then_mutated(xr, w).backward()
    check_gradient(f_saved_then_mutated, x, w, reference=f_saved_then_mutated_reference)
    check_gradient(f_relu_masked, x, reference=f_relu_masked_reference)


def test_mutating_an_argument_is_an_error_naming_op_and_line():
    def f(x):
        x.mul_(2)
        return x.sum()
    with pytest.raises(zt.ZygoteError) as info:
        zt.gradient(f, rand(3))
    assert "mul_" in str(info.value) and "x.mul_(2)" in str(info.value)


def test_mutating_a_param_is_an_error():
    W = rand(3)

    def loss():
        W.add_(1)
        return W.sum()
    with pytest.raises(zt.ZygoteError, match="add_"):
        zt.gradient(loss, zt.Params([W]))


def test_mutating_an_untracked_captured_tensor_used_by_a_pullback_keeps_gradients_right():
    c = rand(3, seed=5)
    c_before = c.clone()

    def f(x):
        y = (x * c).sum()   # mul's pullback holds c
        c.add_(1)           # ... which is then mutated in place
        return y
    (g,) = zt.gradient(f, rand(3))
    torch.testing.assert_close(g, c_before)


def test_staged_inplace_matches():
    x = rand(3, 4)
    _, back = staged.pullback(f_setitem, x, rand(4, seed=1))
    xr = x.clone().requires_grad_()
    f_setitem(xr, rand(4, seed=1)).backward()
    torch.testing.assert_close(back(torch.tensor(1.0, dtype=torch.float64))[0], xr.grad)


def test_inplace_flag_of_activations_mutates_like_eager():
    import torch.nn.functional as F

    def f(x):
        h = x * 2
        F.silu(h, inplace=True)   # the result is discarded: h itself must be activated
        F.relu(h, True)
        return (h * h).sum()

    def reference(x):
        return (F.relu(F.silu(x * 2)) ** 2).sum()
    check_gradient(f, rand(3, 4), reference=reference)
