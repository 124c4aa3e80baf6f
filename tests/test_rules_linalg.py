"""Rules of zygote_torch/rules/linalg.py against torch.autograd (float64, real and complex), finite
differences, and laziness of the cotangents."""
import operator
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt
from zygote_torch.ad.registry import REGISTRY
from zygote_torch.rules import linalg
from zygote_torch.runtime import staged
from helpers import check_gradient, fd_check, noncontiguous, rand

Tensor = torch.Tensor


def crand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed + len(shape))
    return torch.randn(*shape, dtype=torch.complex128, generator=g)


def check_complex(f, *args):
    """Complex inputs: our pullback (dynamic and staged) equals torch.autograd's for a random
    complex output cotangent (torch's convention: the conjugate Wirtinger gradient)."""
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


# -- matmul ------------------------------------------------------------------------------------------

MATMUL_SHAPES = [
    ((4,), (4,)),  # dot
    ((4,), (4, 5)),  # vector @ matrix
    ((3, 4), (4,)),  # matrix @ vector
    ((3, 4), (4, 5)),
    ((2, 3, 4), (4, 5)),  # batched @ matrix
    ((3, 4), (2, 4, 5)),  # matrix @ batched
    ((4,), (2, 4, 5)),
    ((2, 3, 4), (4,)),
    ((2, 1, 3, 4), (5, 4, 2)),  # broadcast batch dimensions
    ((1, 3, 4), (2, 4, 5)),
    ((2, 3, 4), (1, 4, 5)),
    ((0, 3, 4), (4, 5)),  # empty batch
    ((3, 0), (0, 5)),  # empty contraction: zeros
    ((3, 4), (4, 0)),
]

MATMUL_FORMS = {
    "torch.matmul": torch.matmul,
    "torch.linalg.matmul": torch.linalg.matmul,
    "Tensor.matmul": lambda a, b: a.matmul(b),
    "@": operator.matmul,
    "Tensor.__rmatmul__": lambda a, b: Tensor.__rmatmul__(b, a),
}


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
@pytest.mark.parametrize("form", list(MATMUL_FORMS))
def test_matmul_all_cases(form, shapes):
    sa, sb = shapes
    check_gradient(MATMUL_FORMS[form], rand(*sa, seed=1), rand(*sb, seed=2))


def test_matmul_noncontiguous_and_closure_constant():
    a, w = noncontiguous(rand(2, 3, 4)), noncontiguous(rand(4, 5))
    check_gradient(lambda a, w: a @ w, a, w)
    check_gradient(lambda a: (a @ w).sin(), a)  # w is a constant: its cotangent is never needed
    check_gradient(lambda w: a @ w, w)


def test_product_cotangents_are_lazy():
    """The cotangent of an untracked operand is a Thunk that nobody evaluates."""
    a, w = rand(3, 4), rand(4, 5)
    evaluated = []
    real = linalg.matmul_cotangents

    def spy(x, y, dy):
        da, db = real(x, y, dy)
        def wrap(t, name):
            if not isinstance(t, zt.Thunk):
                return t
            return zt.Thunk(lambda: (evaluated.append(name), t())[1])
        return wrap(da, "da"), wrap(db, "db")

    linalg.matmul_cotangents = spy
    try:
        (g,) = zt.gradient(lambda a: (a @ w).sum(), a)
    finally:
        linalg.matmul_cotangents = real
    torch.testing.assert_close(g, w.sum(1).expand(3, 4))
    assert evaluated == ["da"]


@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((4,), (2, 4, 3)), ((2, 1, 3, 4), (3, 4, 2))], ids=str)
def test_matmul_finite_differences(shapes):
    fd_check(torch.matmul, rand(*shapes[0]), rand(*shapes[1]))


@pytest.mark.parametrize("shapes", [((4,), (4,)), ((3, 4), (4,)), ((2, 3, 4), (4, 5)), ((3, 4), (2, 4, 5))], ids=str)
def test_matmul_complex(shapes):
    check_complex(torch.matmul, crand(*shapes[0]), crand(*shapes[1], seed=1))


