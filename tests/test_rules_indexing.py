"""Rules of zygote_torch/rules/indexing.py against torch.autograd (float64), finite differences, and
complex inputs: every kind of index ``x[...]`` accepts, alone and mixed, plus gather & co."""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch

import zygote_torch as zt
from zygote_torch.ad.registry import REGISTRY
from zygote_torch.runtime import staged
from helpers import _autograd_pullback, _compare, check_gradient, fd_check, noncontiguous, rand

Tensor = torch.Tensor
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing")


def check_dynamic(f, *args):
    """The dynamic API (pullback, gradient, no fallback) equals torch.autograd: check_gradient's
    first half."""
    y_ref, _ = _autograd_pullback(f, args)
    dy = torch.randn(y_ref.shape, dtype=y_ref.dtype, generator=torch.Generator().manual_seed(0))
    _, ref = _autograd_pullback(f, args, [dy])
    y, back = zt.pullback(f, *args)
    torch.testing.assert_close(y, y_ref.detach())
    _compare(back(dy), ref, args, 1e-7, 1e-6, "pullback")
    _compare(zt.gradient(lambda *a: (f(*a) * dy).sum(), *args), ref, args, 1e-7, 1e-6, "gradient")
    assert not zt.fallbacks(f, *args)


def check_data_dependent(f, *args, staged_error=zt.TraceError):
    """For ops whose output shape depends on tensor data (bool masks): the dynamic API equals
    torch.autograd, and staging refuses with a TraceError."""
    check_dynamic(f, *args)
    with pytest.raises(staged_error):
        staged.pullback(f, *args)


def check_complex(f, *args):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    y = f(*leaves)
    dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(3))
    ref = torch.autograd.grad(y, leaves, dy)
    _, back = zt.pullback(f, *args)
    for ours, r in zip(back(dy), ref):
        torch.testing.assert_close(ours, r)
    _, sback = staged.pullback(f, *args)
    for ours, r in zip(sback(dy), ref):
        torch.testing.assert_close(ours, r)


I = torch.tensor([0, 2, 2, 1])  # repeated entries accumulate
I2 = torch.tensor([[1, 0], [3, 3]])
J = torch.tensor([1, 1, 0, 3])
NEG = torch.tensor([-1, 0, -4])

INDICES = {
    # basic
    "int": 1,
    "neg-int": -1,
    "int-tuple": (1, 2),
    "slice": slice(1, 3),
    "slice-step": (slice(None), slice(None, None, 2)),
    "slice-step-offset": (slice(1, None, 2), 0, slice(1, 4, 3)),
    "slice-empty": slice(3, 1),
    "slice-out-of-range": slice(-10, 10),
    "none": None,
    "none-mid": (slice(None), None, 1),
    "ellipsis": Ellipsis,
    "ellipsis-int": (Ellipsis, 1),
    "int-ellipsis-none": (1, Ellipsis, None),
    "everything-basic": (None, 1, Ellipsis, None, slice(None, None, 3)),
    "empty-tuple": (),
    # advanced
    "tensor": I,
    "tensor-2d": I2,
    "tensor-neg": NEG,
    "tensor-empty": torch.tensor([], dtype=torch.long),
    "tensor-int32": I.int(),
    "list": [0, 0, 1],
    "list-of-lists": [[0, 1], [1, 1]],
    "tuple-of-tensors": (I, J),
    "list-of-tensors": [I, J],
    "broadcast-tensors": (I2, torch.tensor([1, 2])),
    "tensor-after-slice": (slice(None), J),
    "tensor-after-ellipsis": (Ellipsis, torch.tensor([3, 0, 0])),
    "two-tensors-after-slice": (slice(None), J, torch.tensor([0])),
    "tensors-then-slice": (I, J, slice(1, None)),
    # advanced mixed with basic
    "int-tensor": (1, J),
    "tensor-int": (I, 1),
    "slice-tensor-step": (slice(1, None), J, slice(None, None, 2)),
    "none-tensor": (None, I),
    "tensor-none": (I, None),
    "ellipsis-none-tensor": (Ellipsis, None, torch.tensor([3, 0])),
    "list-in-tuple": (slice(None), [0, 0, 2]),
    "int-list-int": (1, [0, 2], 1),
    # advanced indices separated: their dimension goes first
    "separated": (I, slice(None), torch.tensor([0, 1, 2, 3])),
    "separated-by-int": (I, 2, torch.tensor([0, 1, 2, 3])),
    "separated-by-none": (I, None, torch.tensor([0, 1, 2, 3])),
    "separated-2d": (I2, slice(1, 3), I2),
    # Python bools
    "true": True,
    "false": False,
    "true-in-tuple": (1, True),
}


