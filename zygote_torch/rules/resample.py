"""Rules for resampling and rearranging: ``F.interpolate`` (every mode), ``F.pad`` (constant,
reflect, replicate, circular), ``F.pixel_shuffle`` / ``F.pixel_unshuffle``, ``F.channel_shuffle``,
``F.unfold`` / ``F.fold``, ``F.affine_grid``, and ``F.grid_sample``.

All but grid_sample are linear in the input, ``y = A x``, so each pullback is the adjoint ``A^T``, and it
is chosen so that ``A^T`` is again an op with a rule (closing derivatives of every order):

- interpolate: ``A`` is torch's ``upsample_<mode>`` kernel, ``A^T`` its ``upsample_<mode>_backward``
  op with the same output size and scales; both aten ops have rules here (``'area'`` is adaptive
  average pooling, whose rules live in :mod:`.pooling`);
- constant pad: ``A^T`` is a constant pad with the negated widths (cropping what was added,
  zero-padding what was cropped);
- reflect / replicate / circular pad: ``y = x.index_select(dim, idx)`` along each padded dim with
  ``idx`` the source position of each output position, so ``A^T dy`` is ``index_add`` of ``dy`` at
  ``idx`` along each padded dim;
- pixel_shuffle and pixel_unshuffle are each other's inverse permutation, as are channel_shuffle
  with ``g`` and ``C/g`` groups;
- unfold (im2col) and fold (col2im) are each other's adjoint;
- affine_grid: ``grid[n, p] = theta[n] @ [x_p, y_p, 1]``, so ``dtheta[n] = dgrid[n]^T @ base``.

``F.grid_sample`` (not linear in the grid) takes its cotangents from torch's
``grid_sampler_{2,3}d_backward``; its second derivatives go through the fallback.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ..ad.tangents import Thunk
from ._util import NoTangent, nondiff
from .pooling import adaptive_avg_pool_backward

Tensor = torch.Tensor
aten = torch.ops.aten


def _schema_signature(op) -> inspect.Signature:
    """A Python signature mirroring an aten op's schema (names and defaults)."""
    params = []
    for a in op.default._schema.arguments:
        kind = inspect.Parameter.KEYWORD_ONLY if a.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        default = a.default_value if a.has_default_value() else inspect.Parameter.empty
        params.append(inspect.Parameter(a.name, kind, default=default))
    return inspect.Signature(params)


# ---------------------------------------------------------------------------------------------
# interpolate

# (mode, spatial dims, antialias) -> (aten forward, whether it takes align_corners)
_UPSAMPLE = {
    ("nearest", 1, False): ("upsample_nearest1d", False),
    ("nearest", 2, False): ("upsample_nearest2d", False),
    ("nearest", 3, False): ("upsample_nearest3d", False),
    ("nearest-exact", 1, False): ("_upsample_nearest_exact1d", False),
    ("nearest-exact", 2, False): ("_upsample_nearest_exact2d", False),
    ("nearest-exact", 3, False): ("_upsample_nearest_exact3d", False),
    ("linear", 1, False): ("upsample_linear1d", True),
    ("bilinear", 2, False): ("upsample_bilinear2d", True),
    ("bicubic", 2, False): ("upsample_bicubic2d", True),
    ("trilinear", 3, False): ("upsample_trilinear3d", True),
    ("bilinear", 2, True): ("_upsample_bilinear2d_aa", True),
    ("bicubic", 2, True): ("_upsample_bicubic2d_aa", True),
    ("lanczos", 2, True): ("_upsample_lanczos2d_aa", True),
}