def test_matmul_out_is_refused():
    a, b = rand(2, 2), rand(2, 2)
    with pytest.raises((TypeError, zt.ZygoteError), match="out="):
        zt.gradient(lambda a: torch.matmul(a, b, out=torch.empty(2, 2, dtype=torch.float64)).sum(), a)


# -- mm, bmm, mv, dot, vdot, outer --------------------------------------------------------------------

PRODUCTS = [
    ("mm", torch.mm, (3, 4), (4, 5)),
    ("Tensor.mm", Tensor.mm, (3, 4), (4, 5)),
    ("mm-empty", torch.mm, (0, 4), (4, 5)),
    ("bmm", torch.bmm, (2, 3, 4), (2, 4, 5)),
    ("Tensor.bmm", Tensor.bmm, (2, 3, 4), (2, 4, 5)),
    ("mv", torch.mv, (3, 4), (4,)),
    ("Tensor.mv", Tensor.mv, (3, 4), (4,)),
    ("dot", torch.dot, (5,), (5,)),
    ("Tensor.dot", Tensor.dot, (5,), (5,)),
    ("vdot", torch.vdot, (5,), (5,)),
    ("Tensor.vdot", Tensor.vdot, (5,), (5,)),
    ("outer", torch.outer, (3,), (4,)),
    ("ger", torch.ger, (3,), (4,)),
    ("Tensor.outer", Tensor.outer, (3,), (4,)),
    ("Tensor.ger", Tensor.ger, (3,), (4,)),
    ("inner", torch.inner, (2, 3), (4, 3)),
    ("inner-1d", torch.inner, (3,), (3,)),
    ("inner-0d", torch.inner, (), (4, 3)),
    ("Tensor.inner", Tensor.inner, (2, 3), (3,)),
]


@pytest.mark.parametrize("name,f,sa,sb", PRODUCTS, ids=[p[0] for p in PRODUCTS])
def test_products(name, f, sa, sb):
    check_gradient(f, rand(*sa, seed=1), rand(*sb, seed=2))
    check_gradient(f, noncontiguous(rand(*sa, seed=1)), noncontiguous(rand(*sb, seed=2)))


def test_product_keywords():
    a, b, v = rand(3, 4), rand(4, 5), rand(4)
    check_gradient(lambda a, b: torch.mm(a, mat2=b), a, b)
    check_gradient(lambda a, v: torch.mv(a, vec=v), a, v)
    check_gradient(lambda u, v: torch.dot(u, tensor=v), v, v * 2)
    check_gradient(lambda u, v: torch.outer(u, vec2=v), v, rand(3))


def test_all_keyword_calls():
    check_gradient(lambda a, b: torch.mm(input=a, mat2=b), rand(3, 4), rand(4, 5))
    check_gradient(lambda x, w, b: F.linear(input=x, weight=w, bias=b), rand(2, 4), rand(3, 4), rand(3))
    check_gradient(lambda a, b: torch.matmul(input=a, other=b), rand(2, 3, 4), rand(4))


@pytest.mark.parametrize("name,f,sa,sb", [p for p in PRODUCTS if "empty" not in p[0] and "0d" not in p[0]],
                         ids=[p[0] for p in PRODUCTS if "empty" not in p[0] and "0d" not in p[0]])
def test_products_complex(name, f, sa, sb):
    check_complex(f, crand(*sa), crand(*sb, seed=1))


def test_products_finite_differences():
    fd_check(torch.bmm, rand(2, 3, 4), rand(2, 4, 2))
    fd_check(torch.vdot, rand(4), rand(4))
    fd_check(torch.outer, rand(3), rand(2))


# -- beta*input + alpha*product ----------------------------------------------------------------------

FUSED = [
    ("addmm", torch.addmm, (3, 5), (3, 4), (4, 5)),
    ("addmm-broadcast", torch.addmm, (5,), (3, 4), (4, 5)),
    ("addmm-0d", torch.addmm, (), (3, 4), (4, 5)),
    ("Tensor.addmm", Tensor.addmm, (1, 5), (3, 4), (4, 5)),
    ("baddbmm", torch.baddbmm, (2, 3, 5), (2, 3, 4), (2, 4, 5)),
    ("baddbmm-broadcast", torch.baddbmm, (3, 1), (2, 3, 4), (2, 4, 5)),
    ("Tensor.baddbmm", Tensor.baddbmm, (2, 3, 5), (2, 3, 4), (2, 4, 5)),
    ("addbmm", torch.addbmm, (3, 5), (2, 3, 4), (2, 4, 5)),
    ("Tensor.addbmm", Tensor.addbmm, (5,), (2, 3, 4), (2, 4, 5)),
    ("addmv", torch.addmv, (3,), (3, 4), (4,)),
    ("Tensor.addmv", Tensor.addmv, (1,), (3, 4), (4,)),
    ("addr", torch.addr, (3, 4), (3,), (4,)),
    ("Tensor.addr", Tensor.addr, (4,), (3,), (4,)),
]


