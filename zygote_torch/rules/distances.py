"""Rules for distances: cdist, pdist, dist, pairwise_distance and cosine_similarity.

Each is a rule via rules (:func:`._util._via_rules`): the distance written with sub and
vector_norm (whose rule gives torch's subgradient, 0 at zero distance) and differentiated through
those ops' rules; the value is torch's own, where the formula only rounds differently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ._util import _via_rules, nondiff

Tensor = torch.Tensor


@rrule(torch.cdist, torch.functional.cdist)
def cdist(x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    """y[..., i, j] = ||x1[..., i, :] - x2[..., j, :]||_p;  dx1, dx2 through the rules of sub and
    vector_norm (0 at zero distance, like torch)."""
    y, back = _via_rules(lambda a, b: torch.linalg.vector_norm(a.unsqueeze(-2) - b.unsqueeze(-3), p, -1), x1, x2,
                         value=lambda: torch.cdist(x1, x2, p, compute_mode))
    return y, lambda dy: back(dy) + nondiff(2)


@rrule(torch.pdist, F.pdist)
def pdist(input, p=2):
    """y = ||x_i - x_j||_p for the row pairs i < j, row-major;  dx through gather, sub, vector_norm."""
    n = input.shape[0]
    i, j = torch.triu_indices(n, n, 1, device=input.device)
    y, back = _via_rules(lambda x: torch.linalg.vector_norm(x[i] - x[j], p, -1), input,
                         value=lambda: torch.pdist(input, p))
    return y, lambda dy: back(dy) + nondiff(1)


@rrule(torch.dist, Tensor.dist)
def dist(input, other, p=2):
    """y = ||x - other||_p over all elements;  through the rules of sub and vector_norm."""
    y, back = _via_rules(lambda a, b: torch.linalg.vector_norm(a - b, p), input, other,
                         value=lambda: torch.dist(input, other, p))
    return y, lambda dy: back(dy) + nondiff(1)


@rrule(torch.pairwise_distance, F.pairwise_distance)
def pairwise_distance(x1, x2, p=2.0, eps=1e-6, keepdim=False):
    """y = ||x1 - x2 + eps||_p over the last dimension;  through the rules of sub, add, vector_norm."""
    d = max(x1.dim(), x2.dim()) - 1
    y, back = _via_rules(lambda a, b: torch.linalg.vector_norm(a - b + eps, p, d if d >= 0 else None, keepdim),
                         x1, x2, value=lambda: torch.pairwise_distance(x1, x2, p, eps, keepdim))
    return y, lambda dy: back(dy) + nondiff(3)


@rrule(torch.cosine_similarity, F.cosine_similarity)
def cosine_similarity(x1, x2, dim=1, eps=1e-8):
    """y = sum((x1 / max(||x1||, eps)) * (x2 / max(||x2||, eps)), dim) on the broadcast inputs; torch
    clamps the norms without differentiating the clamp, and so does this decomposition."""
    def decomposition(a, b):
        shape = torch.broadcast_shapes(a.shape, b.shape)
        a, b = a.expand(shape), b.expand(shape)
        na = torch.linalg.vector_norm(a, 2, dim, keepdim=True)
        nb = torch.linalg.vector_norm(b, 2, dim, keepdim=True)
        na = na + (na.clamp_min(eps) - na).detach()
        nb = nb + (nb.clamp_min(eps) - nb).detach()
        return ((a / na) * (b / nb)).sum(dim)

    y, back = _via_rules(decomposition, x1, x2, value=lambda: torch.cosine_similarity(x1, x2, dim, eps))
    return y, lambda dy: back(dy) + nondiff(2)
