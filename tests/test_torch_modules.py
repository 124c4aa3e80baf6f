"""torch's own modules whose forward takes paths the tape must not miss: nn.MultiheadAttention and
the Transformer layers (masks, need_weights both ways, train and eval), parametrizations
(weight_norm, spectral_norm in training, orthogonal), TorchScript, and the fallback's call shapes
(outputs with None, non-tensor or empty items, inputs returned, attribute reads). Each against
torch.autograd in float64, dynamically and staged (zt.gradient inside zt.compile, and
zt.compile(module) in an ordinary training step)."""
import copy

import pytest
import torch
import torch.nn as nn

import zygote_torch as zt
from helpers import check_gradient, rand
from zygote_torch.ad.fallback import fallback_rule
from zygote_torch.runtime.staged import _gradients_per_argument, build

torch.manual_seed(0)
E, HEADS, L, S, N = 8, 2, 5, 4, 2


def module_grads(module, loss):
    """torch.autograd's gradients of ``loss(module)`` with respect to the module's parameters."""
    params = list(module.parameters())
    return torch.autograd.grad(loss(module), params, allow_unused=True)


def assert_close_grads(ours, ref, what):
    for i, (o, r) in enumerate(zip(ours, ref)):
        if r is None:
            assert o is None or torch.count_nonzero(o) == 0, f"{what}: parameter {i}"
        else:
            torch.testing.assert_close(o, r, msg=lambda m: f"{what}: parameter {i}: {m}")


def staged_program_grads(program, m) -> list:
    """The gradients with respect to ``m``'s parameters by ``program``, the staged program of a
    loss of ``m`` (the generated forward and backward, run as they are)."""
    with torch.no_grad():  # as zt.compile runs them
        results = program.forward(*program.traced.input_values((m,)))
        (by_name,) = _gradients_per_argument(program, (m,), program.backward(*results[program.n_outputs:]))
    return [None if by_name is None else by_name[name] for name, _ in m.named_parameters()]


def check_module(module, loss, staged=True, compiled_module=None, seed=0):
    """zt.gradient with implicit Params (dynamic, and inside zt.compile) and the staged program of
    ``loss`` equal torch.autograd for ``loss(module)``; ``compiled_module(cm)``, when given, is a
    loss of zt.compile(module) whose .backward() must give the same parameter gradients. Modules
    that change state in the forward (spectral_norm's power iteration) start each run from the
    same copy, and every run from random seed ``seed`` (dropout draws the same masks)."""
    fresh = copy.deepcopy(module)
    torch.manual_seed(seed)
    ref = module_grads(copy.deepcopy(fresh), loss)
    m = copy.deepcopy(fresh)
    ps = zt.Params(list(m.parameters()))
    torch.manual_seed(seed)
    gs = zt.gradient(lambda: loss(m), ps)
    assert_close_grads([gs[p] for p in ps], ref, "dynamic")
    if staged:
        m = copy.deepcopy(fresh)
        program = build(lambda mod: loss(mod), (m,), seeded=False)
        torch.manual_seed(seed)
        assert_close_grads(staged_program_grads(program, m), ref, "staged program")
        m = copy.deepcopy(fresh)
        ps = zt.Params(list(m.parameters()))
        step = zt.compile(lambda: zt.gradient(lambda: loss(m), ps))
        torch.manual_seed(seed)
        gs = step()
        assert_close_grads([gs[p] for p in ps], ref, "zt.gradient inside zt.compile")
    if compiled_module is not None:
        m = copy.deepcopy(fresh)
        cm = zt.compile(m)
        torch.manual_seed(seed)
        compiled_module(cm).backward()
        assert_close_grads([p.grad for p in m.parameters()], ref, "zt.compile(module)")


