"""PyTorch's own custom gradients are honoured: torch.autograd.Function (both styles and every ctx
feature), custom ops with a registered autograd, checkpointing, tensor hooks. Each case against
torch.autograd in float64, on the dynamic path and staged (a staged pullback, and zt.gradient
inside zt.compile)."""
import pytest
import torch

import zygote_torch as zt
from helpers import check_gradient, rand

HERE = __file__


def check(f, *args, **kwargs):
    """check_gradient (dynamic pullback and gradient, staged pullback), then zt.gradient of the
    summed output inside zt.compile, all against torch.autograd."""
    check_gradient(f, *args, **kwargs)
    total = lambda *a: f(*a).sum()  # noqa: E731
    leaves = [a.detach().clone().requires_grad_() for a in args]
    ref = torch.autograd.grad(total(*leaves), leaves, allow_unused=True)
    ours = zt.compile(lambda *a: zt.gradient(total, *a))(*args)
    for o, r in zip(ours, ref):
        if r is None:
            assert o is None or torch.count_nonzero(o) == 0
        else:
            torch.testing.assert_close(o, r)


def line_of(text: str) -> str:
    """'this_file:N' for the line of this file that contains ``text``."""
    with open(HERE) as f:
        n = next(i for i, line in enumerate(f, 1) if text in line and "line_of" not in line)
    return f"{HERE}:{n}"


# -- torch.autograd.Function ------------------------------------------------------------------------
class StraightThrough(torch.autograd.Function):
    """Old style (ctx in forward): round in the forward, identity in the backward."""

    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, g):
        return g


class ClippedSquare(torch.autograd.Function):
    """New style (setup_context): a backward that is not the forward's derivative."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * 2 * x.clamp(-0.5, 0.5) + y


def test_straight_through_estimator_gives_torchs_gradient():
    check(lambda x: StraightThrough.apply(x * 3) * x, rand(5))


def test_setup_context_style_function_uses_its_own_backward():
    check(lambda x: ClippedSquare.apply(x.sin()), rand(4, 3))


class ScaledMul(torch.autograd.Function):
    """Non-tensor arguments, needs_input_grad, and a gradient that broadcasts (each backward
    here differs from the forward's derivative on purpose: the Function's own must be used)."""

    @staticmethod
    def forward(ctx, x, w, scale: float, mode: str):
        ctx.save_for_backward(x, w)
        ctx.scale, ctx.mode = scale, mode
        return x * w * scale

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        assert ctx.mode == "mul"
        gx = 2 * g * w * ctx.scale if ctx.needs_input_grad[0] else None
        gw = (g * x * ctx.scale).sum(0, keepdim=True) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None


def test_non_tensor_arguments_and_needs_input_grad():
    w = rand(1, 3, seed=1)
    check(lambda x, w: ScaledMul.apply(x, w, 2.5, "mul"), rand(4, 3), w)
    check(lambda x: ScaledMul.apply(x, w, 0.5, "mul"), rand(4, 3))  # w is a constant here


def test_integer_input_gets_no_gradient():
    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, index):
            ctx.save_for_backward(index)
            ctx.n = x.shape[0]
            return x[index]

        @staticmethod
        def backward(ctx, g):
            (index,) = ctx.saved_tensors
            assert not ctx.needs_input_grad[1]
            return torch.zeros(ctx.n, dtype=g.dtype).index_add(0, index, g * 3), None

    check(lambda x: Gather.apply(x, torch.tensor([0, 2, 2])) * 3, rand(4))


class SortValues(torch.autograd.Function):
    """Several outputs, one of them integer, one marked non-differentiable."""

    @staticmethod
    def forward(ctx, x):
        values, indices = x.sort()
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        return values, indices

    @staticmethod
    def backward(ctx, g_values, g_indices):
        (indices,) = ctx.saved_tensors
        return torch.zeros_like(g_values).scatter(-1, indices, g_values.exp())


def test_several_outputs_with_a_non_differentiable_one():
    def f(x):
        values, indices = SortValues.apply(x)
        return values * indices.to(x.dtype)

    check(f, rand(3, 5))


def test_output_marked_non_differentiable_carries_no_gradient():
    received = []

    class Pair(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            a, b = x * 2, x * 3
            ctx.mark_non_differentiable(b)
            return a, b

        @staticmethod
        def backward(ctx, ga, gb):
            received.append(gb)
            return ga * 2

    def f(x):
        a, b = Pair.apply(x)
        return a * b

    check(f, rand(4))
    real = [g for g in received if not isinstance(g, torch._subclasses.FakeTensor)]
    assert real and all(torch.count_nonzero(g) == 0 for g in real)  # as torch, zeros


def test_set_materialize_grads_false_gives_none_for_unused_outputs():
    seen = []

    class Two(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.set_materialize_grads(False)
            return x.exp(), x.cos()

        @staticmethod
        def backward(ctx, ga, gb):
            seen.append(gb is None)
            return ga * 2 if gb is None else ga * 2 + gb

    check(lambda x: Two.apply(x)[0], rand(3))
    assert seen and all(seen)


def test_input_returned_unchanged_is_a_new_value():
    class PassThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            return g * 10

    check(lambda x: PassThrough.apply(x) + x * 2, rand(3))


def test_tensor_passed_by_keyword_to_a_setup_context_function():
    class Affine(torch.autograd.Function):
        @staticmethod
        def forward(x, w, shift=1.0):
            return x * w + shift

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, w, shift = inputs
            ctx.save_for_backward(x, w)

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g * w, g * x * x, None

    check(lambda x, w: Affine.apply(x, w=w), rand(4), rand(4, seed=3))


class DifferentiableBackward(torch.autograd.Function):
    """A backward written in differentiable ops: torch.autograd differentiates it again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos() * 2


class OnceOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos()


def test_second_derivative_through_the_backward():
    x = rand(3)
    f = lambda x: DifferentiableBackward.apply(x * x).sum()  # noqa: E731
    ref = torch.autograd.functional.hessian(f, x)
    torch.testing.assert_close(zt.hessian(f, x), ref)


def test_once_differentiable_first_order_and_refused_second_order():
    check(lambda x: OnceOnly.apply(x) * x, rand(3))
    with pytest.raises(zt.ZygoteError, match="OnceOnly.backward is marked @once_differentiable"):
        zt.hessian(lambda x: OnceOnly.apply(x * x).sum(), rand(3))


def test_function_inside_a_module_with_implicit_params():
    class LinearFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            return x @ w.T + b

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g @ w, g.T @ x.cos(), g.sum(0) * 2

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(rand(3, 4, seed=5))
            self.b = torch.nn.Parameter(rand(3, seed=6))

        def forward(self, x):
            return LinearFn.apply(x, self.w, self.b).tanh()

    layer, x = Layer(), rand(2, 4)
    loss = lambda: layer(x).pow(2).sum()  # noqa: E731
    layer.zero_grad()
    loss().backward()
    gs = zt.gradient(loss, zt.Params(layer))
    compiled = zt.compile(lambda: zt.gradient(loss, zt.Params(layer)))()
    for p in layer.parameters():
        torch.testing.assert_close(gs[p], p.grad)
        torch.testing.assert_close(compiled[p], p.grad)
    # zt.compile(module) in an ordinary training step: its backward calls the Function's
    cm = zt.compile(layer)
    expected = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    cm(x).pow(2).sum().backward()
    for p, e in zip(layer.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


def test_mark_dirty_is_refused_naming_the_function_and_line():
    class AddOne_(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            x.add_(1)
            ctx.mark_dirty(x)
            return x

        @staticmethod
        def backward(ctx, g):
            return g

    def f(x):
        y = x * 2
        return AddOne_.apply(y).sum()  # the dirty call

    with pytest.raises(zt.ZygoteError, match="AddOne_.apply") as info:
        zt.gradient(f, rand(3))
    assert line_of("# the dirty call") in str(info.value)


def test_backward_with_wrong_number_of_gradients_names_the_function():
    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            return x * y

        @staticmethod
        def backward(ctx, g):
            return g

    with pytest.raises(zt.RuleError, match="Bad.backward"):
        zt.gradient(lambda x: Bad.apply(x, x).sum(), rand(3))
