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
    with pytest.raises(zt.ZygoteError, match="OnceOnly.apply at .* marked @once_differentiable") as info:
        zt.hessian(lambda x: OnceOnly.apply(x * x).sum(), rand(3))  # the twice-differentiated call
    assert line_of("# the twice-differentiated call") in str(info.value)


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

    with pytest.raises(zt.RuleError, match="Bad.backward") as info:
        zt.gradient(lambda x: Bad.apply(x, x).sum(), rand(3))  # the bad backward's call
    assert line_of("# the bad backward's call") in str(info.value)


# -- checkpointing ----------------------------------------------------------------------------------
class Block(torch.nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, dtype=torch.float64)
        self.drop = torch.nn.Dropout(p)
        self.scale = torch.nn.Parameter(rand(4, seed=11))

    def forward(self, h):
        return self.drop(torch.tanh(self.lin(h))) * self.scale


def reference_grads(loss, params):
    """torch.autograd's gradients of ``loss()`` with respect to ``params`` (None where unused), by
    ``.backward()`` (the reentrant checkpoint refuses ``torch.autograd.grad``)."""
    for p in params:
        p.grad = None
    loss().backward()
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def assert_grads(ours, ref):
    for o, r in zip(ours, ref):
        if r is None:
            assert o is None or torch.count_nonzero(o) == 0
        else:
            torch.testing.assert_close(o, r)


@pytest.mark.parametrize("how", ["zt", "reentrant", "non_reentrant"])
def test_checkpoint_differentiates_what_the_block_reaches_by_itself(how):
    block, x = Block(), rand(3, 4)
    w = torch.nn.Parameter(rand(4, seed=12))
    run = {"zt": lambda f, h: zt.checkpointed(f, h),
           "reentrant": lambda f, h: torch.utils.checkpoint.checkpoint(f, h, use_reentrant=True),
           "non_reentrant": lambda f, h: torch.utils.checkpoint.checkpoint(f, h, use_reentrant=False)}[how]
    closure = lambda h: block(h) * w  # noqa: E731  (reaches block's parameters and w by itself)
    loss = lambda: run(closure, x * w).pow(2).sum()  # noqa: E731
    params = [w, *block.parameters()]
    ref = reference_grads(loss, params)
    ps = zt.Params(params)
    assert_grads([zt.gradient(loss, ps)[p] for p in params], ref)
    staged = zt.compile(lambda: zt.gradient(loss, ps))()
    assert_grads([staged[p] for p in params], ref)


def test_checkpointed_module_argument_and_recompute():
    calls = []
    block, x = Block(), rand(2, 4)

    def f(h):
        calls.append(1)
        return block(h)

    ref = reference_grads(lambda: (f(x) ** 2).sum(), list(block.parameters()))
    calls.clear()
    (gs,) = zt.gradient(lambda m: (zt.checkpointed(f, x) ** 2).sum(), block)
    assert len(calls) == 2  # the forward once, the recomputation once
    assert_grads([gs[n] for n, _ in block.named_parameters()], ref)


def test_checkpoint_replays_the_forwards_random_numbers():
    block, x = Block(p=0.5), rand(5, 4)
    block.train()
    loss = lambda: torch.utils.checkpoint.checkpoint(block, x * 1.5, use_reentrant=False).pow(2).sum()  # noqa: E731
    params = list(block.parameters())
    torch.manual_seed(3)
    ref = reference_grads(loss, params)
    torch.manual_seed(3)
    ours = zt.gradient(loss, zt.Params(params))
    assert_grads([ours[p] for p in params], ref)


def test_reentrant_checkpoint_without_differentiated_arguments_gives_no_gradient_as_torch():
    block, x = Block(), rand(2, 4)  # x is data: nothing differentiates it
    w = torch.nn.Parameter(rand(4, seed=13))
    loss = lambda: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True).sum() + (w * w).sum()  # noqa: E731
    params = [w, *block.parameters()]
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        ref = reference_grads(loss, params)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        ours = zt.gradient(loss, zt.Params(params))
    assert ref[1] is None
    assert_grads([ours[p] for p in params], ref)