def _upsample_pair_rules(name: str, has_align: bool) -> None:
    """Rules for aten ``name`` (y = A x) and ``name_backward`` (gx = A^T gy): each is linear in its
    tensor argument and the other one's adjoint."""
    fwd, bwd = getattr(aten, name, None), getattr(aten, name + "_backward", None)
    if fwd is None or bwd is None:
        return
    n_mid = 1 if has_align else 0  # align_corners sits between the sizes and the scales

    def forward_rule(*args):
        x, output_size, rest = args[0], args[1], args[2:]
        y = fwd.default(x, output_size, *rest)
        input_size = list(x.shape)

        def pullback(dy):
            return (NoTangent(), bwd.default(dy, output_size, input_size, *rest)) + nondiff(len(args) - 1)

        return y, pullback

    def backward_rule(*args):
        g, output_size, input_size, rest = args[0], args[1], args[2], args[3:]
        gx = bwd.default(g, output_size, input_size, *rest)

        def pullback(dgx):
            return (NoTangent(), fwd.default(dgx, output_size, *rest)) + nondiff(len(args) - 1)

        return gx, pullback

    def packet_rule(*args, **kwargs):
        """The overload packet: (self, output_size, [align_corners], scale per dim...) or the
        ``.vec`` form (input, output_size or None, [align_corners], scale_factors list or None)."""
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"aten.{name}: pass the input tensor positionally to differentiate it")
        y = fwd(*args, **kwargs)
        x, nd = args[0], args[0].dim() - 2
        named = [a.name for a in fwd.default._schema.arguments][1:]
        values = dict(zip(named, args[1:]))
        values.update({k: v for k, v in kwargs.items() if k != "scale_factors"})
        mid = [bool(values.get("align_corners", False))] if n_mid else []
        rest = list(args[2 + n_mid:])
        factors = kwargs.get("scale_factors", rest[0] if len(rest) == 1 else None)
        if "scale_factors" in kwargs or (len(rest) == 1 and (factors is None or isinstance(factors, (list, tuple)))):
            scales = [None] * nd if factors is None else [float(f) for f in factors]
        else:  # the default overload: one optional scale per spatial dim
            scales = [values.get(n) for n in named[1 + n_mid:]]
        output_size, input_size = list(y.shape[2:]), list(x.shape)

        def pullback(dy):
            return (NoTangent(), bwd.default(dy, output_size, input_size, *mid, *scales)) + nondiff(len(args) - 1)

        return y, pullback

    forward_rule.__signature__ = _schema_signature(fwd)
    backward_rule.__signature__ = _schema_signature(bwd)
    forward_rule.__name__ = forward_rule.__qualname__ = name
    packet_rule.__name__ = packet_rule.__qualname__ = name
    backward_rule.__name__ = backward_rule.__qualname__ = name + "_backward"
    forward_rule.__doc__ = (f"y = {name}(x, output_size{', align_corners' if n_mid else ''}, scales) = A x;  "
                            f"dx = A^T dy = {name}_backward(dy, output_size, x.shape, ...).")
    packet_rule.__doc__ = forward_rule.__doc__ + " (Either overload: per-dim scales or a scale_factors list.)"
    backward_rule.__doc__ = (f"gx = {name}_backward(gy, ...) = A^T gy (A: {name});  "
                             f"dgy = A dgx = {name}(dgx, output_size, ...).")
    rrule(fwd.default)(forward_rule)
    rrule(fwd)(packet_rule)
    if hasattr(fwd, "vec"):
        rrule(fwd.vec)(packet_rule)
    rrule(bwd, bwd.default)(backward_rule)


for (_name, _align) in set(_UPSAMPLE.values()):
    _upsample_pair_rules(_name, _align)


def _interp_scales(nd, size, scale_factor, mode, recompute_scale_factor) -> list:
    """The per-dim scales F.interpolate hands its kernel (None: from the sizes)."""
    if size is not None or scale_factor is None or recompute_scale_factor or mode == "area":
        return [None] * nd
    if isinstance(scale_factor, (list, tuple)):
        return [float(s) for s in scale_factor]
    return [float(scale_factor)] * nd


