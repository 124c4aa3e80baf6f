"""Rules of zygote_torch/rules/conv.py against torch.autograd (float64), finite differences and
second derivatives (Hessian-vector products through the rules, no fallback)."""
import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt
import zygote_torch.rules.conv  # noqa: F401
import zygote_torch.rules.resample  # noqa: F401  (F.pad, used by the 'same' pullback)
from helpers import check_gradient, check_hvp, gradcheck, noncontiguous, rand

Tensor = torch.Tensor

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

# (nd, keyword arguments, input shape, weight shape)
CONV_CASES = [
    (1, {}, (2, 4, 9), (6, 4, 3)),
    (1, dict(stride=2, padding=1, dilation=2, groups=2), (3, 4, 11), (6, 2, 3)),
    (1, dict(padding="same", dilation=3), (2, 3, 10), (5, 3, 4)),
    (1, dict(padding="valid", stride=3), (2, 3, 10), (5, 3, 4)),
    (2, {}, (2, 3, 7, 6), (4, 3, 3, 2)),
    (2, dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), (2, 4, 9, 8), (6, 2, 3, 2)),
    (2, dict(stride=3, padding=2), (1, 2, 10, 11), (3, 2, 4, 3)),  # output_padding 2 to recover the input
    (2, dict(padding="same"), (2, 4, 7, 8), (3, 4, 2, 3)),  # even kernel: one more pad on the right
    (2, dict(padding="same", dilation=(2, 1), groups=4), (2, 4, 7, 8), (8, 1, 3, 4)),
    (2, dict(padding="valid"), (2, 4, 7, 8), (3, 4, 2, 3)),
    (2, dict(groups=3), (2, 3, 5, 5), (3, 1, 3, 3)),  # depthwise
    (2, dict(stride=(2,), padding=(1,)), (2, 3, 7, 6), (4, 3, 3, 2)),  # one-element tuples broadcast
    (3, dict(stride=2, padding=1, groups=3), (1, 3, 5, 6, 7), (6, 1, 3, 2, 3)),
    (3, dict(padding="same", dilation=2), (2, 2, 4, 5, 3), (3, 2, 2, 3, 2)),
]


@pytest.mark.parametrize("nd,kw,xs,ws", CONV_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv(nd, kw, xs, ws, with_bias):
    x, w, b = rand(*xs), rand(*ws, seed=1), rand(ws[0], seed=2)
    if with_bias:
        check_gradient(lambda x, w, b: CONV[nd](x, w, b, **kw), x, w, b)
    else:
        check_gradient(lambda x, w: CONV[nd](x, w, **kw), x, w)


@pytest.mark.parametrize("nd,kw,xs,ws", [CONV_CASES[1], CONV_CASES[5], CONV_CASES[7], CONV_CASES[12]])
def test_conv_unbatched(nd, kw, xs, ws):
    check_gradient(lambda x, w, b: CONV[nd](x, w, b, **kw), rand(*xs[1:]), rand(*ws, seed=1), rand(ws[0], seed=2))


@pytest.mark.parametrize("call", [
    lambda x, w, b: torch.conv2d(x, w, b, 2, 1),
    lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
    lambda x, w, b: F.conv2d(input=x, weight=w, bias=b, stride=2, padding=1),
    lambda x, w, b: F.conv2d(x, w, bias=b, padding="same", dilation=2),
    lambda x, w, b: torch.convolution(x, w, b, [2, 2], [1, 1], [1, 1], False, [0, 0], 1),
    lambda x, w, b: torch._convolution(x, w, b, [1, 2], [0, 1], [2, 1], False, [0, 0], 1, False, False, True, True),
    lambda x, w, b: torch.nn.functional.conv2d(x, w, b, 1, 0, 1, 1),
])
def test_conv_forms(call):
    check_gradient(call, rand(2, 4, 7, 8), rand(3, 4, 3, 2, seed=1), rand(3, seed=2))


def test_conv_noncontiguous():
    x, w, b = rand(2, 4, 7, 8), rand(6, 2, 3, 2, seed=1), rand(6, seed=2)
    check_gradient(lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=2),
                   noncontiguous(x), noncontiguous(w), noncontiguous(b))
    # channels-last and transposed layouts
    check_gradient(lambda x, w: F.conv2d(x, w, groups=2), x.to(memory_format=torch.channels_last),
                   w.transpose(2, 3).contiguous().transpose(2, 3))


