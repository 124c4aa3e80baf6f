"""Rules for pooling: max pooling (with or without indices), average pooling, adaptive average and
max pooling, and power-average (Lp) pooling, in 1, 2 and 3 spatial dimensions.

- Max pooling ``y[o] = x[argmax over window(o)]``: ``dx = scatter_add(zeros, argmax, dy)`` over the
  flattened spatial dims, so the whole cotangent of an output goes to the index torch recorded
  (the first maximum of a tie, as torch picks it), and overlapping windows accumulate. Only the
  indices are kept for the pullback.
- Average pooling and adaptive average pooling are linear, ``y = A x``: ``dx = A^T dy`` is torch's
  ``avg_pool{2,3}d_backward`` / ``_adaptive_avg_pool{2,3}d_backward`` (the 1-d forms run as 2-d with
  a unit height, as torch runs them). Those backward ops have rules too: they are linear in the
  output cotangent, with adjoint ``A`` itself, the forward pooling; so derivatives of every order
  stay on rules.
- ``lp_pool``: ``y = (K * s)^(1/p)``, ``s = avg_pool(x^p)`` with ``K`` the window size;
  ``ds = dy * (1/p) * (K s)^(1/p - 1) * K`` where ``s > 0`` (torch's relu(|s|) term: 0 elsewhere),
  ``dx = avg_pool_backward(ds) * p * x^(p-1)``; ``p = +-inf`` is max pooling of ``|x|``, so
  ``dx = scatter(dy) * sign(x)``.

The registered callables mirror torch's signatures: ``F.max_pool2d`` (with ``return_indices``),
``F.max_pool2d_with_indices``, ``torch.max_pool2d``, ``torch._C._nn.max_pool2d_with_indices``,
``F.avg_pool2d`` (``torch._C._nn.avg_pool2d``), ``F.adaptive_avg_pool2d``,
``F.adaptive_max_pool2d``, ``F.lp_pool2d``, ``F.fractional_max_pool2d``, ``F.max_unpool2d`` and
their 1-d and 3-d counterparts, and the backward ops the pullbacks call.

- ``max_unpool``: ``y = zeros.scatter(indices, x)``, so ``dx = dy.gather(indices)``;
  ``max_pool{2,3}d_with_indices_backward`` (linear in its cotangent) has the gather as adjoint too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ._util import NoTangent, materialize, nondiff

Tensor = torch.Tensor
aten = torch.ops.aten
_nn = torch._C._nn


def _ntuple(v, n: int) -> list:
    if isinstance(v, (list, tuple, torch.Size)):
        v = [int(e) for e in v]
        return v * n if len(v) == 1 and n != 1 else v
    return [int(v)] * n


def _no_stride(stride) -> bool:
    return stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)


# ---------------------------------------------------------------------------------------------
# max pooling (and adaptive max pooling): scatter the cotangent to the recorded argmax

def _scatter_to_argmax(dy: Tensor, indices: Tensor, input_shape, nd: int) -> Tensor:
    """dx: zeros shaped like the input with dy added at ``indices`` (flat over the last nd dims)."""
    shape = tuple(input_shape)
    lead = shape[:len(shape) - nd]
    flat = math.prod(shape[len(shape) - nd:])
    g = dy.flatten(dy.dim() - nd) if nd > 1 else dy
    idx = indices.flatten(indices.dim() - nd) if nd > 1 else indices
    return dy.new_zeros(lead + (flat,)).scatter_add(-1, idx, g).reshape(shape)


_MAX_POOL_WITH_INDICES = {1: torch.max_pool1d_with_indices, 2: _nn.max_pool2d_with_indices,
                          3: _nn.max_pool3d_with_indices}


def _max_pool(nd, input, kernel_size, stride, padding, dilation, ceil_mode):
    """(values, indices, pullback of the values)."""
    stride = [] if _no_stride(stride) else stride
    y, idx = _MAX_POOL_WITH_INDICES[nd](input, kernel_size, stride, padding, dilation, ceil_mode)
    shape = input.shape
    return y, idx, lambda dy: _scatter_to_argmax(dy, idx, shape, nd)


def _max_pool_rules(nd):
    dispatch = getattr(F, f"max_pool{nd}d")
    with_indices = getattr(F, f"max_pool{nd}d_with_indices")
    values_only = getattr(F, f"_max_pool{nd}d")
    math_doc = (f"y[o] = max of x over window o, idx[o] its flat position (torch's, first of ties);  "
                f"dx = zeros.scatter_add(idx, dy) over the {nd} spatial dim(s).")

    def f_max_pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        y, idx, back = _max_pool(nd, input, kernel_size, stride, padding, dilation, ceil_mode)
        if return_indices:
            return (y, idx), lambda dy: (NoTangent(), back(materialize(dy[0], y))) + nondiff(6)
        return y, lambda dy: (NoTangent(), back(dy)) + nondiff(6)

    def f_max_pool_with_indices(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                                return_indices=False):
        y, idx, back = _max_pool(nd, input, kernel_size, stride, padding, dilation, ceil_mode)
        return (y, idx), lambda dy: (NoTangent(), back(materialize(dy[0], y))) + nondiff(6)

    def torch_max_pool(input, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
        y, idx, back = _max_pool(nd, input, kernel_size, stride, padding, dilation, ceil_mode)
        return y, lambda dy: (NoTangent(), back(dy)) + nondiff(5)

    def torch_max_pool_with_indices(input, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
        y, idx, back = _max_pool(nd, input, kernel_size, stride, padding, dilation, ceil_mode)
        return (y, idx), lambda dy: (NoTangent(), back(materialize(dy[0], y))) + nondiff(5)

    rules = [(f_max_pool, (dispatch, values_only), f"F.max_pool{nd}d (``return_indices`` gives (y, idx))"),
             (f_max_pool_with_indices, (with_indices,), f"F.max_pool{nd}d_with_indices: (y, idx)"),
             (torch_max_pool, (getattr(torch, f"max_pool{nd}d"),), f"torch.max_pool{nd}d"),
             (torch_max_pool_with_indices, (_MAX_POOL_WITH_INDICES[nd],), f"torch max_pool{nd}d_with_indices")]
    for fn, keys, what in rules:
        fn.__name__ = fn.__qualname__ = f"{fn.__name__.replace('max_pool', f'max_pool{nd}d')}"
        fn.__doc__ = f"{what}: {math_doc}"
        rrule(*keys)(fn)


_ADAPTIVE_MAX = {1: torch.adaptive_max_pool1d, 2: _nn.adaptive_max_pool2d, 3: _nn.adaptive_max_pool3d}


def _adaptive_max_pool(nd, input, output_size):
    sizes = _ntuple(output_size, nd) if not isinstance(output_size, (list, tuple)) else list(output_size)
    sizes = [input.shape[input.dim() - nd + i] if s is None else int(s) for i, s in enumerate(sizes)]
    y, idx = _ADAPTIVE_MAX[nd](input, sizes)
    shape = input.shape
    return y, idx, lambda dy: _scatter_to_argmax(dy, idx, shape, nd)


def _adaptive_max_pool_rules(nd):
    math_doc = ("y[o] = max of x over adaptive window o (start floor(o*in/out), end ceil((o+1)*in/out)), "
                "idx[o] its flat position;  dx = zeros.scatter_add(idx, dy).")

    def f_adaptive_max_pool(input, output_size, return_indices=False):
        y, idx, back = _adaptive_max_pool(nd, input, output_size)
        if return_indices:
            return (y, idx), lambda dy: (NoTangent(), back(materialize(dy[0], y)), NoTangent(), NoTangent())
        return y, lambda dy: (NoTangent(), back(dy), NoTangent(), NoTangent())

    def f_adaptive_max_pool_with_indices(input, output_size, return_indices=False):
        y, idx, back = _adaptive_max_pool(nd, input, output_size)
        return (y, idx), lambda dy: (NoTangent(), back(materialize(dy[0], y)), NoTangent(), NoTangent())

    def torch_adaptive_max_pool(input, output_size):
        y, idx, back = _adaptive_max_pool(nd, input, output_size)
        return (y, idx), lambda dy: (NoTangent(), back(materialize(dy[0], y)), NoTangent())

    rules = [(f_adaptive_max_pool, (getattr(F, f"adaptive_max_pool{nd}d"), getattr(F, f"_adaptive_max_pool{nd}d")),
              f"F.adaptive_max_pool{nd}d (``return_indices`` gives (y, idx))"),
             (f_adaptive_max_pool_with_indices, (getattr(F, f"adaptive_max_pool{nd}d_with_indices"),),
              f"F.adaptive_max_pool{nd}d_with_indices: (y, idx)"),
             (torch_adaptive_max_pool, (_ADAPTIVE_MAX[nd],), f"torch adaptive_max_pool{nd}d: (y, idx)")]
    for fn, keys, what in rules:
        fn.__name__ = fn.__qualname__ = fn.__name__.replace("max_pool", f"max_pool{nd}d")
        fn.__doc__ = f"{what}: {math_doc}"
        rrule(*keys)(fn)


for _nd in (1, 2, 3):
    _max_pool_rules(_nd)
    _adaptive_max_pool_rules(_nd)


def _gather_at(g: Tensor, indices: Tensor, shape, nd: int) -> Tensor:
    """g read at ``indices`` (flat over the last nd dims), shaped ``shape``: the adjoint of
    ``_scatter_to_argmax``."""
    flat = g.flatten(g.dim() - nd) if nd > 1 else g
    idx = indices.flatten(indices.dim() - nd) if nd > 1 else indices
    return flat.gather(-1, idx).reshape(tuple(shape))


def _max_pool_backward_rule(nd):
    op = getattr(aten, f"max_pool{nd}d_with_indices_backward")

    def rule(grad_output, self, kernel_size, stride, padding, dilation, ceil_mode, indices):
        gx = op(grad_output, self, kernel_size, stride, padding, dilation, ceil_mode, indices)
        shape = grad_output.shape
        return gx, lambda g: (NoTangent(), _gather_at(g, indices, shape, nd)) + nondiff(7)

    rule.__name__ = rule.__qualname__ = f"max_pool{nd}d_with_indices_backward"
    rule.__doc__ = ("gx = zeros.scatter_add(indices, gy), the max-pooling pullback (linear in gy);  "
                    "dgy = dgx.gather(indices), its adjoint;  ``self`` gives only the input's shape.")
    rrule(op, op.default)(rule)


for _nd in (2, 3):
    _max_pool_backward_rule(_nd)


# ---------------------------------------------------------------------------------------------
# max unpooling: y = zeros.scatter(indices, x), linear; dx = dy.gather(indices)

def _max_unpool_rule(nd):
    public = getattr(F, f"max_unpool{nd}d")

    def rule(input, indices, kernel_size, stride=None, padding=0, output_size=None):
        y = public(input, indices, kernel_size, stride, padding, output_size)
        shape = input.shape
        return y, lambda dy: (NoTangent(), _gather_at(dy, indices, shape, nd)) + nondiff(5)

    rule.__name__ = rule.__qualname__ = f"max_unpool{nd}d"
    rule.__doc__ = ("y = zeros of the unpooled size with x placed at ``indices`` (flat over the spatial dims);  "
                    "dx = dy.gather(indices), as torch differentiates it.")
    rrule(public)(rule)


for _nd in (1, 2, 3):
    _max_unpool_rule(_nd)


# ---------------------------------------------------------------------------------------------
# fractional max pooling: max pooling over pseudo-random windows (drawn once, in the forward)

def _fractional_max_pool_rules(nd):
    with_indices = getattr(F, f"fractional_max_pool{nd}d_with_indices")
    math_doc = ("y[o] = max of x over pseudo-random window o (``_random_samples``, drawn by torch when None, "
                "once, in the forward), idx[o] its flat position;  dx = zeros.scatter_add(idx, dy).")

    def forward(input, kernel_size, output_size, output_ratio, _random_samples):
        y, idx = with_indices(input, kernel_size, output_size, output_ratio, True, _random_samples)
        shape = input.shape
        return y, idx, lambda dy: _scatter_to_argmax(dy, idx, shape, nd)

    def f_fractional(input, kernel_size, output_size=None, output_ratio=None, return_indices=False,
                     _random_samples=None):
        y, idx, back = forward(input, kernel_size, output_size, output_ratio, _random_samples)
        if return_indices:
            return (y, idx), lambda dy: (NoTangent(), back(materialize(dy[0], y))) + nondiff(5)
        return y, lambda dy: (NoTangent(), back(dy)) + nondiff(5)

    def f_fractional_with_indices(input, kernel_size, output_size=None, output_ratio=None, return_indices=False,
                                  _random_samples=None):
        y, idx, back = forward(input, kernel_size, output_size, output_ratio, _random_samples)
        return (y, idx), lambda dy: (NoTangent(), back(materialize(dy[0], y))) + nondiff(5)

    for fn, keys, what in [
            (f_fractional, (getattr(F, f"fractional_max_pool{nd}d"), getattr(F, f"_fractional_max_pool{nd}d")),
             f"F.fractional_max_pool{nd}d (``return_indices`` gives (y, idx))"),
            (f_fractional_with_indices, (with_indices,), f"F.fractional_max_pool{nd}d_with_indices: (y, idx)")]:
        fn.__name__ = fn.__qualname__ = fn.__name__.replace("fractional", f"fractional_max_pool{nd}d")
        fn.__doc__ = f"{what}: {math_doc}"
        rrule(*keys)(fn)


for _nd in (2, 3):
    _fractional_max_pool_rules(_nd)


# ---------------------------------------------------------------------------------------------
# average pooling: linear; the backward op and its adjoint (the forward) both have rules

_AVG_POOL = {1: torch.avg_pool1d, 2: _nn.avg_pool2d, 3: _nn.avg_pool3d}
_AVG_POOL_BACKWARD = {2: aten.avg_pool2d_backward, 3: aten.avg_pool3d_backward}


def _avg_pool_params(nd, kernel_size, stride, padding):
    k = _ntuple(kernel_size, nd)
    s = k if _no_stride(stride) else _ntuple(stride, nd)
    return k, s, _ntuple(padding, nd)


def avg_pool_backward(nd, dy, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                      divisor_override=None):
    """A^T dy for y = avg_pool{nd}d(x) (the 1-d case as 2-d with a unit height)."""
    k, s, p = _avg_pool_params(nd, kernel_size, stride, padding)
    if nd == 1:
        g = aten.avg_pool2d_backward(dy.unsqueeze(-2), input.unsqueeze(-2), [1] + k, [1] + s, [0] + p,
                                     ceil_mode, count_include_pad, divisor_override)
        return g.squeeze(-2)
    return _AVG_POOL_BACKWARD[nd](dy, input, k, s, p, ceil_mode, count_include_pad, divisor_override)


@rrule(torch.avg_pool1d)
def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """y[o] = mean of x over window o (zero padding counted when ``count_include_pad``; windows
    clipped at the padded border);  dx = A^T dy (avg_pool2d_backward at unit height)."""
    y = torch.avg_pool1d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)

    def pullback(dy):
        return (NoTangent(), avg_pool_backward(1, dy, input, kernel_size, stride, padding, ceil_mode,
                                               count_include_pad)) + nondiff(5)

    return y, pullback


def _avg_pool_rule(nd):
    fwd = _AVG_POOL[nd]

    def rule(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
             divisor_override=None):
        y = fwd(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

        def pullback(dy):
            return (NoTangent(), avg_pool_backward(nd, dy, input, kernel_size, stride, padding, ceil_mode,
                                                   count_include_pad, divisor_override)) + nondiff(6)

        return y, pullback

    rule.__name__ = rule.__qualname__ = f"avg_pool{nd}d"
    rule.__doc__ = (f"y[o] = sum of x over window o / divisor (divisor_override, else the window size, "
                    f"without padding unless count_include_pad);  dx = A^T dy = avg_pool{nd}d_backward(dy).")
    rrule(fwd)(rule)


def _avg_pool_backward_rule(nd):
    op = _AVG_POOL_BACKWARD[nd]
    fwd = _AVG_POOL[nd]

    def rule(grad_output, self, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        gx = op(grad_output, self, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

        def pullback(g):
            gg = fwd(g, kernel_size, stride if not _no_stride(stride) else None, padding, ceil_mode,
                     count_include_pad, divisor_override)
            return (NoTangent(), gg) + nondiff(7)

        return gx, pullback

    rule.__name__ = rule.__qualname__ = f"avg_pool{nd}d_backward"
    rule.__doc__ = (f"gx = A^T gy, the adjoint of y = avg_pool{nd}d(x) = A x (linear in gy);  "
                    f"dgy = A dgx = avg_pool{nd}d(dgx);  ``self`` gives only the input's shape.")
    rrule(op, op.default)(rule)


for _nd in (2, 3):
    _avg_pool_rule(_nd)
    _avg_pool_backward_rule(_nd)


# ---------------------------------------------------------------------------------------------
# adaptive average pooling

_ADAPTIVE_AVG = {1: torch.adaptive_avg_pool1d, 2: _nn.adaptive_avg_pool2d, 3: _nn.adaptive_avg_pool3d}
_ADAPTIVE_AVG_BACKWARD = {2: aten._adaptive_avg_pool2d_backward, 3: aten._adaptive_avg_pool3d_backward}


def _adaptive_sizes(nd, input, output_size) -> list:
    sizes = list(output_size) if isinstance(output_size, (list, tuple, torch.Size)) else [output_size] * nd
    if len(sizes) == 1 and nd != 1:
        sizes = sizes * nd
    return [input.shape[input.dim() - nd + i] if s is None else int(s) for i, s in enumerate(sizes)]


def adaptive_avg_pool_backward(nd, dy, input) -> Tensor:
    """A^T dy for y = adaptive_avg_pool{nd}d(x) (the 1-d case as 2-d with a unit height)."""
    if nd == 1:
        return aten._adaptive_avg_pool2d_backward(dy.unsqueeze(-2), input.unsqueeze(-2)).squeeze(-2)
    return _ADAPTIVE_AVG_BACKWARD[nd](dy, input)


def _adaptive_avg_pool_rule(nd):
    fwd = _ADAPTIVE_AVG[nd]
    keys = (fwd,) if nd == 1 else (fwd, getattr(F, f"adaptive_avg_pool{nd}d"))

    def rule(input, output_size):
        y = fwd(input, _adaptive_sizes(nd, input, output_size))
        return y, lambda dy: (NoTangent(), adaptive_avg_pool_backward(nd, dy, input), NoTangent())

    rule.__name__ = rule.__qualname__ = f"adaptive_avg_pool{nd}d"
    rule.__doc__ = ("y[o] = mean of x over adaptive window o (start floor(o*in/out), end ceil((o+1)*in/out)); "
                    "output sizes of None keep the input's;  dx = A^T dy = _adaptive_avg_pool_backward(dy).")
    rrule(*keys)(rule)


def _adaptive_avg_pool_backward_rule(nd):
    op = _ADAPTIVE_AVG_BACKWARD[nd]
    fwd = _ADAPTIVE_AVG[nd]

    def rule(grad_output, self):
        gx = op(grad_output, self)
        sizes = list(grad_output.shape[grad_output.dim() - nd:])
        return gx, lambda g: (NoTangent(), fwd(g, sizes), NoTangent())

    rule.__name__ = rule.__qualname__ = f"_adaptive_avg_pool{nd}d_backward"
    rule.__doc__ = (f"gx = A^T gy, the adjoint of y = adaptive_avg_pool{nd}d(x) = A x;  "
                    f"dgy = A dgx = adaptive_avg_pool{nd}d(dgx, gy's sizes).")
    rrule(op, op.default)(rule)


for _nd in (1, 2, 3):
    _adaptive_avg_pool_rule(_nd)
for _nd in (2, 3):
    _adaptive_avg_pool_backward_rule(_nd)


# ---------------------------------------------------------------------------------------------
# power-average pooling

def _lp_pool_rule(nd):
    public = getattr(F, f"lp_pool{nd}d")

    def rule(input, norm_type, kernel_size, stride=None, ceil_mode=False):
        if nd == 1:
            window = kernel_size if isinstance(kernel_size, int) else math.prod(kernel_size)
        else:
            window = math.prod(_ntuple(kernel_size, nd))
        if isinstance(norm_type, (int, float)) and math.isinf(norm_type):
            a = input.abs()
            if norm_type > 0:
                m, _, back = _max_pool(nd, a, kernel_size, stride, 0, 1, ceil_mode)
                y = m
            else:
                m, _, back = _max_pool(nd, -a, kernel_size, stride, 0, 1, ceil_mode)
                y = -m
            return y, lambda dy: (NoTangent(), back(dy) * torch.sign(input)) + nondiff(4)
        p = norm_type
        s_stride = None if stride is None else stride
        u = input.pow(p)
        s = _AVG_POOL[nd](u, kernel_size, s_stride, 0, ceil_mode)
        z = (torch.sign(s) * F.relu(torch.abs(s))) * window
        y = z.pow(1.0 / p)

        def pullback(dy):
            dz = dy * ((1.0 / p) * z.pow(1.0 / p - 1))
            ds = torch.where(s.abs() > 0, dz * window * torch.sign(s), torch.zeros_like(dz)) * torch.sign(s)
            du = avg_pool_backward(nd, ds, u, kernel_size, s_stride, 0, ceil_mode, True)
            dx = du * (p * input.pow(p - 1)) if p != 0 else torch.zeros_like(input)
            return (NoTangent(), dx) + nondiff(4)

        return y, pullback

    rule.__name__ = rule.__qualname__ = f"lp_pool{nd}d"
    rule.__doc__ = ("y = (K * avg_pool(x^p))^(1/p), K the window size (p = +-inf: +-max_pool(+-|x|));  "
                    "ds = dy * (1/p) (K s)^(1/p - 1) * K where s != 0,  dx = avg_pool_backward(ds) * p x^(p-1);  "
                    "p = +-inf: dx = scatter_to_argmax(dy) * sign(x).")
    rrule(public)(rule)


for _nd in (1, 2, 3):
    if hasattr(F, f"lp_pool{_nd}d"):
        _lp_pool_rule(_nd)