@rrule(F.interpolate)
def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                recompute_scale_factor=None, antialias=False):
    """y = A x, A the resampling of ``mode`` (nearest, nearest-exact, linear, bilinear, bicubic,
    trilinear, lanczos, area) to ``size`` or by ``scale_factor``;  dx = A^T dy: torch's
    upsample_<mode>_backward with the output size and the scales the forward kernel used (area:
    adaptive average pooling's backward)."""
    y = F.interpolate(input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)
    nd = input.dim() - 2
    if mode == "area":
        return y, lambda dy: (NoTangent(), adaptive_avg_pool_backward(nd, dy, input)) + nondiff(6)
    name, has_align = _UPSAMPLE[(mode, nd, bool(antialias))]
    bwd = getattr(aten, name + "_backward").default
    output_size = list(y.shape[2:])
    input_size = list(input.shape)
    mid = [bool(align_corners)] if has_align else []
    scales = _interp_scales(nd, size, scale_factor, mode, recompute_scale_factor)

    def pullback(dy):
        return (NoTangent(), bwd(dy, output_size, input_size, *mid, *scales)) + nondiff(6)

    return y, pullback


# ---------------------------------------------------------------------------------------------
# pad

def _source_index(mode: str, n: int, before: int, after: int, device) -> Tensor:
    """For each output position j along a padded dim of size n, the input position it reads."""
    if mode == "circular":  # torch crops first (negative widths), then wraps within the crop
        lo, hi = max(0, -before), max(0, -after)
        m = n - lo - hi
        return torch.arange(-max(before, 0), m + max(after, 0), device=device).remainder(m) + lo
    j = torch.arange(-before, n + after, device=device)
    if mode == "reflect":
        return (n - 1) - ((n - 1) - j.abs()).abs()
    if mode == "replicate":
        return j.clamp(0, n - 1)
    raise NotImplementedError(f"F.pad: mode '{mode}' has no rule")


