"""Rules for torch.fft: fft/ifft, rfft/irfft, hfft/ihfft in their 1-D, 2-D and n-D forms (with
``n``/``s``, ``dim`` and ``norm``), and fftshift/ifftshift.

Every transform is linear, so its pullback is its adjoint, again a transform:

* complex-to-complex: the adjoint of ``fftn(x, norm=m)`` is ``ifftn(dy, norm=m')`` and vice versa,
  where ``m'`` is the dual normalisation ('backward' <-> 'forward', 'ortho' <-> 'ortho'): the
  scaling moves to the other side;
* ``n``/``s`` first cut or zero-pad the input, whose adjoint zero-pads or cuts the cotangent back
  to the input's size;
* real-to-complex (rfft, one-sided): the cotangent is zero-padded to the full spectrum, inverse
  transformed, and its real part taken (torch's fft_r2c_backward);
* complex-to-real (irfft): the cotangent is transformed with rfft and the entries whose mirror
  image the one-sided input stands for are doubled (torch's fft_c2r_backward);
* hfft(x) = irfft(conj(x)) and ihfft(x) = conj(rfft(x)) with the dual normalisation, so their
  adjoints conjugate around those.

Cotangents follow torch's complex convention (``dL/dRe + i dL/dIm``); a real input of a complex
transform gets the real part.
"""
from __future__ import annotations

import torch

from ..ad.registry import rrule
from ._util import NoTangent, no_out
from ._util import conj as _conj

fft_ = torch.fft

_DUAL = {None: "forward", "backward": "forward", "forward": "backward", "ortho": "ortho"}


def _dual(norm):
    if norm not in _DUAL:
        raise ValueError(f"Invalid normalization mode: {norm}")
    return _DUAL[norm]


def _dims_sizes(x, s, dim, c2r=False):
    """(dims, sizes) as torch resolves ``s`` and ``dim``: dim None means the last len(s) dims (or
    all); s None (or -1 entries) means the input's sizes, except for the last dim of a
    complex-to-real transform, whose default output size is 2 (m - 1)."""
    nd = x.dim()
    if dim is None:
        dims = list(range(nd - len(s), nd)) if s is not None else list(range(nd))
    elif isinstance(dim, int):
        dims = [dim]
    else:
        dims = list(dim)
    dims = [d % nd for d in dims] if nd else dims
    if s is None:
        sizes = [x.shape[d] for d in dims]
        if c2r and dims:
            sizes[-1] = 2 * (x.shape[dims[-1]] - 1)
    else:
        sizes = list(s)
        for i, d in enumerate(dims):
            if sizes[i] == -1:
                sizes[i] = 2 * (x.shape[d] - 1) if c2r and i == len(dims) - 1 else x.shape[d]
    return dims, sizes


def _resize(g, shape, dims):
    """g cut or zero-padded (at the end) along each of dims to ``shape``: the adjoint of the
    input resizing that ``n``/``s`` do."""
    for d in dims:
        have, want = g.shape[d], shape[d]
        if have > want:
            g = g.narrow(d, 0, want)
        elif have < want:
            pad = list(g.shape)
            pad[d] = want - have
            g = torch.cat([g, g.new_zeros(pad)], d)
    return g


def _as_input(g, x):
    """g as the cotangent of x: its real part for a real x."""
    return g if x.is_complex() else g.real


def _c2c_back(x, dims, forward, norm):
    """Cotangent of x for y = fftn(resize(x)) (forward) or ifftn(resize(x))."""
    adjoint = fft_.ifftn if forward else fft_.fftn

    def back(dy):
        return _as_input(_resize(adjoint(dy, dim=dims, norm=_dual(norm)), x.shape, dims), x)

    return back


def _r2c_back(x, dims, sizes, norm):
    """Cotangent of x for y = one-sided rfftn(resize(x), norm): zero-pad to the full spectrum,
    ifftn with the dual normalisation, real part."""
    def back(dy):
        g = fft_.ifftn(dy, s=sizes, dim=dims, norm=_dual(norm)).real
        return _resize(g, x.shape, dims)

    return back


def _c2r_back(x, dims, sizes, norm):
    """Cotangent of x for y = irfftn(resize(x), s=sizes, norm): rfftn with the dual normalisation,
    entries 1 .. n - (n//2 + 1) of the last dim doubled (they stand for their mirror images)."""
    def back(dy):
        g = fft_.rfftn(dy, dim=dims, norm=_dual(norm))
        d, n = dims[-1], sizes[-1]
        half = n // 2 + 1
        doubled = n - half
        if doubled > 0:
            real = dy.dtype
            w = torch.cat([torch.ones(1, dtype=real, device=dy.device),
                           torch.full((doubled,), 2.0, dtype=real, device=dy.device),
                           torch.ones(half - 1 - doubled, dtype=real, device=dy.device)])
            g = g * w.reshape([-1] + [1] * (g.dim() - 1 - d))
        return _as_input(_resize(g, x.shape, dims), x)

    return back


