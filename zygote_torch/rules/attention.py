"""Rule for ``F.scaled_dot_product_attention`` (``torch._C._nn.scaled_dot_product_attention``).

With ``q (..., L, E)``, ``k (..., S, E)``, ``v (..., S, Ev)``, scale ``c`` (default ``1/sqrt(E)``)::

    s = c * q k^T + mask          (bool mask: -inf where False; is_causal: -inf above the diagonal)
    P = softmax(s, -1)            (a row that is -inf throughout gives P = 0, as torch's math path)
    y = (P * D) v                 (D = Bernoulli(1 - p) / (1 - p) dropout noise, else 1)

and the pullback, recomputing ``P`` from ``q``, ``k`` and the mask instead of keeping it::

    dv = (P * D)^T dy,   dP = (dy v^T) * D,   ds = P * (dP - sum(dP * P, -1)),
    dq = c * ds k,       dk = c * ds^T q,     dmask = ds (float masks)

summed over broadcast batch dimensions, and over the query heads sharing a key/value head when
``enable_gqa`` (``k`` and ``v`` repeated ``Hq/Hk`` times along dim -3, as torch repeats them).

Without dropout the value is torch's own (fused) kernel's. With ``dropout_p > 0`` the value is
computed by the formula above, with ``D`` drawn once in the forward as
``torch.bernoulli(torch.empty_like(P), 1 - p)`` on the shape of ``P``: the draw torch's math
implementation makes, so under the same seed the mask (and the value) equal torch's; the pullback
reuses that mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ..ad.via_ad import rrule_via_ad
from ..ops import attention as fused_attention
from ._util import NoTangent, grad_like, is_zero, materialize, nondiff, reference_pullback

Tensor = torch.Tensor


def _scores(query, key, attn_mask, is_causal, scale):
    """s = scale * q k^T with the mask applied (k already repeated for GQA)."""
    s = torch.matmul(query, key.transpose(-2, -1)) * scale
    L, S = query.shape[-2], key.shape[-2]
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        s = torch.where(causal, s, torch.full((), -math.inf, dtype=s.dtype, device=s.device))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = torch.where(attn_mask, s, torch.full((), -math.inf, dtype=s.dtype, device=s.device))
        else:
            s = s + attn_mask
    return s


def _safe_softmax(s):
    """softmax over the last dim, 0 on rows that are -inf throughout (torch's _safe_softmax)."""
    p = torch.softmax(s, -1)
    dead = (s == -math.inf).all(-1, keepdim=True)
    return torch.where(dead, torch.zeros_like(p), p)


def _repeat_heads(t, r: int):
    """t.repeat_interleave(r, dim=-3), written with expand and reshape (ops with rules)."""
    if r == 1:
        return t
    shape = tuple(t.shape)
    big = shape[:-2] + (r,) + shape[-2:]
    return t.unsqueeze(-3).expand(big).reshape(shape[:-3] + (shape[-3] * r,) + shape[-2:])


def _sum_heads(g, r: int, like):
    """The cotangent of a head-repeated k or v, summed back over its r copies."""
    if r == 1:
        return g
    shape = tuple(g.shape)
    return g.reshape(shape[:-3] + (shape[-3] // r, r) + shape[-2:]).sum(-3)


@rrule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                 scale=None, enable_gqa=False):
    """y = (softmax(c q k^T + mask) * D) v;  see the module docs for the pullback (dq, dk, dv and a
    float mask's cotangent), GQA and dropout."""
    if is_causal and attn_mask is not None:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    c = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    r = query.shape[-3] // key.shape[-3] if enable_gqa and query.dim() >= 3 else 1
    if enable_gqa and r * key.shape[-3] != query.shape[-3]:
        raise RuntimeError("scaled_dot_product_attention: number of heads in key/value must divide the number "
                           "of heads in query")
    if _flash_applies(query, key, value, attn_mask, dropout_p, enable_gqa):
        return _flash_attention(query, key, value, is_causal, scale)
    k, v = _repeat_heads(key, r), _repeat_heads(value, r)
    noise = None
    if dropout_p > 0.0:
        p = _safe_softmax(_scores(query, k, attn_mask, is_causal, c))
        if dropout_p >= 1.0:
            noise = torch.zeros_like(p)
        else:
            noise = torch.bernoulli(torch.empty_like(p), 1.0 - dropout_p) * (1.0 / (1.0 - dropout_p))
        y = torch.matmul(p * noise, v)
    else:
        y = F.scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal, scale=scale,
                                           enable_gqa=enable_gqa)

    def pullback(dy):
        p = _safe_softmax(_scores(query, k, attn_mask, is_causal, c))
        pd = p * noise if noise is not None else p
        dv = torch.matmul(pd.transpose(-2, -1), dy)
        dp = torch.matmul(dy, v.transpose(-2, -1))
        if noise is not None:
            dp = dp * noise
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq = torch.matmul(ds, k) * c
        dk = torch.matmul(ds.transpose(-2, -1), query) * c
        dmask = grad_like(ds, attn_mask) if attn_mask is not None and attn_mask.is_floating_point() \
            else NoTangent()
        return (NoTangent(), grad_like(dq, query), grad_like(_sum_heads(dk, r, key), key),
                grad_like(_sum_heads(dv, r, value), value), dmask) + nondiff(2)

    return y, pullback


# -- CUDA: torch's flash-attention kernels ---------------------------------------------------------

aten = torch.ops.aten


def _flash_applies(query, key, value, attn_mask, dropout_p, enable_gqa) -> bool:
    """Whether the flash kernels compute this call: half precision on CUDA, 4-d, no mask, no
    dropout, one head size, a multiple of 8 up to 256."""
    e = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.dim() == 4
            and key.dtype == value.dtype == query.dtype and attn_mask is None and dropout_p == 0.0
            and not enable_gqa and key.shape[-1] == value.shape[-1] == e and e % 8 == 0 and e <= 256
            and query.shape[:2] == key.shape[:2] == value.shape[:2])


