"""Fused attention for attention written out by hand: ``softmax(q k^T * c, masked) v``.

Users often write attention as matmuls and a softmax rather than calling
``F.scaled_dot_product_attention``. Those ops keep the ``(L, S)`` probabilities for the backward
and run two matmuls and a softmax each way; torch's flash-attention CPU kernels compute the same
value and gradients blockwise, keeping only one log-sum-exp per query row. The differentiation
(:mod:`zygote_torch.ad.fusion`) and the graph passes (:mod:`zygote_torch.passes.attention`) route
hand-written attention on the CPU to these two ops::

    attention_forward(q, kt, v, drop, c) -> (y, lse)
        s = c * q kt   (kt = k^T, of shape (..., E, S)),   s = -inf where drop,
        y = softmax(s, -1) v,   lse = logsumexp(s, -1)
    attention_backward(dy, q, kt, v, y, lse, drop, c) -> (dq, dkt, dv)
        P = exp(s - lse),  dv = P^T dy,  ds = P * (dy v^T - rowsum(dy * y)),
        dq = c ds kt^T,  dkt = c q^T ds

Exactly the hand-written ops' results, including where they are not finite: when some query row
keeps no key (NaN by hand, 0 from the flash kernel) or some row's log-sum-exp is not finite, both
ops compute the hand-written formula instead of the kernel.
"""
from typing import Optional

import torch

from ._common import acc_dtype, row_lse

aten = torch.ops.aten
Tensor = torch.Tensor


def _additive_mask(drop: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """The flash kernel's mask: -inf where ``drop``, 0 elsewhere."""
    if drop is None:
        return None
    return torch.zeros(drop.shape, dtype=like.dtype, device=like.device).masked_fill(drop, float("-inf"))


def masked_scores(q: Tensor, kt: Tensor, drop: Optional[Tensor], scale: float) -> Tensor:
    """s = scale * q kt, -inf where ``drop`` (the hand-written ops)."""
    s = torch.matmul(q, kt) * scale
    return s if drop is None else s.masked_fill(drop, float("-inf"))


def _kernel_exact(drop: Optional[Tensor], lse: Tensor) -> bool:
    """Whether the kernel's result is the hand-written ops': every query row keeps a key (the
    kernel gives 0 for a row that keeps none, the softmax NaN) and every row's scores are finite."""
    return (drop is None or not bool(drop.all(-1).any())) and bool(torch.isfinite(lse).all())


def attention_reference(q: Tensor, kt: Tensor, v: Tensor, drop: Optional[Tensor], scale: float):
    """(y, lse) by the hand-written ops."""
    s = masked_scores(q, kt, drop, scale)
    return torch.matmul(torch.softmax(s, -1), v), row_lse(s)


@torch.library.custom_op("zygote_torch::attention_forward", mutates_args=())
def attention_forward(q: Tensor, kt: Tensor, v: Tensor, drop: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """(y, lse) of attention; see the module docs."""
    if q.device.type == "cpu":
        y, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, kt.transpose(-2, -1), v, 0.0, False, attn_mask=_additive_mask(drop, q), scale=scale)
        if _kernel_exact(drop, lse):
            return y, lse.contiguous()
    return attention_reference(q, kt, v, drop, scale)


@attention_forward.register_fake
def _(q, kt, v, drop, scale):
    shape = torch.broadcast_shapes(q.shape[:-1], v.shape[:-2] + (1,))
    return q.new_empty(shape + (v.shape[-1],)), q.new_empty(shape, dtype=acc_dtype(q.dtype))


def attention_backward_reference(dy, q, kt, v, y, lse, drop, scale):
    """(dq, dkt, dv) by the hand-written formula (the backward of the hand-written ops)."""
    s = masked_scores(q, kt, drop, scale)
    p = torch.softmax(s, -1)
    dv = torch.matmul(p.transpose(-2, -1), dy)
    dp = torch.matmul(dy, v.transpose(-2, -1))
    ds = (p * (dp - (dp * p).sum(-1, keepdim=True))) * scale
    if drop is not None:
        ds = ds.masked_fill(drop, 0.0)
    return torch.matmul(ds, kt.transpose(-2, -1)), torch.matmul(q.transpose(-2, -1), ds), dv


@torch.library.custom_op("zygote_torch::attention_backward", mutates_args=())
def attention_backward(dy: Tensor, q: Tensor, kt: Tensor, v: Tensor, y: Tensor, lse: Tensor, drop: Optional[Tensor],
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dkt, dv) of attention for the cotangent ``dy`` of ``y``; see the module docs."""
    if q.device.type == "cpu" and _kernel_exact(drop, lse):
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dy.contiguous(), q, kt.transpose(-2, -1), v, y, lse, 0.0, False, attn_mask=_additive_mask(drop, q),
            scale=scale)
        return dq, dk.transpose(-2, -1).contiguous(), dv
    dq, dkt, dv = attention_backward_reference(dy, q, kt, v, y, lse, drop, scale)
    return dq.contiguous(), dkt.contiguous(), dv.contiguous()


@attention_backward.register_fake
def _(dy, q, kt, v, y, lse, drop, scale):
    return torch.empty_like(q), torch.empty_like(kt), torch.empty_like(v)


def applies(q: Tensor, kt: Tensor, v: Tensor, drop: Optional[Tensor]) -> bool:
    """Whether the fused ops take this attention: CPU, floating, 4-d operands with one batch shape
    and head size, a boolean mask broadcasting to the scores."""
    if not (q.device.type == kt.device.type == v.device.type == "cpu" and q.dim() == kt.dim() == v.dim() == 4):
        return False
    if not (q.dtype == kt.dtype == v.dtype and q.dtype in (torch.float32, torch.float64, torch.bfloat16)):
        return False
    if not (q.shape[:2] == kt.shape[:2] == v.shape[:2] and q.shape[-1] == kt.shape[-2]
            and kt.shape[-1] == v.shape[-2] and v.shape[-1] == q.shape[-1]):
        return False
    if drop is None:
        return True
    scores = tuple(q.shape[:-1]) + (kt.shape[-1],)
    try:
        return drop.dtype == torch.bool and torch.broadcast_shapes(drop.shape, scores) == scores
    except RuntimeError:
        return False
