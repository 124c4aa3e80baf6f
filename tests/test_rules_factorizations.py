"""Matrix functions and decompositions (rules/factorizations.py) against torch.autograd (float64 and
complex128, dynamic and staged), finite differences, and torch's errors.

Inputs are well-conditioned random matrices (distinct eigen/singular values); losses of
eigenvectors and singular vectors are gauge invariant (projectors, |V|, U f(S) V^H), as their
gradients are only defined for those. Complex results are compared through torch.view_as_real,
since check_gradient draws a random cotangent for real outputs only.
"""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch

import zygote_torch as zt
import zygote_torch.rules.factorizations as dec  # noqa: F401  (registers the rules)
import zygote_torch.rules.special  # noqa: F401  (view_as_real, used to compare complex outputs)
from zygote_torch.ad.registry import REGISTRY
from helpers import check_second_derivatives, check_gradient, fd_check, noncontiguous

L = torch.linalg
Tensor = torch.Tensor
F64, C128 = torch.float64, torch.complex128
DTYPES = [F64, C128]

warnings.filterwarnings("ignore", message=".*deprecated.*")


# -- inputs ----------------------------------------------------------------------------------------

def R(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * len(shape))
    return torch.randn(shape, dtype=dtype, generator=g)


def WC(*shape, dtype=F64, seed=0):
    """A well-conditioned square matrix (batch): random plus n times the identity."""
    n = shape[-1]
    return R(*shape, dtype=dtype, seed=seed) + n * torch.eye(n, dtype=dtype)


def SPD(*shape, dtype=F64, seed=0):
    A = R(*shape, dtype=dtype, seed=seed)
    return A @ A.mH + shape[-1] * torch.eye(shape[-1], dtype=dtype)


def HERM(*shape, dtype=F64, seed=0):
    A = R(*shape, dtype=dtype, seed=seed)
    return A + A.mH


def out(t):
    """A real view of a result, so that check_gradient draws a nonzero cotangent for it."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


# -- inverse, det, slogdet, logdet -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 3), (2, 4, 4), (0, 3, 3)])
def test_inv(dtype, shape):
    A = WC(*shape, dtype=dtype)
    check_gradient(lambda a: out(L.inv(a)), A)
    check_gradient(lambda a: out(torch.inverse(a)), A)
    check_gradient(lambda a: out(a.inverse()), noncontiguous(A))
    check_gradient(lambda a: out(L.inv_ex(a).inverse), A)
    check_gradient(lambda a: out(L.inv(A=a)), A.mT)  # keyword form, transposed (non-contiguous) input


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 3), (2, 4, 4), (1, 1)])
def test_det(dtype, shape):
    A = R(*shape, dtype=dtype)
    check_gradient(lambda a: out(L.det(a)), A)
    check_gradient(lambda a: out(torch.det(input=a)), noncontiguous(A))
    check_gradient(lambda a: out(a.det()), A)


def _twice_differentiable_det_grad(A):
    """torch's det gradient on its create_graph path (SVD near singular matrices)."""
    A = A.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(L.det(A).sum(), A, create_graph=True)
    return g.detach()


@pytest.mark.parametrize("dtype", DTYPES)
def test_det_singular(dtype):
    """At singular matrices the gradient is the (conjugate) adjugate, finite and nonzero for rank
    n-1. torch's create_graph path computes it by the SVD; its first-order path returns 0 at
    exactly singular matrices (a zero pivot), which is not the derivative: we follow the former."""
    A = R(2, 4, 4, dtype=dtype).clone()
    A[0, :, 3] = 0.0  # exactly singular, rank 3
    A[1, :, 3] = A[1, :, 0] + 2 * A[1, :, 1]  # singular up to rounding
    (ours,) = zt.gradient(lambda a: L.det(a).real.sum() if dtype == C128 else L.det(a).sum(), A)
    ref = _twice_differentiable_det_grad(A) if dtype == F64 else None
    if ref is not None:
        torch.testing.assert_close(ours, ref)
    adj0 = torch.zeros(4, 4, dtype=dtype)  # the adjugate of A[0] by cofactors (only column 3 is nonzero)
    for i in range(4):
        minor = torch.cat([A[0, :i], A[0, i + 1:]])[:, :3]
        adj0[i, 3] = (-1) ** (i + 3) * L.det(minor)
    torch.testing.assert_close(ours[0], adj0.conj())
    fd_check(L.det, A[1])


