"""Functions whose outputs carry no gradient (ChainRulesCore's ``@non_differentiable``).

Comparisons, index-valued functions, rounding (zero derivative almost everywhere), value-reading
conversions, and constructors whose result depends only on their argument's shape.
"""
from __future__ import annotations

import torch

from ..ad.registry import non_differentiable

Tensor = torch.Tensor


def _both(*names):
    """``torch.<name>`` and ``Tensor.<name>`` where they exist."""
    out = []
    for name in names:
        for owner in (torch, Tensor):
            if hasattr(owner, name):
                out.append(getattr(owner, name))
    return out


non_differentiable(
    *_both("eq", "ne", "lt", "le", "gt", "ge", "greater", "less", "greater_equal", "less_equal",
           "not_equal", "equal", "allclose", "isclose", "isnan", "isinf", "isfinite", "isposinf", "isneginf",
           "isreal", "argmax", "argmin", "argsort", "nonzero", "count_nonzero", "bincount", "unique",
           "unique_consecutive", "searchsorted", "bucketize", "any", "all", "logical_and", "logical_or",
           "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not",
           "floor", "ceil", "round", "trunc", "fix", "floor_divide", "is_nonzero", "signbit",
           "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
           "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "item", "tolist",
           "numpy", "histc", "histogram"),
    Tensor.__eq__, Tensor.__ne__, Tensor.__lt__, Tensor.__le__, Tensor.__gt__, Tensor.__ge__,
    Tensor.__and__, Tensor.__or__, Tensor.__xor__, Tensor.__invert__, Tensor.__bool__, Tensor.__float__,
    Tensor.__int__, Tensor.__index__, Tensor.__floordiv__, Tensor.__rfloordiv__,
    Tensor.__len__, Tensor.__repr__, Tensor.__format__, Tensor.__hash__, Tensor.__contains__,
    Tensor.__array__, Tensor.__complex__,
    Tensor.long, Tensor.int, Tensor.short, Tensor.char, Tensor.byte, Tensor.bool,  # integer results
)
