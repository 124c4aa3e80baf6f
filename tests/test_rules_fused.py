"""The rules' use of the fused kernels (zygote_torch.ops): forced on the CPU here, the same wiring
the rules take on CUDA. Gradients and Hessians against torch.autograd."""
import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt
import zygote_torch.ops.kernel_choice as fused
from helpers import check_gradient, rand


@pytest.fixture(autouse=True)
def kernels_on_cpu(monkeypatch):
    if not zt.ops.available()["cpu"]:
        pytest.fail("the CPU extension did not build: `pip install --no-build-isolation -e .` prints why")
    monkeypatch.setattr(fused, "USE_KERNELS_ON_CPU", True)


CASES = {
    "cross_entropy": (lambda x: F.cross_entropy(x, torch.tensor([0, 3, -100, 6, 3])), (5, 7)),
    "cross_entropy_sum": (lambda x: F.cross_entropy(x, torch.tensor([1, 2, 0]), reduction="sum"), (3, 4)),
    "cross_entropy_none": (lambda x: F.cross_entropy(x, torch.tensor([1, 2, 0]), reduction="none"), (3, 4)),
    "softmax": (lambda x: x.softmax(-1), (3, 5)),
    "softmax_dim0": (lambda x: torch.softmax(x, 0), (3, 5)),
    "log_softmax": (lambda x: F.log_softmax(x, dim=1), (3, 5)),
    "gelu": (lambda x: F.gelu(x), (4, 6)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), (4, 6)),
    "layer_norm": (lambda x: F.layer_norm(x, (6,), torch.linspace(0.5, 1.5, 6, dtype=torch.float64),
                                          torch.linspace(-1, 1, 6, dtype=torch.float64)), (4, 6)),
    "layer_norm_2d": (lambda x: F.layer_norm(x, (3, 2)), (4, 3, 2)),
    "silu": (lambda x: F.silu(x), (4, 6)),
    "rms_norm": (lambda x: F.rms_norm(x, (6,), torch.linspace(0.5, 1.5, 6, dtype=torch.float64), 1e-5), (4, 6)),
    "rms_norm_no_weight": (lambda x: F.rms_norm(x, (3, 2)), (4, 3, 2)),
}

IDS = torch.tensor([[1, 4, 0], [4, 4, 2]])
EMBEDDING = {  # name: (function of the weight, weight shape)
    "embedding": (lambda w: F.embedding(IDS, w), (5, 3)),
    "embedding_padding": (lambda w: F.embedding(IDS, w, padding_idx=4), (5, 3)),
    "embedding_negative_padding": (lambda w: F.embedding(IDS, w, padding_idx=-5), (5, 3)),
}


@pytest.mark.parametrize("name", sorted(EMBEDDING))
def test_embedding_backward_kernel_matches_autograd(name):
    f, shape = EMBEDDING[name]
    check_gradient(lambda w: f(w) ** 2, rand(*shape))
    w = rand(*shape).reshape(-1)
    g = lambda v: (f(v.reshape(shape)) ** 3).sum()  # noqa: E731
    torch.testing.assert_close(zt.hessian(g, w), torch.autograd.functional.hessian(g, w))
    from zygote_torch.runtime import staged
    assert "ops_embedding_backward" in staged.build(lambda w: f(w).sum(), (rand(*shape),), seeded=False).code()


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_rules_match_autograd(name):
    f, shape = CASES[name]
    check_gradient(f, rand(*shape))


@pytest.mark.parametrize("name", ["cross_entropy", "softmax", "log_softmax", "gelu", "layer_norm", "silu", "rms_norm",
                                  "rms_norm_no_weight"])
def test_second_derivatives_through_fused_kernels(name):
    f, shape = CASES[name]
    x = rand(*shape).reshape(-1)
    g = lambda v: (f(v.reshape(shape)) ** 2).sum()  # noqa: E731
    torch.testing.assert_close(zt.hessian(g, x), torch.autograd.functional.hessian(g, x))


def test_the_kernels_are_what_ran():
    x = rand(5, 7)
    from zygote_torch.runtime import staged
    code = staged.build(CASES["cross_entropy"][0], (x,), seeded=False).code()
    assert "ops_cross_entropy_forward" in code and "ops_cross_entropy_backward" in code
    for name, op in (("silu", "ops_silu_backward"), ("rms_norm", "ops_rms_norm_backward"),
                     ("gelu", "ops_gelu_backward"), ("layer_norm", "ops_layer_norm_backward")):
        f, shape = CASES[name]
        assert op in staged.build(lambda x: f(x).sum(), (rand(*shape),), seeded=False).code(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,cols", [(5, 7), (1024, 128)])
def test_cpu_dispatch_follows_the_measured_table(monkeypatch, dtype, rows, cols):
    """Without the override, each rule takes our kernel on the CPU where fused.CPU_KERNELS lists
    the op and dtype (for the instruction set of the loaded kernels) and the problem is at least
    fused.CPU_MIN_NUMEL elements, torch's kernel otherwise."""
    monkeypatch.setattr(fused, "USE_KERNELS_ON_CPU", None)
    from zygote_torch.runtime import staged
    table = fused.CPU_KERNELS.get(fused.cpu_capability(), {})
    t = torch.randint(0, cols, (rows,))
    t[2] = -100
    cases = {  # op: (function, the name of our op in the staged code)
        "cross_entropy": (lambda x: F.cross_entropy(x, t), "ops_cross_entropy_backward"),
        "softmax": (lambda x: x.softmax(-1).sum(), "ops_softmax_backward"),
        "log_softmax": (lambda x: F.log_softmax(x, 1).sum(), "ops_log_softmax_backward"),
        "gelu": (lambda x: F.gelu(x).sum(), "ops_gelu_backward"),
        "layer_norm": (lambda x: F.layer_norm(x, (cols,)).sum(), "ops_layer_norm_backward"),
    }
    x = torch.randn(rows, cols, dtype=dtype)
    for op, (f, name) in cases.items():
        code = staged.build(f, (x,), seeded=False).code()
        expected = dtype in table.get(op, ()) and x.numel() >= fused.CPU_MIN_NUMEL.get(op, 0)
        assert (name in code) == expected, (op, dtype)
    monkeypatch.setattr(fused, "USE_KERNELS_ON_CPU", False)
    assert not any(name in staged.build(f, (x,), seeded=False).code() for f, name in cases.values())


def test_a_changed_kernel_choice_recompiles(monkeypatch):
    """A staged program is guarded on ops.kernel_choice_key(): after the kernels are forced off, the
    next call traces again (now with torch's GELU backward) and gives torch.autograd's gradient; with
    the setting back, the first program serves again."""
    loss = lambda x: (F.gelu(F.layer_norm(x, (6,))) ** 2).sum()  # noqa: E731
    step = zt.compile(lambda x: zt.gradient(loss, x))
    x = rand(4, 6)
    xr = x.clone().requires_grad_()
    expected = torch.autograd.grad(loss(xr), xr)[0]
    on = zt.ops.kernel_choice_key()
    torch.testing.assert_close(step(x)[0], expected)
    assert len(step.cache) == 1
    monkeypatch.setattr(fused, "USE_KERNELS_ON_CPU", False)
    assert zt.ops.kernel_choice_key() != on and hash(zt.ops.kernel_choice_key()) is not None
    torch.testing.assert_close(step(x)[0], expected)
    assert len(step.cache) == 2
    monkeypatch.setattr(fused, "USE_KERNELS_ON_CPU", True)
    torch.testing.assert_close(step(x)[0], expected)
    assert len(step.cache) == 2