@pytest.mark.parametrize("beta,alpha", [(1, 1), (0.5, -2.0), (0, 3)])
@pytest.mark.parametrize("name,f,sc,sa,sb", FUSED, ids=[p[0] for p in FUSED])
def test_fused_products(name, f, sc, sa, sb, beta, alpha):
    c, a, b = rand(*sc, seed=0), rand(*sa, seed=1), rand(*sb, seed=2)
    if (beta, alpha) == (1, 1):
        check_gradient(f, c, a, b)
    else:
        check_gradient(lambda c, a, b: f(c, a, b, beta=beta, alpha=alpha), c, a, b)


@pytest.mark.parametrize("name,f,sc,sa,sb", FUSED[:1] + FUSED[4:5] + FUSED[9:12], ids=["addmm", "baddbmm", "addbmm",
                                                                                          "addmv", "addr"])
def test_fused_products_complex_scalars(name, f, sc, sa, sb):
    check_complex(lambda c, a, b: f(c, a, b, beta=0.5 - 1j, alpha=2 + 1j), crand(*sc), crand(*sa, seed=1),
                  crand(*sb, seed=2))


def test_fused_finite_differences():
    fd_check(lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0), rand(3, 1), rand(3, 4), rand(4, 2))
    fd_check(lambda c, a, b: torch.baddbmm(c, a, b, alpha=-1.0), rand(2, 3, 2), rand(2, 3, 4), rand(2, 4, 2))


# -- linear ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape", [(4,), (2, 4), (2, 3, 4), (0, 4), (2, 0, 4)], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(x_shape, with_bias):
    x, w, b = rand(*x_shape, seed=1), rand(5, 4, seed=2), rand(5, seed=3)
    if with_bias:
        check_gradient(F.linear, x, w, b)
        check_gradient(lambda x, w, b: torch.nn.functional.linear(x, w, bias=b), noncontiguous(x), w, b)
        check_gradient(lambda x, w, b: torch._C._nn.linear(x, weight=w, bias=b), x, w, b)
    else:
        check_gradient(F.linear, x, w)
        check_gradient(lambda x, w: F.linear(x, w, None), x, noncontiguous(w))


def test_linear_variants():
    check_gradient(F.linear, rand(2, 4), rand(4))  # a 1-D weight: a dot product per row
    check_gradient(F.linear, rand(2, 4), rand(5, 4), rand())  # a 0-d bias broadcasts
    check_gradient(F.linear, rand(3, 4), rand(5, 4), rand(3, 5))  # a bias that covers the batch
    layer = torch.nn.Linear(4, 3).double()
    check_gradient(lambda x: layer(x), rand(2, 4))
    check_complex(F.linear, crand(2, 4), crand(3, 4, seed=1), crand(3, seed=2))
    fd_check(F.linear, rand(2, 3), rand(2, 3), rand(2))


# -- einsum ------------------------------------------------------------------------------------------