def test_det_empty():
    check_gradient(L.det, torch.zeros(0, 0, dtype=F64))
    check_gradient(L.det, torch.zeros(2, 0, 0, dtype=F64))
    check_gradient(L.det, R(0, 3, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_slogdet(dtype):
    A = R(2, 3, 3, dtype=dtype)
    check_gradient(lambda a: tuple(out(t) for t in L.slogdet(a)), A)
    check_gradient(lambda a: out(L.slogdet(A=a).logabsdet), A)
    check_gradient(lambda a: tuple(out(t) for t in torch.slogdet(a)), A)
    check_gradient(lambda a: out(a.slogdet()[1]), noncontiguous(A))
    if dtype == C128:
        check_gradient(lambda a: out(L.slogdet(a).sign), A)  # the phase of a complex determinant
    assert type(torch.slogdet(A)) is type(zt.pullback(torch.slogdet, A)[0])
    assert type(L.slogdet(A)) is type(zt.pullback(L.slogdet, A)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_logdet(dtype):
    check_gradient(lambda a: out(torch.logdet(a)), SPD(2, 3, 3, dtype=dtype))
    check_gradient(lambda a: out(a.logdet()), R(3, 3, dtype=dtype, seed=3))
    if dtype == F64:  # a negative determinant: NaN, and torch's zero gradient
        A = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=F64))
        check_gradient(torch.logdet, A)


# -- linear systems --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape,b_shape,left", [
    ((3, 3), (3, 2), True), ((2, 3, 3), (2, 3, 4), True), ((3, 3), (5, 3, 2), True),  # batch broadcast
    ((2, 3, 3), (1, 3, 2), True), ((2, 3, 3), (3,), True), ((2, 3, 3), (2, 3), True),  # vector rhs
    ((3, 3), (2, 3), False), ((2, 3, 3), (2, 4, 3), False)])
def test_solve(dtype, a_shape, b_shape, left):
    A, B = WC(*a_shape, dtype=dtype), R(*b_shape, dtype=dtype, seed=1)
    check_gradient(lambda a, b: out(L.solve(a, b, left=left)), A, B)
    check_gradient(lambda a, b: out(L.solve_ex(A=a, B=b, left=left).result), noncontiguous(A), B)
    check_gradient(lambda b: out(L.solve(A, b, left=left)), B)  # a constant A


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("upper", [True, False])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("unitriangular", [True, False])
def test_solve_triangular(dtype, upper, left, unitriangular):
    A = WC(2, 3, 3, dtype=dtype)
    B = R(3, 4, dtype=dtype, seed=1) if left else R(4, 3, dtype=dtype, seed=1)
    check_gradient(lambda a, b: out(L.solve_triangular(a, b, upper=upper, left=left, unitriangular=unitriangular)),
                   A, B)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("upper,transpose,unitriangular", [
    (True, False, False), (False, False, False), (True, True, False), (False, True, True), (True, False, True)])
def test_triangular_solve(dtype, upper, transpose, unitriangular):
    A, b = WC(3, 3, dtype=dtype), R(2, 3, 2, dtype=dtype, seed=1)
    check_gradient(lambda b, a: tuple(out(t) for t in torch.triangular_solve(b, a, upper, transpose, unitriangular)),
                   b, A)
    check_gradient(lambda b, a: out(b.triangular_solve(a, upper=upper, transpose=transpose,
                                                       unitriangular=unitriangular).solution), b, A)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("upper", [False, True])
def test_cholesky_solve_and_inverse(dtype, upper):
    C = L.cholesky(SPD(3, 3, dtype=dtype), upper=upper)
    B = R(2, 3, 2, dtype=dtype, seed=1)
    check_gradient(lambda b, c: out(torch.cholesky_solve(b, c, upper)), B, C)
    check_gradient(lambda b, c: out(b.cholesky_solve(input2=c, upper=upper)), B, C)
    check_gradient(lambda c: out(torch.cholesky_inverse(c, upper=upper)), C)
    check_gradient(lambda c: out(c.cholesky_inverse(upper)), noncontiguous(C))


