"""Rules of zygote_torch/rules/resample.py against torch.autograd (float64), finite differences and
second derivatives through the rules."""
import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt
import zygote_torch.rules.pooling  # noqa: F401  ('area' mode)
import zygote_torch.rules.resample  # noqa: F401
from helpers import check_gradient, check_hvp, gradcheck, noncontiguous, rand

aten = torch.ops.aten
pytestmark = [pytest.mark.filterwarnings("ignore:`nn.functional.upsample"),
              pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid")]


X1, X2, X3 = rand(2, 3, 7), rand(2, 3, 5, 6), rand(1, 2, 3, 4, 5)

# ---------------------------------------------------------------------------------------------
# interpolate

INTERPOLATE = [
    (lambda x: F.interpolate(x, scale_factor=2), X1),
    (lambda x: F.interpolate(x, size=4), X1),
    (lambda x: F.interpolate(x, scale_factor=0.6, mode="nearest-exact"), X1),
    (lambda x: F.interpolate(x, size=11, mode="linear"), X1),
    (lambda x: F.interpolate(x, scale_factor=1.7, mode="linear", align_corners=True), X1),
    (lambda x: F.interpolate(x, scale_factor=1.7, mode="linear", recompute_scale_factor=True), X1),
    (lambda x: F.interpolate(x, scale_factor=0.5, mode="area"), X1),
    (lambda x: F.interpolate(x, scale_factor=(1.5, 2.3)), X2),
    (lambda x: F.interpolate(x, size=(7, 4), mode="nearest-exact"), X2),
    (lambda x: F.interpolate(x, size=(7, 9), mode="bilinear"), X2),
    (lambda x: F.interpolate(x, scale_factor=(1.5, 2.3), mode="bilinear"), X2),
    (lambda x: F.interpolate(x, scale_factor=(1.5, 2.3), mode="bilinear", recompute_scale_factor=True), X2),
    (lambda x: F.interpolate(x, scale_factor=0.7, mode="bilinear", align_corners=True), X2),
    (lambda x: F.interpolate(x, scale_factor=1.3, mode="bicubic", align_corners=True), X2),
    (lambda x: F.interpolate(x, size=(8, 3), mode="bicubic"), X2),
    (lambda x: F.interpolate(x, size=(3, 4), mode="bicubic", antialias=True), X2),
    (lambda x: F.interpolate(x, size=(3, 4), mode="bilinear", antialias=True), X2),
    (lambda x: F.interpolate(x, scale_factor=0.7, mode="area"), X2),
    (lambda x: F.interpolate(x, size=(4, 4), mode="area"), X2),
    (lambda x: F.interpolate(x, scale_factor=2, mode="trilinear"), X3),
    (lambda x: F.interpolate(x, size=(2, 5, 3), mode="trilinear", align_corners=True), X3),
    (lambda x: F.interpolate(x, size=(2, 3, 3), mode="area"), X3),
    (lambda x: F.interpolate(x, size=(2, 3, 7), mode="nearest"), X3),
    (lambda x: F.interpolate(x, scale_factor=(1.5, 0.8, 2), mode="nearest-exact"), X3),
    (lambda x: F.interpolate(input=x, size=None, scale_factor=2.0, mode="bilinear", align_corners=False), X2),
    (lambda x: F.upsample(x, scale_factor=2, mode="bilinear"), X2),
    (lambda x: F.upsample_nearest(x, scale_factor=2), X2),
    (lambda x: F.upsample_bilinear(x, scale_factor=2), X2),
    (lambda x: torch.nn.Upsample(scale_factor=3, mode="nearest")(x), X2),
]
if hasattr(aten, "_upsample_lanczos2d_aa"):
    INTERPOLATE.append((lambda x: F.interpolate(x, size=(3, 4), mode="lanczos", antialias=True), X2))


@pytest.mark.parametrize("f,x", INTERPOLATE)
def test_interpolate(f, x):
    check_gradient(f, x)


def test_interpolate_noncontiguous():
    check_gradient(lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear"), noncontiguous(X2))
    check_gradient(lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), X2.to(memory_format=torch.channels_last))
    check_gradient(lambda x: F.interpolate(x, size=5, mode="linear"), noncontiguous(X1))


def test_interpolate_empty_batch():
    check_gradient(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), rand(0, 3, 4, 4))
    # torch's own meta kernel of upsample_nearest{1,2}d fails on an empty batch under FakeTensorMode
    # ("cond must be a bool, but got <class 'int'>", torch/_meta_registrations.py), so the staged
    # path cannot trace that forward at all: the dynamic path is checked.
    check_gradient(lambda x: F.interpolate(x, size=3, mode="nearest"), rand(0, 2, 5), staged_too=False)


