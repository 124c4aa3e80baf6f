"""zt.compile is sound: staged outputs have eager's types, guards retrace when what a trace read
changes, and the cache is bounded. Each test compares against eager PyTorch (float64)."""
import warnings

import pytest
import torch

import zygote_torch as zt
from helpers import rand


# -- staged outputs have the dynamic path's types ------------------------------------------------

def test_a_float_argument_gives_a_float_back():
    assert zt.compile(lambda a: a * 2.0)(3.0) == 6.0
    assert type(zt.compile(lambda a: a * 2.0)(3.0)) is float


def test_number_operators_on_floats_give_floats_and_bools():
    got = zt.compile(lambda a, b: (a * b - 1, a > b, -a, 2 ** a, abs(a) // 2, a % 2, a / b))(3.0, 2.0)
    expected = (5.0, True, -3.0, 8.0, 1.0, 1.0, 1.5)
    assert got == expected and [type(v) for v in got] == [type(v) for v in expected]


def test_a_float_mixed_with_a_tensor_gives_a_tensor():
    x = rand(3)
    got = zt.compile(lambda a, x: (a * x, a * torch.ones((), dtype=torch.float64)))(3.0, x)
    assert all(isinstance(v, torch.Tensor) for v in got)
    torch.testing.assert_close(got[0], 3.0 * x)


def test_gradients_of_floats_inside_a_compiled_function_are_floats():
    x = torch.ones(2, dtype=torch.float64)
    cases = [(lambda a: zt.gradient(lambda a: a ** 2, a), (3.0,)),
             (lambda a: zt.withgradient(lambda a: a ** 2, a), (3.0,)),
             (lambda a, x: zt.gradient(lambda a, x: (a * x).sum(), a, x), (3.0, x)),
             (lambda a: zt.derivative(lambda a: a ** 3)(a), (2.0,))]
    for f, args in cases:
        got, expected = zt.compile(f)(*args), f(*args)  # f itself: the dynamic path
        assert type(got) is type(expected)
        for g, e in zip(*(v if isinstance(v, tuple) else (v,) for v in (got, expected))):
            assert type(g) is type(e)
            torch.testing.assert_close(g, e)


def test_a_float_argument_is_read_at_each_call():
    step = zt.compile(lambda a: a * 2.0 + 1)
    assert [step(v) for v in (1.0, 2.5, -4.0)] == [3.0, 6.0, -7.0]
    assert len(step.cache) == 1


# -- guards: what a trace read from Python is checked at each call --------------------------------

def _mlp(p=0.0):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Dropout(p), torch.nn.ReLU(),
                               torch.nn.Linear(5, 2)).double()


X = rand(4, 3, seed=1)


def test_eval_of_a_module_reached_through_a_closure_retraces():
    model = _mlp(p=0.5)
    step = zt.compile(lambda x: model(x))
    step(X)
    model.eval()
    torch.testing.assert_close(step(X), model(X))  # Dropout off: the train-mode program is not reused


def test_eval_of_one_submodule_retraces():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    step = zt.compile(lambda x: model(x))
    step(X)
    model[1].eval()  # frozen statistics while fine-tuning
    before = model[1].running_mean.clone()
    torch.testing.assert_close(step(X), model(X))
    torch.testing.assert_close(model[1].running_mean, before)  # not updated in eval mode


def test_a_replaced_parameter_is_read():
    model = _mlp()
    step = zt.compile(lambda x: model(x))
    step(X)
    model[0].weight = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    torch.testing.assert_close(step(X), model(X))
    assert len(step.cache) == 1  # same shape: the same program reads the new parameter


def test_a_parameter_replaced_by_another_shape_retraces():
    model = _mlp()
    step = zt.compile(lambda x: model(x))
    step(X)
    model[3] = torch.nn.Linear(5, 7).double()
    torch.testing.assert_close(step(X), model(X))


def test_a_replaced_buffer_is_read():
    bn = torch.nn.BatchNorm1d(3).double().eval()
    step = zt.compile(lambda x: bn(x))
    step(X)
    bn.running_mean = torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(step(X), bn(X))


W_GLOBAL = torch.ones(3, dtype=torch.float64)


def _times_global(x):
    return x * W_GLOBAL


def test_a_rebound_global_tensor_is_read():
    global W_GLOBAL
    step = zt.compile(_times_global)
    step(X)
    W_GLOBAL = torch.full((3,), 20.0, dtype=torch.float64)
    try:
        torch.testing.assert_close(step(X), X * 20.0)  # 20, not the old 1
    finally:
        W_GLOBAL = torch.ones(3, dtype=torch.float64)


def test_a_rebound_closure_tensor_is_read():
    w = torch.ones(3, dtype=torch.float64)

    def f(x):
        return x * w

    def rebind(value):
        nonlocal w
        w = value

    step = zt.compile(f)
    step(X)
    rebind(torch.full((3,), 7.0, dtype=torch.float64))
    torch.testing.assert_close(step(X), X * 7.0)


def test_an_object_argument_whose_attributes_change():
    class Config:
        pass

    cfg = Config()
    cfg.w, cfg.scale = torch.ones(3, dtype=torch.float64), 2.0
    step = zt.compile(lambda cfg, x: x * cfg.w * cfg.scale)
    step(cfg, X)
    cfg.w = torch.full((3,), 20.0, dtype=torch.float64)
    torch.testing.assert_close(step(cfg, X), X * 40.0)
    cfg.scale = 3.0
    torch.testing.assert_close(step(cfg, X), X * 60.0)


SCALE = 2


def _times_scale(x):
    return x * SCALE


def test_a_rebound_global_number_retraces():
    global SCALE
    step = zt.compile(_times_scale)
    step(X)
    SCALE = 5
    try:
        torch.testing.assert_close(step(X), X * 5)
    finally:
        SCALE = 2


def test_a_python_flag_selecting_a_branch_retraces():
    flags = {"sin": True}
    step = zt.compile(lambda x: x.sin() if flags["sin"] else x.cos())
    torch.testing.assert_close(step(X), X.sin())
    flags["sin"] = False
    torch.testing.assert_close(step(X), X.cos())


def test_a_module_attribute_read_by_forward_retraces():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.scale = torch.nn.Linear(3, 3).double(), 2.0

        def forward(self, x):
            return self.lin(x) * self.scale

    m = Scaled()
    step = zt.compile(lambda x: m(x))
    step(X)
    m.scale = 4.0
    torch.testing.assert_close(step(X), m(X))


def test_dropout_probability_changed_retraces():
    model = _mlp(p=0.3)
    step = zt.compile(lambda x: model(x))
    step(X)
    model[1].p = 0.0
    torch.testing.assert_close(step(X), model(X))


def test_a_list_of_tensors_grown_retraces():
    ws = [torch.ones(3, dtype=torch.float64)]
    step = zt.compile(lambda x: sum(x * w for w in ws))
    step(X)
    ws.append(torch.full((3,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(step(X), X * 3.0)


def test_a_forward_hook_runs_at_every_call():
    model, seen = _mlp(), []
    step = zt.compile(lambda x: model(x))
    step(X)
    handle = model[3].register_forward_hook(lambda mod, inputs, out: seen.append(out.shape))
    step(X)
    step(X)
    assert len(seen) == 2
    handle.remove()
    step(X)
    assert len(seen) == 2


def test_a_hook_changing_the_output_is_applied():
    model = _mlp()
    step = zt.compile(lambda x: model(x))
    step(X)
    model[3].register_forward_hook(lambda mod, inputs, out: out * 10)
    torch.testing.assert_close(step(X), model(X))


def test_autocast_retraces():
    model = _mlp().float()
    x = X.float()
    step = zt.compile(lambda x: model(x))
    step(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = step(x)
        expected = model(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)


def test_the_default_dtype_is_guarded():
    step = zt.compile(lambda x: x + torch.ones(3))
    assert step(torch.zeros(3)).dtype == torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert step(torch.zeros(3, dtype=torch.float32)).dtype == torch.float64  # ones(3) is float64 now
    finally:
        torch.set_default_dtype(previous)


def test_the_kernel_choice_setting_is_guarded():
    from zygote_torch.ops import kernel_choice as fused
    step = zt.compile(lambda x: torch.nn.functional.gelu(x).sum())
    x = torch.randn(8, 8)
    step(x)
    before = len(step.cache)
    previous = fused.USE_KERNELS_ON_CPU
    fused.USE_KERNELS_ON_CPU = not bool(previous)
    try:
        torch.testing.assert_close(step(x), torch.nn.functional.gelu(x).sum())
        assert len(step.cache) == before + 1
    finally:
        fused.USE_KERNELS_ON_CPU = previous


def test_a_tensor_whose_shape_the_trace_read_is_guarded():
    state = {"w": torch.ones(3, dtype=torch.float64)}
    step = zt.compile(lambda x: x[: state["w"].shape[0] - 1])  # reads w's shape, not its values
    torch.testing.assert_close(step(rand(5)), rand(5)[:2])
    state["w"] = torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(step(rand(5)), rand(5)[:3])


def test_a_tensor_passed_twice_then_two_tensors():
    step = zt.compile(lambda a, b: a - b * 2)
    x, y = rand(3), rand(3, seed=2)
    torch.testing.assert_close(step(x, x), x - x * 2)
    torch.testing.assert_close(step(x, y), x - y * 2)


def test_a_captured_tensor_passed_as_the_argument_then_another():
    w = rand(3)
    step = zt.compile(lambda x: x * w)
    torch.testing.assert_close(step(w), w * w)
    x = rand(3, seed=4)
    torch.testing.assert_close(step(x), x * w)


def test_a_parameter_held_by_params_and_the_model_rebound_in_one_place():
    model = _mlp()
    ps = zt.Params(model)
    step = zt.compile(lambda x: zt.gradient(lambda: model(x).sum(), ps))
    step(X)
    model[0].weight = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))  # ps keeps the old one
    expected = zt.gradient(lambda: model(X).sum(), ps)
    got = step(X)
    for p in ps:
        if expected[p] is None:
            assert got[p] is None
        else:
            torch.testing.assert_close(got[p], expected[p])


def test_tracing_that_writes_python_state_runs_eagerly():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    m = Counter()
    step = zt.compile(lambda x: m(x))
    with pytest.warns(UserWarning, match="changed Python state"):
        first = step(X)
    second = step(X)
    assert m.calls == 2  # as eagerly: the trace's increment was undone
    torch.testing.assert_close(first, X * 1)
    torch.testing.assert_close(second, X * 2)


def test_a_program_writing_its_input_is_not_reused_for_aliased_inputs():
    def f(a, b):
        a.add_(1)
        return b * 2

    step = zt.compile(f)
    x, y = rand(3), rand(3, seed=5)
    torch.testing.assert_close(step(x.clone(), y), y * 2)
    base = rand(3)
    a = base.clone()
    torch.testing.assert_close(step(a, a), (base + 1) * 2)  # b is a: it sees the write
    whole = rand(2, 3)
    reference = whole.clone()
    expected = f(reference[0], reference[0].view(3))  # b a view of a: aliased, not the same object
    torch.testing.assert_close(step(whole[0], whole[0].view(3)), expected)


# -- a bounded cache --------------------------------------------------------------------------------

def test_five_hundred_batch_sizes_give_bounded_programs_and_the_right_values():
    model = _mlp()
    ps = zt.Params(model)
    step = zt.compile(lambda x: zt.withgradient(lambda: model(x).pow(2).sum(), ps))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in range(1, 501):
            x = rand(batch, 3, seed=batch)
            loss, gs = step(x)
            if batch % 50 == 0 or batch <= 10:  # against the dynamic path (every call would be slow)
                ref_loss, ref = zt.withgradient(lambda: model(x).pow(2).sum(), ps)
                torch.testing.assert_close(loss, ref_loss)
                for p in ps:
                    torch.testing.assert_close(gs[p], ref[p])
    assert len(step.cache) == zt.runtime.compile.CACHE_LIMIT
    assert sum("cache limit" in str(w.message) for w in caught) == 1


def test_the_cache_limit_is_per_compiled_function_and_configurable():
    step = zt.compile(lambda x: x * 2, cache_limit=2)
    with pytest.warns(UserWarning, match="cache_limit=2"):
        for n in range(1, 5):
            torch.testing.assert_close(step(rand(n)), rand(n) * 2)
    assert len(step.cache) == 2
    torch.testing.assert_close(step(rand(1)), rand(1) * 2)  # a cached program still serves its calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_rebound_parameter_is_read_under_cuda_graphs():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).cuda()
    step = zt.compile(lambda x: model(x) * 1, cuda_graphs=True)
    x = torch.randn(4, 3, device="cuda")
    torch.testing.assert_close(step(x).clone(), model(x))
    model.weight = torch.nn.Parameter(torch.randn(2, 3, device="cuda"))  # another address
    torch.testing.assert_close(step(x).clone(), model(x))


def test_a_module_argument_switched_to_eval_retraces():
    model = _mlp(p=0.5)
    step = zt.compile(lambda m, x: m(x))
    step(model, X)
    model.eval()
    torch.testing.assert_close(step(model, X), model(X))


def test_a_module_list_grown_retraces():
    layers = torch.nn.ModuleList([torch.nn.Linear(3, 3).double()])
    step = zt.compile(lambda x: sum(layer(x) for layer in layers))
    step(X)
    layers.append(torch.nn.Linear(3, 3).double())
    torch.testing.assert_close(step(X), sum(layer(X) for layer in layers))


def test_a_class_attribute_read_through_self_retraces():
    class Scaled(torch.nn.Module):
        scale = 2.0

        def forward(self, x):
            return x * self.scale

    m = Scaled()
    step = zt.compile(lambda x: m(x))
    step(X)
    Scaled.scale = 5.0
    torch.testing.assert_close(step(X), X * 5.0)


def test_a_learning_rate_decayed_between_calls_of_a_compiled_step():
    model, reference = _mlp(), _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    ps = zt.Params(model)

    def train_step(x):
        gs = zt.gradient(lambda: model(x).pow(2).sum(), ps)
        with torch.no_grad():
            for p in ps:
                p.sub_(opt.param_groups[0]["lr"] * gs[p])

    step = zt.compile(train_step)
    for _ in range(3):
        step(X)
        ref_opt.zero_grad()
        reference(X).pow(2).sum().backward()
        ref_opt.step()
        for o in (opt, ref_opt):  # a step decay of the learning rate, as a scheduler makes it
            o.param_groups[0]["lr"] *= 0.1
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_a_tensor_hook_applies_to_its_gradient_as_on_the_dynamic_path():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    ps = zt.Params([w])
    x = torch.arange(3.0, dtype=torch.float64)
    step = zt.compile(lambda x: zt.gradient(lambda: (w * x).sum(), ps))
    torch.testing.assert_close(step(x)[w], x)
    handle = w.register_hook(lambda g: g * 10)  # registered after the first trace
    torch.testing.assert_close(step(x)[w].detach(), zt.gradient(lambda: (w * x).sum(), ps)[w].detach())
    handle.remove()
    torch.testing.assert_close(step(x)[w], x)
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    a.register_hook(lambda g: g * 10)  # on an argument
    (got,) = zt.compile(lambda a: zt.gradient(lambda a: (a * 2).sum(), a))(a)
    torch.testing.assert_close(got.detach(), torch.full((3,), 20.0, dtype=torch.float64))