EINSUM = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,jk", [(3, 4), (4, 5)]),  # implicit output
    ("i,i->", [(4,), (4,)]),
    ("i,j->ij", [(3,), (4,)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij->ji", [(3, 4)]),
    ("ij->", [(3, 4)]),
    ("ij->j", [(3, 4)]),
    ("ii", [(4, 4)]),  # trace
    ("ii->i", [(4, 4)]),  # diagonal
    ("iii->i", [(3, 3, 3)]),
    ("iji->j", [(3, 2, 3)]),
    ("iij,jk->ik", [(3, 3, 2), (2, 4)]),
    ("ij,k->k", [(3, 4), (5,)]),  # i, j summed only in the first operand
    ("ij,k->ik", [(3, 4), (5,)]),
    ("ij,ij->i", [(3, 1), (3, 4)]),  # size-1 dimensions broadcast
    ("ij,ij->ij", [(3, 4), (1, 4)]),
    ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]),
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]),  # ellipsis dims broadcast
    ("b...i,i->b...", [(2, 3, 5, 4), (4,)]),
    ("...ii->...i", [(2, 3, 3)]),
    ("...i,...i", [(2, 4), (4,)]),
    ("ij,jk,kl->il", [(3, 4), (4, 5), (5, 2)]),
    ("ab,bc,cd,de->ae", [(2, 3), (3, 4), (4, 2), (2, 3)]),
    (",ij->ij", [(), (3, 4)]),  # a 0-d operand
    ("Ab,bC->AC", [(3, 4), (4, 2)]),  # capital letters
    (" i j , j k -> i k ", [(3, 4), (4, 5)]),  # spaces
    ("ij,jk->ik", [(0, 4), (4, 5)]),  # empty
    ("ij,jk->ik", [(3, 0), (0, 5)]),
]


@pytest.mark.parametrize("equation,shapes", EINSUM, ids=[e[0].replace(" ", "_") or "scalar" for e in EINSUM])
def test_einsum(equation, shapes):
    xs = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    check_gradient(lambda *xs: torch.einsum(equation, *xs), *xs)


def test_einsum_forms():
    a, b = rand(3, 4), rand(4, 5)
    check_gradient(lambda a, b: torch.einsum("ij,jk->ik", [a, b]), a, b)  # list of operands
    check_gradient(lambda a, b: torch.einsum("ij,jk->ik", (a, b)), a, b)  # tuple of operands
    check_gradient(lambda a, b: torch.einsum(a, [0, 1], b, [1, 2], [0, 2]), a, b)  # sublist format
    check_gradient(lambda a, b: torch.einsum(a, [0, 1], b, [1, 2]), a, b)
    check_gradient(lambda a, b: torch.einsum(a, [..., 0], b, [0, 1]), rand(2, 3, 4), b)
    check_gradient(lambda a: torch.einsum("ij,jk->ik", a, b), noncontiguous(a))
    check_gradient(lambda a: torch.einsum("ii->i", a), noncontiguous(rand(4, 4)))
    check_gradient(lambda a: torch.einsum("ij,ij->", a, a), a)  # one tensor twice


@pytest.mark.parametrize("equation,shapes", [("ij,jk->ik", [(3, 4), (4, 5)]), ("ii->i", [(3, 3)]),
                                             ("bij,bkj->bik", [(2, 3, 4), (2, 5, 4)]), ("ij,k->k", [(2, 3), (4,)])])
def test_einsum_complex(equation, shapes):
    check_complex(lambda *xs: torch.einsum(equation, *xs), *[crand(*s, seed=i) for i, s in enumerate(shapes)])


def test_einsum_finite_differences():
    fd_check(lambda a, b: torch.einsum("iij,jk->ik", a, b), rand(2, 2, 3), rand(3, 2))
    fd_check(lambda a, b: torch.einsum("...i,ij->...j", a, b), rand(2, 1, 3), rand(3, 2))


def test_parse_einsum():
    assert linalg.parse_einsum("ij,jk", [(2, 3), (3, 4)]) == (["ij", "jk"], "ik")
    assert linalg.parse_einsum("ba,ab", [(2, 3), (3, 2)]) == (["ba", "ab"], "")
    assert linalg.parse_einsum("ji", [(2, 3)]) == (["ji"], "ij")
    subs, out = linalg.parse_einsum("...ij,j->...i", [(5, 4, 2, 3), (3,)])
    assert subs[0][2:] == "ij" and len(subs[0]) == 4 and out == subs[0][:2] + "i"


# -- tensordot ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,sa,sb", [
    (2, (2, 3, 4), (3, 4, 5)),
    (1, (2, 3), (3, 4)),
    (0, (2, 3), (4,)),
    (([0, 2], [2, 0]), (2, 3, 4), (4, 5, 2)),
    (([1], [0]), (2, 3), (3, 4)),
    ([[-1], [0]], (2, 3), (3, 4)),
], ids=str)
def test_tensordot(dims, sa, sb):
    check_gradient(lambda a, b: torch.tensordot(a, b, dims=dims), rand(*sa, seed=1), rand(*sb, seed=2))
    check_gradient(lambda a, b: torch.tensordot(a, b, dims), rand(*sa, seed=1), rand(*sb, seed=2))