def test_interpolate_errors_come_from_torch():
    with pytest.raises(ValueError, match="only one of size or scale_factor"):
        zt.gradient(lambda x: F.interpolate(x, size=3, scale_factor=2).sum(), X1)
    with pytest.raises(ValueError, match="align_corners"):
        zt.gradient(lambda x: F.interpolate(x, size=3, align_corners=True).sum(), X1)


@pytest.mark.parametrize("name,x,args", [
    ("upsample_nearest1d", X1, ([12], 1.7)),
    ("upsample_nearest2d", X2, ([9, 4], None, None)),
    ("_upsample_nearest_exact2d", X2, ([9, 4], None, 0.7)),
    ("upsample_linear1d", X1, ([10], True, None)),
    ("upsample_bilinear2d", X2, ([7, 8], False, 1.5, 1.4)),
    ("upsample_bicubic2d", X2, ([7, 8], True, None, None)),
    ("_upsample_bilinear2d_aa", X2, ([3, 4], False, None, None)),
    ("upsample_trilinear3d", X3, ([4, 5, 6], False, None, None, None)),
    ("upsample_nearest3d", X3, ([4, 5, 6], None, None, None)),
])
def test_upsample_ops_and_their_backward_ops(name, x, args):
    """The aten kernels and their backward ops (each the other's adjoint) have rules."""
    fwd, bwd = getattr(aten, name), getattr(aten, name + "_backward")
    check_gradient(lambda x: fwd(x, *args), x)
    check_gradient(lambda x: fwd.default(x, *args), x)
    y = fwd(x, *args)
    output_size, rest = args[0], args[1:]
    check_gradient(lambda g: bwd(g, output_size, list(x.shape), *rest), rand(*y.shape, seed=4))
    if all(r is None for r in rest):  # keywords, defaults for the scales
        check_gradient(lambda g: bwd.default(g, output_size=output_size, input_size=list(x.shape)),
                       rand(*y.shape, seed=4))


@pytest.mark.parametrize("call", [
    lambda x: aten._upsample_bilinear2d_aa(x, [3, 4], False, None),  # the .vec overload through the packet
    lambda x: aten._upsample_bilinear2d_aa(x, None, True, [0.6, 0.7]),
    lambda x: aten.upsample_nearest2d(x, None, [1.5, 2.0]),
    lambda x: aten.upsample_nearest2d.vec(x, [7, 9], None),
    lambda x: aten.upsample_bilinear2d(x, [7, 9], True, scales_h=1.4),
    lambda x: aten.upsample_bilinear2d(x, output_size=None, align_corners=False, scale_factors=[1.5, 1.5]),
    lambda x: aten.upsample_bicubic2d.vec(x, None, False, [1.3, 0.9]),
])
def test_upsample_op_overloads(call):
    check_gradient(call, X2)


# ---------------------------------------------------------------------------------------------
# pad

