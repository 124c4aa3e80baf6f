"""Rule of zygote_torch/rules/attention.py (F.scaled_dot_product_attention) against torch.autograd
(float64), finite differences and second derivatives through the rules."""
import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt
import zygote_torch.rules.attention  # noqa: F401
from zygote_torch.runtime import staged
from helpers import check_gradient, check_hvp, gradcheck, noncontiguous, rand

sdpa = F.scaled_dot_product_attention


Q, K, V = rand(2, 3, 5, 4), rand(2, 3, 6, 4, seed=1), rand(2, 3, 6, 7, seed=2)
BOOL_MASK = torch.rand(5, 6, generator=torch.Generator().manual_seed(0)) > 0.3
BOOL_MASK[2] = False  # a row attending to nothing: output and cotangents 0 there, as in torch
FLOAT_MASK = rand(2, 1, 5, 6, seed=3)
INF_MASK = torch.where(BOOL_MASK, rand(5, 6, seed=4), torch.tensor(float("-inf"), dtype=torch.float64))


@pytest.mark.parametrize("call", [
    lambda q, k, v: sdpa(q, k, v),
    lambda q, k, v: sdpa(q, k, v, is_causal=True),
    lambda q, k, v: sdpa(q, k, v, None, 0.0, True),
    lambda q, k, v: sdpa(q, k, v, scale=0.3),
    lambda q, k, v: sdpa(query=q, key=k, value=v, attn_mask=BOOL_MASK, scale=1.7),
    lambda q, k, v: sdpa(q, k, v, BOOL_MASK),
    lambda q, k, v: sdpa(q, k, v, BOOL_MASK[None, None].expand(2, 3, 5, 6)),
    lambda q, k, v: sdpa(q, k, v, INF_MASK),
    lambda q, k, v: sdpa(q[:, :, :4], k[:, :, :4], v[:, :, :4], is_causal=True),  # square
    lambda q, k, v: sdpa(q, k[:, :, :3], v[:, :, :3], is_causal=True),  # L > S
    lambda q, k, v: torch._C._nn.scaled_dot_product_attention(q, k, v),
    lambda q, k, v: sdpa(q[:1], k, v),  # broadcast batch dims
    lambda q, k, v: sdpa(q, k[:, :1], v),
    lambda q, k, v: sdpa(q[0, 0], k[0, 0], v[0, 0]),  # 2-d
    lambda q, k, v: sdpa(q[0], k[0], v[0], is_causal=True),  # 3-d
])
def test_sdpa(call):
    check_gradient(call, Q, K, V)


@pytest.mark.parametrize("mask", [FLOAT_MASK, rand(5, 6, seed=5), rand(3, 1, 6, seed=6), INF_MASK])
def test_sdpa_float_mask_is_differentiated(mask):
    check_gradient(lambda q, k, v, m: sdpa(q, k, v, m), Q, K, V, mask)
    check_gradient(lambda q, k, v, m: sdpa(q, k, v, attn_mask=m, scale=0.5), Q, K, V, mask)


@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 1), (3, 3)])
def test_sdpa_gqa(hq, hk):
    q, k, v = rand(2, hq, 5, 4), rand(2, hk, 6, 4, seed=1), rand(2, hk, 6, 3, seed=2)
    check_gradient(lambda q, k, v: sdpa(q, k, v, enable_gqa=True), q, k, v)
    check_gradient(lambda q, k, v: sdpa(q, k, v, BOOL_MASK, enable_gqa=True, scale=0.4), q, k, v)
    check_gradient(lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True), q, k, v)


def test_sdpa_noncontiguous():
    q, k, v = (rand(2, 5, 3, 4).transpose(1, 2), rand(2, 6, 3, 4, seed=1).transpose(1, 2),
               rand(2, 6, 3, 7, seed=2).transpose(1, 2))  # (B, L, H, E) read as (B, H, L, E)
    check_gradient(lambda q, k, v: sdpa(q, k, v, is_causal=True), q, k, v)
    check_gradient(lambda q, k, v, m: sdpa(q, k, v, m), noncontiguous(Q), noncontiguous(K), noncontiguous(V),
                   noncontiguous(FLOAT_MASK))


def test_sdpa_empty():
    check_gradient(lambda q, k, v: sdpa(q, k, v), rand(2, 3, 0, 4), K, V)  # no queries
    check_gradient(lambda q, k, v: sdpa(q, k, v), Q, rand(2, 3, 0, 4), rand(2, 3, 0, 7))  # no keys: zeros
    check_gradient(lambda q, k, v: sdpa(q, k, v), rand(0, 3, 5, 4), rand(0, 3, 6, 4), rand(0, 3, 6, 7))


