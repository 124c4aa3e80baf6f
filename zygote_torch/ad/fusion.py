"""Fusing chains of tape entries whose combined pullback has a fused kernel.

By the time a backward pass starts, the tape holds the whole forward: every value's producer and
every consumer is known. A chain of entries whose intermediate values nothing else reads (and no
seed differentiates) can then be differentiated as one function. Today one chain is fused:
attention written out by hand on the CPU,

    s = q @ kt;  s = s * c (or s / c);  s = s.masked_fill(drop, -inf);  p = s.softmax(-1);  y = p @ v

(scale and mask optional), whose backward becomes one flash-attention kernel call
(:mod:`zygote_torch.ops.attention`) instead of two matmuls and a softmax over the kept
probabilities, and the staged program then also computes the forward with the kernel
(:mod:`zygote_torch.passes.attention`): the probabilities are never computed or kept. Only staged
tapes fuse: on the dynamic path the forward has already run as written, and the flash backward
alone (after a log-sum-exp pass over the kept scores) measured no faster than the written-out one.

Only builtin rules take part (a user's rule for ``matmul``, say, turns the fusion off), and every
value the fused pullback reads must still hold the version the tape recorded.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops import attention as fused_attention
from .registry import REGISTRY
from .tangents import NoTangent

Tensor = torch.Tensor

_MATMUL = {torch.matmul, Tensor.matmul, Tensor.__matmul__}
_MUL = {torch.mul, Tensor.mul, Tensor.__mul__}
_DIV = {torch.div, Tensor.div, Tensor.__truediv__, torch.true_divide, Tensor.true_divide}
_MASKED_FILL = {torch.masked_fill, Tensor.masked_fill}
_SOFTMAX = {torch.softmax, Tensor.softmax, F.softmax}


def fuse(tape, seeds) -> None:
    """Replace fusable chains in ``tape.entries`` by single entries (see the module docs)."""
    entries = tape.entries
    if not any(e is not None and _is_one_of(e.func, _SOFTMAX) for e in entries):
        return  # no chain can end here (the common case, checked cheaply)
    producer, uses = {}, {}
    for i, e in enumerate(entries):
        if e is None:
            continue
        for k in _flat_keys(e.out_keys):
            producer[k] = i
        for k in _flat_keys(e.in_keys):
            uses[k] = uses.get(k, 0) + 1
    for t, _ in seeds:
        if isinstance(t, Tensor):
            k = tape.key_of(t)
            uses[k] = uses.get(k, 0) + 1
    chain = _Chain(tape, entries, producer, uses)
    for i in range(len(entries) - 1, -1, -1):
        fused = _attention(chain, i)
        if fused is not None:
            entry, dropped = fused
            entries[i] = entry
            for j in dropped:
                entries[j] = None


def _flat_keys(keys):
    if isinstance(keys, int):
        yield keys
    elif isinstance(keys, list):
        for k in keys:
            yield from _flat_keys(k)


class _Chain:
    """Walks producers of entry arguments, keeping to values read exactly once."""

    def __init__(self, tape, entries, producer, uses):
        self.tape, self.entries, self.producer, self.uses = tape, entries, producer, uses

    def builtin(self, i, funcs):
        e = self.entries[i] if i is not None else None
        if e is None or e.fallback or not _is_one_of(e.func, funcs):
            return None
        rule = REGISTRY.lookup(e.func)
        return e if rule is not None and rule.builtin else None

    def single_use_producer(self, entry, position, funcs):
        """The entry producing ``entry``'s argument at ``position``, if it is one of ``funcs`` and
        that value is read by ``entry`` alone."""
        k = entry.in_keys[position]
        if not isinstance(k, int) or self.uses.get(k) != 1:
            return None, None
        i = self.producer.get(k)
        return self.builtin(i, funcs), i


def _is_one_of(func, funcs) -> bool:
    try:
        return func in funcs
    except TypeError:  # an unhashable callable
        return False


def _current(tape, t, k) -> bool:
    """Whether tensor ``t`` still holds the value recorded under key ``k``."""
    return isinstance(t, Tensor) and (k is None or tape.key_of(t) == k)


def _attention(chain: _Chain, i: int):
    """(fused entry, indices of the entries it replaces) for hand-written attention ending at
    entry ``i`` (``y = p @ v``), or None."""
    out = chain.builtin(i, _MATMUL)
    if out is None or not isinstance(out.out_keys, int):
        return None
    soft, i_soft = chain.single_use_producer(out, 0, _SOFTMAX)
    if soft is None or not _is_last_dim_softmax(soft):
        return None
    replaced, scores = [i_soft], soft
    masked, i_masked = chain.single_use_producer(scores, 0, _MASKED_FILL)
    drop = None
    if masked is not None:
        drop, value = masked.args[1], masked.args[2]
        if not (isinstance(drop, Tensor) and drop.dtype == torch.bool and value == -math.inf):
            return None
        replaced.append(i_masked)
        scores = masked
    scale = 1.0
    scaled, i_scaled = chain.single_use_producer(scores, 0, _MUL | _DIV)
    if scaled is not None:
        c = scaled.args[1]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c == 0 \
                or len(scaled.args) > 2 and scaled.args[2] is not None:
            return None
        scale = float(c) if scaled.func in _MUL else 1.0 / float(c)
        replaced.append(i_scaled)
        scores = scaled
    product, i_product = chain.single_use_producer(scores, 0, _MATMUL)
    if product is None:
        return None
    replaced.append(i_product)
    q, kt = product.args
    v, y = out.args[1], out.out
    masked_scores = (masked or scaled or product).out  # the softmax's input
    if not fused_attention.applies(q, kt, v, drop):
        return None
    if not all(_current(chain.tape, t, k) for t, k in ((q, product.in_keys[0]), (kt, product.in_keys[1]),
                                          (v, out.in_keys[1]), (y, out.out_keys),
                                          (masked_scores, soft.in_keys[0]))):
        return None
    return _fused_entry(out, product, q, kt, v, y, masked_scores, drop, scale), replaced


def _is_last_dim_softmax(e) -> bool:
    x, dim = e.args[0], e.args[1]
    dtype = e.args[-1]
    return isinstance(dim, int) and dim in (-1, x.dim() - 1) and dtype is None


def _fused_entry(out, product, q, kt, v, y, masked_scores, drop, scale):
    """One entry for the chain: inputs (q, kt, v), output y, the fused pullback."""

    def pullback(dy):
        """(dq, dkt, dv) by the flash backward, given the rows' log-sum-exps of the scores."""
        lse = fused_attention.row_lse(masked_scores)
        dq, dkt, dv = torch.ops.zygote_torch.attention_backward(dy, q, kt, v, y, lse, drop, scale)
        return NoTangent(), dq, dkt, dv

    return type(out)(torch.ops.zygote_torch.attention_forward, (q, kt, v), y, pullback, out.where,
                     "hand-written attention, fused", False,
                     [product.in_keys[0], product.in_keys[1], out.in_keys[1]], out.out_keys)