PAD = [
    (lambda x: F.pad(x, (1, 2)), X1),
    (lambda x: F.pad(x, (1, 2), value=3.5), X1),
    (lambda x: F.pad(x, (1, -2, 0, 3), value=2.5), X2),
    (lambda x: F.pad(x, (-1, -1, -2, 0)), X2),
    (lambda x: F.pad(x, (1, 1, 1, 1, 1, 1, 1, 1)), X2),  # every dim, batch included
    (lambda x: F.pad(x, pad=(2, 0), mode="constant", value=-1.0), X1),
    (lambda x: F.pad(x, (2, 1), mode="reflect"), X1),
    (lambda x: F.pad(x, (2, 1, 3, 2), mode="reflect"), X2),
    (lambda x: F.pad(x, (2, 1, 3, 2, 1, 1), mode="reflect"), X3),
    (lambda x: F.pad(x, (-1, 2), mode="reflect"), X1),
    (lambda x: F.pad(x, (2, 1), mode="replicate"), X1),
    (lambda x: F.pad(x, (2, 1, 3, 0), mode="replicate"), X2),
    (lambda x: F.pad(x, (4, 1, 3, 2, 0, 2), mode="replicate"), X3),
    (lambda x: F.pad(x, (2, 1, 3, 2), mode="circular"), X2),
    (lambda x: F.pad(x, (2, 1, 3, 2, 1, 1), mode="circular"), X3),
    (lambda x: F.pad(x, (-1, 2), mode="circular"), X1),
    (lambda x: F.pad(x, (3, -2), mode="circular"), X1),
    (lambda x: F.pad(x, (1, 1), "reflect"), X1[0]),  # unbatched
    (lambda x: F.pad(x, (1, 2, 2, 1), "replicate"), X2[0]),
    (lambda x: torch._C._nn.pad(x, [1, 1], "circular"), X1),
    (lambda x: torch.constant_pad_nd(x, (1, 2, 0, -1), 3.0), X2),
    (lambda x: torch.nn.ReflectionPad2d(2)(x), X2),
    (lambda x: torch.nn.ZeroPad2d((1, 0, 2, 1))(x), X2),
    (lambda x: torch.nn.ReplicationPad3d(1)(x), X3),
    (lambda x: torch.nn.CircularPad1d(2)(x), X1),
]


@pytest.mark.parametrize("f,x", PAD)
def test_pad(f, x):
    check_gradient(f, x)


def test_pad_0d_and_empty():
    check_gradient(lambda x: F.pad(x, ()), rand())
    check_gradient(lambda x: F.pad(x, (1, 2)), rand(0, 3))
    check_gradient(lambda x: F.pad(x, (0, 0, 1, 1)), rand(3, 0))
    check_gradient(lambda x: F.pad(x, (1, 1), mode="reflect"), rand(0, 2, 4))


def test_pad_noncontiguous():
    for mode in ("constant", "reflect", "replicate", "circular"):
        check_gradient(lambda x: F.pad(x, (1, 2, 2, 1), mode=mode), noncontiguous(X2))


# ---------------------------------------------------------------------------------------------
# permutations and im2col

SHUFFLE = [
    (lambda x: F.pixel_shuffle(x, 2), rand(2, 8, 3, 4)),
    (lambda x: torch.pixel_shuffle(x, upscale_factor=3), rand(9, 2, 3)),  # unbatched
    (lambda x: F.pixel_shuffle(x, 2), rand(2, 3, 8, 2, 2)),  # extra batch dims
    (lambda x: F.pixel_unshuffle(x, 2), rand(2, 2, 4, 6)),
    (lambda x: torch.pixel_unshuffle(x, downscale_factor=3), rand(1, 6, 3)),
    (lambda x: torch.nn.PixelShuffle(2)(x), rand(1, 4, 3, 3)),
    (lambda x: F.channel_shuffle(x, 3), rand(2, 6, 3, 4)),
    (lambda x: torch.channel_shuffle(x, groups=2), rand(2, 6, 5)),
    (lambda x: torch.nn.ChannelShuffle(2)(x), rand(2, 4, 3, 3)),
    (lambda x: F.pixel_shuffle(x, 2), noncontiguous(rand(2, 8, 3, 4))),
]