@pytest.mark.parametrize("shape", [(4, 5, 6), (4, 4, 4)], ids=str)
@pytest.mark.parametrize("name", list(INDICES))
def test_getitem(name, shape):
    index = INDICES[name]
    x = rand(*shape, seed=1)
    check_gradient(lambda x: x[index], x)
    check_gradient(lambda x: x[index], noncontiguous(x))


# 0-d index tensors: torch reads an integer one into Python (a select) and a bool one decides
# whether the output is empty, so these are data-dependent like masks.
ZERO_D = {
    "tensor-0d": torch.tensor(2),
    "0d-with-separated": (torch.tensor(2), slice(None), I),
    "separated-0d": (I, slice(None), torch.tensor(1)),
    "0d-and-tensor": (torch.tensor(0), I),
    "tensor-0d-0d": (torch.tensor(0), slice(None), torch.tensor(-1)),
    "0d-bool-true": torch.tensor(True),
    "0d-bool-false": (1, torch.tensor(False)),
}


@pytest.mark.parametrize("shape", [(4, 5, 6), (4, 4, 4)], ids=str)
@pytest.mark.parametrize("name", list(ZERO_D))
def test_getitem_0d_index_tensors(name, shape):
    index = ZERO_D[name]
    check_data_dependent(lambda x: x[index], rand(*shape, seed=1))
    check_data_dependent(lambda x: x[index], noncontiguous(rand(*shape, seed=1)))


@pytest.mark.parametrize("name", ["int", "slice", "tensor", "separated", "int-tensor", "true", "list"])
def test_getitem_function_forms(name):
    index = INDICES[name]
    x = rand(4, 5, 6)
    check_gradient(lambda x: Tensor.__getitem__(x, index), x)
    check_gradient(lambda x: x[index].sum() * x[index], x)  # the same element read twice


def test_getitem_0d_and_empty_inputs():
    for index in ((), None, Ellipsis, (None, Ellipsis), True):
        check_gradient(lambda x: x[index], rand())
    check_gradient(lambda x: x[torch.tensor([0, 0])], rand(1))
    check_gradient(lambda x: x[:, 1:], rand(0, 3))
    check_gradient(lambda x: x[torch.tensor([], dtype=torch.long)], rand(0, 3))
    check_gradient(lambda x: x[..., 2], rand(3, 0, 4))


MASK = rand(4, 5, seed=7) > 0
MASKS = {
    "mask": MASK,
    "mask-full": rand(4, 5, 6, seed=8) > 0,
    "mask-1d-after-slice": (slice(None), MASK[0]),
    "mask-then-int": (MASK, 1),
    "mask-and-tensor": (MASK[:, 0], slice(None), torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 0])[: int(MASK[:, 0].sum())]),
    "ellipsis-mask": (Ellipsis, rand(6, seed=9) > 0),
    "list-of-bools": [True, False, True, True],
    "mask-none": (None, MASK),
    "mask-empty": torch.zeros(4, dtype=torch.bool),
    "uint8": MASK.to(torch.uint8),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_getitem_bool_masks(name):
    index = MASKS[name]
    x = rand(4, 5, 6, seed=1)
    if name == "uint8":  # deprecated; fake tensors reject it outright while staging (a RuntimeError)
        with pytest.warns(UserWarning, match="uint8"):
            check_data_dependent(lambda x: x[index], x, staged_error=(zt.TraceError, RuntimeError))
    else:
        check_data_dependent(lambda x: x[index], x)