def test_conv_empty_batch():
    check_gradient(lambda x, w, b: F.conv2d(x, w, b, padding=1), rand(0, 3, 5, 4), rand(2, 3, 3, 3, seed=1),
                   rand(2, seed=2))
    check_gradient(lambda x, w, b: F.conv_transpose1d(x, w, b, stride=2), rand(0, 3, 5), rand(3, 2, 3, seed=1),
                   rand(2, seed=2))


def test_conv_in_a_module():
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1).double()
    x = rand(2, 3, 7, 7)
    g = zt.gradient(lambda m, x: conv(x).pow(2).sum(), conv, x)
    xr = x.clone().requires_grad_()
    ref = torch.autograd.grad(conv(xr).pow(2).sum(), [conv.weight, conv.bias, xr])
    torch.testing.assert_close(g[0]["weight"], ref[0])
    torch.testing.assert_close(g[0]["bias"], ref[1])
    torch.testing.assert_close(g[1], ref[2])
    assert not zt.fallbacks(lambda x: conv(x).sum(), x)


# (nd, keyword arguments, input shape, weight shape)
CONV_T_CASES = [
    (1, {}, (2, 4, 9), (4, 3, 3)),
    (1, dict(stride=2, padding=1, output_padding=1, dilation=2, groups=2), (2, 4, 6), (4, 3, 3)),
    (2, {}, (2, 3, 4, 5), (3, 2, 2, 3)),
    (2, dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2), groups=2, dilation=(1, 2)), (2, 4, 5, 4),
     (4, 3, 3, 2)),
    (2, dict(stride=1, output_padding=1, dilation=2), (2, 4, 5, 4), (4, 3, 3, 2)),  # output_padding >= stride
    (3, dict(stride=2, padding=1), (1, 3, 3, 4, 2), (3, 2, 3, 2, 3)),
    (3, dict(stride=(1, 2, 1), groups=3, output_padding=(0, 1, 0)), (2, 3, 2, 3, 2), (3, 1, 2, 2, 2)),
]


@pytest.mark.parametrize("nd,kw,xs,ws", CONV_T_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_transpose(nd, kw, xs, ws, with_bias):
    x, w, b = rand(*xs), rand(*ws, seed=1), rand(ws[1] * kw.get("groups", 1), seed=2)
    if with_bias:
        check_gradient(lambda x, w, b: CONV_T[nd](x, w, b, **kw), x, w, b)
    else:
        check_gradient(lambda x, w: CONV_T[nd](x, w, **kw), x, w)


@pytest.mark.parametrize("call", [
    lambda x, w, b: F.conv_transpose2d(x[0], w, b, stride=2, padding=1, output_padding=1),  # unbatched
    lambda x, w, b: torch.conv_transpose2d(x, w, b, 2, 1, 1, 1, 1),
    lambda x, w, b: F.conv_transpose2d(input=x, weight=w, bias=b, stride=2, dilation=2, output_padding=1),
    lambda x, w, b: torch.convolution(x, w, b, [2, 1], [1, 0], [1, 1], True, [1, 0], 1),
])
def test_conv_transpose_forms(call):
    check_gradient(call, rand(2, 4, 5, 4), rand(4, 3, 3, 2, seed=1), rand(3, seed=2))


def test_conv_transpose_noncontiguous():
    check_gradient(lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, groups=2),
                   noncontiguous(rand(2, 4, 5, 4)), noncontiguous(rand(4, 3, 3, 2, seed=1)),
                   noncontiguous(rand(6, seed=2)))


def test_conv_errors_come_from_torch():
    with pytest.raises(RuntimeError):
        zt.gradient(lambda x, w: F.conv2d(x, w).sum(), rand(2, 3, 5, 5), rand(4, 2, 3, 3))
    with pytest.raises(RuntimeError):  # 'same' with stride > 1
        zt.gradient(lambda x, w: F.conv2d(x, w, stride=2, padding="same").sum(), rand(2, 3, 5, 5), rand(4, 3, 3, 3))