# kind: (dims, sizes, pullback)
def _pullback(kind, x, s, dim, norm):
    if kind in ("fft", "ifft"):
        dims, _ = _dims_sizes(x, s, dim)
        return _c2c_back(x, dims, kind == "fft", norm)
    if kind == "rfft":
        dims, sizes = _dims_sizes(x, s, dim)
        return _r2c_back(x, dims, sizes, norm)
    if kind == "irfft":
        dims, sizes = _dims_sizes(x, s, dim, c2r=True)
        return _c2r_back(x, dims, sizes, norm)
    if kind == "hfft":  # hfftn(x, norm) = irfftn(conj(x), dual(norm))
        dims, sizes = _dims_sizes(x, s, dim, c2r=True)
        inner = _c2r_back(x, dims, sizes, _dual(norm))
        return lambda dy: _conj(inner(dy))
    if kind == "ihfft":  # ihfftn(x, norm) = conj(rfftn(x, dual(norm)))
        dims, sizes = _dims_sizes(x, s, dim)
        inner = _r2c_back(x, dims, sizes, _dual(norm))
        return lambda dy: inner(_conj(dy))
    raise AssertionError(kind)


_MATH = {
    "fft": "y = DFT(x) (complex);  dx = ifft of dy with the dual normalisation",
    "ifft": "y = inverse DFT(x);  dx = fft of dy with the dual normalisation",
    "rfft": "y = one-sided DFT of a real x;  dx = Re ifft(dy zero-padded to the full length), dual norm",
    "irfft": "y = real inverse DFT of a one-sided spectrum;  dx = rfft(dy) (dual norm) with the mirrored "
             "entries doubled",
    "hfft": "y = real DFT of a Hermitian signal = irfft(conj(x)) (dual norm);  dx = conj of irfft's "
            "cotangent",
    "ihfft": "y = conj(rfft(x)) (dual norm);  dx = rfft's cotangent of conj(dy)",
}


def _make_1d(kind, fn):
    def rule(input, n=None, dim=-1, norm=None, *, out=None):
        no_out(out)
        y = fn(input, n, dim, norm)
        back = _pullback(kind, input, None if n is None else [n], [dim], norm)
        return y, lambda dy: (NoTangent(), back(dy), NoTangent(), NoTangent(), NoTangent())

    rule.__name__ = rule.__qualname__ = kind
    rule.__doc__ = _MATH[kind] + " (n cuts / zero-pads x: dx is cut / padded back)."
    return rule


def _make_nd(name, kind, fn, default_dim):
    def rule(input, s=None, dim=default_dim, norm=None, *, out=None):
        no_out(out)
        y = fn(input, s, dim, norm)
        back = _pullback(kind, input, s, dim, norm)
        return y, lambda dy: (NoTangent(), back(dy), NoTangent(), NoTangent(), NoTangent())

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = _MATH[kind] + " over the transformed dims (s cuts / zero-pads x: dx is cut / padded back)."
    return rule


for _kind in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft"):
    globals()[_kind] = rrule(getattr(fft_, _kind))(_make_1d(_kind, getattr(fft_, _kind)))
    globals()[_kind + "2"] = rrule(getattr(fft_, _kind + "2"))(
        _make_nd(_kind + "2", _kind, getattr(fft_, _kind + "2"), (-2, -1)))
    globals()[_kind + "n"] = rrule(getattr(fft_, _kind + "n"))(
        _make_nd(_kind + "n", _kind, getattr(fft_, _kind + "n"), None))
del _kind


@rrule(fft_.fftshift)
def fftshift(input, dim=None):
    """y = x rolled by half its size along dim (all dims by default);  dx = ifftshift(dy)."""
    y = fft_.fftshift(input, dim)
    return y, lambda dy: (NoTangent(), fft_.ifftshift(dy, dim), NoTangent())


@rrule(fft_.ifftshift)
def ifftshift(input, dim=None):
    """y = x rolled back by half its size along dim;  dx = fftshift(dy)."""
    y = fft_.ifftshift(input, dim)
    return y, lambda dy: (NoTangent(), fft_.fftshift(dy, dim), NoTangent())