@pytest.mark.parametrize("f,x", SHUFFLE)
def test_shuffles(f, x):
    check_gradient(f, x)


def _pixel_shuffle_by_hand(x, r):
    n, c, h, w = x.shape
    return x.reshape(n, c // (r * r), r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c // (r * r), h * r, w * r)


def test_shuffles_where_torch_autograd_cannot():
    """References written out by hand where torch.autograd itself fails: native_channel_shuffle
    has no derivative in torch, and PixelShuffleBackward0 rejects an empty batch."""
    check_gradient(lambda x: torch.native_channel_shuffle(x, 2), rand(1, 4, 2, 2),
                   reference=lambda x: torch.channel_shuffle(x, 2))
    check_gradient(lambda x: F.pixel_shuffle(x, 2), rand(0, 4, 3, 4), reference=lambda x: _pixel_shuffle_by_hand(x, 2))
    check_gradient(lambda x: F.pixel_shuffle(x, 2), rand(2, 8, 3, 4), reference=lambda x: _pixel_shuffle_by_hand(x, 2))
    # torch's pixel_unshuffle returns an empty input unchanged (shape (0, 1, 4, 6), not (0, 4, 2, 3));
    # the rule keeps torch's value and still returns a cotangent of the input's shape
    x = rand(0, 1, 4, 6)
    y, back = zt.pullback(lambda x: F.pixel_unshuffle(x, 2), x)
    assert y.shape == F.pixel_unshuffle(x, 2).shape and back(torch.zeros_like(y))[0].shape == x.shape
    check_gradient(lambda x: F.channel_shuffle(x, 2), rand(0, 4, 3), reference=lambda x: x.reshape(0, 2, 2, 3)
                   .transpose(1, 2).reshape(0, 4, 3))


FOLD = [
    (lambda x: F.unfold(x, 2), X2),
    (lambda x: F.unfold(x, (2, 3), dilation=(1, 2), padding=1, stride=(2, 1)), X2),
    (lambda x: F.unfold(x, kernel_size=3, padding=1), X2[0]),  # unbatched
    (lambda x: torch.nn.Unfold(2, stride=2)(x), X2),
    (lambda x: F.fold(x, (4, 5), 2), rand(2, 12, 12)),
    (lambda x: F.fold(x, (4, 5), 2), rand(12, 12)),
    (lambda x: F.fold(x, output_size=(5, 5), kernel_size=(2, 3), dilation=2, padding=1, stride=2), rand(1, 12, 6)),
    (lambda x: F.unfold(x, 2), noncontiguous(X2)),
]


@pytest.mark.parametrize("f,x", FOLD)
def test_fold_unfold(f, x):
    check_gradient(f, x)


# ---------------------------------------------------------------------------------------------
# finite differences and second order

@pytest.mark.parametrize("f,x", [
    (lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear"), rand(1, 2, 3, 4)),
    (lambda x: F.interpolate(x, size=(5, 2), mode="bicubic", align_corners=True), rand(1, 1, 3, 4)),
    (lambda x: F.interpolate(x, scale_factor=0.7, mode="area"), rand(1, 2, 5, 4)),
    (lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect"), rand(1, 2, 3, 4)),
    (lambda x: F.pad(x, (2, -1, 1, 2), mode="circular"), rand(1, 2, 3, 4)),
    (lambda x: F.fold(x, (3, 4), 2), rand(1, 8, 6)),
])
def test_resample_gradcheck(f, x):
    gradcheck(f, x)


@pytest.mark.parametrize("f,x", [
    (lambda x: (F.interpolate(x ** 2, scale_factor=1.5, mode="bilinear") ** 2).sum(), X2),
    (lambda x: (F.interpolate(x ** 2, scale_factor=2) ** 2).sum(), X2),
    (lambda x: (F.interpolate(x ** 2, size=(3, 4), mode="area") ** 2).sum(), X2),
    (lambda x: (F.interpolate(x ** 2, size=9, mode="linear", align_corners=True) ** 2).sum(), X1),
    (lambda x: (F.interpolate(x ** 2, size=(3, 4), mode="bicubic", antialias=True) ** 2).sum(), X2),
    (lambda x: (F.pad(x ** 2, (1, 2, 2, 1), mode="reflect") ** 2).sum(), X2),
    (lambda x: (F.pad(x ** 2, (1, 2, 2, 1), mode="replicate") ** 2).sum(), X2),
    (lambda x: (F.pad(x ** 2, (1, -2, 2, 1), mode="circular") ** 2).sum(), X2),
    (lambda x: (F.pad(x ** 2, (1, -2, 2, 1)) ** 2).sum(), X2),
    (lambda x: (F.unfold(x ** 2, 2, padding=1) ** 2).sum(), X2),
    (lambda x: (F.pixel_shuffle(x ** 2, 2) ** 2).sum(), rand(2, 4, 2, 3)),
    (lambda x: (F.channel_shuffle(x ** 2, 2) ** 2).sum(), rand(2, 4, 2, 3)),
])
def test_resample_second_order(f, x):
    check_hvp(f, x)


# ---------------------------------------------------------------------------------------------
# grid_sample (first order on rules; torch's backward op for the cotangents)

GRID2 = torch.rand(2, 4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2.4 - 1.2
GRID3 = torch.rand(1, 2, 3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 2.4 - 1.2


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_sample(mode, padding_mode, align_corners):
    check_gradient(lambda x, g: F.grid_sample(x, g, mode, padding_mode, align_corners), X2, GRID2)


@pytest.mark.parametrize("call,x,g", [
    (lambda x, g: F.grid_sample(x, g, mode="bilinear", align_corners=True), X3, GRID3),
    (lambda x, g: F.grid_sample(x, g, "nearest", "border", False), X3, GRID3),
    (lambda x, g: F.grid_sample(input=x, grid=g, padding_mode="reflection", align_corners=False), X2, GRID2),
    (lambda x, g: torch.grid_sampler(x, g, 0, 0, False), X2, GRID2),
    (lambda x, g: torch.grid_sampler_2d(x, g, 2, 1, True), X2, GRID2),
    (lambda x, g: torch.grid_sampler_3d(x, g, 0, 2, False), X3, GRID3),
    (lambda x, g: F.grid_sample(x, g, align_corners=False), noncontiguous(X2), noncontiguous(GRID2)),
    (lambda x, g: F.grid_sample(x, g, align_corners=False), rand(0, 3, 5, 6), GRID2[:0]),
    (lambda x, g: F.grid_sample(x, F.affine_grid(g, [2, 3, 4, 5], align_corners=False), align_corners=False),
     X2, rand(2, 2, 3, seed=7) * 0.5),
])
def test_grid_sample_forms(call, x, g):
    check_gradient(call, x, g)


def test_grid_sample_gradcheck():
    gradcheck(lambda x, g: F.grid_sample(x, g, "bicubic", "border", True), rand(1, 2, 3, 4), GRID2[:1, :2] * 0.9)


@pytest.mark.parametrize("size", [[2, 3, 4, 5], [2, 1, 1, 3], [2, 3, 2, 4, 3], [2, 1, 1, 1, 2]])
@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid(size, align_corners):
    theta = rand(2, len(size) - 2, len(size) - 1, seed=11)
    check_gradient(lambda t: F.affine_grid(t, size, align_corners=align_corners), theta)
    check_gradient(lambda t: torch.affine_grid_generator(t, size, align_corners), noncontiguous(theta))


def test_spatial_transformer_second_order():
    """affine_grid then grid_sample, differentiated in theta; second order through affine_grid's
    rule (grid_sample's own second derivative is torch's, through the fallback)."""
    check_hvp(lambda t: (F.affine_grid(t, [2, 3, 4, 5], align_corners=False) ** 3).sum(), rand(2, 2, 3, seed=12))