# -- attention and transformer layers --------------------------------------------------------------
def _inputs(batch_first=True):
    shape = (N, L, E) if batch_first else (L, N, E)
    kv = (N, S, E) if batch_first else (S, N, E)
    return rand(*shape, seed=1), rand(*kv, seed=2), rand(*kv, seed=3)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_multihead_attention_with_masks(need_weights, training):
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True, dtype=torch.float64).train(training)
    q, k, v = _inputs()
    padding = torch.tensor([[False, False, True, False], [False, False, False, True]])
    causal = torch.rand(L, S, generator=torch.Generator().manual_seed(4)) * -1.0  # a float mask

    def loss(m):
        out, weights = m(q, k, v, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
        return out.pow(2).sum() + (weights.pow(2).sum() if need_weights else 0)

    check_module(mha, loss, compiled_module=lambda cm: loss(cm))


def test_multihead_attention_sequence_first_other_kv_dims_unaveraged_weights():
    mha = nn.MultiheadAttention(E, HEADS, kdim=3, vdim=5, dtype=torch.float64)
    q, k, v = rand(L, N, E), rand(S, N, 3, seed=5), rand(S, N, 5, seed=6)
    mask = torch.triu(torch.ones(L, S, dtype=torch.bool), 1)

    def loss(m):
        out, weights = m(q, k, v, attn_mask=mask, average_attn_weights=False)
        return out.sum() + (weights * torch.arange(S, dtype=torch.float64)).sum()

    check_module(mha, loss)


def test_multihead_attention_gradient_with_respect_to_its_inputs():
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True, dtype=torch.float64).eval()
    check_gradient(lambda q, k: mha(q, k, k)[0], *_inputs()[:2], allow_fallback=True)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_transformer_encoder_layer(norm_first, training):
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True, norm_first=norm_first,
                                       activation="gelu", dtype=torch.float64).train(training)
    x = _inputs()[0]
    padding = torch.tensor([[False] * (L - 1) + [True], [False] * L])
    loss = lambda m: m(x, src_key_padding_mask=padding).pow(2).sum()  # noqa: E731
    check_module(layer, loss, compiled_module=lambda cm: loss(cm))


def test_transformer_encoder_stack_and_decoder_layer_with_causal_masks():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, dtype=torch.float64),
                                num_layers=2, enable_nested_tensor=False)
    dec = nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0, dtype=torch.float64)
    model = nn.ModuleDict({"enc": enc, "dec": dec})
    src, tgt = rand(S, N, E, seed=7), rand(L, N, E, seed=8)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)

    def loss(m):
        memory = m["enc"](src, is_causal=False)
        return m["dec"](tgt, memory, tgt_mask=tgt_mask, tgt_is_causal=True).sum()

    check_module(model, loss)


def test_eval_mode_inference_matches_torchs_fast_path():
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, batch_first=True, dtype=torch.float64).eval()
    x = _inputs()[0]
    with torch.no_grad():  # torch takes its fused fast path here
        expected = layer(x)
    torch.testing.assert_close(zt.compile(layer)(x), expected)


@pytest.mark.parametrize("training", [True, False])
def test_dropout_inside_attention_draws_the_same_mask_when_recomputed(training):
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.3, batch_first=True,  # MHA's own dropout too
                                       dtype=torch.float64).train(training)
    x = _inputs()[0]
    loss = lambda m: m(x).pow(2).sum()  # noqa: E731
    check_module(layer, loss, compiled_module=lambda cm: loss(cm), seed=5)


# -- parametrizations -------------------------------------------------------------------------------
def test_weight_norm_parametrization():
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(5, 3, dtype=torch.float64))
    x = rand(4, 5)
    loss = lambda m: m(x).tanh().sum()  # noqa: E731
    check_module(lin, loss, compiled_module=lambda cm: loss(cm))


def test_spectral_norm_in_training_updates_its_vectors_as_torch():
    lin = nn.utils.parametrizations.spectral_norm(nn.Linear(5, 3, dtype=torch.float64), n_power_iterations=2).train()
    x = rand(4, 5)
    loss = lambda m: m(x).pow(2).sum()  # noqa: E731
    check_module(lin, loss)
    ours, ref = copy.deepcopy(lin), copy.deepcopy(lin)
    zt.gradient(lambda: loss(ours), zt.Params(list(ours.parameters())))
    loss(ref)
    for (name, a), b in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=lambda m: f"buffer {name}: {m}")


