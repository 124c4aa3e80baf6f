"""Attention's forward by the fused kernel, where its backward already is.

The differentiation fuses the backward of hand-written attention into one
``attention_backward(dy, q, kt, v, y, logsumexp(scores), drop, c)`` call (:mod:`..ad.fusion`),
while the forward still runs the ops as written: two matmuls and a softmax whose probabilities
feed nothing else. This pass computes ``y`` and the log-sum-exps with ``attention_forward`` instead
(one kernel, the same values; :mod:`..ops.attention`), after which dead-code elimination drops the
written-out forward: the probabilities and the masked scores are neither computed nor kept.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..capture.op_classes import classify_node
from ..ops import attention as _ops  # noqa: F401  (registers the two ops)

_FORWARD = torch.ops.zygote_torch.attention_forward
_BACKWARD = {torch.ops.zygote_torch.attention_backward, torch.ops.zygote_torch.attention_backward.default}


def fuse_attention_forward(graph: fx.Graph) -> int:
    """Rewrite as described above; return how many attentions now run forward fused."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    changed = 0
    for bwd in [n for n in graph.nodes if n.op == "call_function" and n.target in _BACKWARD]:
        dy, q, kt, v, y, lse, drop, scale = bwd.args
        if not (isinstance(y, fx.Node) and y in order and isinstance(lse, fx.Node) and lse.target is torch.logsumexp):
            continue
        if any(isinstance(a, fx.Node) and order[a] > order[y] for a in (q, kt, v, drop)):
            continue
        with graph.inserting_before(y):
            fwd = graph.call_function(_FORWARD, (q, kt, v, drop, scale))
            out = graph.call_function(operator.getitem, (fwd, 0))
            fused_lse = graph.call_function(operator.getitem, (fwd, 1))
        for node, like in ((fwd, None), (out, y), (fused_lse, lse)):
            node.meta.update({k: y.meta[k] for k in ("phase", "where") if k in y.meta})
            node.meta["val"] = (y.meta["val"], lse.meta["val"]) if like is None else like.meta["val"]
            classify_node(node)
        y.replace_all_uses_with(out)
        bwd.replace_input_with(lse, fused_lse)
        changed += 1
    return changed