NUMPY_INDICES = {
    "np-int": lambda np: np.int64(1),
    "np-int-in-tuple": lambda np: (slice(None), np.int32(-1)),
    "np-array": lambda np: np.array([0, 2, 2]),
    "np-array-after-slice": lambda np: (slice(None), np.array([1, 1])),
    "np-mixed": lambda np: (1, np.array([1, 0]), slice(None, None, 2)),
    "np-ints-in-list": lambda np: [np.int64(0), np.int64(2)],
}


@pytest.mark.parametrize("name", list(NUMPY_INDICES))
def test_getitem_numpy_indices(name):
    np = pytest.importorskip("numpy")
    index = NUMPY_INDICES[name](np)
    check_dynamic(lambda x: x[index], rand(4, 5, 6))


def test_getitem_numpy_scalar_staged():
    np = pytest.importorskip("numpy")
    check_gradient(lambda x: x[np.int64(1)], rand(4, 5))


def test_getitem_random_indices():
    """Random mixes of ints, slices (with steps), None, Ellipsis, integer tensors and lists,
    against torch.autograd (dynamic and staged)."""
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    shape = (4, 3, 5, 2)
    x = rand(*shape, seed=3)
    checked = 0
    while checked < 60:
        index, dim, used_ellipsis = [], 0, False
        adv_shape = rng.choice([(3,), (2, 1), (1, 4)])
        while dim < len(shape) and rng.random() < 0.8:
            kind = rng.choice(["int", "slice", "none", "ellipsis", "tensor", "list", "0d"])
            n = shape[dim]
            if kind == "int":
                index.append(rng.randrange(-n, n))
            elif kind == "slice":
                index.append(slice(rng.choice([None, 0, 1, -2]), rng.choice([None, n, -1, 2]),
                                   rng.choice([None, 1, 2, 3])))
            elif kind == "none":
                index.append(None)
                continue
            elif kind == "ellipsis":
                if used_ellipsis:
                    continue
                used_ellipsis = True
                index.append(Ellipsis)
                dim = len(shape) - (len(shape) - dim) // 2  # leave some dimensions to what follows
                continue
            elif kind == "tensor":
                index.append(torch.randint(-n, n, adv_shape, generator=gen))
            elif kind == "list":
                index.append([rng.randrange(n) for _ in range(adv_shape[-1])])
            else:
                index.append(torch.tensor(rng.randrange(n)))
            dim += 1
        index = tuple(index)
        try:
            x[index]
        except (IndexError, RuntimeError):  # indices that do not broadcast, or run past the rank
            continue
        if any(isinstance(e, Tensor) and e.dim() == 0 for e in index):
            check_data_dependent(lambda x: x[index], x)
        else:
            check_gradient(lambda x: x[index], x)
        checked += 1


