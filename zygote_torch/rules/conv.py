"""Rules for convolutions: ``F.conv1d/2d/3d`` (``torch.conv1d/2d/3d`` are the same builtins),
``F.conv_transpose1d/2d/3d``, ``torch.convolution`` and ``torch._convolution``.

A convolution ``y = conv(x, w) + b`` is linear in each of ``x`` and ``w``. With stride ``s``,
padding ``p``, dilation ``d`` and ``G`` groups, per spatial dimension::

    y[n, o, i] = b[o] + sum_{c in group(o), k} w[o, c, k] * x[n, c, i*s + k*d - p]

so its pullback is made of convolutions again; for real inputs with symmetric padding the pullback
runs torch's fused ``aten.convolution_backward`` kernel instead (much faster on the CPU), whose own
rule differentiates these formulas, which keeps second derivatives on rules:

- ``dx = conv_transpose(dy, w, s, p, output_padding, G, d)``: the adjoint of ``x -> conv(x, w)``,
  with ``output_padding = (in + 2p - d(k-1) - 1) mod s`` recovering the exact input size;
- ``dw[o, c, k] = sum_{n, i} dy[n, o, i] * x[n, c, i*s + k*d - p]``: a convolution with the
  roles of batch and channels exchanged (``x`` as ``(C/G, G*N, ...)`` input, ``dy`` as
  ``(O, N, ...)`` weight, stride ``d``, dilation ``s``, groups ``G``), cut to the kernel size;
- ``db[o] = sum_{n, i} dy[n, o, i]``.

``conv_transpose(x, w)`` is the adjoint of ``conv(., w)`` (same stride, padding, dilation, groups),
so its pullback is ``dx = conv(dy, w)`` and ``dw = the weight cotangent of conv at (input dy,
output cotangent x)``. ``padding='same'`` with an odd total padding pads one more on the right, as
torch does; the pullback pads the input explicitly there. Unbatched inputs (no batch dimension)
are handled by adding the batch dimension inside the pullback. For complex tensors the other
factor enters conjugated (``dx = conv_transpose(dy, conj(w))``, ``dw`` from ``conj(x)``), torch's
convention for the cotangent of a complex-linear map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ..ad.tangents import Thunk
from ._util import NoTangent, materialize, nondiff, reference_pullback
from ._util import conj as _conj

Tensor = torch.Tensor
aten = torch.ops.aten

_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}
_CONV_T = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}


def _ntuple(v, n: int, name: str = "argument") -> tuple:
    """An int or a sequence (of length 1 or n) as an n-tuple of ints, as torch expands them."""
    if isinstance(v, (list, tuple, torch.Size)):
        v = tuple(int(e) for e in v)
        if len(v) == 1 and n != 1:
            return v * n
        if len(v) != n:
            raise ValueError(f"expected {name} to be a single integer or a list of {n} integers, got {list(v)}")
        return v
    return (int(v),) * n


def _pads(padding, nd: int, kernel, dilation) -> tuple:
    """(left pads, right pads) per spatial dim for an int/tuple padding or 'valid'/'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * nd, (0,) * nd
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            lo = tuple(t // 2 for t in total)
            return lo, tuple(t - l for t, l in zip(total, lo))
        raise ValueError(f"Invalid padding string '{padding}', should be one of {{'valid', 'same'}}")
    p = _ntuple(padding, nd, "padding")
    return p, p


def _batched(t: Tensor, nd: int) -> Tensor:
    return t if t.dim() == nd + 2 else t.unsqueeze(0)


def _unbatch(t: Tensor, like: Tensor, nd: int) -> Tensor:
    return t if like.dim() == nd + 2 else t.squeeze(0)


def _crop_to(t: Tensor, sizes, start=None) -> Tensor:
    """``t`` narrowed on its trailing spatial dims to ``sizes`` (from ``start``, default 0)."""
    nd = len(sizes)
    for i, n in enumerate(sizes):
        dim = t.dim() - nd + i
        s = 0 if start is None else start[i]
        if s != 0 or t.shape[dim] != n:
            t = t.narrow(dim, s, n)
    return t


def _bias_grad(dy: Tensor, nd: int) -> Tensor:
    """db[o] = sum of dy over the batch and spatial dims (dy batched)."""
    return dy.sum([0] + list(range(2, dy.dim())))


def _conv_input_grad(dy, weight, in_sizes, stride, lo, hi, dilation, groups):
    """The adjoint of ``x -> conv(x, weight)`` at ``dy`` (both batched): a transposed convolution
    whose output_padding recovers the input size ``in_sizes``."""
    nd = len(in_sizes)
    full = [(o - 1) * s + d * (k - 1) + 1 for o, s, d, k in zip(dy.shape[2:], stride, dilation, weight.shape[2:])]
    if lo == hi:  # output_padding = (in + 2p - d(k-1) - 1) mod s, always < stride
        op = tuple(n + 2 * p - f for n, p, f in zip(in_sizes, lo, full))
        return _CONV_T[nd](dy, weight, None, stride, lo, op, groups, dilation)
    # 'same' with an odd total padding (stride 1): the cotangent of the padded input, cut to x
    op = tuple(n + a + b - f for n, a, b, f in zip(in_sizes, lo, hi, full))
    return _crop_to(_CONV_T[nd](dy, weight, None, stride, 0, op, groups, dilation), in_sizes, lo)


def _conv_weight_grad(x, dy, weight_shape, stride, lo, hi, dilation, groups):
    """dw[o, c, k] = sum_{n, i} dy[n, o, i] x[n, c, i*s + k*d - p] (x, dy batched): a convolution
    of x, read as a (C/G)-batch with G*N channels, with dy as an (O, N, ...) weight; stride and
    dilation exchange roles."""
    nd = len(weight_shape) - 2
    N, C = x.shape[0], x.shape[1]
    G = groups
    if x.numel() == 0 or dy.numel() == 0:
        return dy.new_zeros(weight_shape)
    if lo != hi:
        x = F.pad(x, [q for a, b in reversed(list(zip(lo, hi))) for q in (a, b)])
        lo = (0,) * nd
    sp = tuple(x.shape[2:])
    xt = x.reshape((N, G, C // G) + sp).permute((2, 1, 0) + tuple(range(3, 3 + nd))).reshape((C // G, G * N) + sp)
    out = _CONV[nd](xt, dy.transpose(0, 1), None, dilation, lo, stride, G)  # (C/G, O, K'...)
    return _crop_to(out.transpose(0, 1), weight_shape[2:])


def _conv_rule(nd, input, weight, bias, stride, padding, dilation, groups, forward):
    """y = conv(x, w) + b and its pullback (dx, dw, db); ``forward`` computes y."""
    y = forward()
    st = _ntuple(stride, nd, "stride")
    dl = _ntuple(dilation, nd, "dilation")
    lo, hi = _pads(padding, nd, weight.shape[2:], dl)

    def pullback(dy):
        g = _batched(dy, nd)
        if lo == hi and not input.is_complex() and not weight.is_complex():
            return _fused_conv_cotangents(g, input, weight, bias, st, lo, dl, groups, nd)

        def dx():
            return _unbatch(_conv_input_grad(g, _conj(weight), input.shape[-nd:], st, lo, hi, dl, groups), input, nd)

        def dw():
            return _conv_weight_grad(_conj(_batched(input, nd)), g, weight.shape, st, lo, hi, dl, groups)

        db = Thunk(lambda: _bias_grad(g, nd)) if bias is not None else NoTangent()
        return Thunk(dx), Thunk(dw), db

    return y, pullback


def _fused_conv_cotangents(g, input, weight, bias, stride, padding, dilation, groups, nd):
    """(dx, dw, db) by torch's ``convolution_backward`` kernel, each lazily: the tape asks for the
    input's cotangent first when it needs it, so a first call from dw means dx is not needed."""
    done = {}

    def run(need_input):
        if "out" not in done:
            mask = [need_input, True, bias is not None]
            done["out"] = aten.convolution_backward(g, _batched(input, nd), weight, None if bias is None else
                                                    list(bias.shape), list(stride), list(padding), list(dilation),
                                                    False, [0] * nd, groups, mask)
        return done["out"]

    dx = Thunk(lambda: _unbatch(run(True)[0], input, nd))
    dw = Thunk(lambda: run(False)[1])
    db = Thunk(lambda: run(False)[2]) if bias is not None else NoTangent()
    return dx, dw, db


@rrule(aten.convolution_backward, aten.convolution_backward.default)
def convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask):
    """torch's convolution pullback kernel as an op (second derivatives): (dx, dw, db), linear in
    grad_output and bilinear overall; differentiated through the public-op formulas above."""
    out = aten.convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                                    output_padding, groups, output_mask)
    if transposed:
        raise NotImplementedError("differentiating aten.convolution_backward of a transposed convolution")
    nd = input.dim() - 2
    pads = tuple(padding)

    def reference(g, x, w):
        dx = _conv_input_grad(g, w, x.shape[-nd:], tuple(stride), pads, pads, tuple(dilation), groups)
        dw = _conv_weight_grad(x, g, w.shape, tuple(stride), pads, pads, tuple(dilation), groups)
        return dx, dw, _bias_grad(g, nd)

    def pullback(dout):
        likes = (input, weight, grad_output.new_empty(weight.shape[0]))  # the shapes of (dx, dw, db)
        douts = tuple(materialize(d, like=o) if isinstance(o, Tensor) else torch.zeros_like(like)
                      for d, o, like in zip(dout, out, likes))
        back = reference_pullback(reference, (grad_output, input, weight))
        dg, dx, dw = back(douts)
        return (NoTangent(), dg, dx, dw) + (NoTangent(),) * 8

    return out, pullback


def _conv_transpose_rule(nd, input, weight, bias, stride, padding, output_padding, groups, dilation, forward):
    """y = conv_transpose(x, w) + b (the adjoint of conv(., w)) and its pullback."""
    y = forward()
    st = _ntuple(stride, nd, "stride")
    dl = _ntuple(dilation, nd, "dilation")
    pd = _ntuple(padding, nd, "padding")

    def pullback(dy):
        g = _batched(dy, nd)
        x = _batched(input, nd)

        def dx():
            # conv of dy can be longer than x when output_padding >= stride (allowed if < dilation)
            return _unbatch(_crop_to(_CONV[nd](g, _conj(weight), None, st, pd, dl, groups), x.shape[2:]), input, nd)

        def dw():
            return _conv_weight_grad(g, _conj(x), weight.shape, st, pd, pd, dl, groups)

        db = Thunk(lambda: _bias_grad(g, nd)) if bias is not None else NoTangent()
        return Thunk(dx), Thunk(dw), db

    return y, pullback


def _make_conv(nd):
    conv = _CONV[nd]

    def rule(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        y, back = _conv_rule(nd, input, weight, bias, stride, padding, dilation, groups,
                             lambda: conv(input, weight, bias, stride, padding, dilation, groups))

        def pullback(dy):
            dx, dw, db = back(dy)
            return (NoTangent(), dx, dw, db) + nondiff(4)

        return y, pullback

    rule.__name__ = rule.__qualname__ = f"conv{nd}d"
    rule.__doc__ = (f"y = conv{nd}d(x, w, b, stride, padding, dilation, groups) (padding an int, a tuple, "
                    "'valid' or 'same');  dx = conv_transpose(dy, w) with the output padding that recovers "
                    "x's size,  dw = conv(x as a (C/G)-batch, dy as weight, stride=dilation, "
                    "dilation=stride) cut to the kernel,  db = sum(dy) over batch and space. "
                    "See the module docs.")
    return rule


def _make_conv_transpose(nd):
    conv_t = _CONV_T[nd]

    def rule(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        y, back = _conv_transpose_rule(
            nd, input, weight, bias, stride, padding, output_padding, groups, dilation,
            lambda: conv_t(input, weight, bias, stride, padding, output_padding, groups, dilation))

        def pullback(dy):
            dx, dw, db = back(dy)
            return (NoTangent(), dx, dw, db) + nondiff(5)

        return y, pullback

    rule.__name__ = rule.__qualname__ = f"conv_transpose{nd}d"
    rule.__doc__ = (f"y = conv_transpose{nd}d(x, w, b, stride, padding, output_padding, groups, dilation), "
                    "the adjoint of conv(., w);  dx = conv(dy, w, stride, padding, dilation, groups),  "
                    "dw = the weight cotangent of conv at input dy and output cotangent x,  "
                    "db = sum(dy) over batch and space.")
    return rule


for _nd in (1, 2, 3):
    rrule(_CONV[_nd])(_make_conv(_nd))
    rrule(_CONV_T[_nd])(_make_conv_transpose(_nd))


def _convolution_rule(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, forward):
    nd = weight.dim() - 2
    if transposed:
        return _conv_transpose_rule(nd, input, weight, bias, stride, padding, output_padding, groups, dilation,
                                    forward)
    return _conv_rule(nd, input, weight, bias, stride, padding, dilation, groups, forward)


@rrule(torch.convolution)
def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """torch.convolution: conv{1,2,3}d, or conv_transpose{1,2,3}d when ``transposed``; see those rules."""
    y, back = _convolution_rule(input, weight, bias, stride, padding, dilation, transposed, output_padding,
                                groups, lambda: torch.convolution(input, weight, bias, stride, padding, dilation,
                                                                  transposed, output_padding, groups))

    def pullback(dy):
        dx, dw, db = back(dy)
        return (NoTangent(), dx, dw, db) + nondiff(6)

    return y, pullback


@rrule(torch._convolution)
def _convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
                 benchmark, deterministic, cudnn_enabled, allow_tf32):
    """torch._convolution: torch.convolution with backend flags (ignored by the math)."""
    y, back = _convolution_rule(input, weight, bias, stride, padding, dilation, transposed, output_padding,
                                groups, lambda: torch._convolution(input, weight, bias, stride, padding, dilation,
                                                                   transposed, output_padding, groups, benchmark,
                                                                   deterministic, cudnn_enabled, allow_tf32))

    def pullback(dy):
        dx, dw, db = back(dy)
        return (NoTangent(), dx, dw, db) + nondiff(10)

    return y, pullback
