"""Rules of zygote_torch/rules/shape.py against torch.autograd (float64), finite differences, and
complex inputs."""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch

import zygote_torch as zt
from zygote_torch.ad.registry import REGISTRY
from zygote_torch.runtime import staged
from helpers import check_gradient, fd_check, noncontiguous, rand

Tensor = torch.Tensor


def check_complex(f, *args):
    """Complex inputs or outputs: our pullback (dynamic and staged) equals torch.autograd's."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    y = f(*leaves)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
    ref = torch.autograd.grad(y, leaves, dy)
    _, back = zt.pullback(f, *args)
    for ours, r in zip(back(dy), ref):
        torch.testing.assert_close(ours, r)
    assert not zt.fallbacks(f, *args)
    _, sback = staged.pullback(f, *args)
    for ours, r in zip(sback(dy), ref):
        torch.testing.assert_close(ours, r)


X = rand(2, 3, 4, seed=1)
NC = noncontiguous(X)

# name -> (f, shapes of the arguments)
SINGLE = {
    # reshapes
    "torch.reshape": (lambda x: torch.reshape(x, (6, 4)), (2, 3, 4)),
    "torch.reshape-kw": (lambda x: torch.reshape(x, shape=(-1,)), (2, 3, 4)),
    "reshape-varargs": (lambda x: x.reshape(4, -1), (2, 3, 4)),
    "reshape-tuple": (lambda x: x.reshape((24,)), (2, 3, 4)),
    "reshape-kw": (lambda x: x.reshape(shape=(3, 8)), (2, 3, 4)),
    "reshape-0d": (lambda x: x.reshape(1, 1), ()),
    "reshape-empty": (lambda x: x.reshape(3, 0), (0, 3)),
    "view-varargs": (lambda x: x.view(-1), (2, 3, 4)),
    "view-tuple": (lambda x: x.view((6, 4)), (2, 3, 4)),
    "view-kw": (lambda x: x.view(size=(4, 6)), (2, 3, 4)),
    "flatten": (lambda x: x.flatten(), (2, 3, 4)),
    "flatten-start": (lambda x: x.flatten(1), (2, 3, 4)),
    "torch.flatten-kw": (lambda x: torch.flatten(x, start_dim=0, end_dim=1), (2, 3, 4)),
    "flatten-0d": (torch.flatten, ()),
    "ravel": (torch.ravel, (2, 3, 4)),
    "Tensor.ravel": (lambda x: x.ravel(), (2, 3)),
    "unflatten": (lambda x: x.unflatten(-1, (2, 2)), (2, 3, 4)),
    "torch.unflatten": (lambda x: torch.unflatten(x, 0, (1, 2)), (2, 3, 4)),
    "squeeze": (torch.squeeze, (1, 3, 1)),
    "squeeze-int": (lambda x: x.squeeze(0), (1, 3, 1)),
    "squeeze-kw": (lambda x: torch.squeeze(x, dim=-1), (1, 3, 1)),
    "squeeze-tuple": (lambda x: x.squeeze((0, 2)), (1, 3, 1)),
    "squeeze-noop": (lambda x: x.squeeze(1), (1, 3, 1)),
    "squeeze-0d": (torch.squeeze, ()),
    "unsqueeze": (lambda x: x.unsqueeze(-1), (2, 3)),
    "torch.unsqueeze": (lambda x: torch.unsqueeze(x, dim=0), ()),
    # broadcasting
    "expand-varargs": (lambda x: x.expand(2, 3, 4), (3, 1)),
    "expand-tuple": (lambda x: x.expand((5, -1, 4)), (3, 1)),
    "expand-kw": (lambda x: x.expand(size=(2, 3)), (3,)),
    "expand-0d": (lambda x: x.expand(3, 2), ()),
    "expand-noop": (lambda x: x.expand(-1, -1), (2, 3)),
    "broadcast_to": (lambda x: torch.broadcast_to(x, (2, 3, 4)), (3, 1)),
    "Tensor.broadcast_to": (lambda x: x.broadcast_to((4, 3)), (1, 3)),
    # splits
    "split-int": (lambda x: torch.split(x, 2, dim=2), (2, 3, 4)),
    "split-int-uneven": (lambda x: torch.split(x, 2, 1), (2, 3, 4)),
    "split-list": (lambda x: torch.split(x, [1, 3], -1), (2, 3, 4)),
    "split-kw": (lambda x: torch.split(x, split_size_or_sections=1), (2, 3, 4)),
    "Tensor.split": (lambda x: x.split([1, 2], 1), (2, 3, 4)),
    "Tensor.split-kw": (lambda x: x.split(split_size=2, dim=-1), (2, 3, 4)),
    "split-one-piece-used": (lambda x: torch.split(x, [1, 3], -1)[1] * 2, (2, 3, 4)),
    "split_with_sizes": (lambda x: x.split_with_sizes([2, 2], dim=2), (2, 3, 4)),
    "chunk": (lambda x: x.chunk(3, -1), (2, 3, 4)),
    "torch.chunk": (lambda x: torch.chunk(x, 2), (3, 4)),
    "chunk-one-used": (lambda x: torch.chunk(x, 2, dim=1)[0], (3, 4)),
    "unbind": (lambda x: x.unbind(1), (2, 3, 4)),
    "torch.unbind-one-used": (lambda x: torch.unbind(x)[1], (2, 3, 4)),
    "tensor_split": (lambda x: torch.tensor_split(x, [1, 3], dim=2), (2, 3, 4)),
    "tensor_split-sections": (lambda x: x.tensor_split(3, dim=2), (2, 3, 4)),
    "tensor_split-decreasing": (lambda x: torch.tensor_split(x, [3, 1], dim=2), (2, 3, 4)),
    # permutations
    "t": (lambda x: x.t(), (3, 4)),
    "torch.t-1d": (torch.t, (3,)),
    "transpose": (lambda x: x.transpose(0, -1), (2, 3, 4)),
    "torch.transpose-kw": (lambda x: torch.transpose(x, dim0=1, dim1=2), (2, 3, 4)),
    "swapaxes": (lambda x: torch.swapaxes(x, 0, 1), (2, 3, 4)),
    "Tensor.swapaxes": (lambda x: x.swapaxes(axis0=0, axis1=2), (2, 3, 4)),
    "swapdims": (lambda x: x.swapdims(1, 2), (2, 3, 4)),
    "permute-varargs": (lambda x: x.permute(2, 0, 1), (2, 3, 4)),
    "permute-tuple": (lambda x: x.permute((1, 2, 0)), (2, 3, 4)),
    "permute-kw": (lambda x: x.permute(dims=(1, 0, 2)), (2, 3, 4)),
    "torch.permute": (lambda x: torch.permute(x, (-1, 0, 1)), (2, 3, 4)),
    "movedim": (lambda x: x.movedim(0, -1), (2, 3, 4)),
    "moveaxis-tuple": (lambda x: torch.moveaxis(x, (0, 1), (2, 0)), (2, 3, 4)),
    ".T": (lambda x: x.T, (3, 4)),
    ".mT": (lambda x: x.mT, (2, 3, 4)),
    ".H": (lambda x: x.H, (3, 4)),
    ".mH": (lambda x: x.mH, (2, 3, 4)),
    "adjoint": (torch.adjoint, (2, 3, 4)),
    "flip-varargs": (lambda x: x.flip(0, 2), (2, 3, 4)),
    "flip-tuple": (lambda x: x.flip((1,)), (2, 3, 4)),
    "torch.flip": (lambda x: torch.flip(x, dims=[-1]), (2, 3, 4)),
    "fliplr": (torch.fliplr, (2, 3, 4)),
    "flipud": (lambda x: x.flipud(), (2, 3)),
    "roll": (lambda x: x.roll(1), (2, 3, 4)),
    "roll-dims": (lambda x: torch.roll(x, (1, -2), (0, 2)), (2, 3, 4)),
    "roll-kw": (lambda x: x.roll(shifts=5, dims=1), (2, 3, 4)),
    # copies and casts
    "contiguous": (lambda x: x.contiguous(), (2, 3, 4)),
    "clone": (torch.clone, (2, 3, 4)),
    "clone-format": (lambda x: x.clone(memory_format=torch.contiguous_format), (2, 3, 4)),
    "to-dtype": (lambda x: x.to(torch.float32).to(torch.float64), (2, 3)),
    "to-device": (lambda x: x.to("cpu"), (2, 3)),
    "to-device-dtype": (lambda x: x.to("cpu", torch.float32).double(), (2, 3)),
    "to-kw": (lambda x: x.to(dtype=torch.float32, non_blocking=False, copy=True), (2, 3)),
    "to-device-kw": (lambda x: x.to(device=torch.device("cpu")), (2, 3)),
    "to-same": (lambda x: x.to(torch.float64), (2, 3)),
    "float": (lambda x: x.float(), (2, 3)),
    "double": (lambda x: x.double() * 2, (2, 3)),
    "cpu": (lambda x: x.cpu(), (2, 3)),
    # repetition and slicing
    "repeat": (lambda x: x.repeat(2, 1, 3), (2, 3, 4)),
    "repeat-more-dims": (lambda x: x.repeat(2, 3, 1, 2), (2, 3, 4)),
    "repeat-tuple": (lambda x: x.repeat((2, 2)), (3,)),
    "repeat-kw": (lambda x: x.repeat(repeats=(1, 2)), (2, 3)),
    "repeat-0d": (lambda x: x.repeat(3, 2), ()),
    "repeat-zero": (lambda x: x.repeat(0, 2), (2, 3)),
    "tile": (lambda x: torch.tile(x, (2,)), (2, 3, 4)),
    "tile-more-dims": (lambda x: x.tile(2, 1, 1, 2), (2, 3, 4)),
    "tile-tuple": (lambda x: x.tile((3, 2)), (2, 3)),
    "narrow": (lambda x: x.narrow(2, 1, 2), (2, 3, 4)),
    "torch.narrow-neg": (lambda x: torch.narrow(x, -1, -3, 2), (2, 3, 4)),
    "narrow-tensor-start": (lambda x: x.narrow(1, torch.tensor(1), 2), (2, 3, 4)),
    "narrow_copy": (lambda x: torch.narrow_copy(x, 0, 1, 1), (2, 3, 4)),
    "narrow-empty": (lambda x: x.narrow(0, 1, 0), (2, 3)),
    # diagonals and triangles
    "diagonal": (lambda x: x.diagonal(), (3, 4)),
    "diagonal-offset": (lambda x: torch.diagonal(x, 1), (3, 4)),
    "diagonal-dims": (lambda x: torch.diagonal(x, -1, 2, 0), (3, 2, 4)),
    "diagonal-kw": (lambda x: x.diagonal(offset=-1, dim1=1, dim2=2), (2, 3, 3)),
    "linalg.diagonal": (lambda x: torch.linalg.diagonal(x, offset=1), (2, 3, 3)),
    "diag-vector": (lambda x: torch.diag(x, 1), (3,)),
    "diag-matrix": (lambda x: x.diag(-1), (3, 4)),
    "diag-matrix-default": (torch.diag, (4, 3)),
    "diag_embed": (torch.diag_embed, (2, 3)),
    "diag_embed-args": (lambda x: torch.diag_embed(x, 1, 0, 2), (2, 3)),
    "tril": (lambda x: x.tril(), (3, 4)),
    "tril-offset": (lambda x: torch.tril(x, -1), (2, 3, 3)),
    "triu": (lambda x: torch.triu(x, diagonal=1), (2, 3, 3)),
    "triu-method": (lambda x: x.triu(-2), (4, 3)),
    # detach
    "detach": (lambda x: x.detach() * x, (2, 3)),
    "torch.detach": (lambda x: torch.detach(x) * x, (2, 3)),
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_input_ops(name):
    f, shape = SINGLE[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_gradient(f, rand(*shape, seed=1))
        if len(shape):
            check_gradient(f, noncontiguous(rand(*shape, seed=1)))


def test_low_precision_casts():
    x = rand(2, 3)
    for f in (lambda x: x.half(), lambda x: x.bfloat16(), lambda x: x.to(torch.float16)):
        check_gradient(f, x, atol=1e-2, rtol=1e-2)


def test_T_reverses_every_dimension():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # x.T on non-matrices is deprecated
        check_gradient(lambda x: x.T, rand(2, 3, 4))
        check_gradient(lambda x: x.T * 2, rand(3))


def test_detach_is_non_differentiable():
    x = rand(3)
    (g,) = zt.gradient(lambda x: x.detach().sum(), x)
    assert g is None
    assert REGISTRY.is_non_differentiable(torch.detach) and REGISTRY.is_non_differentiable(Tensor.detach)


def test_view_dtype_is_not_differentiable():
    x = rand(3)
    (g,) = zt.gradient(lambda x: x.view(torch.float64).sum() + x.sum(), x)
    torch.testing.assert_close(g, torch.ones(3, dtype=torch.float64))  # only the second term, as in torch
    check_gradient(lambda x: x.view(torch.float64) * x, x)


# -- several inputs --------------------------------------------------------------------------------

MULTI = {
    "view_as": (lambda x, y: x.view_as(y), [(2, 3, 4), (24,)]),
    "reshape_as": (lambda x, y: x.reshape_as(y), [(2, 3, 4), (4, 6)]),
    "expand_as": (lambda x, y: x.expand_as(y), [(1, 4), (2, 3, 4)]),
    "broadcast_tensors": (torch.broadcast_tensors, [(3, 1), (4,), ()]),
    "broadcast_tensors-one-used": (lambda a, b: torch.broadcast_tensors(a, b)[0], [(3, 1), (4,)]),
    "cat": (lambda x, y: torch.cat([x, y], 1), [(2, 3, 4), (2, 5, 4)]),
    "cat-tuple-kw": (lambda x, y: torch.cat((x, y), dim=-2), [(2, 3, 4), (2, 5, 4)]),
    "cat-axis": (lambda x, y: torch.cat([x, y], axis=2), [(2, 3, 4), (2, 3, 1)]),
    "cat-three": (lambda x, y, z: torch.cat([x, y, z]), [(2, 3), (1, 3), (4, 3)]),
    "cat-repeated-member": (lambda x, y: torch.cat([x, y, x], dim=0), [(2, 3), (1, 3)]),
    "cat-empty-member": (lambda x, y: torch.cat([x, y], 0), [(2, 3), (0, 3)]),
    "cat-1d": (lambda x, y: torch.cat([x, y]), [(2,), (3,)]),
    "concat": (lambda x, y: torch.concat([x, y]), [(2, 3), (2, 3)]),
    "concatenate": (lambda x, y: torch.concatenate([x, y], axis=1), [(2, 3), (2, 1)]),
    "concatenate-dim": (lambda x, y: torch.concatenate([x, y], dim=1), [(2, 3), (2, 1)]),
    "stack": (lambda x, y: torch.stack([x, y]), [(2, 3), (2, 3)]),
    "stack-neg": (lambda x, y: torch.stack((x, y), dim=-1), [(2, 3), (2, 3)]),
    "stack-0d": (lambda x, y: torch.stack([x, y]), [(), ()]),
    "hstack-1d": (lambda a, b: torch.hstack([a, b]), [(3,), (2,)]),
    "hstack-2d": (lambda a, b: torch.hstack((a, b)), [(3, 2), (3, 1)]),
    "hstack-0d": (lambda a, b: torch.hstack([a, b]), [(), (2,)]),
    "vstack": (lambda a, b: torch.vstack([a, b]), [(3,), (2, 3)]),
    "row_stack": (lambda a, b: torch.row_stack([a, b]), [(3,), (3,)]),
    "dstack": (lambda a, b, c: torch.dstack([a, b, c]), [(3,), (1, 3, 2), (1, 3)]),
    "dstack-2d": (lambda a, b: torch.dstack([a, b]), [(2, 3), (2, 3)]),
    "column_stack": (lambda a, b, c: torch.column_stack([a, b, c]), [(3,), (3, 2), (3, 1)]),
    "type_as": (lambda x, y: x.type_as(y) * y, [(2, 3), (2, 3)]),
    "to-other": (lambda x, y: x.to(y) * 2, [(2, 3), (3,)]),
}


@pytest.mark.parametrize("name", list(MULTI))
def test_multi_input_ops(name):
    f, shapes = MULTI[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # row_stack is deprecated
        check_gradient(f, *[rand(*s, seed=i) for i, s in enumerate(shapes)])


def test_all_keyword_calls():
    x, y = rand(2, 3), rand(2, 1)
    check_gradient(lambda x, y: torch.cat(tensors=[x, y], dim=1), x, y)
    check_gradient(lambda x, y: torch.stack(tensors=(x, x * 2), dim=2), x, y)
    check_gradient(lambda x: torch.reshape(input=x, shape=(3, 2)), x)
    check_gradient(lambda x: torch.transpose(input=x, dim0=0, dim1=1), x)
    check_gradient(lambda x: torch.split(tensor=x, split_size_or_sections=[2, 1], dim=1), x)


def test_cat_skips_legacy_empty_members():
    """torch.cat ignores 1-D empty tensors whatever the other members' shapes."""
    e = torch.zeros(0, dtype=torch.float64)
    check_gradient(lambda x, e: torch.cat([x, e, x], dim=1), rand(2, 3), e)
    check_gradient(lambda x, e: torch.cat([e, x]), rand(2, 3), e)