@pytest.mark.parametrize("kind", ["matrix_exp", "cayley", "householder"])
def test_orthogonal_parametrization(kind):
    lin = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4, dtype=torch.float64), orthogonal_map=kind)
    x = rand(3, 4)
    check_module(lin, lambda m: (m(x) * torch.arange(4, dtype=torch.float64)).sum())


# -- TorchScript ------------------------------------------------------------------------------------
@torch.jit.script
def scripted_gelu_mul(x, w):
    return torch.nn.functional.gelu(x) * w


class WithScripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double())
        self.head = nn.Linear(3, 2, dtype=torch.float64)
        self.w = nn.Parameter(rand(3, seed=9))

    def forward(self, x):
        return self.head(scripted_gelu_mul(self.inner(x), self.w))


def test_scripted_submodule_and_function_parameters_get_their_gradients():
    model, x = WithScripted(), rand(2, 4)
    loss = lambda m: m(x).pow(2).sum()  # noqa: E731
    check_module(model, loss)
    used = zt.fallbacks(lambda: loss(model), zt.Params(list(model.parameters())))
    assert any("script_method" in u for u in used) and any("script_function" in u for u in used)


def test_a_scripted_modules_other_methods():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=torch.float64)

        def forward(self, x):
            return self.lin(x)

        @torch.jit.export
        def twice(self, x):
            return self.lin(self.lin(x)).tanh()

    model, x = torch.jit.script(Twice()), rand(2, 3)
    check_module(model, lambda m: m.twice(x).sum() + m.forward(x).sum())


def test_traced_module():
    traced = torch.jit.trace(nn.Linear(4, 3, dtype=torch.float64), rand(2, 4))
    x = rand(2, 4, seed=10)
    check_module(traced, lambda m: m(x).exp().sum())


# -- the fallback's call shapes ---------------------------------------------------------------------
def every_kind_of_output(x, y):
    """A call returning every kind of output item: a new tensor, None, a number, an empty tuple, a
    list holding a tensor and an integer tensor, an argument itself, a constant."""
    return (x * y, None, 3, (), [x.sin().sum(), torch.arange(2)], y, CONSTANT)


CONSTANT = torch.ones(2, dtype=torch.float64)


@pytest.mark.parametrize("staged", [False, True])
def test_fallback_handles_every_output_shape(staged):
    x, y = rand(3), rand(3, seed=2)
    out, pullback = fallback_rule(every_kind_of_output, (x, y), {}, staged=staged)
    new, none, three, empty, (s, idx), y_again, constant = out
    assert none is None and three == 3 and empty == () and idx.dtype == torch.int64
    assert y_again is y and constant is CONSTANT  # the caller's own tensors, not copies or stand-ins
    dy = (rand(3, seed=3), None, None, (), [torch.tensor(2.0, dtype=torch.float64), None], rand(3, seed=4), None)
    _, dx, dyy = pullback(dy)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    ref = every_kind_of_output(xs, ys)
    loss = (ref[0] * dy[0]).sum() + ref[4][0] * dy[4][0] + (ref[5] * dy[5]).sum()
    rx, ry = torch.autograd.grad(loss, (xs, ys))
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dyy, ry)


def test_fallback_of_a_call_nothing_differentiable_comes_out_of():
    x = rand(3)
    out, pullback = fallback_rule(lambda t: (t.argmax(), None, t.shape), (x,), {}, staged=False)
    assert out[1] is None and out[2] == (3,)
    assert all(zt.NoTangent() == g or g is None for g in pullback((None, None, None)))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # torch's, reading h.grad
def test_attribute_reads_are_their_values():
    def f(x):
        h = x * 2
        v = h[1]
        assert v._base is h and h.grad is None and h.is_nested is False
        assert h.data.data_ptr() == h.data_ptr()
        return h * h.data + v._base.sin() * 3 + h.T

    check_gradient(f, rand(3, 3), staged_too=False)