def test_checkpoint_sequential():
    blocks = torch.nn.Sequential(Block(), Block(), Block())
    x = rand(2, 4)
    loss = lambda: torch.utils.checkpoint.checkpoint_sequential(blocks, 2, x * 2, use_reentrant=False).sum()  # noqa: E731
    params = list(blocks.parameters())
    ours = zt.gradient(loss, zt.Params(params))
    assert_grads([ours[p] for p in params], reference_grads(loss, params))


# -- hooks ------------------------------------------------------------------------------------------
def test_tensor_hook_sees_the_total_gradient_and_hooks_run_in_order():
    def f(x):
        y = x * 2
        z = y * 5  # read before the hooks are registered: its cotangent passes through them too
        y.register_hook(lambda g: g * 10)
        y.register_hook(lambda g: g + 1)
        return z + y * y

    check(f, rand(3))


@pytest.mark.parametrize("same", [lambda t: t.double(), lambda t: t.contiguous(), lambda t: t.to(torch.float64)])
def test_tensor_hook_registered_through_a_call_that_returns_the_tensor_itself(same):
    """A regression (the fuzzer's seed 0, both paths): ``t.double()`` of a float64 ``t`` is ``t``, so
    a hook registered on it is a hook on ``t`` and sees the cotangent of reads made before it too."""
    def f(x):
        t = x * 2
        u = t.sin()
        same(t).register_hook(lambda g: g * 3)
        return (u + t * t).sum()

    check(f, rand(3))


def test_tensor_hook_on_an_argument_and_a_hook_returning_none():
    seen = []

    def f(x):
        x.register_hook(lambda g: g * 3)
        h = x.sin()
        h.register_hook(lambda g: seen.append(g.shape) or None)
        return h * x

    check(f, rand(4))
    assert seen and all(s == (4,) for s in seen)


def test_removed_tensor_hook_does_not_apply():
    def f(x):
        y = x.exp()
        handle = y.register_hook(lambda g: g * 100)
        handle.remove()
        return y * 2

    check(f, rand(3))


def test_a_staged_hook_runs_at_each_call_on_real_gradients():
    log = []

    def loss(x):
        y = x.sin()
        y.register_hook(lambda g: log.append(g.clone()))
        return (y * 3).sum()

    step = zt.compile(lambda x: zt.gradient(loss, x))
    x = rand(3)
    for _ in range(2):
        step(x)
    assert len(log) == 2 and all(not isinstance(g, torch._subclasses.FakeTensor) for g in log)
    torch.testing.assert_close(log[1], torch.full((3,), 3.0, dtype=torch.float64))


def test_module_forward_hook_and_pre_hook():
    layer = torch.nn.Linear(3, 3, dtype=torch.float64)
    layer.register_forward_pre_hook(lambda m, inputs: (inputs[0] * 3,))
    layer.register_forward_hook(lambda m, inputs, out: out.tanh() * inputs[0].sum())
    x = rand(2, 3)
    check_gradient(lambda x: layer(x), x)
    params = list(layer.parameters())
    loss = lambda: layer(x * 2).pow(2).sum()  # noqa: E731
    ref = reference_grads(loss, params)
    for ours in (zt.gradient(loss, zt.Params(params)), zt.compile(lambda: zt.gradient(loss, zt.Params(params)))()):
        assert_grads([ours[p] for p in params], ref)