def test_joins_with_mixed_dtypes_and_constants():
    x, c = rand(2, 3), rand(2, 3, dtype=torch.float32)
    check_gradient(lambda x, c: torch.cat([x, c]), x, c)  # float32 member: cotangent cast back
    check_gradient(lambda x: torch.stack([x, torch.ones(2, 3, dtype=torch.float64)]), x)  # constant member
    check_gradient(lambda x: torch.cat([x, torch.arange(3).expand(1, 3)]), x)  # an integer member


def test_cast_to_other_dtypes_and_devices():
    x, y = rand(2, 3), rand(3, dtype=torch.float32)
    check_gradient(lambda x, y: x.to(y), x, y)  # float32 output: compare in float32 precision
    check_gradient(lambda x: x.to(torch.float32).sum(), x, atol=1e-5, rtol=1e-5)
    check_gradient(lambda x: x.type_as(y), x, atol=1e-5, rtol=1e-5)


def test_complex_casts_and_conjugate_transposes():
    x = rand(2, 3)
    z = torch.randn(2, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    c = torch.tensor(1 + 2j, dtype=torch.complex128)  # (a Python complex factor meets an arithmetic.py bug)
    check_complex(lambda x: x.to(torch.complex128) * c, x)  # real -> complex: the real part comes back
    check_complex(lambda x: x.to(torch.complex128), x)
    check_complex(lambda z: z.H, z)
    check_complex(lambda z: z.mH * c, z.reshape(1, 2, 3))
    check_complex(lambda z: z.T, z)
    check_complex(lambda z: torch.cat([z, z * c], 1), z)
    check_complex(lambda z: z.reshape(3, 2).flip(0).roll(1), z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex -> real discards the imaginary part
        check_complex(lambda z: z.to(torch.float64), z)


def test_finite_differences():
    fd_check(lambda x: x.repeat(2, 1, 2), rand(2, 3))
    fd_check(lambda x: torch.tile(x, (2,)), rand(3))
    fd_check(lambda x, y: torch.cat([x, y], 1), rand(2, 2), rand(2, 1))
    fd_check(lambda x: x.expand(3, 2, 2), rand(2, 1))
    fd_check(lambda x: x.narrow(1, 1, 2).roll(1, 0), rand(2, 3))
    fd_check(lambda x: torch.split(x, [1, 2], 1)[1].permute(1, 0), rand(2, 3))


def test_rules_registered_for_every_alias():
    for f in (torch.reshape, Tensor.reshape, Tensor.view, Tensor.view_as, Tensor.reshape_as, torch.flatten,
              Tensor.flatten, torch.unflatten, Tensor.unflatten, torch.squeeze, Tensor.squeeze, torch.unsqueeze,
              Tensor.unsqueeze, Tensor.expand, Tensor.expand_as, torch.broadcast_to, torch.cat, torch.concat,
              torch.concatenate, torch.stack, torch.hstack, torch.vstack, torch.split, Tensor.split, torch.chunk,
              Tensor.chunk, torch.unbind, Tensor.unbind, torch.t, Tensor.t, torch.transpose, Tensor.transpose,
              torch.swapaxes, Tensor.swapaxes, torch.permute, Tensor.permute, torch.movedim, Tensor.movedim,
              Tensor.T, Tensor.mT, Tensor.contiguous, torch.clone, Tensor.clone, Tensor.to, Tensor.float,
              Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.type_as, torch.flip, Tensor.flip, torch.roll,
              Tensor.roll, Tensor.repeat, torch.tile, Tensor.tile, torch.narrow, Tensor.narrow, torch.diagonal,
              Tensor.diagonal, torch.linalg.diagonal, torch.diag, Tensor.diag, torch.diag_embed, torch.tril,
              Tensor.tril, torch.triu, Tensor.triu):
        assert f in REGISTRY, f