def _pad_rule(input, pad, mode, value, forward):
    """Shared by F.pad and torch._C._nn.pad: (y, pullback of x)."""
    y = forward()
    pad = [int(p) for p in pad]
    if mode == "constant":
        negated = [-p for p in pad]
        return y, lambda dy: F.pad(dy, negated)
    shape = tuple(input.shape)

    def pullback(dy):
        g = dy
        for i in range(len(pad) // 2):
            dim = len(shape) - 1 - i
            before, after = pad[2 * i], pad[2 * i + 1]
            if before == 0 and after == 0:
                continue
            idx = _source_index(mode, shape[dim], before, after, dy.device)
            target = list(g.shape)
            target[dim] = shape[dim]
            g = g.new_zeros(target).index_add(dim, idx, g)
        return g

    return y, pullback


@rrule(F.pad, torch._C._nn.pad)
def pad(input, pad, mode="constant", value=None):
    """constant: y = x surrounded by ``value`` (negative widths crop);  dx = pad(dy, -widths), the
    adjoint crop/zero-pad.  reflect / replicate / circular: y = x.index_select(d, idx_d) along each
    padded dim d (idx: mirrored without the edge / clamped / modulo source positions);
    dx = zeros.index_add(d, idx_d, dy) along each padded dim."""
    y, back = _pad_rule(input, pad, mode, value, lambda: F.pad(input, pad, mode, value))
    return y, lambda dy: (NoTangent(), back(dy)) + nondiff(3)


@rrule(torch.constant_pad_nd)
def constant_pad_nd(input, pad, value=0):
    """y = x surrounded by ``value`` (negative widths crop);  dx = constant_pad(dy, -widths)."""
    y = torch.constant_pad_nd(input, pad, value)
    negated = [-int(p) for p in pad]
    return y, lambda dy: (NoTangent(), F.pad(dy, negated)) + nondiff(2)


# ---------------------------------------------------------------------------------------------
# permutations: pixel shuffle, channel shuffle

def _inverse(fn, dy, factor, shape):
    """fn(dy, factor), or zeros of ``shape`` for an empty dy (torch's shuffles return an empty
    input as it is, without reshaping it)."""
    return fn(dy, factor) if dy.numel() else dy.new_zeros(shape)


@rrule(torch.pixel_shuffle)
def pixel_shuffle(input, upscale_factor):
    """y = pixel_shuffle(x, r): (*, C r^2, H, W) -> (*, C, H r, W r), a permutation;
    dx = pixel_unshuffle(dy, r), its inverse."""
    y = torch.pixel_shuffle(input, upscale_factor)
    return y, lambda dy: (NoTangent(), _inverse(torch.pixel_unshuffle, dy, upscale_factor, input.shape), NoTangent())


@rrule(torch.pixel_unshuffle)
def pixel_unshuffle(input, downscale_factor):
    """y = pixel_unshuffle(x, r): (*, C, H r, W r) -> (*, C r^2, H, W), a permutation;
    dx = pixel_shuffle(dy, r), its inverse."""
    y = torch.pixel_unshuffle(input, downscale_factor)
    return y, lambda dy: (NoTangent(), _inverse(torch.pixel_shuffle, dy, downscale_factor, input.shape), NoTangent())


def _channel_shuffle_rule(fn):
    def rule(input, groups):
        y = fn(input, groups)
        inverse = input.shape[1] // groups
        return y, lambda dy: (NoTangent(), _inverse(fn, dy, inverse, input.shape), NoTangent())

    rule.__name__ = rule.__qualname__ = fn.__name__
    rule.__doc__ = ("y = channel_shuffle(x, g): channels read as (g, C/g) and transposed, a permutation;  "
                    "dx = channel_shuffle(dy, C/g), its inverse.")
    rrule(fn)(rule)


_channel_shuffle_rule(torch.channel_shuffle)
_channel_shuffle_rule(torch.native_channel_shuffle)


# ---------------------------------------------------------------------------------------------
# unfold / fold (im2col / col2im): each other's adjoint

@rrule(F.unfold)
def unfold(input, kernel_size, dilation=1, padding=0, stride=1):
    """y = im2col(x): every (dilated, padded, strided) sliding block of x as a column;
    dx = fold(dy, x's spatial size, same parameters) = col2im(dy), its adjoint."""
    y = F.unfold(input, kernel_size, dilation, padding, stride)
    out = tuple(input.shape[-2:])
    return y, lambda dy: (NoTangent(), F.fold(dy, out, kernel_size, dilation, padding, stride)) + nondiff(4)


@rrule(F.fold)
def fold(input, output_size, kernel_size, dilation=1, padding=0, stride=1):
    """y = col2im(x): columns summed back into their sliding blocks' positions;
    dx = unfold(dy, same parameters) = im2col(dy), its adjoint."""
    y = F.fold(input, output_size, kernel_size, dilation, padding, stride)
    return y, lambda dy: (NoTangent(), F.unfold(dy, kernel_size, dilation, padding, stride)) + nondiff(5)


# ---------------------------------------------------------------------------------------------
# grid_sample

_GRID_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_GRID_PADDING = {"zeros": 0, "border": 1, "reflection": 2}


def _grid_sampler_rule(input, grid, interpolation_mode, padding_mode, align_corners, forward):
    """y = grid_sampler(x, grid) and the pullback (dx, dgrid) from torch's grid_sampler_{2,3}d_backward,
    computed once for both, and only if one of them is needed."""
    y = forward()

    def pullback(dy):
        bwd = aten.grid_sampler_2d_backward if input.dim() == 4 else aten.grid_sampler_3d_backward
        both = Thunk(lambda: bwd(dy, input, grid, interpolation_mode, padding_mode, bool(align_corners),
                                 [True, True]))
        return Thunk(lambda: both()[0]), Thunk(lambda: both()[1])

    return y, pullback


@rrule(F.grid_sample)
def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
    """y[n, c, p] = x[n, c] interpolated (bilinear / nearest / bicubic) at grid[n, p] in [-1, 1]
    coordinates, out-of-range points by ``padding_mode``;  dx scatters dy with the interpolation
    weights, dgrid = dy . (d interpolant / d position) (0 for nearest): torch's
    grid_sampler_{2,3}d_backward. Its second derivatives go through the fallback."""
    y, back = _grid_sampler_rule(input, grid, _GRID_MODES.get(mode, -1), _GRID_PADDING.get(padding_mode, -1),
                                 align_corners, lambda: F.grid_sample(input, grid, mode, padding_mode, align_corners))
    return y, lambda dy: (NoTangent(),) + back(dy) + nondiff(3)


@rrule(torch.grid_sampler, torch.grid_sampler_2d, torch.grid_sampler_3d)
def grid_sampler(input, grid, interpolation_mode, padding_mode, align_corners):
    """torch.grid_sampler{,_2d,_3d} with integer modes (bilinear 0, nearest 1, bicubic 2; padding
    zeros 0, border 1, reflection 2): see F.grid_sample's rule."""
    y, back = _grid_sampler_rule(
        input, grid, interpolation_mode, padding_mode, align_corners,
        lambda: torch.grid_sampler(input, grid, interpolation_mode, padding_mode, align_corners))
    return y, lambda dy: (NoTangent(),) + back(dy) + nondiff(3)


def _linspace_from_neg_one(n: int, align_corners: bool, like: Tensor) -> Tensor:
    """torch's affine-grid coordinates along one dim: n points in [-1, 1] (pixel centres when not
    align_corners), 0 for a single point."""
    if n <= 1:
        return torch.zeros(n, dtype=like.dtype, device=like.device)
    r = torch.linspace(-1.0, 1.0, n, dtype=like.dtype, device=like.device)
    return r if align_corners else r * ((n - 1) / n)


def _affine_base_grid(theta: Tensor, size, align_corners: bool) -> Tensor:
    """(P, k+1) homogeneous coordinates [x, y(, z), 1] of the P output positions, x fastest."""
    spatial = list(size[2:])  # (H, W) or (D, H, W)
    axes = [_linspace_from_neg_one(n, align_corners, theta) for n in reversed(spatial)]  # x, y(, z)
    mesh = torch.meshgrid(*reversed(axes), indexing="ij")  # each (…spatial), z/y/x order
    coords = [m.reshape(-1) for m in reversed(mesh)] + [torch.ones_like(mesh[0]).reshape(-1)]
    return torch.stack(coords, dim=-1)


def _affine_grid_rule(theta, size, align_corners, forward):
    y = forward()

    def pullback(dy):
        base = _affine_base_grid(theta, size, bool(align_corners))
        k = theta.shape[-2]
        return torch.matmul(dy.reshape(theta.shape[0], -1, k).transpose(1, 2), base)

    return y, pullback


@rrule(F.affine_grid)
def affine_grid(theta, size, align_corners=None):
    """grid[n, p] = theta[n] @ [x_p, y_p(, z_p), 1] over the output positions p (coordinates in
    [-1, 1], pixel centres unless align_corners);  dtheta[n] = sum_p dgrid[n, p] [x_p, y_p, 1]^T."""
    y, back = _affine_grid_rule(theta, size, align_corners, lambda: F.affine_grid(theta, size, align_corners))
    return y, lambda dy: (NoTangent(), back(dy), NoTangent(), NoTangent())


@rrule(torch.affine_grid_generator)
def affine_grid_generator(theta, size, align_corners):
    """torch.affine_grid_generator: see F.affine_grid's rule."""
    y, back = _affine_grid_rule(theta, size, align_corners,
                                lambda: torch.affine_grid_generator(theta, size, align_corners))
    return y, lambda dy: (NoTangent(), back(dy), NoTangent(), NoTangent())