# -- custom ops -------------------------------------------------------------------------------------
@torch.library.custom_op("zt_custom_gradients::scaled_sin", mutates_args=())
def scaled_sin(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.sin(x) * scale


@scaled_sin.register_fake
def _(x, scale):
    return torch.empty_like(x)


def _scaled_sin_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


def _scaled_sin_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return g * ctx.scale * torch.cos(x) * 10, None  # ten times the derivative: its own must be used


scaled_sin.register_autograd(_scaled_sin_backward, setup_context=_scaled_sin_setup)


def test_custom_op_uses_its_registered_backward():
    check(lambda x: scaled_sin(x * 2, 1.5) * x, rand(4), allow_fallback=True)


_LIB = torch.library.Library("zt_custom_gradients_lib", "DEF")
_LIB.define("cube(Tensor x) -> Tensor")


class _CubeBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.zt_custom_gradients_lib.cube(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x * x  # not 3 x^2: the op's Autograd kernel is what counts


_LIB.impl("cube", lambda x: x * x * x, "CPU")
_LIB.impl("cube", _CubeBackward.apply, "Autograd")
_LIB.impl("cube", lambda x: torch.empty_like(x), "Meta")


def test_op_with_an_autograd_kernel_uses_it():
    check(lambda x: torch.ops.zt_custom_gradients_lib.cube(x.exp()), rand(3), allow_fallback=True)


def test_module_full_backward_hook_on_differentiated_inputs_is_refused_naming_the_line():
    layer = torch.nn.Linear(3, 3, dtype=torch.float64)
    handle = layer.register_full_backward_hook(lambda m, grad_in, grad_out: tuple(None if g is None else g * 2
                                                                                   for g in grad_in))
    try:
        with pytest.raises(zt.ZygoteError, match="Linear called at .* full backward hook") as info:
            zt.gradient(lambda x: layer(x * 2).sum(), rand(2, 3))  # the hooked call
        assert line_of("# the hooked call") in str(info.value)
        # the parameters alone: such a hook cannot change their gradients, which are torch's
        x = rand(2, 3)
        ref = reference_grads(lambda: layer(x).pow(2).sum(), list(layer.parameters()))
        ours = zt.gradient(lambda: layer(x).pow(2).sum(), zt.Params(layer))
        assert_grads([ours[p] for p in layer.parameters()], ref)
    finally:
        handle.remove()


def test_second_derivatives_through_checkpoints_and_a_custom_op():
    w = rand(3, seed=14)
    x = rand(3, seed=15)
    block = lambda h: (h * w).sin()  # noqa: E731
    cases = {
        "zt.checkpointed": lambda x: zt.checkpointed(block, x * x).sum(),
        "torch.utils.checkpoint": lambda x: torch.utils.checkpoint.checkpoint(block, x * x, use_reentrant=False).sum(),
        "custom op": lambda x: scaled_sin(x * x, 0.5).sum(),
    }
    for name, f in cases.items():
        torch.testing.assert_close(zt.hessian(f, x), torch.autograd.functional.hessian(f, x),
                                   msg=lambda m: f"{name}: {m}")


def test_jacobians_through_functions_and_custom_ops():
    x = rand(3, seed=16)
    for f in (lambda x: scaled_sin(x, 2.0), lambda x: ClippedSquare.apply(x), lambda x: StraightThrough.apply(x) * x):
        torch.testing.assert_close(zt.jacobian(f, x)[0], torch.autograd.functional.jacobian(f, x))


def test_hooks_registered_before_the_call_apply_to_the_gradient():
    w = torch.nn.Parameter(rand(3, seed=17))
    layer = torch.nn.Linear(3, 2, dtype=torch.float64)
    handles = [w.register_hook(lambda g: g * 2), w.register_hook(lambda g: g + 1),
               layer.weight.register_hook(lambda g: g.clamp(-0.1, 0.1))]
    x = rand(4, 3, seed=18)
    try:
        loss = lambda: (layer(x * w) ** 2).sum()  # noqa: E731
        params = [w, *layer.parameters()]
        ref = reference_grads(loss, params)
        ours = zt.gradient(loss, zt.Params(params))
        assert_grads([ours[p] for p in params], ref)
        (gw,) = zt.gradient(lambda w: (layer(x * w) ** 2).sum(), w)
        torch.testing.assert_close(gw, ref[0])
    finally:
        for h in handles:
            h.remove()


def test_a_hook_on_a_tensor_no_gradient_reaches_is_refused_by_name():
    """Fuzzer seed 6597 (replayed path): ``t.detach().sin().register_hook(h)`` inside ``f``. torch
    raises a RuntimeError (the tensor does not require grad); ours was that same bare RuntimeError.
    It is a ZygoteError naming the op and the user's line, on every call of the site."""
    def f(x):
        t = x.detach().sin()
        t.register_hook(lambda g: g * 2)
        return (x * t).sum()

    x = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="doesn't require gradient"):
        f(x)  # torch refuses it
    for _ in range(3):
        with pytest.raises(zt.ZygoteError, match=r"Tensor.register_hook at .*test_custom_gradients.py"):
            zt.gradient(f, x.detach())