# -- Cholesky, QR ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("upper", [False, True])
def test_cholesky(dtype, upper):
    A = SPD(2, 3, 3, dtype=dtype)
    check_gradient(lambda a: out(L.cholesky(a, upper=upper)), A)
    check_gradient(lambda a: out(L.cholesky_ex(a, upper=upper).L), A)
    check_gradient(lambda a: out(torch.cholesky(a, upper)), A[0])
    check_gradient(lambda a: out(a.cholesky(upper=upper)), noncontiguous(A))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,mode", [((5, 3), "reduced"), ((3, 3), "reduced"), ((3, 5), "reduced"),
                                        ((2, 3, 5), "complete"), ((4, 4), "complete"), ((2, 4, 2), "reduced")])
def test_qr(dtype, shape, mode):
    A = R(*shape, dtype=dtype)
    check_gradient(lambda a: tuple(out(t) for t in L.qr(a, mode)), A)
    check_gradient(lambda a: out(L.qr(A=a, mode=mode).Q), noncontiguous(A))  # Q alone
    check_gradient(lambda a: out(L.qr(a, mode=mode).R), A)  # R alone
    if mode == "reduced":
        check_gradient(lambda a: tuple(out(t) for t in torch.qr(a)), A)
        check_gradient(lambda a: out(a.qr(some=True).R), A)


def test_qr_not_differentiable_where_torch_is_not():
    _, back = zt.pullback(lambda a: L.qr(a, mode="r").R, R(3, 3))
    with pytest.raises(RuntimeError, match="mode='r'"):
        back(torch.ones(3, 3, dtype=F64))
    _, back = zt.pullback(lambda a: L.qr(a, mode="complete").Q, R(4, 2))
    with pytest.raises(RuntimeError, match="complete"):
        back(torch.ones(4, 4, dtype=F64))


# -- SVD and eigendecompositions -------------------------------------------------------------------

def _svd_losses(full):
    """Gauge-invariant functions of (U, S, Vh): U f(S) V^H, the projectors U U^H and V V^H, S."""
    def all_parts(a):
        U, S, Vh = L.svd(a, full_matrices=full)
        k = S.shape[-1]
        U, Vh = U[..., :k], Vh[..., :k, :]
        return out((U * S.unsqueeze(-2) ** 2) @ Vh), S

    def u_only(a):
        U = L.svd(a, full_matrices=full).U[..., :min(a.shape[-2:])]
        return out(U @ U.mH)

    def vh_only(a):
        Vh = L.svd(a, full_matrices=full).Vh[..., :min(a.shape[-2:]), :]
        return out(Vh.mH @ Vh)

    def abs_u(a):
        return L.svd(a, full_matrices=full).U[..., :min(a.shape[-2:])].abs()

    return [all_parts, u_only, vh_only, abs_u]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 5), (2, 4, 3)])
@pytest.mark.parametrize("full", [False, True])
def test_svd(dtype, shape, full):
    A = R(*shape, dtype=dtype)
    for f in _svd_losses(full):
        check_gradient(f, A)
    check_gradient(lambda a: L.svd(A=a, full_matrices=full).S, noncontiguous(A))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 5)])
def test_svd_legacy_and_svdvals(dtype, shape):
    A = R(2, *shape, dtype=dtype)

    def legacy(a, some=True):
        U, S, V = torch.svd(a, some=some)
        k = S.shape[-1]
        return out((U[..., :k] * S.unsqueeze(-2)) @ V[..., :k].mH), out(U[..., :k] @ U[..., :k].mH), S

    check_gradient(legacy, A)
    check_gradient(lambda a: legacy(a, some=False), A)
    check_gradient(lambda a: out((lambda r: r.V @ r.V.mH)(a.svd())), A)
    check_gradient(lambda a: torch.svd(a, compute_uv=False).S, A)
    check_gradient(L.svdvals, A)
    check_gradient(lambda a: L.svdvals(A=a), noncontiguous(A))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("uplo", ["L", "U"])
