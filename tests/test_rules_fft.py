"""torch.fft rules (rules/fft.py) against torch.autograd on real and complex inputs (dynamic and
staged), for every transform, n / s (cutting and zero-padding), dim and norm, plus finite
differences. Complex results are compared through torch.view_as_real, since check_gradient draws
a random cotangent for real outputs only."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch

import zygote_torch.rules.fft as fr  # noqa: F401  (registers the rules)
import zygote_torch.rules.special  # noqa: F401  (view_as_real / resolve_conj for complex outputs)
from zygote_torch.ad.registry import REGISTRY
from helpers import check_second_derivatives, check_gradient, fd_check, noncontiguous

FFT = torch.fft
F64, C128 = torch.float64, torch.complex128
NORMS = [None, "backward", "forward", "ortho"]


def R(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed + 100 * len(shape))
    return torch.randn(shape, dtype=dtype, generator=g)


def out(t):
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


# input kinds each transform accepts: c2c and c2r take real or complex, r2c only real
ONE_D = {"fft": (F64, C128), "ifft": (F64, C128), "rfft": (F64,), "irfft": (F64, C128),
         "hfft": (F64, C128), "ihfft": (F64,)}


@pytest.mark.parametrize("name", list(ONE_D))
@pytest.mark.parametrize("norm,n", [(None, None), ("backward", 3), ("forward", 11), ("ortho", None),
                                    ("ortho", 6), ("forward", 4)])
def test_one_dimensional(name, norm, n):
    f = getattr(FFT, name)
    for dtype in ONE_D[name]:
        check_gradient(lambda x: out(f(x, n=n, norm=norm)), R(2, 6, dtype=dtype))
    if norm is None:
        x = R(6, 2, dtype=ONE_D[name][-1])
        check_gradient(lambda x: out(f(x, 5, 0, "ortho")), x)  # another dim, positionally
        check_gradient(lambda x: out(f(input=x, n=7, dim=-1)), noncontiguous(x))


N_D = {k: v for k, v in ONE_D.items()}


@pytest.mark.parametrize("name", list(N_D))
@pytest.mark.parametrize("norm,s", [(None, None), ("forward", (3, 7)), ("ortho", (6, -1)), ("backward", (5, 4))])
def test_two_dimensional(name, norm, s):
    f = getattr(FFT, name + "2")
    for dtype in N_D[name]:
        check_gradient(lambda x: out(f(x, s=s, norm=norm)), R(2, 4, 5, dtype=dtype))
    if norm is None:
        check_gradient(lambda x: out(f(x, (3, 4), (0, 2), "ortho")), R(4, 2, 5, dtype=N_D[name][-1]))


@pytest.mark.parametrize("name", list(N_D))
@pytest.mark.parametrize("norm,s,dim", [(None, None, None), ("ortho", (3, 4), None), ("forward", (5, -1, 3), (0, 1, 2)),
                                        ("backward", None, (2, 0)), ("ortho", (4,), (1,))])
def test_n_dimensional(name, norm, s, dim):
    f = getattr(FFT, name + "n")
    for dtype in N_D[name]:
        check_gradient(lambda x: out(f(x, s=s, dim=dim, norm=norm)), R(3, 4, 5, dtype=dtype))
    if norm is None:
        check_gradient(lambda x: out(f(input=x, s=(2, 6), dim=(1, 2), norm="forward")),
                       noncontiguous(R(3, 4, 5, dtype=N_D[name][-1])))


def test_irfft_odd_and_small_lengths():
    # the doubled entries depend on the output length's parity; length 1 and 2 have none
    for n in (1, 2, 3, 4, 5, 9):
        check_gradient(lambda x: FFT.irfft(x, n=n), R(3, 4, dtype=C128))
        check_gradient(lambda x: FFT.hfft(x, n=n, norm="ortho"), R(3, 4, dtype=C128))
    check_gradient(lambda x: FFT.irfftn(x, s=(3, 5)), R(4, 3, dtype=C128))


def test_batched():
    # (empty batches are not tested: torch's CPU FFT (MKL) rejects them in the forward)
    check_gradient(lambda x: out(FFT.fft(x)), R(2, 3, 4, dtype=C128))
    check_gradient(lambda x: out(FFT.rfft2(x)), R(2, 3, 4, 5))


def test_shifts():
    x = R(4, 5)
    check_gradient(FFT.fftshift, x)
    check_gradient(lambda x: FFT.ifftshift(x, dim=1), x)
    check_gradient(lambda x: FFT.fftshift(input=x, dim=(0,)), noncontiguous(x))
    check_gradient(lambda x: out(FFT.ifftshift(x)), R(3, 5, dtype=C128))
    check_gradient(lambda x: FFT.fftshift(FFT.ifftshift(x, -1), 0), x)


def test_composite_spectral_filter():
    """A typical use: filter in the frequency domain and transform back."""
    x, h = R(2, 16), R(9, seed=1)
    check_gradient(lambda x, h: FFT.irfft(FFT.rfft(x) * h, n=16), x, h)
    check_gradient(lambda x: FFT.ifft(FFT.fft(x, norm="ortho") * 2j, norm="ortho").real, R(2, 8, dtype=C128))
    check_gradient(lambda x: FFT.fft2(x).abs(), R(4, 4))


FD_CASES = {
    "fft": (lambda x: out(FFT.fft(x, n=5)), R(4, dtype=C128)),
    "ifft_real": (lambda x: out(FFT.ifft(x, norm="ortho")), R(4)),
    "rfft": (lambda x: out(FFT.rfft(x, n=7, norm="forward")), R(5)),
    "irfft": (lambda x: FFT.irfft(x, n=6), R(4, dtype=C128)),
    "irfft_odd": (lambda x: FFT.irfft(x, n=5, norm="ortho"), R(3, dtype=C128)),
    "hfft": (lambda x: FFT.hfft(x, n=5), R(3, dtype=C128)),
    "ihfft": (lambda x: out(FFT.ihfft(x, norm="forward")), R(5)),
    "fftn": (lambda x: out(FFT.fftn(x, s=(3, 2))), R(2, 3, dtype=C128)),
    "rfft2": (lambda x: out(FFT.rfft2(x, s=(3, 5))), R(2, 4)),
    "irfftn": (lambda x: FFT.irfftn(x, s=(2, 5), norm="ortho"), R(2, 3, dtype=C128)),
    "hfft2": (lambda x: FFT.hfft2(x), R(2, 3, dtype=C128)),
    "ihfftn": (lambda x: out(FFT.ihfftn(x)), R(2, 4)),
}


@pytest.mark.parametrize("name", list(FD_CASES))
def test_finite_differences(name):
    f, x = FD_CASES[name]
    fd_check(f, x)


@pytest.mark.parametrize("name", [k + suffix for k in ONE_D for suffix in ("", "2", "n")] + ["fftshift", "ifftshift"])
def test_registered(name):
    assert REGISTRY.lookup(getattr(FFT, name)).fn is getattr(fr, name)


# -- second derivatives: the pullbacks themselves only call ops with rules ------------------------

SECOND_ORDER = {
    "fft": (lambda x: torch.fft.rfft(x).abs().pow(2).sum() + torch.fft.irfft(torch.fft.fft(x)).pow(3).sum(), R(6)),
    "fftn": (lambda x: torch.fft.ifftn(torch.fft.rfftn(x.reshape(2, 3)), s=(2, 4)).abs().pow(2).sum(), R(6)),
    "hfft": (lambda x: torch.fft.hfft(torch.fft.ihfft(x) * 2, n=6).pow(3).sum(), R(6)),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_second_derivatives_through_rules(name):
    check_second_derivatives(*SECOND_ORDER[name])
