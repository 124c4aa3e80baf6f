"""The dynamic path's replay (zygote_torch/runtime/replay.py): a repeated trace's backward is
generated once and reused while every call matches it; at the first difference the call goes on as a
tape would. Every test compares with torch.autograd (float64) at every call, including the calls
after the program was built and the ones that diverge from it."""
import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt
from zygote_torch.runtime import replay


@pytest.fixture(autouse=True, params=["C++ recorder", "Python recorder"])
def fresh_sites(request):
    """Every test twice: with the recorder's C++ __torch_function__ (csrc/replay.cpp, where the
    extension is loaded) and with its Python method alone, which the C++ one must agree with."""
    replay.reset()
    replay._native()
    kept = list(replay._NATIVE)
    if request.param == "Python recorder":
        replay._NATIVE[:] = [None]
    yield
    replay._NATIVE[:] = kept
    replay.reset()


def test_the_compiled_extension_brings_the_cpp_recorder(request):
    from zygote_torch.ops import _loader

    if request.node.callspec.params["fresh_sites"] != "C++ recorder":
        return  # (the fixture's other half runs without it)
    assert _loader.LOADED["cpu"], "the test environment is built with the compiled extension (make install)"
    native = replay._native()
    assert native is not None and native.__name__ == _loader.MODULE
    recorder = replay.ReplayRecorder(replay.Replay(_a_program()), None)
    assert recorder.__dict__["__torch_function__"].__self__ is recorder
    with recorder:
        pass
    assert "__torch_function__" not in recorder.__dict__  # no cycle left behind


def _a_program():
    x = torch.randn(3, dtype=torch.float64)
    f = lambda x: (x.sin() * 2).sum()  # noqa: E731
    for _ in range(2):
        zt.gradient(f, x)
    (site,) = [s for s in replay._sites.values() if s.program is not None]
    return site.program


def autograd_gradient(f, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    return torch.autograd.grad(f(*xs), xs, allow_unused=True)


def assert_same(ours, ref):
    assert len(ours) == len(ref)
    for g, r in zip(ours, ref):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-9)