def test_getitem_complex():
    z = torch.randn(4, 5, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    check_complex(lambda z: z[1:, torch.tensor([0, 0, 3])], z)
    check_complex(lambda z: z[None, ..., ::2], z)
    check_complex(lambda z: z[torch.tensor([1, 1]), :, None][:, 2], z)


def test_getitem_finite_differences():
    fd_check(lambda x: x[torch.tensor([0, 0, 1]), 1:], rand(3, 3))
    fd_check(lambda x: x[1:, None, torch.tensor([2, 0])], rand(3, 3))
    fd_check(lambda x: x[torch.tensor([0, 2]), :, torch.tensor([1, 1])], rand(3, 2, 2))


# -- index functions ---------------------------------------------------------------------------------

G = torch.tensor([[0, 1, 1], [2, 0, 0]])

INDEX_FUNCS = {
    "select": (lambda x: torch.select(x, 1, 2), (3, 4)),
    "select-neg": (lambda x: x.select(-1, -1), (3, 4)),
    "select-kw": (lambda x: torch.select(x, dim=0, index=1), (3, 4)),
    "gather": (lambda x: torch.gather(x, 1, G), (2, 4)),
    "gather-0": (lambda x: x.gather(0, G), (3, 3)),
    "gather-kw": (lambda x: torch.gather(x, dim=1, index=G, sparse_grad=False), (2, 4)),
    "gather-smaller": (lambda x: torch.gather(x, 1, G[:1, :2]), (2, 4)),
    "index_select": (lambda x: torch.index_select(x, 0, torch.tensor([2, 0, 2])), (3, 4)),
    "index_select-neg-dim": (lambda x: x.index_select(-1, torch.tensor([1, 1])), (3, 4)),
    "index_select-0d-index": (lambda x: x.index_select(1, torch.tensor(3)), (3, 4)),
    "index_select-empty": (lambda x: x.index_select(0, torch.tensor([], dtype=torch.long)), (3, 4)),
    "take_along_dim": (lambda x: torch.take_along_dim(x, G, dim=1), (2, 4)),
    "take_along_dim-broadcast": (lambda x: torch.take_along_dim(x, torch.tensor([[0], [2]]), 1), (2, 4)),
    "take_along_dim-broadcast-x": (lambda x: torch.take_along_dim(x, G, dim=1), (1, 4)),
    "take_along_dim-none": (lambda x: torch.take_along_dim(x, torch.tensor([0, 5, 5, 7])), (2, 4)),
    "take_along_dim-argsort": (lambda x: x.take_along_dim(torch.tensor([[3, 2, 1, 0]]), dim=-1), (3, 4)),
    "take": (lambda x: torch.take(x, torch.tensor([[0, 5], [5, -1]])), (2, 4)),
    "Tensor.take": (lambda x: x.take(torch.tensor([3])), (2, 4)),
}


@pytest.mark.parametrize("name", list(INDEX_FUNCS))
def test_index_functions(name):
    f, shape = INDEX_FUNCS[name]
    check_gradient(f, rand(*shape, seed=1))
    check_gradient(f, noncontiguous(rand(*shape, seed=1)))


def test_all_keyword_calls():
    check_gradient(lambda x: torch.gather(input=x, dim=1, index=G), rand(2, 4))
    check_gradient(lambda x: torch.index_select(input=x, dim=0, index=torch.tensor([1, 1])), rand(2, 4))
    check_gradient(lambda x: torch.take_along_dim(input=x, indices=G, dim=1), rand(2, 4))
    check_gradient(lambda x: torch.select(input=x, dim=1, index=-1), rand(2, 4))


def test_index_functions_on_0d_inputs():
    check_gradient(lambda x: torch.gather(x, 0, torch.tensor(0)), rand())
    check_gradient(lambda x: x.index_select(0, torch.tensor([0])), rand())
    check_gradient(lambda x: torch.take(x, torch.tensor([0, 0])), rand())


@pytest.mark.parametrize("mask_shape,x_shape", [((3, 4), (3, 4)), ((4,), (3, 4)), ((3, 1), (3, 4)), ((3, 4), (4,)),
                                                ((3, 4), ())], ids=str)
def test_masked_select(mask_shape, x_shape):
    mask = rand(*mask_shape, seed=5) > 0
    check_data_dependent(lambda x: torch.masked_select(x, mask), rand(*x_shape, seed=1))
    check_data_dependent(lambda x: x.masked_select(mask=mask), rand(*x_shape, seed=1))


def test_index_functions_complex_and_finite_differences():
    z = torch.randn(2, 4, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    check_complex(lambda z: torch.gather(z, 1, G), z)
    check_complex(lambda z: z.index_select(1, torch.tensor([3, 3])), z)
    fd_check(lambda x: torch.gather(x, 1, G), rand(2, 3))
    fd_check(lambda x: torch.take_along_dim(x, torch.tensor([[2], [0]]), 1), rand(2, 3))
    fd_check(lambda x: torch.take(x, torch.tensor([1, 1, -1])), rand(2, 3))


# -- writing by index ---------------------------------------------------------------------------------

M = rand(3, 4, seed=11) > 0
S = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])

