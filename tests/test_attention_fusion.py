"""Hand-written attention on the CPU, staged: the backward fused into one flash kernel call
(ad.fusion), the forward too (passes.attention); values and gradients equal torch.autograd's of the
written-out ops, including rows that keep no key (NaN, as written)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt
from zygote_torch.ad import fusion
from zygote_torch.ad.registry import REGISTRY, rrule
from zygote_torch.ops import attention as fused_ops

from helpers import check_gradient, check_hvp, rand

CAUSAL = torch.ones(6, 6, dtype=torch.bool).tril()


def masked(q, k, v):
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    return att.masked_fill(~CAUSAL, float("-inf")).softmax(-1) @ v


def unmasked_div(q, k, v):
    return torch.matmul(F.softmax(torch.matmul(q, k.mT) / 3.0, dim=-1), v)


def unscaled(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=3) @ v


def qkv(dtype=torch.float64, shape=(2, 3, 6, 4)):
    return tuple(rand(*shape, dtype=dtype, seed=s) for s in range(3))


@pytest.fixture
def fused_count(monkeypatch):
    """How many attention chains the differentiation fused."""
    count = []
    make = fusion._fused_entry
    monkeypatch.setattr(fusion, "_fused_entry", lambda *a: count.append(1) or make(*a))
    return count


@pytest.mark.parametrize("f", [masked, unmasked_div, unscaled])
def test_gradients_equal_autograd(f, fused_count):
    check_gradient(f, *qkv())
    assert fused_count, "the chain was not fused"


@pytest.mark.parametrize("f", [masked, unmasked_div])
def test_staged_forward_runs_the_kernel(f):
    q, k, v = qkv()
    code = zt.code(lambda q, k, v: f(q, k, v).pow(2).sum(), q, k, v)
    assert "attention_forward" in code and "attention_backward" in code
    assert "softmax" not in code  # neither computed nor kept
    step = zt.compile(lambda q, k, v: zt.withgradient(lambda q, k, v: f(q, k, v).pow(2).sum(), q, k, v))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = f(*leaves).pow(2).sum()
    value, grads = step(q, k, v)
    torch.testing.assert_close(value, ref.detach())
    for g, r in zip(grads, torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(g, r)


def test_row_that_keeps_no_key_is_nan_as_written(fused_count):
    drop_row = CAUSAL.clone()
    drop_row[2] = False  # query 2 keeps no key: softmax of -inf throughout

    def f(q, k, v):
        att = (q @ k.transpose(-2, -1)).masked_fill(~drop_row, float("-inf")).softmax(-1)
        return att @ v

    q, k, v = qkv()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = f(*leaves).sum()
    assert torch.isnan(ref)
    refs = torch.autograd.grad(ref, leaves)
    step = zt.compile(lambda q, k, v: zt.withgradient(lambda *a: f(*a).sum(), q, k, v))
    value, grads = step(q, k, v)
    assert fused_count and "attention_forward" in step.code(q, k, v)
    assert torch.isnan(value)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, equal_nan=True)


def test_second_derivatives_through_the_fused_ops(fused_count):
    """A staged Hessian-vector product: the inner gradient's fused pullback (attention_backward)
    is differentiated by the outer one, through that op's rule."""
    def f(q, k, v):
        return masked(q, k, v).pow(2).sum()

    args = qkv(shape=(1, 2, 6, 3))
    vecs = [rand(*a.shape, seed=7 + i) for i, a in enumerate(args)]

    def inner_product(q, k, v):
        return sum((g * d).sum() for g, d in zip(zt.gradient(f, q, k, v), vecs))

    ours = zt.compile(lambda *a: zt.gradient(inner_product, *a))(*args)
    assert fused_count
    leaves = [a.clone().requires_grad_() for a in args]
    grads = torch.autograd.grad(f(*leaves), leaves, create_graph=True)
    refs = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, vecs)), leaves)
    for o, r in zip(ours, refs):
        torch.testing.assert_close(o, r)
    check_hvp(f, *args)  # the dynamic path (written-out backward) too


def test_float32_and_bfloat16_close_to_float64():
    q, k, v = qkv()
    ref = zt.gradient(lambda *a: masked(*a).pow(2).sum(), q, k, v)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        low = [t.to(dtype) for t in (q, k, v)]
        for grads in (zt.gradient(lambda *a: masked(*a).pow(2).sum(), *low),
                      zt.compile(lambda *a: zt.gradient(lambda *b: masked(*b).pow(2).sum(), *a))(*low)):
            for g, r in zip(grads, ref):
                assert g.dtype == dtype
                torch.testing.assert_close(g.double(), r, atol=tol, rtol=tol)


def test_probabilities_used_elsewhere_are_not_fused(fused_count):
    def f(q, k, v):
        att = (q @ k.transpose(-2, -1)).softmax(-1)
        return (att @ v).sum() + att.pow(2).sum()  # att has a second reader

    check_gradient(f, *qkv())
    assert not fused_count


def test_a_users_matmul_rule_turns_the_fusion_off(fused_count):
    rules = dict(REGISTRY._rules)
    try:
        @rrule(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
        def _(a, b):
            return torch.matmul(a, b), lambda dy: (zt.NoTangent(), dy @ b.mT, a.mT @ dy)

        check_gradient(masked, *qkv())
        assert not fused_count
    finally:
        REGISTRY._rules = rules
        REGISTRY.version += 1


def test_module_with_hand_written_attention_trains_like_eager():
    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24, dtype=torch.float64)
            self.register_buffer("mask", CAUSAL, persistent=False)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.reshape(B, T, 2, 4).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
            att = (q @ k.transpose(-2, -1)) * 0.5
            y = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1) @ v
            return y.transpose(1, 2).reshape(B, T, C)

    model = SelfAttention()
    x = rand(3, 6, 8, seed=4)
    ps = zt.Params(model)
    step = zt.compile(lambda x: zt.gradient(lambda: model(x).pow(2).sum(), ps))
    gs = step(x)
    model(x).pow(2).sum().backward()
    for p in model.parameters():
        torch.testing.assert_close(gs[p], p.grad)
    assert "attention_forward" in step.code(x)


def test_applies_only_to_what_the_kernel_takes():
    q, k, v = qkv(dtype=torch.float32)
    kt = k.transpose(-2, -1)
    assert fused_ops.applies(q, kt, v, ~CAUSAL)
    assert fused_ops.applies(q, kt, v, None)
    assert not fused_ops.applies(q[0], kt[0], v[0], None)  # 3-d
    assert not fused_ops.applies(q, kt, v, torch.zeros(6, 6))  # a float mask
    assert not fused_ops.applies(q, kt, v[..., :3], None)  # another value head size
    assert not fused_ops.applies(q.to(torch.float16), kt.to(torch.float16), v.to(torch.float16), None)