def test_a_training_loop_replays_with_the_current_parameters(float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    ps = zt.Params(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(8):
        x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
        gs = zt.gradient(lambda: F.cross_entropy(model(x), y), ps)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            torch.testing.assert_close(gs[p], p.grad, atol=1e-12, rtol=1e-10)
        opt.step()  # the next step's program reads the parameters' new values
    assert replay.stats()["built"] == 1
    assert replay.stats()["replayed"] == 6


def test_explicit_arguments_replay_with_new_values(float64):
    def f(x, w):
        return (torch.tanh(x @ w) ** 2).sum() + w.exp().mean()

    for _ in range(5):
        x, w = torch.randn(4, 3), torch.randn(3, 2)
        assert_same(zt.gradient(f, x, w), autograd_gradient(f, x, w))
    assert replay.stats()["replayed"] == 3


def test_a_branch_taken_otherwise_diverges_and_stays_right(float64):
    def f(x):
        h = torch.tanh(x)
        if h.sum() > 0:
            return (h * 2.0).sum()
        return (h * h.exp()).sum()

    positive, negative = torch.rand(5) + 0.1, -torch.rand(5) - 0.1
    for x in [positive, positive, positive, negative, positive, negative]:
        assert_same(zt.gradient(f, x), autograd_gradient(f, x))
    assert replay.stats()["diverged"] >= 1


def test_a_new_number_or_shape_diverges(float64):
    def f(x, scale):
        return (x.sin() * scale).sum()

    calls = [(3, 2.0), (3, 2.0), (3, 2.0), (3, 3.0), (3, 3.0), (3, 3.0), (3, 3.0), (4, 3.0)]
    for n, scale in calls:
        x = torch.randn(n)
        (g,) = zt.gradient(f, x, scale=scale)
        torch.testing.assert_close(g, x.cos() * scale)
    assert replay.stats()["diverged"] == 2


def test_outputs_the_user_holds_keep_their_gradient_after_a_divergence(float64):
    kept = []

    def f(x, late):
        h = x.sin() * 1.5
        kept.append(h)
        u = h * 3.0
        if late:  # diverges after two replayed calls; h and u are used again afterwards
            h.mul_(2.0)  # an in-place update of a value the replayed calls made
            return (u * h).sum() + u.exp().sum()
        return u.sum()

    x = torch.randn(4)
    for late in [False, False, False, True, True]:
        (g,) = zt.gradient(lambda x: f(x, late), x)
        (ref,) = autograd_gradient(lambda x: f(x, late), x)
        torch.testing.assert_close(g, ref)
    assert replay.stats()["diverged"] >= 1


def test_torch_no_grad_appearing_later_is_honoured(float64):
    def f(x, frozen):
        h = x.sin()
        if frozen:
            with torch.no_grad():
                h = h * 2.0
        else:
            h = h * 2.0
        return (h * x).sum()

    x = torch.randn(3)
    for frozen in [False, False, False, True]:
        (g,) = zt.gradient(lambda x: f(x, frozen), x)
        (ref,) = autograd_gradient(lambda x: f(x, frozen), x)
        torch.testing.assert_close(g, ref)


def test_a_constant_written_after_its_use_keeps_its_old_value(float64):
    c = torch.ones(3)

    def f(x):
        y = (x * c).sum()
        c.add_(1.0)  # the backward reads c as it was at the multiplication, as the tape gives it
        return y

    x = torch.randn(3)
    for _ in range(6):
        before = c.clone()
        (g,) = zt.gradient(f, x)
        torch.testing.assert_close(g, before)


def test_a_hook_or_a_new_rule_after_the_program_is_built_applies(float64):
    w = torch.randn(3)

    def f(x):
        return (torch.sin(x) * w).sum()

    x = torch.randn(3)
    for _ in range(3):
        zt.gradient(f, x)
    assert replay.stats()["replayed"] == 1

    def unrelated(t):
        return t * 2

    zt.rrule(unrelated)(lambda t: (t * 2, lambda dy: (zt.NoTangent(), 2 * dy)))  # the rules changed
    (g,) = zt.gradient(f, x)
    torch.testing.assert_close(g, x.cos() * w)
    assert replay.stats()["diverged"] == 1
    x = x.clone().requires_grad_(True)
    handle = x.register_hook(lambda g: 2 * g)  # a hook on an input applies to its gradient
    try:
        for _ in range(3):
            (g,) = zt.gradient(f, x)
            torch.testing.assert_close(g, 2 * x.cos() * w)
    finally:
        handle.remove()


def test_dropout_in_training_is_not_replayed_and_stays_right(float64):
    torch.manual_seed(0)
    x = torch.randn(6, 4)

    def f(x):
        return (F.dropout(x, p=0.5, training=True) * x).sum()

    for seed in range(5):
        torch.manual_seed(seed)
        (g,) = zt.gradient(f, x)
        torch.manual_seed(seed)
        (ref,) = autograd_gradient(f, x)
        torch.testing.assert_close(g, ref)
    assert replay.stats().get("replayed", 0) == 0


def test_withgradient_and_has_aux_replay(float64):
    def f(x):
        y = (x ** 3).sum()
        return y, {"y": y.detach()}

    x = torch.randn(4)
    for _ in range(4):
        (value, aux), (g,) = zt.withgradient(f, x)
        torch.testing.assert_close(g, 3 * x ** 2)
        torch.testing.assert_close(value, (x ** 3).sum())
        grads, aux = zt.gradient(f, x, has_aux=True)
        torch.testing.assert_close(grads[0], 3 * x ** 2)
    assert replay.stats()["replayed"] >= 2


def test_a_replayed_gradient_stays_connected_to_an_outer_graph(float64):
    def f(x):
        return (x.sin() * x).sum()

    for _ in range(4):
        x = torch.randn(3, requires_grad=True)
        (g,) = zt.gradient(f, x)
        (g.square().sum()).backward()
        x2 = x.detach().requires_grad_(True)
        (r,) = torch.autograd.grad(f(x2), x2, create_graph=True)
        (ref,) = torch.autograd.grad(r.square().sum(), x2)
        torch.testing.assert_close(x.grad, ref)
    assert replay.stats()["replayed"] >= 1


def test_a_site_whose_traces_keep_differing_is_left_to_the_tape(float64):
    def f(x):
        return x.sum() * x.numel()  # the number differs with every shape

    for n in range(1, 12):
        x = torch.randn(n)
        (g,) = zt.gradient(f, x)
        torch.testing.assert_close(g, torch.full((n,), float(n)))
    assert replay.stats().get("built", 0) == 0


def test_the_replay_can_be_turned_off(float64, monkeypatch):
    monkeypatch.setattr(replay, "ENABLED", False)
    x = torch.randn(3)
    for _ in range(4):
        zt.gradient(lambda x: x.exp().sum(), x)
    assert replay.stats() == {}


def test_a_hugging_face_model_replays_with_eager_gradients():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    ps = zt.Params(model)
    for _ in range(4):
        gs = zt.gradient(lambda: model(input_ids=ids, labels=ids).loss, ps)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            torch.testing.assert_close(gs[p], p.grad, atol=1e-6, rtol=1e-4)
        ids = torch.randint(0, 64, (2, 8))
    assert replay.stats()["replayed"] == 2


def test_an_in_place_update_of_an_integer_constant_replays(float64):
    """``counter.add_(1)`` on a buffer (BatchNorm's num_batches_tracked): an in-place call on a
    constant, with a number argument. The trace once took the number for a tracked value and left
    the site to the tape; it replays, and the counter advances at every call, as eagerly."""
    counter = torch.zeros((), dtype=torch.long)

    def f(x):
        counter.add_(1)
        return (x.sin() * x).sum()

    for n in range(1, 6):
        x = torch.randn(7)
        assert_same(zt.gradient(f, x), autograd_gradient(lambda x: (x.sin() * x).sum(), x))
        assert counter.item() == n
    assert replay.stats()["replayed"] == 3


def test_the_replayed_backward_frees_each_residual_after_its_last_use(float64):
    """The program takes its residuals boxed: the list it is given is empty once it has read it, so
    what the backward no longer needs is freed as it runs, as torch.autograd frees saved tensors."""
    def f(x):
        return torch.tanh(torch.tanh(x) * 2.0).sum()

    for _ in range(3):
        zt.gradient(f, torch.randn(5))
    program = next(s.program for s in replay._sites.values() if s.program is not None)
    values = [torch.randn(5) for _ in range(program.n_slots)] + [torch.ones(())]
    program.run(values)
    assert values == []


def test_replayed_attention_written_out_keeps_its_forward(float64):
    """Staged tapes fuse ``q @ k^T``, mask, softmax, ``@ v`` into one flash-attention backward, which
    reads the kernel's own forward results. A replayed trace's forward has run as written, so that
    fusion made its program compute the attention forward a second time in the backward (GPT step
    1.10x eager's, 1.04x without); its program differentiates the written-out calls."""
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)

    def f(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.5
        p = s.masked_fill(mask, float("-inf")).softmax(-1)
        return ((p @ v) ** 2).sum()

    for _ in range(4):
        q, k, v = (torch.randn(2, 3, 6, 4) for _ in range(3))  # (batch, heads, T, head size)
        assert_same(zt.gradient(f, q, k, v), autograd_gradient(f, q, k, v))
    assert replay.stats()["replayed"] == 2
    program = next(s.program for s in replay._sites.values() if s.program is not None)
    assert "attention" not in program.module.code


def test_one_helper_for_two_models_replays_each(float64):
    """The site of ``zt.gradient`` in a helper called for two models in turn (a GAN's two steps, or
    the benchmark's workloads in one process) was one site whose trace changed at every call: after
    a few misses it stayed on the tape. The Params and the modules ``f`` reaches tell sites apart."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)),
              torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))]
    params = [zt.Params(m) for m in models]

    def step(model, ps, x):
        return zt.gradient(lambda: (model(x) ** 2).mean(), ps)

    for _ in range(5):
        for model, ps in zip(models, params):
            x = torch.randn(6, 4)
            gs = step(model, ps, x)
            model.zero_grad()
            (model(x) ** 2).mean().backward()
            for p in model.parameters():
                torch.testing.assert_close(gs[p], p.grad, atol=1e-12, rtol=1e-10)
    assert replay.stats()["built"] == 2
    assert replay.stats()["replayed"] == 6


def test_the_one_pass_argument_check_agrees_with_the_signature():
    """``matches`` (the replay's check) and ``signature`` (what the trace recorded) are two readings
    of one description of a call's arguments: for every pair of argument lists below, ``matches(b,
    signature(a))`` is ``signature(b) == signature(a)``, and it collects the same constants."""
    from zygote_torch.ad.tape import Tape
    tape = Tape(staged=False)
    w, v = torch.randn(3, 2), torch.randn(3)
    tape.track_input(w)
    tape.track_input(v)
    c, c2 = torch.randn(3, 2), torch.randn(2, 3).t()  # constants: same shape, other strides
    calls = [(w, 2.0), (w, 2), (w, True), (v, 2.0), (c, 2.0), (c2, 2.0), (w, c), (w, None), (w, "mean"),
             (w, torch.Size([3, 2])), (w, (3, 2)), (w, [3, 2]), (w, (c, 1)), (w, (v, 1)), (w, torch.float32),
             (w, torch.float64), (w, slice(0, 2)), (w,), (w, 2.0, 1)]
    for a in calls:
        sig = replay.signature(a, tape.tracked, [])
        for b in calls:
            consts, expected = [], []
            same = replay.signature(b, tape.tracked, expected) == sig
            assert replay.matches(b, sig, tape.tracked, consts) is same, (a, b)
            if same:
                assert len(consts) == len(expected) and all(x is y for x, y in zip(consts, expected))
