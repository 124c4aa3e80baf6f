"""zt.compile: staged programs equal the dynamic path and eager autograd; caching is keyed on the
input signature; JAX-jit semantics for Python-level state."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import zygote_torch as zt
from helpers import rand


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()


def _eager_grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_withgradient_of_module_matches_eager():
    model, x, y = _mlp(), rand(8, 6), torch.randint(0, 3, (8,))
    step = zt.compile(lambda m, x, y: zt.withgradient(lambda m: F.cross_entropy(m(x), y), m))
    loss, (g,) = step(model, x, y)
    ref = _eager_grads(model, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    for name in ref:
        torch.testing.assert_close(g[name], ref[name])
    assert len(step.cache) == 1
    step(model, rand(8, 6, seed=3), y)
    assert len(step.cache) == 1  # same signature: reused
    step(model, rand(5, 6), y[:5])
    assert len(step.cache) == 2  # new shape: traced again


def test_compiled_params_gradient_sees_inplace_updates():
    model, x, y = _mlp(), rand(8, 6), torch.randint(0, 3, (8,))
    ps = zt.Params(model)
    step = zt.compile(lambda x, y: zt.gradient(lambda: F.cross_entropy(model(x), y), ps))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        gs = step(x, y)
        ref = _eager_grads(model, x, y)
        for name, p in model.named_parameters():
            torch.testing.assert_close(gs[p], ref[name])
        gs.to_grad()
        opt.step()
    assert len(step.cache) == 1


def test_whole_training_step_with_inplace_update_is_one_program():
    model, x, y = _mlp(), rand(8, 6), torch.randint(0, 3, (8,))
    reference = _mlp()
    ps = zt.Params(model)

    def train_step(x, y):
        loss, gs = zt.withgradient(lambda: F.cross_entropy(model(x), y), ps)
        for p in ps:
            p.sub_(0.1 * gs[p])
        return loss

    step = zt.compile(train_step)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        loss = step(x, y)
        ref_opt.zero_grad()
        ref_loss = F.cross_entropy(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(loss, ref_loss.detach())
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach())
    code = step.code(x, y)
    assert "sub_" in code and "forward" in code


def test_python_state_read_by_the_trace_is_guarded_like_torch_compile():
    scale = {"k": 2.0}
    step = zt.compile(lambda x: x * scale["k"])
    x = rand(3)
    torch.testing.assert_close(step(x), 2 * x)
    scale["k"] = 5.0
    torch.testing.assert_close(step(x), 5 * x)  # the guard on scale["k"] failed: traced again
    assert len(step.cache) == 2
    scale["k"] = 2.0
    torch.testing.assert_close(step(x), 2 * x)  # the first program again
    assert len(step.cache) == 2


def test_tensors_read_at_each_call_not_frozen():
    w = rand(3)
    step = zt.compile(lambda x: x * w)
    x = rand(3, seed=2)
    torch.testing.assert_close(step(x), x * w)
    w.mul_(3)
    torch.testing.assert_close(step(x), x * w)


def test_registering_a_rule_retraces():
    def double(x):
        return x * 2

    step = zt.compile(lambda x: zt.gradient(lambda x: double(x).sum(), x)[0])
    x = rand(3)
    torch.testing.assert_close(step(x), torch.full((3,), 2.0, dtype=torch.float64))

    @zt.rrule(double)
    def _(x):
        return double(x), lambda dy: (zt.NoTangent(), 7 * dy)

    torch.testing.assert_close(step(x), torch.full((3,), 7.0, dtype=torch.float64))


def test_compiled_module_in_an_unchanged_pytorch_loop():
    model, x, y = _mlp(), rand(8, 6), torch.randint(0, 3, (8,))
    reference = _mlp()
    cm = zt.compile(model)
    opt = torch.optim.Adam(cm.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(cm(x), y)
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        ref_loss = F.cross_entropy(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(loss.detach(), ref_loss.detach())
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach())
    with torch.no_grad():
        torch.testing.assert_close(cm(x), reference(x))


def test_compiled_module_input_gradient_and_batchnorm_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh()).double()
    ref = copy.deepcopy(net)
    cm = zt.compile(net)
    x = rand(7, 4).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    (cm(x) ** 2).sum().backward()
    (ref(xr) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for a, b in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)


def test_inductor_backend_runs_the_generated_program():
    model, x, y = _mlp(), rand(8, 6), torch.randint(0, 3, (8,))
    ps = zt.Params(model)
    step = zt.compile(lambda x, y: zt.gradient(lambda: F.cross_entropy(model(x), y), ps), backend="eager")
    gs = step(x, y)
    ref = _eager_grads(model, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(gs[p], ref[name])


def test_objects_without_a_literal_form_are_held_by_the_program():
    from zygote_torch.runtime import staged
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, back = staged.pullback(lambda x: x * torch.randn(3, dtype=torch.float64, generator=g),
                              torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(y, noise)
    torch.testing.assert_close(back(torch.ones(3, dtype=torch.float64))[0], noise)


def test_a_pullback_reading_a_forward_value_through_an_identity_conversion():
    from zygote_torch.runtime import staged

    def myop(x):
        return x * 2

    @zt.rrule(myop)
    def _(x):
        y = x * 2
        return y, lambda dy: (zt.NoTangent(), dy * y.conj() * y.real * 0 + dy * 2)

    _, back = staged.pullback(lambda x: myop(x).sum(), rand(3))
    torch.testing.assert_close(back(torch.tensor(1.0, dtype=torch.float64))[0], torch.full((3,), 2.0, dtype=torch.float64))


def test_residuals_min_cut_and_memory_budget():
    from zygote_torch.runtime import staged
    model = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    x = rand(16, 6)
    plain = staged.build(lambda m, x: m(x).sum(), (model, x), seeded=True)
    assert "gelu" not in plain.residuals and "tanh" not in plain.residuals  # recomputed, not kept
    tight = staged.build(lambda m, x: m(x).sum(), (model, x), seeded=True, memory_budget=0)

    def kept_activations(program):  # elements of the residuals that are not inputs of the program
        return sum(n.meta["val"].numel() for n in program.backward.graph.nodes
                   if n.op == "placeholder" and n.name in program.residuals and not n.name.startswith(("m_", "x")))

    assert kept_activations(tight) < kept_activations(plain)
    for program in (plain, tight):
        results = program.forward(*program.traced.input_values((model, x)))
        grads = program.backward(*results[1:], torch.tensor(1.0, dtype=torch.float64))
        model.zero_grad()
        model(x).sum().backward()
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad)
    cm = zt.compile(copy.deepcopy(model), memory_budget=0)
    cm(x).sum().backward()
    for p, q in zip(cm.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