def _flash_attention(query, key, value, is_causal, scale):
    """y = softmax(c q k^T) v by the flash kernel, which keeps the row log-sum-exps; the pullback
    is the flash backward kernel (no probabilities kept or recomputed in memory)."""
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
        query, key, value, 0.0, is_causal, False, scale=scale)

    def pullback(dy):
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dy.contiguous(), query, key, value, out, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed,
            offset, scale=scale)
        return (NoTangent(), dq, dk, dv) + nondiff(3)

    return out, pullback


def _attention_reference(q, k, v, is_causal, scale):
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.matmul(_safe_softmax(_scores(q, k, None, is_causal, c)), v)


@rrule(aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention.default)
def flash_attention(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """The flash kernel as an op (met when differentiating a pullback): its output's cotangent goes
    through the flash backward kernel; the other outputs are statistics (refused)."""
    out = aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, return_debug_mask,
                                                   scale=scale)
    if dropout_p != 0.0:
        raise NotImplementedError("differentiating aten._scaled_dot_product_flash_attention with dropout")

    def pullback(dout):
        back = reference_pullback(lambda q, k, v: _attention_reference(q, k, v, is_causal, scale),
                                  (query, key, value))
        return (NoTangent(), *back(materialize(dout[0], like=out[0]))) + nondiff(3)

    return out, pullback


@rrule(aten._scaled_dot_product_flash_attention_backward, aten._scaled_dot_product_flash_attention_backward.default)
def flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                             dropout_p, is_causal, philox_seed, philox_offset, *, scale=None):
    """The flash backward kernel as an op (second derivatives): (dq, dk, dv) are the vjp of
    attention; differentiated through the math formula's double pullback."""
    grads = aten._scaled_dot_product_flash_attention_backward(
        grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
        philox_seed, philox_offset, scale=scale)

    def vjp(g, q, k, v):
        return rrule_via_ad(lambda q, k, v: _attention_reference(q, k, v, is_causal, scale), q, k, v)[1](g)[1:]

    def pb(dgrads):
        dgrads = tuple(materialize(d, like=o) for d, o in zip(dgrads, grads))
        back = reference_pullback(vjp, (grad_out, query, key, value))
        dg, dq, dk, dv = back(tuple(dgrads))
        return (NoTangent(), dg, dq, dk, dv) + nondiff(10)

    return grads, pb


# -- hand-written attention, fused (zygote_torch.ad.fusion) ----------------------------------------

_attention_forward = torch.ops.zygote_torch.attention_forward
_attention_backward = torch.ops.zygote_torch.attention_backward


@rrule(_attention_forward, _attention_forward.default)
def attention_forward(q, kt, v, drop, scale):
    """(y, lse) = the fused kernel;  (dq, dkt, dv) = attention_backward(dy) when only y has a
    cotangent, else the pullback of the written-out formula."""
    y, lse = _attention_forward(q, kt, v, drop, scale)

    def pullback(dout):
        dy, dlse = dout
        if is_zero(dlse):
            dq, dkt, dv = _attention_backward(materialize(dy, like=y), q, kt, v, y, lse, drop, scale)
            return NoTangent(), dq, dkt, dv, NoTangent(), NoTangent()
        back = reference_pullback(lambda q, kt, v: fused_attention.attention_reference(q, kt, v, drop, scale), (q, kt, v))
        return (NoTangent(), *back((materialize(dy, like=y), materialize(dlse, like=lse))), NoTangent(), NoTangent())

    return (y, lse), pullback


@rrule(_attention_backward, _attention_backward.default)
def attention_backward(dy, q, kt, v, y, lse, drop, scale):
    """(dq, dkt, dv) = the fused backward kernel; differentiated through the written-out backward
    formula, which recomputes the probabilities from q and kt (y and lse are functions of them)."""
    out = _attention_backward(dy, q, kt, v, y, lse, drop, scale)
    back = reference_pullback(
        lambda dy, q, kt, v: fused_attention.attention_backward_reference(dy, q, kt, v, None, None, drop, scale),
        (dy, q, kt, v))

    def pullback(dout):
        ddy, dq, dkt, dv = back(tuple(materialize(d, like=o) for d, o in zip(dout, out)))
        return (NoTangent(), ddy, dq, dkt, dv) + nondiff(4)

    return out, pullback