def test_eigh(dtype, uplo):
    A = HERM(2, 4, 4, dtype=dtype)
    scale = torch.arange(1.0, 5.0, dtype=F64)

    def f(a):
        lam, V = L.eigh(a, uplo)
        return lam, out((V * scale.to(V.dtype)) @ V.mH), V.abs()

    check_gradient(f, A)
    check_gradient(lambda a: L.eigh(input=a, UPLO=uplo).eigenvalues, A)  # eigenvalues alone
    check_gradient(lambda a: L.eigh(a, uplo).eigenvectors.abs(), A)  # eigenvectors alone
    check_gradient(lambda a: L.eigvalsh(a, UPLO=uplo), noncontiguous(A))


@pytest.mark.parametrize("dtype", DTYPES)
def test_eig(dtype):
    A = R(2, 3, 3, dtype=dtype, seed=5)
    check_gradient(lambda a: (out(L.eig(a).eigenvalues), L.eig(a).eigenvectors.abs()), A)
    check_gradient(lambda a: L.eig(a).eigenvectors.abs(), A)
    check_gradient(lambda a: out(L.eigvals(a)), A)


# -- matrix functions and norms --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_matrix_exp(dtype):
    A = R(2, 3, 3, dtype=dtype)
    check_gradient(lambda a: out(L.matrix_exp(a)), A)
    check_gradient(lambda a: out(torch.matrix_exp(a)), noncontiguous(A))
    check_gradient(lambda a: out(a.matrix_exp()), A[0])
    check_gradient(lambda a: out(L.matrix_exp(a)), torch.zeros(0, 2, 2, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [-3, -1, 0, 1, 2, 5])
def test_matrix_power(dtype, n):
    A = WC(2, 3, 3, dtype=dtype) / 3
    check_gradient(lambda a: out(L.matrix_power(a, n)), A)
    check_gradient(lambda a: out(torch.matrix_power(a, n=n)), A)
    check_gradient(lambda a: out(a.matrix_power(n)), noncontiguous(A))


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_dot(dtype):
    a, b, c, d = R(3, dtype=dtype), R(3, 4, dtype=dtype, seed=1), R(4, 2, dtype=dtype, seed=2), R(2, dtype=dtype)
    check_gradient(lambda a, b, c, d: out(L.multi_dot([a, b, c, d])), a, b, c, d)
    check_gradient(lambda b, c: out(L.multi_dot((b, c))), b, noncontiguous(c))
    check_gradient(lambda b, c: out(L.multi_dot(tensors=[b.mT[:2], b, c])), b, c)


MATRIX_ORDS = ["fro", "nuc", 2, -2, 1, -1, float("inf"), -float("inf")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", MATRIX_ORDS)
@pytest.mark.parametrize("dim,keepdim", [((-2, -1), False), ((0, 2), True), ((2, 0), False)])
def test_matrix_norm(dtype, ord, dim, keepdim):
    A = R(3, 2, 4, dtype=dtype)
    check_gradient(lambda a: L.matrix_norm(a, ord, dim, keepdim), A)
    check_gradient(lambda a: L.matrix_norm(input=a, ord=ord, dim=dim, keepdim=keepdim), noncontiguous(A))
    check_gradient(lambda a: L.norm(a, ord, dim, keepdim), A)


@pytest.mark.parametrize("ord", [2, -2, 1, -1, float("inf"), -float("inf")])
def test_matrix_norm_ties_split_evenly(ord):
    A = torch.tensor([[1.0, -2.0], [-1.0, 2.0], [2.0, 1.0], [-2.0, -1.0]], dtype=F64)  # equal column / row sums
    check_gradient(lambda a: L.matrix_norm(a, ord), A)
    check_gradient(lambda a: L.matrix_norm(a, ord), torch.eye(3, dtype=F64))  # equal singular values


def test_matrix_norm_dtype():
    A = R(3, 4).float()
    check_gradient(lambda a: L.matrix_norm(a, "nuc", dtype=F64), A, atol=1e-5, rtol=1e-5)
    check_gradient(lambda a: L.matrix_norm(a, 1, dtype=F64), A, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linalg_norm(dtype):
    A = R(3, 4, dtype=dtype)
    check_gradient(L.norm, A)  # the 2-norm of all elements
    check_gradient(lambda a: L.norm(a, 3), A[0])  # a vector norm of a vector
    check_gradient(lambda a: L.norm(a, 2), A)  # ord given, 2-D: the spectral norm
    check_gradient(lambda a: L.norm(a, "nuc"), A)
    check_gradient(lambda a: L.norm(a, ord=float("inf"), dim=1, keepdim=True), A)  # one dim: a vector norm
    check_gradient(lambda a: L.norm(input=a, dim=(0, 1)), R(3, 4, 2, dtype=dtype))
    check_gradient(lambda a: torch.nuclear_norm(a, True), A)
    check_gradient(lambda a: torch.nuclear_norm(a, dim=(1, 0)), R(3, 4, 2, dtype=dtype))


# -- pseudo-inverse and least squares --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 3), (5, 3), (2, 3, 5)])
def test_pinv(dtype, shape):
    A = R(*shape, dtype=dtype)
    check_gradient(lambda a: out(L.pinv(a)), A)
    check_gradient(lambda a: out(L.pinv(a, rtol=1e-8)), noncontiguous(A))
    check_gradient(lambda a: out(L.pinv(a, 1e-10)), A)  # the legacy positional rcond
    check_gradient(lambda a: out(torch.pinverse(a)), A)
    check_gradient(lambda a: out(a.pinverse(rcond=1e-12)), A)
    H = A @ A.mH + torch.eye(A.shape[-2], dtype=dtype)
    check_gradient(lambda h: out(L.pinv(h, hermitian=True)), H)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b_shape", [(5, 2), (5,), (2, 5, 3)])
def test_lstsq(dtype, b_shape):
    A, B = R(5, 3, dtype=dtype), R(*b_shape, dtype=dtype, seed=1)
    if len(b_shape) == 3:
        A = R(2, 5, 3, dtype=dtype)
    # the residuals' size depends on the data (rank), so only the dynamic path follows lstsq
    check_gradient(lambda a, b: out(L.lstsq(a, b).solution), A, B, staged_too=False)
    check_gradient(lambda a, b: out(L.lstsq(input=a, b=b, driver="gelsd").solution), A, B, staged_too=False)
    if len(b_shape) == 2:
        check_gradient(lambda a, b: tuple(out(t) for t in L.lstsq(a, b, driver="gelsd")[:2]), A, B,
                       staged_too=False)


# -- LU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 3), (2, 4, 4), (5, 3), (3, 5)])
@pytest.mark.parametrize("pivot", [True])  # pivot=False: LU without pivoting is CUDA-only in torch
def test_lu(dtype, shape, pivot):
    A = R(*shape, dtype=dtype)
    check_gradient(lambda a: tuple(out(t) for t in L.lu(a, pivot=pivot)[1:]), A)
    check_gradient(lambda a: out(L.lu(A=a, pivot=pivot).U), noncontiguous(A))  # U alone
    check_gradient(lambda a: out(L.lu(a, pivot=pivot).L), A)  # L alone
    check_gradient(lambda a: out(L.lu_factor(a, pivot=pivot).LU), A)
    check_gradient(lambda a: out(L.lu_factor_ex(a, pivot=pivot).LU), A)
    check_gradient(lambda a: tuple(out(t) for t in torch.lu_unpack(*L.lu_factor(a, pivot=pivot))[1:]), A)
    if pivot:
        check_gradient(lambda a: out(torch.lu(a)[0]), A)
        check_gradient(lambda a: out(a.lu(get_infos=True)[0]), A)
        check_gradient(lambda a: out(torch.lu_unpack(*L.lu_factor(a), unpack_pivots=False).U), A)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("adjoint", [True, False])
def test_lu_solve(dtype, left, adjoint):
    A = WC(2, 3, 3, dtype=dtype)
    B = R(3, 2, dtype=dtype, seed=1) if left else R(2, 3, dtype=dtype, seed=1)

    def f(a, b):
        LU, piv = L.lu_factor(a)
        return out(L.lu_solve(LU, piv, b, left=left, adjoint=adjoint))

    check_gradient(f, A, B)
    LU, piv = L.lu_factor(A)
    check_gradient(lambda lu, b: out(L.lu_solve(LU=lu, pivots=piv, B=b, left=left, adjoint=adjoint)), LU, B)
    if left and not adjoint:
        check_gradient(lambda b, lu: out(torch.lu_solve(b, lu, piv)), R(2, 3, 2, dtype=dtype), LU)
        check_gradient(lambda b, lu: out(b.lu_solve(lu, piv)), R(2, 3, 2, dtype=dtype), LU)


# -- cond, tensorinv, tensorsolve, vander ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [None, 2, -2, "fro", "nuc", 1, -1, float("inf"), -float("inf")])
def test_cond(dtype, p):
    A = WC(2, 3, 3, dtype=dtype)
    # for p other than None / 2 / -2, torch.autograd itself cannot differentiate cond (it fills the
    # inverse in place); the reference is the same composition written out of place
    ref = None if p in (None, 2, -2) else (lambda a: L.matrix_norm(a, p) * L.matrix_norm(L.inv(a), p))
    check_gradient(lambda a: L.cond(a, p), A, reference=ref)
    check_gradient(lambda a: L.cond(input=a, p=p), noncontiguous(A), reference=ref)
    if p in (None, 2, -2):
        check_gradient(lambda a: L.cond(a, p), R(4, 3, dtype=dtype))  # rectangular: singular values


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensorinv_tensorsolve(dtype):
    A = WC(6, 6, dtype=dtype).reshape(2, 3, 6)
    check_gradient(lambda a: out(L.tensorinv(a, ind=2)), A)
    check_gradient(lambda a: out(L.tensorinv(input=a.reshape(6, 2, 3), ind=1)), A)
    B = R(2, 3, dtype=dtype, seed=1)
    check_gradient(lambda a, b: out(L.tensorsolve(a.reshape(2, 3, 2, 3), b)), A, B)
    check_gradient(lambda a, b: out(L.tensorsolve(a.reshape(3, 2, 2, 3), b, dims=(0, 1))), A, B)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vander(dtype):
    x = R(2, 4, dtype=dtype)
    check_gradient(lambda x: out(L.vander(x)), x)
    check_gradient(lambda x: out(L.vander(x, N=6)), noncontiguous(x))
    check_gradient(lambda x: out(L.vander(x=x, N=2)), R(dtype=dtype))
    check_gradient(lambda x: L.vander(x, N=4), torch.tensor([0.0, 1.0, -2.0], dtype=F64))  # x = 0


# -- products --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_cross(dtype):
    x, y = R(4, 3, dtype=dtype), R(1, 3, dtype=dtype, seed=1)
    check_gradient(lambda x, y: out(L.cross(x, y)), x, y)  # broadcasting
    check_gradient(lambda x, y: out(L.cross(input=x, other=y, dim=0)), x.mT, noncontiguous(y.mT))
    check_gradient(lambda x, y: out(torch.cross(x, y)), x.mT, y.mT.expand(3, 4))  # dim=None: the first of size 3
    check_gradient(lambda x, y: out(torch.cross(x, y, dim=1)), x, y)
    check_gradient(lambda x, y: out(x.cross(y, dim=-1)), x, y)
    check_gradient(lambda x, y: out(L.cross(x, y)), R(0, 3, dtype=dtype), R(0, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vecdot(dtype):
    x, y = R(4, 3, dtype=dtype), R(3, dtype=dtype, seed=1)
    check_gradient(lambda x, y: out(L.vecdot(x, y)), x, y)
    check_gradient(lambda x, y: out(L.vecdot(x=x, y=y, dim=0)), x.mT, noncontiguous(R(3, 1, dtype=dtype)))
    check_gradient(lambda x, y: out(L.vecdot(x, y)), R(0, 3, dtype=dtype), y)


# -- finite differences, aliases -------------------------------------------------------------------

FD_CASES = {
    "inv": (L.inv, [WC(3, 3)]),
    "det": (L.det, [R(3, 3)]),
    "slogdet": (lambda a: L.slogdet(a).logabsdet, [R(3, 3)]),
    "solve": (L.solve, [WC(3, 3), R(3, 2)]),
    "solve_triangular": (lambda a, b: L.solve_triangular(a, b, upper=False, left=False), [WC(3, 3), R(2, 3)]),
    "triangular_solve": (lambda b, a: torch.triangular_solve(b, a, transpose=True).solution, [R(3, 2), WC(3, 3)]),
    # cholesky and eigh read one triangle, their gradients assume Hermitian perturbations (as
    # torch's): perturb through a Hermitian parametrisation
    "cholesky": (lambda x: L.cholesky(x @ x.mT + 3 * torch.eye(3, dtype=F64)), [R(3, 3)]),
    "qr": (lambda a: tuple(L.qr(a)), [R(4, 3)]),
    "qr_wide": (lambda a: tuple(L.qr(a)), [R(2, 4)]),
    "svd": (lambda a: (lambda r: ((r.U * r.S.unsqueeze(-2) ** 2) @ r.Vh, r.U @ r.U.mT))(L.svd(a, False)), [R(4, 3)]),
    "eigh": (lambda x: (lambda r: (r.eigenvalues, r.eigenvectors.abs()))(L.eigh(x + x.mT)), [R(3, 3)]),
    "eig": (lambda a: L.eigvals(a).abs(), [R(3, 3)]),
    "matrix_exp": (L.matrix_exp, [R(3, 3)]),
    "matrix_norm_2": (lambda a: L.matrix_norm(a, 2), [R(3, 4)]),
    "matrix_norm_nuc": (lambda a: L.matrix_norm(a, "nuc"), [R(3, 4)]),
    "pinv": (L.pinv, [R(3, 4)]),
    "lstsq": (lambda a, b: L.lstsq(a, b).solution, [R(4, 3), R(4, 2)]),
    "matrix_power": (lambda a: L.matrix_power(a, -2), [WC(3, 3)]),
    "cross": (L.cross, [R(2, 3), R(2, 3)]),
    "cholesky_inverse": (lambda c: torch.cholesky_inverse(c.tril()), [L.cholesky(SPD(3, 3))]),
}


FD_CASES.update({
    "lu": (lambda a: tuple(L.lu(a)[1:]), [R(3, 4)]),
    "lu_tall": (lambda a: tuple(L.lu(a)[1:]), [R(4, 3)]),
    "lu_factor": (lambda a: L.lu_factor(a).LU, [WC(3, 3)]),
    "lu_solve": (lambda lu, b: L.lu_solve(lu, L.lu_factor(WC(3, 3)).pivots, b, adjoint=True),
                 [L.lu_factor(WC(3, 3)).LU, R(3, 2)]),
    "cond_fro": (lambda a: L.cond(a, "fro"), [WC(3, 3)]),
    "tensorsolve": (lambda a, b: L.tensorsolve(a, b), [WC(4, 4).reshape(2, 2, 4), R(2, 2)]),
    "vander": (lambda x: L.vander(x, N=4), [R(3)]),
})


@pytest.mark.parametrize("name", list(FD_CASES))
def test_finite_differences(name):
    f, xs = FD_CASES[name]
    fd_check(f, *xs)


@pytest.mark.parametrize("name", ["det", "inv", "solve", "svd_u"])
def test_finite_differences_complex(name):
    f, xs = {
        "det": (L.det, [R(3, 3, dtype=C128)]),
        "inv": (L.inv, [WC(3, 3, dtype=C128)]),
        "solve": (L.solve, [WC(3, 3, dtype=C128), R(3, 2, dtype=C128)]),
        "svd_u": (lambda a: (lambda U: U @ U.mH)(L.svd(a, False).U), [R(4, 3, dtype=C128)]),
    }[name]
    fd_check(f, *xs)


ALIASES = {
    dec.inv: [L.inv], dec.inverse: [torch.inverse, Tensor.inverse], dec.inv_ex: [L.inv_ex],
    dec.det: [L.det], dec.det_: [torch.det, Tensor.det], dec.slogdet: [L.slogdet],
    dec.slogdet_: [torch.slogdet, Tensor.slogdet], dec.logdet: [torch.logdet, Tensor.logdet],
    dec.solve: [L.solve], dec.solve_ex: [L.solve_ex], dec.solve_triangular: [L.solve_triangular],
    dec.triangular_solve: [torch.triangular_solve, Tensor.triangular_solve],
    dec.cholesky_solve: [torch.cholesky_solve, Tensor.cholesky_solve],
    dec.cholesky_inverse: [torch.cholesky_inverse, Tensor.cholesky_inverse],
    dec.pinv: [L.pinv], dec.pinverse: [torch.pinverse, Tensor.pinverse], dec.lstsq: [L.lstsq],
    dec.cholesky: [L.cholesky], dec.cholesky_: [torch.cholesky, Tensor.cholesky], dec.cholesky_ex: [L.cholesky_ex],
    dec.qr: [L.qr], dec.qr_: [torch.qr, Tensor.qr], dec.svd: [L.svd], dec.svd_: [torch.svd, Tensor.svd],
    dec.svdvals: [L.svdvals], dec.eigh: [L.eigh], dec.eigvalsh: [L.eigvalsh], dec.eig: [L.eig],
    dec.eigvals: [L.eigvals], dec.matrix_exp: [L.matrix_exp, torch.matrix_exp, Tensor.matrix_exp],
    dec.matrix_power: [L.matrix_power, torch.matrix_power, Tensor.matrix_power], dec.multi_dot: [L.multi_dot],
    dec.matrix_norm: [L.matrix_norm], dec.norm: [L.norm], dec.nuclear_norm: [torch.nuclear_norm],
    dec.cross: [L.cross], dec.cross_: [torch.cross, Tensor.cross], dec.vecdot: [L.vecdot],
    dec.lu_factor: [L.lu_factor], dec.lu_factor_ex: [L.lu_factor_ex], dec.lu_: [torch.lu],
    dec.lu_method: [Tensor.lu], dec.lu: [L.lu], dec.lu_unpack: [torch.lu_unpack], dec.lu_solve: [L.lu_solve],
    dec.lu_solve_: [torch.lu_solve, Tensor.lu_solve], dec.cond: [L.cond], dec.tensorinv: [L.tensorinv],
    dec.tensorsolve: [L.tensorsolve], dec.vander: [L.vander],
}


@pytest.mark.parametrize("rule", list(ALIASES), ids=lambda r: r.__name__)
def test_registered_under_every_alias(rule):
    for fn in ALIASES[rule]:
        assert REGISTRY.lookup(fn).fn is rule, fn


# -- second derivatives: the pullbacks themselves only call ops with rules ------------------------

SECOND_ORDER = {
    "det": (L.det, WC(3, 3)),
    "det_singular": (L.det, torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 1.0, 1.0]], dtype=F64)),
    "slogdet": (lambda a: L.slogdet(a).logabsdet, WC(3, 3)),
    "logdet": (torch.logdet, SPD(3, 3)),
    "inv": (lambda a: L.inv(a).sum(), WC(3, 3)),
    "solve": (lambda a: L.solve(a, torch.ones(3, dtype=F64)).pow(2).sum(), WC(3, 3)),
    "cholesky": (lambda a: L.cholesky(a).pow(2).sum(), SPD(3, 3)),
    "qr": (lambda a: (lambda r: (r.Q.sum(0) ** 2).sum() + r.R.pow(3).sum())(L.qr(a)), R(4, 3)),
    "svdvals": (lambda a: L.svdvals(a).pow(3).sum(), R(3, 4)),
    "svd": (lambda a: (lambda U: (U @ U.mT * torch.arange(16.0, dtype=F64).reshape(4, 4)).sum())(L.svd(a, False).U),
            R(4, 3)),
    "eigh": (lambda a: (lambda r: r.eigenvalues.pow(3).sum() + (r.eigenvectors ** 2).sum(0).pow(2).sum())(
        L.eigh(a + a.mT)), R(3, 3)),
    "matrix_exp": (lambda a: L.matrix_exp(a).pow(2).sum(), R(3, 3) / 3),
    "pinv": (lambda a: L.pinv(a).pow(2).sum(), R(3, 4)),
    "matrix_norm_2": (lambda a: L.matrix_norm(a, 2), R(3, 4)),
    "lu_solve": (lambda a: (lambda f: L.lu_solve(f.LU, f.pivots, torch.ones(3, 2, dtype=F64)).pow(2).sum())(
        L.lu_factor(a)), WC(3, 3)),
    "cond": (L.cond, WC(3, 3)),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_second_derivatives_through_rules(name):
    check_second_derivatives(*SECOND_ORDER[name])