def test_sdpa_causal_with_mask_is_refused():
    with pytest.raises(RuntimeError, match="attn_mask"):
        zt.gradient(lambda q: sdpa(q, K, V, BOOL_MASK, is_causal=True).sum(), Q)


def test_sdpa_gradcheck():
    q, k, v = rand(1, 2, 3, 4), rand(1, 2, 4, 4, seed=1), rand(1, 2, 4, 2, seed=2)
    gradcheck(lambda q, k, v: sdpa(q, k, v), q, k, v)
    gradcheck(lambda q, k, v: sdpa(q, k, v, is_causal=True, scale=0.7), q, k, v)
    gradcheck(lambda q, k, v, m: sdpa(q, k, v, m), q, k, v, rand(3, 4, seed=3))
    gradcheck(lambda q, k, v: sdpa(q, k[:, :1], v[:, :1], enable_gqa=True), q, k, v)


@pytest.mark.parametrize("f,args", [
    (lambda q, k, v: (sdpa(q, k, v, is_causal=True) ** 2).sum(), (Q, K, V)),
    (lambda q, k, v, m: (sdpa(q, k, v, m, scale=0.6) ** 2).sum(), (Q, K, V, rand(5, 6, seed=3))),
    (lambda q, k, v: (sdpa(q, k, v, BOOL_MASK) ** 2).sum(), (Q, K, V)),
    (lambda q, k, v: (sdpa(q, k, v, enable_gqa=True) ** 2).sum(),
     (rand(2, 4, 5, 4), rand(2, 2, 6, 4, seed=1), rand(2, 2, 6, 3, seed=2))),
])
def test_sdpa_second_order(f, args):
    check_hvp(f, *args)


# ---------------------------------------------------------------------------------------------
# dropout

@pytest.mark.parametrize("kwargs", [dict(dropout_p=0.3), dict(dropout_p=0.5, is_causal=True),
                                    dict(dropout_p=0.2, attn_mask=BOOL_MASK, scale=0.5), dict(dropout_p=1.0)])
def test_sdpa_dropout_matches_torch_under_the_same_seed(kwargs):
    """The mask is drawn from torch's stream on P's shape, as torch's math path draws it: under
    one seed, value and cotangents equal torch's."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        y, back = zt.pullback(lambda q, k, v: sdpa(q, k, v, **kwargs), Q, K, V)
        torch.manual_seed(7)
        leaves = [t.clone().requires_grad_() for t in (Q, K, V)]
        y_ref = sdpa(*leaves, **kwargs)
    torch.testing.assert_close(y, y_ref.detach())
    dy = rand(*y.shape, seed=8)
    ref = torch.autograd.grad(y_ref, leaves, dy)
    ours = back(dy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)
    for o, o2 in zip(ours, back(dy)):  # the same mask on every call of back
        assert torch.equal(o, o2)


def test_sdpa_dropout_is_random_and_scaled():
    y0 = sdpa(Q, K, V)
    ys = [zt.pullback(lambda q: sdpa(q, K, V, dropout_p=0.5), Q)[0] for _ in range(2)]
    assert not torch.equal(ys[0], ys[1]) and not torch.equal(ys[0], y0)
    mean = torch.stack([zt.pullback(lambda q: sdpa(q, K, V, dropout_p=0.5), Q)[0] for _ in range(400)]).mean(0)
    torch.testing.assert_close(mean, y0, atol=0.25, rtol=0.0)  # unbiased: E[D] = 1


def test_sdpa_dropout_staged():
    """Staged: the mask is drawn in the forward program (torch's stream) and handed to the backward."""
    call = lambda q, k, v: sdpa(q, k, v, dropout_p=0.4) * 2  # noqa: E731
    with torch.random.fork_rng():
        torch.manual_seed(3)
        y, back = staged.pullback(call, Q, K, V)
        torch.manual_seed(3)
        leaves = [t.clone().requires_grad_() for t in (Q, K, V)]
        y_ref = call(*leaves)
    torch.testing.assert_close(y, y_ref.detach())
    dy = rand(*y.shape, seed=8)
    for o, r in zip(back(dy), torch.autograd.grad(y_ref, leaves, dy)):
        torch.testing.assert_close(o, r)


def test_sdpa_dropout_gradcheck_same_mask():
    q, k, v = rand(1, 2, 3, 4), rand(1, 2, 4, 4, seed=1), rand(1, 2, 4, 2, seed=2)
    gradcheck(lambda q, k, v: sdpa(q, k, v, dropout_p=0.4), q, k, v, seed=5)