@pytest.mark.parametrize("f,shapes", [
    (lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1, dilation=2, groups=2), [(2, 4, 9), (4, 2, 3), (4,)]),
    (lambda x, w, b: F.conv2d(x, w, b, padding="same"), [(1, 2, 4, 5), (3, 2, 2, 3), (3,)]),
    (lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=2),
     [(1, 4, 3, 3), (4, 1, 3, 2), (2,)]),
    (lambda x, w, b: F.conv3d(x, w, b, stride=(1, 2, 1)), [(1, 2, 3, 4, 3), (2, 2, 2, 2, 2), (2,)]),
])
def test_conv_gradcheck(f, shapes):
    gradcheck(f, *[rand(*s, seed=i) for i, s in enumerate(shapes)])


@pytest.mark.parametrize("f,shapes", [
    (lambda x, w: (F.conv2d(x, w, stride=2, padding=1, dilation=2, groups=2) ** 2).sum()
     + F.conv2d(x, w, stride=2, padding=1, dilation=2, groups=2).sin().sum(), [(2, 4, 9, 8), (6, 2, 3, 2)]),
    (lambda x, w: (F.conv2d(x, w, padding="same", dilation=(1, 2)) ** 3).sum(), [(2, 3, 7, 8), (4, 3, 2, 3)]),
    (lambda x, w: (F.conv1d(x, w, stride=3, padding="valid") ** 2).sum(), [(2, 3, 10), (4, 3, 3)]),
    (lambda x, w, b: (F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=2, dilation=2)
                      ** 3).sum(), [(2, 4, 5, 4), (4, 3, 3, 2), (6,)]),
    (lambda x, w: (F.conv3d(x, w, padding=1) ** 2).sum(), [(1, 2, 3, 4, 3), (2, 2, 2, 2, 2)]),
])
def test_conv_second_order(f, shapes):
    """Hessian-vector products (mixed input/weight terms too) equal torch's double backward, through rules."""
    check_hvp(f, *[rand(*s, seed=i) for i, s in enumerate(shapes)])


def test_conv_hessian():
    x, w = rand(1, 2, 4), rand(2, 2, 3, seed=1)
    h = zt.hessian(lambda w: (F.conv1d(x, w, padding=1) ** 2).sum(), w)
    ref = torch.autograd.functional.hessian(lambda w: (F.conv1d(x, w, padding=1) ** 2).sum(), w)
    torch.testing.assert_close(h, ref)


def test_conv_staged_backward_uses_torch_kernel_and_its_rule():
    """The generated backward is torch's convolution_backward kernel (no fallback), and that
    kernel's own rule (public convolutions) gives exact second derivatives."""
    src = zt.code(lambda x, w: F.conv2d(x, w, stride=2, padding=1).sum(), rand(1, 2, 5, 5), rand(3, 2, 3, 3, seed=1))
    backward = src.split("# backward")[1]
    assert "convolution_backward" in backward and "vjp" not in backward
    x, w = rand(1, 2, 5, 5), rand(3, 2, 3, 3, seed=1)
    f = lambda w: (F.conv2d(x, w.reshape(3, 2, 3, 3), stride=2, padding=1) ** 2).sum()  # noqa: E731
    torch.testing.assert_close(zt.hessian(f, w.reshape(-1)), torch.autograd.functional.hessian(f, w.reshape(-1)))
    assert zt.fallbacks(lambda v: zt.gradient(f, v)[0].sum(), w.reshape(-1)) == []


@pytest.mark.parametrize("f", [
    lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=2),
    lambda x, w, b: F.conv1d(x[..., 0], w[..., 0], b, padding="same", dilation=2, groups=2),
    lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, output_padding=1, groups=2),
])
def test_conv_complex(f):
    """Complex inputs: torch's cotangent convention (the other factor conjugated)."""
    x, w, b = (rand(2, 4, 5, 4, dtype=torch.complex128), rand(4, 2, 3, 2, dtype=torch.complex128, seed=1),
               rand(4, dtype=torch.complex128, seed=2))
    check_gradient(f, x, w, b)