WRITES = {
    "masked_fill": (lambda x: x.masked_fill(M, 0.5), [(3, 4)]),
    "masked_fill-broadcast": (lambda x: torch.masked_fill(x, M, 2.0), [(4,)]),
    "masked_fill-tensor-value": (lambda x, v: x.masked_fill(M, v), [(3, 4), ()]),
    "index_put": (lambda x, v: x.index_put((torch.tensor([0, 2]),), v), [(3, 4), (4,)]),
    "index_put-two": (lambda x, v: torch.index_put(x, (torch.tensor([0, 2]), torch.tensor([1, 3])), v), [(3, 4), (2,)]),
    "index_put-accumulate": (lambda x, v: torch.index_put(x, (torch.tensor([0, 0]), torch.tensor([1, 1])), v,
                                                           accumulate=True), [(3, 4), (2,)]),
    "index_put-accumulate-kw": (lambda x, v: x.index_put((torch.tensor([1, 1]),), v, accumulate=True),
                                [(3, 4), (1, 4)]),
    "index_put-mask-one-value": (lambda x, v: x.index_put((M,), v), [(3, 4), ()]),
    "index_put-row-mask-one-value": (lambda x, v: x.index_put((M[:, 0],), v), [(3, 4), (1,)]),
    "scatter": (lambda x, s: x.scatter(0, S, s), [(3, 4), (2, 4)]),
    "torch.scatter-dim1": (lambda x, s: torch.scatter(x, 1, S[:, :3], s), [(2, 4), (2, 3)]),
    "scatter-value": (lambda x: x.scatter(0, S, 1.5), [(3, 4)]),
    "scatter-value-kw": (lambda x: torch.scatter(x, 0, S, value=-1.0), [(3, 4)]),
    "scatter_add": (lambda x, s: x.scatter_add(0, S, s), [(3, 4), (2, 4)]),
    "torch.scatter_add": (lambda x, s: torch.scatter_add(x, 1, S, s), [(2, 3), (2, 4)]),
    "index_add": (lambda x, s: x.index_add(0, torch.tensor([0, 0]), s), [(3, 4), (2, 4)]),
    "index_add-alpha": (lambda x, s: torch.index_add(x, 1, torch.tensor([3, 1]), s, alpha=-2.0), [(3, 4), (3, 2)]),
    "index_copy": (lambda x, s: x.index_copy(1, torch.tensor([3, 0]), s), [(3, 4), (3, 2)]),
    "torch.index_copy": (lambda x, s: torch.index_copy(x, 0, torch.tensor([2]), s), [(3, 4), (1, 4)]),
    "index_fill": (lambda x: x.index_fill(1, torch.tensor([1, 3]), -1.0), [(3, 4)]),
    "index_fill-tensor-value": (lambda x, v: x.index_fill(1, torch.tensor([1, 3]), v), [(3, 4), ()]),
    "masked_scatter": (lambda x, s: x.masked_scatter(M, s), [(3, 4), (20,)]),
    "masked_scatter-broadcast": (lambda x, s: torch.masked_scatter(x, M, s), [(4,), (3, 5)]),
}


@pytest.mark.parametrize("name", list(WRITES))
def test_writes(name):
    f, shapes = WRITES[name]
    check_gradient(f, *[rand(*s, seed=i) for i, s in enumerate(shapes)])
    check_gradient(f, *[noncontiguous(rand(*s, seed=i)) for i, s in enumerate(shapes)])


def test_writes_finite_differences():
    # src bigger than index (torch.autograd refuses this one); no repeated index along dim 1
    fd_check(lambda x, s: torch.scatter(x, 1, torch.tensor([[0, 1], [2, 0]]), s), rand(2, 3), rand(3, 5))
    fd_check(lambda x, s: x.masked_scatter(M[:2], s), rand(2, 4), rand(9))
    fd_check(lambda x, v: x.index_put((torch.tensor([0, 0]),), v, accumulate=True), rand(2, 3), rand(3))


def test_scatter_reduce_is_refused():
    with pytest.raises(NotImplementedError, match="reduce"):
        zt.gradient(lambda x: x.scatter(0, S, 2.0, reduce="multiply").sum(), rand(3, 4))


def test_rules_registered_for_every_alias():
    for f in (Tensor.__getitem__, torch.select, Tensor.select, torch.gather, Tensor.gather, torch.index_select,
              Tensor.index_select, torch.take_along_dim, Tensor.take_along_dim, torch.take, Tensor.take,
              torch.masked_select, Tensor.masked_select, torch.masked_fill, Tensor.masked_fill, torch.index_put,
              Tensor.index_put, torch.scatter, Tensor.scatter, torch.scatter_add, Tensor.scatter_add,
              torch.index_add, Tensor.index_add, torch.index_copy, Tensor.index_copy, torch.index_fill,
              Tensor.index_fill, torch.masked_scatter, Tensor.masked_scatter):
        assert f in REGISTRY, f