@pytest.mark.parametrize("shape", [(3, 3), (3, 5), (4, 2), (0, 3)], ids=str)
def test_trace(shape):
    check_gradient(torch.trace, rand(*shape))
    check_gradient(lambda x: x.trace() * x, noncontiguous(rand(*shape)))


def test_rules_registered_for_every_alias():
    for f in (torch.matmul, torch.linalg.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.mm,
              Tensor.mm, torch.bmm, torch.mv, torch.dot, torch.vdot, torch.outer, torch.ger, torch.addmm,
              Tensor.addmm, torch.baddbmm, torch.addbmm, torch.addmv, torch.addr, F.linear, torch._C._nn.linear,
              torch.einsum, torch.tensordot, torch.inner, torch.trace, Tensor.trace):
        assert f in REGISTRY, f


# -- torch._grouped_mm (mixture-of-experts layers; float32, its kernels' widest dtype on CPU) ----------

def _grouped_operands(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    offs = torch.tensor([3, 6, 10], dtype=torch.int32) if kind in ("2d3d", "2d3d column-major") \
        else torch.tensor([4, 8, 16], dtype=torch.int32)
    return {"2d3d": (r(10, 8), r(3, 8, 4), offs),
            "2d3d column-major": (r(10, 8), r(3, 4, 8).mT, offs),  # nn.Linear-style (out, in) weights
            "3d3d": (r(3, 8, 4), r(3, 4, 8), None),
            "2d2d": (r(8, 16), r(16, 4), offs),
            "3d2d": (r(3, 8, 4), r(4, 16), offs)}[kind]


@pytest.mark.parametrize("kind", ["2d3d", "2d3d column-major", "3d3d", "2d2d", "3d2d"])
def test_grouped_mm_every_layout(kind):
    a, b, offs = _grouped_operands(kind)
    check_gradient(lambda a, b: torch._grouped_mm(a, b, offs=offs), a, b, atol=1e-5, rtol=1e-5)


def test_grouped_mm_rows_past_the_last_group_get_no_cotangent():
    """torch's kernel leaves rows past offs[-1] unwritten and its backward passes garbage there;
    those rows take no part in the product, so their cotangent is 0."""
    a, b, _ = _grouped_operands("2d3d")
    offs = torch.tensor([3, 6, 8], dtype=torch.int32)
    da, db = zt.gradient(lambda a, b: torch._grouped_mm(a, b, offs=offs)[:8].square().sum(), a, b)
    assert torch.equal(da[8:], torch.zeros(2, 8))
    ref = torch.autograd.grad(torch._grouped_mm(a[:8].requires_grad_(), b.requires_grad_(),
                                                offs=offs).square().sum(), b)[0]
    torch.testing.assert_close(db, ref)


def test_grouped_mm_stages_in_float32():
    """torch's meta kernel takes only bfloat16; the staged program traces what the CPU kernel runs
    (a regression: Mixtral and Qwen3-MoE failed staged with 'Expected inputs of BF16 type')."""
    a, b, offs = _grouped_operands("2d3d")
    w = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))  # (torch's backward fails on sum()'s expanded dy)
    f = lambda a, b: (torch._grouped_mm(a, b, offs=offs) * w).sum()  # noqa: E731
    ours = zt.compile(lambda a, b: zt.gradient(f, a, b))(a, b)
    ref = torch.autograd.grad(f(a.requires_grad_(), b.requires_grad_()), (a, b))
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)


def test_grouped_mm_staged_refusals_match_the_kernel():
    a, b, offs = _grouped_operands("2d3d")
    with pytest.raises(RuntimeError, match="expected inputs of one of"):
        zt.compile(lambda a, b: torch._grouped_mm(a, b, offs=offs))(a.double(), b.double())
    with pytest.raises(RuntimeError, match="offs is required"):
        zt.compile(lambda a, b: torch._grouped_mm(a, b))(a, b)
