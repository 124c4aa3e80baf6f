"""Rules for matrix factorizations and what is computed through them (inverses, determinants, solves,
matrix functions and norms): torch.linalg and the older torch.* spellings.

inv, det, slogdet, logdet, solve, cholesky, qr, svd / svdvals, eigh / eigvalsh, eig / eigvals,
matrix_norm and linalg.norm, nuclear_norm, cond, matrix_exp, matrix_power, multi_dot, pinv /
pinverse, lstsq, solve_triangular / triangular_solve, cholesky_solve, cholesky_inverse, the LU
family (lu_factor(_ex), lu, lu_unpack, lu_solve, torch.lu), tensorinv, tensorsolve, vander, cross
and vecdot.
(``vector_norm`` and ``torch.norm`` live in :mod:`.reductions`.)

Every formula is the one torch.autograd uses (``torch/csrc/autograd/FunctionsManual.cpp``), so
gradients agree to rounding, including torch's conventions where a function is not smooth or not
unique: the eigenvector and singular-vector gauge (the gradient is only meaningful for
gauge-invariant losses, and eigh's gradient is not symmetrised), eigh/svd's ``1/(l_j - l_i)``
terms, the triangular projection of triangular solves, and the even split of ties in the 2-norm /
1-norm / inf-norm maxima. det at (nearly) singular matrices uses the SVD form of the adjugate,
as torch's twice-differentiable path does; torch's first-order path returns 0 at exactly
singular matrices instead, which is not the derivative.

Complex inputs use torch's convention (``dA`` is the conjugate-linear adjoint, ``^H`` the
conjugate transpose); real inputs to functions with complex outputs (eig) get the real part.
Batch dimensions broadcast where torch broadcasts them and cotangents are summed back.
"""
from __future__ import annotations

import math

import torch

from ..ad.registry import rrule
from ..ad.tangents import Thunk
from ._util import NoTangent, ZeroTangent, is_float_tensor, is_zero, materialize, no_out, nondiff, unbroadcast, unthunk
from ._util import conj as _c
from .reductions import _vector_norm
from . import scans  # noqa: F401  (det's pullback calls cumprod: its rule keeps second derivatives on rules)

Tensor = torch.Tensor
linalg = torch.linalg
return_types = torch.return_types


def _opt(dy):
    """A cotangent, or None for a symbolic zero (an output nothing depends on)."""
    dy = unthunk(dy)
    return None if is_zero(dy) else dy


def _eye(n, like):
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _diag(x):
    return x.diagonal(0, -2, -1)


def _set_diag(x, d):
    """x with its diagonal replaced by d (out of place)."""
    return x - torch.diag_embed(_diag(x)) + torch.diag_embed(d)


def _lazy(x, compute):
    return Thunk(compute) if is_float_tensor(x) else NoTangent()


# -- inverse ---------------------------------------------------------------------------------------

def _inv_grad(Y, dY):
    """dA for Y = A^{-1}: -Y^H dY Y^H."""
    return -(Y.mH @ (dY @ Y.mH))


@rrule(linalg.inv)
def inv(A, *, out=None):
    """Y = A^{-1};  dA = -Y^H dY Y^H."""
    no_out(out)
    Y = linalg.inv(A)
    return Y, lambda dY: (NoTangent(), _inv_grad(Y, dY))


@rrule(torch.inverse, Tensor.inverse)
def inverse(input, *, out=None):
    """Y = A^{-1};  dA = -Y^H dY Y^H."""
    no_out(out)
    Y = torch.inverse(input)
    return Y, lambda dY: (NoTangent(), _inv_grad(Y, dY))


@rrule(linalg.inv_ex)
def inv_ex(A, *, check_errors=False, out=None):
    """(Y, info) = (A^{-1}, LAPACK status);  dA = -Y^H dY Y^H (info is an integer)."""
    no_out(out)
    res = linalg.inv_ex(A, check_errors=check_errors)
    Y = res.inverse

    def pullback(dys):
        dY = _opt(dys[0])
        return NoTangent(), (ZeroTangent() if dY is None else _inv_grad(Y, dY))

    return res, pullback


# -- determinants ----------------------------------------------------------------------------------

def _exclusive_prod(S):
    """prod_{j != i} S_j along the last dim, without dividing (zeros allowed)."""
    one = torch.ones_like(S[..., :1])
    left = torch.cumprod(torch.cat([one, S[..., :-1]], -1), -1)
    right = torch.cumprod(torch.cat([S[..., 1:], one], -1).flip(-1), -1).flip(-1)
    return left * right


def _det_grad(A, det, gdet):
    """dA for det(A): the conjugate adjugate times gdet, torch's formula: (gdet conj(det)) A^{-H}
    by a solve, and for |det| < 100 eps, where that loses all accuracy, U diag(alpha
    prod_{j != i} S_j) V^H from the SVD with alpha = gdet conj(det U det V^H). Every op here has
    a rule, so second derivatives stay on rules too."""
    if A.numel() == 0:
        return torch.zeros_like(A)
    eps = torch.finfo(det.real.dtype if det.is_complex() else det.dtype).eps
    singular = (det.abs() < 100 * eps).unsqueeze(-1).unsqueeze(-1)
    # the solve runs on the identity where A is singular (its result is not used there)
    safe = torch.where(singular, _eye(A.shape[-1], A), A)
    scale = (gdet * _c(det)).unsqueeze(-1).expand(A.shape[:-1])
    by_solve = linalg.solve(safe.mH, torch.diag_embed(scale.to(A.dtype)))
    U, S, Vh = linalg.svd(A)
    alpha = _c(linalg.det(U) * linalg.det(Vh)) * gdet
    by_svd = (U * (alpha.unsqueeze(-1) * _exclusive_prod(S)).unsqueeze(-2).to(U.dtype)) @ Vh
    return torch.where(singular, by_svd, by_solve)


@rrule(linalg.det)
def det(A, *, out=None):
    """y = det(A);  dA = dy conj(adj(A))^T = dy conj(y) A^{-H} (by the SVD near singular A, where
    it is the limit of the adjugate, as torch's twice-differentiable path computes it)."""
    no_out(out)
    y = linalg.det(A)
    return y, lambda dy: (NoTangent(), _det_grad(A, y, dy))


@rrule(torch.det, Tensor.det)
def det_(input):
    """y = det(A);  dA = dy conj(y) A^{-H}."""
    y = torch.det(input)
    return y, lambda dy: (NoTangent(), _det_grad(input, y, dy))


def _slogdet_grad(A, sign, gsign, glogabsdet):
    """dA for (sign, log|det A|): (g_logabs - i Im(conj(g_sign) sign)) A^{-H}; the sign of a real
    matrix is locally constant."""
    if A.numel() == 0:
        return torch.zeros_like(A)
    if A.is_complex():
        g = torch.zeros_like(sign) if glogabsdet is None else glogabsdet.to(A.dtype)
        if gsign is not None:
            g = g - 1j * torch.imag(_c(gsign) * sign)
    else:
        if glogabsdet is None:
            return ZeroTangent()
        g = glogabsdet
    # solve_ex: no error at singular A, where slogdet is not differentiable (inf/nan, as torch)
    return linalg.solve_ex(A.mH, torch.diag_embed(g.unsqueeze(-1).expand(A.shape[:-1]))).result


def _make_slogdet(fn, return_type):
    def rule(A):
        sign, logabsdet = fn(A)

        def pullback(dys):
            return NoTangent(), _slogdet_grad(A, sign, _opt(dys[0]), _opt(dys[1]))

        return return_type((sign, logabsdet)), pullback

    return rule


@rrule(linalg.slogdet)
def slogdet(A, *, out=None):
    """(sign, logabsdet) of det(A);  dA = (g_logabsdet - i Im(conj(g_sign) sign)) A^{-H}
    (real A: g_logabsdet A^{-T})."""
    no_out(out)
    return _make_slogdet(linalg.slogdet, return_types.linalg_slogdet)(A)


@rrule(torch.slogdet, Tensor.slogdet)
def slogdet_(input):
    """(sign, logabsdet) of det(A);  dA = (g_logabsdet - i Im(conj(g_sign) sign)) A^{-H}."""
    return _make_slogdet(torch.slogdet, return_types.slogdet)(input)


@rrule(torch.logdet, Tensor.logdet)
def logdet(input):
    """y = log(det A) (real A: NaN where det < 0);  dA = dy A^{-H} (0 where det < 0), through
    slogdet as torch composes it."""
    y = torch.logdet(input)
    sign, _ = linalg.slogdet(input)

    def pullback(dy):
        if input.is_complex():
            gsign, glog = dy / _c(sign), dy.real
        else:
            gsign, glog = None, torch.where(sign == -1, torch.zeros((), dtype=dy.dtype, device=dy.device), dy)
        return NoTangent(), _slogdet_grad(input, sign, gsign, glog)

    return y, pullback


# -- linear systems --------------------------------------------------------------------------------

def _is_vector_rhs(A, B):
    """torch's rule: B is a (batch of) vector(s) if 1-D or of shape A.shape[:-1]."""
    return B.dim() == 1 or (A.dim() - 1 == B.dim() and tuple(B.shape) == tuple(A.shape[:-1]))


def _solve_pullback(A, B, X, left):
    vector = _is_vector_rhs(A, B)

    def cotangents(gX):
        G = gX.unsqueeze(-1) if vector else gX
        Xm = X.unsqueeze(-1) if vector else X
        gB = linalg.solve(A.mH, G, left=left)
        gA = Thunk(lambda: unbroadcast(-(gB @ Xm.mH) if left else -(Xm.mH @ gB), A.shape))
        gB_out = unbroadcast(gB.squeeze(-1) if vector else gB, B.shape) if is_float_tensor(B) else NoTangent()
        return gA, gB_out

    return cotangents


@rrule(linalg.solve)
def solve(A, B, *, left=True, out=None):
    """X = A^{-1} B (left) or B A^{-1};  dB = A^{-H} dX (or dX A^{-H}),  dA = -dB X^H (or -X^H dB),
    summed over broadcast batch dimensions."""
    no_out(out)
    X = linalg.solve(A, B, left=left)
    back = _solve_pullback(A, B, X, left)
    return X, lambda dX: (NoTangent(), *back(dX))


@rrule(linalg.solve_ex)
def solve_ex(A, B, *, left=True, check_errors=False, out=None):
    """(X, info) with X = A^{-1} B (or B A^{-1});  dB = A^{-H} dX,  dA = -dB X^H."""
    no_out(out)
    res = linalg.solve_ex(A, B, left=left, check_errors=check_errors)
    back = _solve_pullback(A, B, res.result, left)

    def pullback(dys):
        dX = _opt(dys[0])
        return (NoTangent(), ZeroTangent(), ZeroTangent()) if dX is None else (NoTangent(), *back(dX))

    return res, pullback


def _solve_triangular_grads(A, B, X, gX, upper, left, unitriangular):
    """torch's linalg_solve_triangular_backward: dB = A^{-H} dX (a triangular solve), dA = the
    triangular part of -dB X^H (strictly triangular when unitriangular)."""
    gB = linalg.solve_triangular(A.mH, gX, upper=not upper, left=left, unitriangular=unitriangular)

    def dA():
        g = -(gB @ X.mH) if left else -(X.mH @ gB)
        g = g.triu(int(unitriangular)) if upper else g.tril(-int(unitriangular))
        return unbroadcast(g, A.shape)

    return _lazy(A, dA), (unbroadcast(gB, B.shape) if is_float_tensor(B) else NoTangent())


@rrule(linalg.solve_triangular)
def solve_triangular(input, B, *, upper, left=True, unitriangular=False, out=None):
    """X = A^{-1} B (left) or B A^{-1}, A triangular;  dB = A^{-H} dX (or dX A^{-H}),
    dA = triu/tril(-dB X^H) (or of -X^H dB)."""
    no_out(out)
    X = linalg.solve_triangular(input, B, upper=upper, left=left, unitriangular=unitriangular)
    return X, lambda dX: (NoTangent(), *_solve_triangular_grads(input, B, X, dX, upper, left, unitriangular))


@rrule(torch.triangular_solve, Tensor.triangular_solve)
def triangular_solve(input, A, upper=True, transpose=False, unitriangular=False, *, out=None):
    """(X, A copy) with op(A) X = b, op = transpose or identity;  db = op(A)^{-H} dX,
    dA = triu/tril(-db X^H) (transposed when ``transpose``) + the copy's cotangent."""
    no_out(out)
    res = torch.triangular_solve(input, A, upper, transpose, unitriangular)
    X = res.solution

    def pullback(dys):
        gX, gM = _opt(dys[0]), _opt(dys[1])
        db, dA = ZeroTangent(), None
        if gX is not None:
            if transpose:
                gb = linalg.solve_triangular(_c(A), gX, upper=upper, unitriangular=unitriangular)
                dA = -(_c(X) @ gb.mT)
            else:
                gb = linalg.solve_triangular(A.mH, gX, upper=not upper, unitriangular=unitriangular)
                dA = -(gb @ X.mH)
            dA = dA.triu(int(unitriangular)) if upper else dA.tril(-int(unitriangular))
            db = unbroadcast(gb, input.shape) if is_float_tensor(input) else NoTangent()
        if gM is not None:
            dA = gM if dA is None else dA + gM
        dA = ZeroTangent() if dA is None else unbroadcast(dA, A.shape)
        return NoTangent(), db, dA, *nondiff(3)

    return res, pullback


@rrule(torch.cholesky_solve, Tensor.cholesky_solve)
def cholesky_solve(input, input2, upper=False, *, out=None):
    """X = (L L^H)^{-1} B (or (U^H U)^{-1} B) with B = input, L = input2;  dB = cholesky_solve(dX, L),
    dL = -(C + C^H) L (or -U (C + C^H)) with C = dB X^H."""
    no_out(out)
    X = torch.cholesky_solve(input, input2, upper)

    def pullback(dX):
        gB = torch.cholesky_solve(dX, input2, upper)

        def dL():
            c = gB @ X.mH
            c = c + c.mH
            return unbroadcast(-(input2 @ c) if upper else -(c @ input2), input2.shape)

        return NoTangent(), unbroadcast(gB, input.shape), _lazy(input2, dL), NoTangent()

    return X, pullback


@rrule(torch.cholesky_inverse, Tensor.cholesky_inverse)
def cholesky_inverse(input, upper=False, *, out=None):
    """Y = (L L^H)^{-1} (or (U^H U)^{-1});  dL = -Y (dY + dY^H) Y L (or -U Y (dY + dY^H) Y)."""
    no_out(out)
    Y = torch.cholesky_inverse(input, upper)

    def pullback(dY):
        c = Y @ ((dY + dY.mH) @ Y)
        return NoTangent(), (-(input @ c) if upper else -(c @ input)), NoTangent()

    return Y, pullback


# -- least squares and the pseudo-inverse ----------------------------------------------------------

def _pinv_grad(g, P, A):
    """torch's pinv_backward: dA for P = pinv(A)."""
    m, n = A.shape[-2], A.shape[-1]
    Ph, gh = P.mH, g.mH
    if m <= n:
        K = gh @ P
        KPh = K @ Ph
        return -(P @ K).mH + KPh - (A @ P) @ KPh + (Ph @ P) @ (gh - K @ A)
    K = P @ gh
    PhK = Ph @ K
    return -(K @ P).mH + ((gh - A @ K) @ P) @ Ph + PhK - (PhK @ P) @ A


@rrule(linalg.pinv)
def pinv(input, rcond=None, hermitian=False, *, atol=None, rtol=None, out=None):
    """P = A^+ (Moore-Penrose);  dA by torch's pinv_backward: with K = dP^H P (m <= n),
    dA = -(P K)^H + K P^H - A P K P^H + P^H P (dP^H - K A) (the transposed form for m > n).
    The tolerances are not differentiated."""
    no_out(out)
    if rcond is not None:
        P = linalg.pinv(input, rcond, hermitian)
    else:
        P = linalg.pinv(input, atol=atol, rtol=rtol, hermitian=hermitian)
    return P, lambda dP: (NoTangent(), _pinv_grad(dP, P, input), NoTangent(), NoTangent())


@rrule(torch.pinverse, Tensor.pinverse)
def pinverse(input, rcond=1e-15):
    """P = A^+ (singular values below rcond * max dropped);  dA by torch's pinv_backward."""
    P = torch.pinverse(input, rcond)
    return P, lambda dP: (NoTangent(), _pinv_grad(dP, P, input), NoTangent())


@rrule(linalg.lstsq)
def lstsq(input, b, rcond=None, *, driver=None):
    """(X, residuals, rank, singular values) of min ||A X - B||;  through X = A^+ B:
    dA = pinv_backward(dX B^H),  dB = A^{+H} dX; residuals r = ||A X - B||^2 per column add
    dA = 2 (g r_vec) X^H,  dB = -2 g r_vec. rank and singular values are not differentiated."""
    res = linalg.lstsq(input, b, rcond, driver=driver)
    vector = _is_vector_rhs(input, b)

    def pullback(dys):
        gX, gL = _opt(dys[0]), _opt(dys[1])
        B = b.unsqueeze(-1) if vector else b
        dA = dB = None
        if gX is not None:
            G = gX.unsqueeze(-1) if vector else gX
            P = linalg.pinv(input)
            dA = _pinv_grad(G @ B.mH, P, input)
            dB = P.mH @ G
        if gL is not None and gL.numel():
            X = res.solution.unsqueeze(-1) if vector else res.solution
            r = input @ X - B
            g = gL.unsqueeze(-2)
            dA = 2 * (g * r) @ X.mH if dA is None else dA + 2 * (g * r) @ X.mH
            dB = -2 * g * r if dB is None else dB - 2 * g * r
        dA = ZeroTangent() if dA is None else unbroadcast(dA, input.shape)
        if dB is None or not is_float_tensor(b):
            dB = ZeroTangent()
        else:
            dB = unbroadcast(dB.squeeze(-1) if vector else dB, b.shape)
        return NoTangent(), dA, dB, NoTangent()

    return res, pullback


# -- Cholesky and QR -------------------------------------------------------------------------------

def _cholesky_grad(L, gL, upper):
    """torch's cholesky_backward (Murray 2016): with P = tril(L^H dL) and
    Phi = (P + tril(P, -1)^H) / 2,  dA = L^{-H} Phi L^{-1}."""
    if upper:
        L, gL = L.mH, gL.mH
    P = (L.mH @ gL).tril()
    P = 0.5 * (P + P.tril(-1).mH)
    P = linalg.solve_triangular(L.mH, P, upper=True, left=True)
    return linalg.solve_triangular(L, P, upper=False, left=False)


@rrule(linalg.cholesky)
def cholesky(input, *, upper=False, out=None):
    """L = chol(A) (A = L L^H, or U^H U with upper);  dA = L^{-H} Phi(L^H dL) L^{-1},
    Phi(X) = (tril(X) + tril(X, -1)^H) / 2."""
    no_out(out)
    L = linalg.cholesky(input, upper=upper)
    return L, lambda dL: (NoTangent(), _cholesky_grad(L, dL, upper))


@rrule(torch.cholesky, Tensor.cholesky)
def cholesky_(input, upper=False):
    """L = chol(A) (deprecated spelling);  dA = L^{-H} Phi(L^H dL) L^{-1}."""
    L = torch.cholesky(input, upper)
    return L, lambda dL: (NoTangent(), _cholesky_grad(L, dL, upper), NoTangent())


@rrule(linalg.cholesky_ex)
def cholesky_ex(input, *, upper=False, check_errors=False, out=None):
    """(L, info) = Cholesky factor and status;  dA as for cholesky."""
    no_out(out)
    res = linalg.cholesky_ex(input, upper=upper, check_errors=check_errors)

    def pullback(dys):
        dL = _opt(dys[0])
        return NoTangent(), (ZeroTangent() if dL is None else _cholesky_grad(res.L, dL, upper))

    return res, pullback


def _qr_grad(Q, R, gQ, gR, mode):
    """torch's linalg_qr_backward. m >= n: dA = (dQ + Q syminvadj(triu(dR R^H - Q^H dQ))) R^{-H};
    m < n: dA = [Q trilImInvAdjSkew(Q^H dQ - dR R^H) R_1^{-H}, 0] + Q dR."""
    if mode == "r":
        raise RuntimeError("The derivative of linalg.qr depends on Q, which is not computed when mode='r'. "
                           "Please use linalg.qr(A, mode='reduced') if you are going to differentiate "
                           "through linalg.qr.")
    m, n = Q.shape[-2], R.shape[-1]
    if mode == "complete" and m > n:
        raise RuntimeError("The QR decomposition is not differentiable when mode='complete' and nrows > ncols.")
    if gQ is None and gR is None:
        return ZeroTangent()
    if gQ is not None:
        gA = gR @ R.mH - Q.mH @ gQ if gR is not None else -(Q.mH @ gQ)
    else:
        gA = gR @ R.mH
    if m >= n:
        X = gA.triu()
        X = X + X.mH
        d = _diag(X)
        X = X - 0.5 * torch.diag_embed(d.real.to(X.dtype) if X.is_complex() else d)
        gA = Q @ X
        if gQ is not None:
            gA = gA + gQ
        return linalg.solve_triangular(R.mH, gA, upper=False, left=False)
    Y = -gA
    Y = (Y - Y.mH).tril()
    if Y.is_complex():
        Y = Y - 0.5j * torch.diag_embed(_diag(Y).imag).to(Y.dtype)
    gA = Q @ Y
    gA = linalg.solve_triangular(R[..., :m].mH, gA, upper=False, left=False)
    gA = torch.cat([gA, gA.new_zeros(gA.shape[:-1] + (n - m,))], dim=-1)
    if gR is not None:
        gA = gA + Q @ gR
    return gA


@rrule(linalg.qr)
def qr(A, mode="reduced", *, out=None):
    """(Q, R) = qr(A, mode);  dA by torch's formula (reduced, or complete with m <= n; mode 'r'
    and complete with m > n are not differentiable, as in torch)."""
    no_out(out)
    res = linalg.qr(A, mode)

    def pullback(dys):
        return NoTangent(), _qr_grad(res.Q, res.R, _opt(dys[0]), _opt(dys[1]), mode), NoTangent()

    return res, pullback


@rrule(torch.qr, Tensor.qr)
def qr_(input, some=True, *, out=None):
    """(Q, R) = qr(A) (deprecated spelling: some=True is 'reduced', False 'complete');  dA as for
    linalg.qr."""
    no_out(out)
    mode = "reduced" if some else "complete"
    Q, R = linalg.qr(input, mode)

    def pullback(dys):
        return NoTangent(), _qr_grad(Q, R, _opt(dys[0]), _opt(dys[1]), mode), NoTangent()

    return return_types.qr((Q, R)), pullback


# -- SVD -------------------------------------------------------------------------------------------

def _svd_grad(U, S, Vh, gU, gS, gVh, full_matrices):
    """torch's svd_backward (distinct singular values; full rank if rectangular or complex):
    gA = U [(skew(U^H gU)/E) S + S (skew(V^H gV)/E) + diag(gS) (+ i Im diag(U^H gU)/S)] V^H
    plus (I - U U^H) gU S^{-1} V^H (m > n) or U S^{-1} gV^H (I - V V^H) (m < n), where
    E_jk = S_k^2 - S_j^2 off the diagonal. With full_matrices only the first k columns count."""
    k = S.shape[-1]
    if full_matrices:
        U, Vh = U[..., :k], Vh[..., :k, :]
        gU = gU[..., :k] if gU is not None else None
        gVh = gVh[..., :k, :] if gVh is not None else None
    m, n = U.shape[-2], Vh.shape[-1]
    if gU is None and gVh is None:
        if gS is None:
            return ZeroTangent()
        gS = gS.to(U.dtype)
        return U @ (gS.unsqueeze(-1) * Vh) if m >= n else (U * gS.unsqueeze(-2)) @ Vh
    UhgU = VhgV = None
    if gU is not None:
        UhgU = U.mH @ gU
        UhgU = UhgU - UhgU.mH
    if gVh is not None:
        VhgV = Vh @ gVh.mH
        VhgV = VhgV - VhgV.mH
    S2 = S * S
    E = S2.unsqueeze(-2) - S2.unsqueeze(-1) + _eye(k, S)
    if UhgU is not None and VhgV is not None:
        ret = (UhgU * S.unsqueeze(-2) + S.unsqueeze(-1) * VhgV) / E
    elif UhgU is not None:
        ret = (UhgU / E) * S.unsqueeze(-2)
    else:
        ret = S.unsqueeze(-1) * (VhgV / E)
    if gS is not None:
        ret = ret + torch.diag_embed(gS).to(ret.dtype)
    if U.is_complex() and UhgU is not None and VhgV is not None:
        ret = ret + torch.diag_embed(_diag(UhgU) / (2 * S))
    if m > n and gU is not None:
        gA = U @ ret
        gUSinv = gU / S.unsqueeze(-2)
        gA = gA + gUSinv - U @ (U.mH @ gUSinv)
        return gA @ Vh
    if m < n and gVh is not None:
        gA = ret @ Vh
        SinvgVh = gVh / S.unsqueeze(-1)
        gA = gA + SinvgVh - (SinvgVh @ Vh.mH) @ Vh
        return U @ gA
    return U @ (ret @ Vh) if m >= n else (U @ ret) @ Vh


@rrule(linalg.svd)
def svd(A, full_matrices=True, *, driver=None, out=None):
    """(U, S, Vh) = svd(A);  dA by torch's svd_backward (losses must not depend on the singular
    vectors' signs / phases)."""
    no_out(out)
    res = linalg.svd(A, full_matrices, driver=driver)

    def pullback(dys):
        return (NoTangent(), _svd_grad(res.U, res.S, res.Vh, _opt(dys[0]), _opt(dys[1]), _opt(dys[2]),
                                       full_matrices), NoTangent())

    return res, pullback


@rrule(torch.svd, Tensor.svd)
def svd_(input, some=True, compute_uv=True, *, out=None):
    """(U, S, V) = svd(A) with V = Vh^H (deprecated spelling);  dA by torch's svd_backward. With
    compute_uv=False, U and V are zeros and only S is differentiated."""
    no_out(out)
    res = torch.svd(input, some, compute_uv)
    if not compute_uv:
        U, S, Vh = linalg.svd(input, full_matrices=False)

        def pullback(dys):
            return NoTangent(), _svd_grad(U, S, Vh, None, _opt(dys[1]), None, False), NoTangent(), NoTangent()

        return res, pullback

    def pullback(dys):
        gV = _opt(dys[2])
        return (NoTangent(), _svd_grad(res.U, res.S, res.V.mH, _opt(dys[0]), _opt(dys[1]),
                                       None if gV is None else gV.mH, not some), NoTangent(), NoTangent())

    return res, pullback


@rrule(linalg.svdvals)
def svdvals(A, *, driver=None, out=None):
    """S = singular values of A;  dA = U diag(dS) V^H."""
    no_out(out)
    U, S, Vh = linalg.svd(A, full_matrices=False, driver=driver)
    return S, lambda dS: (NoTangent(), _svd_grad(U, S, Vh, None, dS, None, False))


# -- eigendecompositions ---------------------------------------------------------------------------

def _eigh_grad(L, V, gL, gV):
    """torch's linalg_eig_backward, Hermitian case: dA = V (skew(V^H dV)/2 / E + diag(dL)) V^H with
    E_ij = L_j - L_i off the diagonal (not symmetrised, as torch)."""
    if gV is None:
        if gL is None:
            return ZeroTangent()
        return (V * gL.unsqueeze(-2).to(V.dtype)) @ V.mH
    X = V.mH @ gV
    X = 0.5 * (X - X.mH)
    E = L.unsqueeze(-2) - L.unsqueeze(-1) + _eye(L.shape[-1], L)
    X = X / E
    if gL is not None:
        X = _set_diag(X, gL.to(X.dtype))
    return V @ (X @ V.mH)


@rrule(linalg.eigh)
def eigh(input, UPLO="L", *, out=None):
    """(L, V) = eigh(A) (A Hermitian, one triangle read);  dA = V (skew(V^H dV)/2 / E + diag(dL)) V^H
    with E_ij = L_j - L_i (distinct eigenvalues; the loss must not depend on eigenvector phases)."""
    no_out(out)
    res = linalg.eigh(input, UPLO)

    def pullback(dys):
        return NoTangent(), _eigh_grad(res.eigenvalues, res.eigenvectors, _opt(dys[0]), _opt(dys[1])), NoTangent()

    return res, pullback


@rrule(linalg.eigvalsh)
def eigvalsh(input, UPLO="L", *, out=None):
    """L = eigenvalues of the Hermitian A;  dA = V diag(dL) V^H."""
    no_out(out)
    L, V = linalg.eigh(input, UPLO)
    return L, lambda dL: (NoTangent(), _eigh_grad(L, V, dL, None), NoTangent())


def _eig_grad(A, L, V, gL, gV):
    """torch's linalg_eig_backward (general case): dA = V^{-H} (diag(dL) + (V^H dV -
    V^H V Re diag(V^H dV)) / conj(E)) V^H, real part for a real A."""
    if gV is None:
        if gL is None:
            return ZeroTangent()
        g = linalg.solve(V.mH, gL.unsqueeze(-1) * V.mH)
    else:
        X = V.mH @ gV
        X = X - V.mH @ (V * _diag(X).real.unsqueeze(-2))
        Lc = _c(L)
        E = Lc.unsqueeze(-2) - Lc.unsqueeze(-1) + _eye(L.shape[-1], L)
        X = X / E
        if gL is not None:
            X = _set_diag(X, gL)
        g = linalg.solve(V.mH, X @ V.mH)
    return g if A.is_complex() else g.real


@rrule(linalg.eig)
def eig(input, *, out=None):
    """(L, V) = eig(A) (complex);  dA = V^{-H} (diag(dL) + (V^H dV - V^H V Re diag(V^H dV)) / conj(E)) V^H
    (distinct eigenvalues, phase-invariant losses; real part for real A)."""
    no_out(out)
    res = linalg.eig(input)

    def pullback(dys):
        return NoTangent(), _eig_grad(input, res.eigenvalues, res.eigenvectors, _opt(dys[0]), _opt(dys[1]))

    return res, pullback


@rrule(linalg.eigvals)
def eigvals(input, *, out=None):
    """L = eigenvalues of A (complex);  dA = V^{-H} diag(dL) V^H (real part for real A)."""
    no_out(out)
    L, V = linalg.eig(input)
    return L, lambda dL: (NoTangent(), _eig_grad(input, L, V, dL, None))


# -- matrix functions ------------------------------------------------------------------------------

def _matrix_exp_grad(A, G):
    """dA for exp(A): the upper-right block of exp([[A^H, G], [0, A^H]]) (Mathias 1996)."""
    n = A.shape[-1]
    Ah = A.mH
    G = G.to(A.dtype)
    M = torch.cat([torch.cat([Ah, G], -1), torch.cat([torch.zeros_like(Ah), Ah], -1)], -2)
    return linalg.matrix_exp(M)[..., :n, n:]


@rrule(linalg.matrix_exp, torch.matrix_exp, Tensor.matrix_exp)
def matrix_exp(input):
    """Y = exp(A);  dA = [exp([[A^H, dY], [0, A^H]])]_{12}."""
    Y = linalg.matrix_exp(input)
    return Y, lambda dY: (NoTangent(), _matrix_exp_grad(input, dY))


@rrule(linalg.matrix_power, torch.matrix_power, Tensor.matrix_power)
def matrix_power(input, n, *, out=None):
    """Y = A^n (n an integer; A^{-1} raised to -n when negative);
    dA = sum_k (A^H)^k dY (A^H)^(n-1-k) (then through the inverse: -B^H dB B^H)."""
    no_out(out)
    Y = linalg.matrix_power(input, n)
    B = linalg.inv(input) if n < 0 else input
    p = abs(n)

    def pullback(dY):
        if p == 0:
            return NoTangent(), torch.zeros_like(input), NoTangent()
        Bh = B.mH
        powers = [None] * p  # powers[k] = (B^H)^k
        powers[0] = _eye(B.shape[-1], B).expand(B.shape)
        for k in range(1, p):
            powers[k] = powers[k - 1] @ Bh
        g = sum(powers[k] @ dY @ powers[p - 1 - k] for k in range(p))
        if n < 0:
            g = -(Bh @ g @ Bh)
        return NoTangent(), g, NoTangent()

    return Y, pullback


@rrule(linalg.multi_dot)
def multi_dot(tensors, *, out=None):
    """y = M_1 M_2 ... M_N (first and last may be vectors);  dM_i = (M_1..M_{i-1})^H dy (M_{i+1}..M_N)^H."""
    no_out(out)
    y = linalg.multi_dot(tensors)
    ms = list(tensors)
    first_vec, last_vec = ms[0].dim() == 1, ms[-1].dim() == 1
    mats = ([ms[0].unsqueeze(0)] if first_vec else [ms[0]]) + ms[1:-1] + \
        ([ms[-1].unsqueeze(-1)] if last_vec else [ms[-1]])

    def pullback(dy):
        g = dy
        if last_vec:
            g = g.unsqueeze(-1)
        if first_vec:
            g = g.unsqueeze(0)
        N = len(mats)
        lefts = [None] * N  # product of mats[:i]
        for i in range(1, N):
            lefts[i] = mats[0] if i == 1 else lefts[i - 1] @ mats[i - 1]
        rights = [None] * N  # product of mats[i+1:]
        for i in range(N - 2, -1, -1):
            rights[i] = mats[N - 1] if i == N - 2 else mats[i + 1] @ rights[i + 1]
        grads = []
        for i, (orig, m) in enumerate(zip(ms, mats)):
            if not is_float_tensor(orig):
                grads.append(NoTangent())
                continue
            gi = g if lefts[i] is None else lefts[i].mH @ g
            gi = gi if rights[i] is None else gi @ rights[i].mH
            grads.append(gi.reshape(orig.shape))
        return NoTangent(), type(tensors)(grads) if isinstance(tensors, (list, tuple)) else grads

    return y, pullback


# -- matrix norms ----------------------------------------------------------------------------------

def _restore(dy, dims, keepdim):
    """dy with the reduced dimensions back as size 1 (dims sorted, non-negative)."""
    if keepdim:
        return dy
    for d in sorted(dims):
        dy = dy.unsqueeze(d)
    return dy


def _spread_ties(dy_keep, x, ext, dim):
    """Cotangent of amax/amin over ``dim`` (keepdim shapes): split evenly among the ties."""
    mask = x == ext
    return dy_keep * mask / mask.sum(dim, keepdim=True)


def _matrix_norm(A, ord, dim, keepdim, dtype):
    """(y, dA(dy)) for linalg.matrix_norm, composed as torch composes it."""
    y = linalg.matrix_norm(A, ord, dim, keepdim, dtype=dtype)
    if A.dim() < 2:
        raise RuntimeError("linalg.matrix_norm: The input tensor A must have at least 2 dimensions.")
    d0, d1 = (d % A.dim() for d in dim)
    if ord == "fro":
        _, grad = _vector_norm(A, 2, (d0, d1), keepdim, dtype)
        return y, grad

    def grad(dy):
        x = A.to(dtype) if dtype is not None else A
        g = _restore(dy, (d0, d1), keepdim)
        if ord == "nuc" or abs(ord) == 2:
            xm = torch.movedim(x, (d0, d1), (-2, -1))
            U, S, Vh = linalg.svd(xm, full_matrices=False)
            gb = torch.movedim(g, (d0, d1), (-2, -1)).squeeze(-1)  # (..., 1)
            if ord == "nuc":
                gS = gb.expand(S.shape)
            else:
                ext = S.amax(-1, keepdim=True) if ord > 0 else S.amin(-1, keepdim=True)
                gS = _spread_ties(gb, S, ext, -1)
            gm = U @ (gS.unsqueeze(-1).to(U.dtype) * Vh)
            return torch.movedim(gm, (-2, -1), (d0, d1))
        r, c = (d1, d0) if math.isinf(ord) else (d0, d1)
        s = x.abs().sum(r, keepdim=True)
        ext = s.amax(c, keepdim=True) if ord > 0 else s.amin(c, keepdim=True)
        return torch.sgn(x) * _spread_ties(g, s, ext, c)

    return y, grad


@rrule(linalg.matrix_norm)
def matrix_norm(input, ord="fro", dim=(-2, -1), keepdim=False, *, dtype=None, out=None):
    """y = ||A||_ord over the two dims: 'fro' (dA = dy A / y), 'nuc' (dA = dy U V^H),
    2 / -2 (largest / smallest singular value: dy u v^H, ties split evenly), 1 / -1 and inf / -inf
    (max / min column or row abs-sum: dy sgn(A) on the selected columns / rows, ties split)."""
    no_out(out)
    y, grad = _matrix_norm(input, ord, dim, keepdim, dtype)
    return y, lambda dy: (NoTangent(), grad(dy), *nondiff(3))


@rrule(linalg.norm)
def norm(input, ord=None, dim=None, keepdim=False, *, out=None, dtype=None):
    """linalg.norm: a matrix norm when ord is given and dim has two entries (or A is 2-D and dim
    is None), otherwise the vector norm (ord defaults to 2, over all elements for dim=None)."""
    no_out(out)
    if isinstance(dim, int):
        dim = (dim,)
    if ord is not None and ((dim is not None and len(dim) == 2) or (dim is None and input.dim() == 2)) \
            or isinstance(ord, str):
        y, grad = _matrix_norm(input, "fro" if ord is None else ord, tuple(dim) if dim is not None else (0, 1),
                               keepdim, dtype)
    else:
        y, grad = _vector_norm(input, 2 if ord is None else ord, dim, keepdim, dtype)
    return y, lambda dy: (NoTangent(), grad(dy), *nondiff(3))


@rrule(torch.nuclear_norm)
def nuclear_norm(input, dim=None, keepdim=False, *, out=None):
    """y = sum of singular values (``nuclear_norm(A, keepdim)`` or ``nuclear_norm(A, dim, keepdim)``);
    dA = dy U V^H."""
    no_out(out)
    if isinstance(dim, bool):  # the first overload: nuclear_norm(input, keepdim)
        dim, keepdim = None, dim
    dims = (0, 1) if dim is None else tuple(dim)
    y, grad = _matrix_norm(input, "nuc", dims, keepdim, None)
    return y, lambda dy: (NoTangent(), grad(dy), NoTangent(), NoTangent())


# -- vector products -------------------------------------------------------------------------------

def _cross_dim(input, other, dim):
    if dim is not None:
        return dim
    shape = torch.broadcast_shapes(input.shape, other.shape)
    return next((i for i, s in enumerate(shape) if s == 3), -1)


def _cross_pullback(input, other, dim):
    def pullback(dz):
        dx = _lazy(input, lambda: unbroadcast(linalg.cross(_c(other), dz, dim=dim), input.shape))
        do = _lazy(other, lambda: unbroadcast(linalg.cross(dz, _c(input), dim=dim), other.shape))
        return dx, do
    return pullback


@rrule(linalg.cross)
def cross(input, other, *, dim=-1, out=None):
    """z = x cross y along dim (broadcasting);  dx = conj(y) cross dz,  dy = dz cross conj(x)."""
    no_out(out)
    z = linalg.cross(input, other, dim=dim)
    back = _cross_pullback(input, other, dim)
    return z, lambda dz: (NoTangent(), *back(dz))


@rrule(torch.cross, Tensor.cross)
def cross_(input, other, dim=None, *, out=None):
    """z = x cross y (dim=None: the first dimension of size 3);  dx = conj(y) cross dz,
    dy = dz cross conj(x)."""
    no_out(out)
    z = torch.cross(input, other, dim)
    back = _cross_pullback(input, other, _cross_dim(input, other, dim))
    return z, lambda dz: (NoTangent(), *back(dz), NoTangent())


@rrule(linalg.vecdot)
def vecdot(x, y, *, dim=-1, out=None):
    """z = sum(conj(x) * y, dim) (broadcasting);  dx = conj(dz) y,  dy = dz x."""
    no_out(out)
    z = linalg.vecdot(x, y, dim=dim)

    def pullback(dz):
        shape = torch.broadcast_shapes(x.shape, y.shape)
        g = dz.unsqueeze(dim % len(shape)) if len(shape) else dz
        dx = _lazy(x, lambda: unbroadcast(_c(g) * y, x.shape))
        dy = _lazy(y, lambda: unbroadcast(g * x, y.shape))
        return NoTangent(), dx, dy

    return z, pullback


# -- LU ----------------------------------------------------------------------------------------------

def _lu_grad(gL, gU, P, L, U, pivot):
    """torch's linalg_lu_backward: dA for (P, L, U) = lu(A), square, wide and tall."""
    if gL is None and gU is None:
        return ZeroTangent()
    m, n = L.shape[-2], U.shape[-1]
    k = min(m, n)
    if m == n:
        g = (L.mH @ gL).tril(-1) if gL is not None else None
        if gU is not None:
            t = (gU @ U.mH).triu()
            g = t if g is None else g + t
        g = linalg.solve_triangular(U.mH, g, upper=False, left=False)
        g = linalg.solve_triangular(L.mH, g, upper=True, left=True, unitriangular=True)
        return P @ g if pivot else g
    if m < n:  # wide: A = P L [U1 U2]
        U1 = U[..., :k]
        g = L.mH @ gL if gL is not None else None
        if gU is not None:
            t = -(gU.triu() @ U.mH)
            g = t if g is None else g + t
        g = linalg.solve_triangular(U1.mH, g.tril(-1), upper=False, left=False)
        if gU is not None:
            g = torch.cat([g + gU[..., :k].triu(), gU[..., k:]], -1)
        g = linalg.solve_triangular(L.mH, g, upper=True, left=True, unitriangular=True)
        if gU is None:
            g = torch.cat([g, torch.zeros_like(U[..., k:])], -1)
        return P @ g if pivot else g
    L1 = L[..., :k, :]  # tall: A = P [L1; L2] U
    g = gU @ U.mH if gU is not None else None
    if gL is not None:
        t = -(L.mH @ gL.tril(-1))
        g = t if g is None else g + t
    g = linalg.solve_triangular(L1.mH, g.triu(), upper=True, left=True, unitriangular=True)
    if gL is not None:
        g = torch.cat([g + gL[..., :k, :].tril(-1), gL[..., k:, :]], -2)
    g = linalg.solve_triangular(U.mH, g, upper=False, left=False)
    if gL is None:
        g = torch.cat([g, torch.zeros_like(L[..., k:, :])], -2)
    return P @ g if pivot else g


def _lu_factor_grad(g, LU, pivots, pivot):
    """torch's lu_factor_ex_backward: the packed cotangent split into its L and U parts."""
    P, L, U = torch.lu_unpack(LU, pivots, True, pivot)
    k = min(LU.shape[-2], LU.shape[-1])
    return _lu_grad(g[..., :, :k], g[..., :k, :], P, L, U, pivot)


@rrule(linalg.lu_factor)
def lu_factor(A, *, pivot=True, out=None):
    """(LU, pivots) = packed LU factorisation;  dA by torch's lu_factor_ex_backward (the packed
    cotangent's strictly lower part is L's, the rest U's)."""
    no_out(out)
    res = linalg.lu_factor(A, pivot=pivot)
    return res, lambda dys: (NoTangent(), _lu_factor_grad(materialize(dys[0], like=res.LU), res.LU, res.pivots, pivot))


@rrule(linalg.lu_factor_ex)
def lu_factor_ex(A, *, pivot=True, check_errors=False, out=None):
    """(LU, pivots, info) = packed LU factorisation;  dA as for lu_factor."""
    no_out(out)
    res = linalg.lu_factor_ex(A, pivot=pivot, check_errors=check_errors)
    return res, lambda dys: (NoTangent(), _lu_factor_grad(materialize(dys[0], like=res.LU), res.LU, res.pivots, pivot))


@rrule(torch.lu)
def lu_(A, pivot=True, get_infos=False, out=None):
    """(LU, pivots[, infos]) = torch.lu(A) (deprecated spelling of lu_factor_ex);  dA as for
    lu_factor."""
    no_out(out)
    res = torch.lu(A, pivot=pivot, get_infos=get_infos)
    return res, lambda dys: (NoTangent(), _lu_factor_grad(materialize(dys[0], like=res[0]), res[0], res[1], pivot),
                             *nondiff(3))


@rrule(Tensor.lu)
def lu_method(input, pivot=True, get_infos=False):
    """x.lu(pivot, get_infos) = torch.lu(x, ...);  dA as for lu_factor."""
    res = input.lu(pivot=pivot, get_infos=get_infos)
    return res, lambda dys: (NoTangent(), _lu_factor_grad(materialize(dys[0], like=res[0]), res[0], res[1], pivot),
                             *nondiff(2))


@rrule(linalg.lu)
def lu(A, *, pivot=True, out=None):
    """(P, L, U) = lu(A) with A = P L U;  dA by torch's linalg_lu_backward."""
    no_out(out)
    res = linalg.lu(A, pivot=pivot)
    return res, lambda dys: (NoTangent(), _lu_grad(_opt(dys[1]), _opt(dys[2]), res.P, res.L, res.U, pivot))


@rrule(torch.lu_unpack)
def lu_unpack(LU_data, LU_pivots, unpack_data=True, unpack_pivots=True, *, out=None):
    """(P, L, U) from a packed LU;  dLU = strict lower part of dL + upper part of dU (torch's
    lu_unpack_backward, with the rectangular blocks)."""
    no_out(out)
    res = torch.lu_unpack(LU_data, LU_pivots, unpack_data, unpack_pivots)

    def pullback(dys):
        gL, gU = (_opt(dys[1]), _opt(dys[2])) if unpack_data else (None, None)
        if gL is None and gU is None:
            return NoTangent(), ZeroTangent(), *nondiff(3)
        m, n = LU_data.shape[-2], LU_data.shape[-1]
        k = min(m, n)
        gL = torch.zeros_like(res.L) if gL is None else gL
        gU = torch.zeros_like(res.U) if gU is None else gU
        g1 = gL[..., :k, :].tril(-1) + gU[..., :k].triu()
        if m > n:
            g1 = torch.cat([g1, gL[..., k:, :]], -2)
        elif m < n:
            g1 = torch.cat([g1, gU[..., k:]], -1)
        return NoTangent(), g1, *nondiff(3)

    return res, pullback


def _lu_solve_LU_grad(gX, LU, pivots, X, left, adjoint):
    """torch's linalg_lu_solve_LU: the cotangent of the packed LU factors of a solve."""
    P, L, U = torch.lu_unpack(LU, pivots, True, left == adjoint)
    if left != adjoint:
        gR = linalg.solve_triangular(U.mH, -((gX if left else gX.mH) @ (X.mH if left else X)), upper=False)
        gL = linalg.solve_triangular(L.mH, gR @ U.mH, upper=True, left=True, unitriangular=True).tril(-1)
        return gL + gR.triu()
    gR = -(P.mT @ (X if left else X.mH) @ (gX.mH if left else gX) @ P)
    gR = linalg.solve_triangular(L.mH, gR, upper=True, left=False, unitriangular=True)
    gU = linalg.solve_triangular(U.mH, L.mH @ gR, upper=False, left=False).triu()
    return gR.tril(-1) + gU


def _lu_solve_pullback(LU, pivots, B, X, left, adjoint):
    def cotangents(gX):
        gB = linalg.lu_solve(LU, pivots, gX, left=left, adjoint=not adjoint)
        gB = unbroadcast(gB, B.shape) if is_float_tensor(B) else NoTangent()
        gLU = _lazy(LU, lambda: unbroadcast(_lu_solve_LU_grad(gX, LU, pivots, X, left, adjoint), LU.shape))
        return gLU, gB
    return cotangents


@rrule(linalg.lu_solve)
def lu_solve(LU, pivots, B, *, left=True, adjoint=False, out=None):
    """X = A^{-1} B (or A^{-H} B, B A^{-1}, ...) from A's packed LU;  dB = lu_solve with the
    adjoint flag flipped, dLU by torch's linalg_lu_solve_LU."""
    no_out(out)
    X = linalg.lu_solve(LU, pivots, B, left=left, adjoint=adjoint)
    back = _lu_solve_pullback(LU, pivots, B, X, left, adjoint)

    def pullback(dX):
        gLU, gB = back(dX)
        return NoTangent(), gLU, NoTangent(), gB

    return X, pullback


@rrule(torch.lu_solve, Tensor.lu_solve)
def lu_solve_(input, LU_data, LU_pivots, *, out=None):
    """X = A^{-1} b from A's packed LU (deprecated spelling of linalg.lu_solve(LU, pivots, b))."""
    no_out(out)
    X = torch.lu_solve(input, LU_data, LU_pivots)
    back = _lu_solve_pullback(LU_data, LU_pivots, input, X, True, False)

    def pullback(dX):
        gLU, gB = back(dX)
        return NoTangent(), gB, gLU, NoTangent()

    return X, pullback


# -- composites: cond, tensorinv, tensorsolve, vander ----------------------------------------------

@rrule(linalg.cond)
def cond(input, p=None, *, out=None):
    """y = cond_p(A): s_max/s_min for p in (None, 2) (s_min/s_max for -2), through the singular
    values; otherwise ||A||_p ||A^{-1}||_p, through matrix_norm and inv (torch's composition:
    0 where y is not finite)."""
    no_out(out)
    y = linalg.cond(input, p)

    def pullback(dy):
        if input.numel() == 0:
            return NoTangent(), torch.zeros_like(input), NoTangent()
        if p is None or (not isinstance(p, str) and abs(p) == 2):
            U, S, Vh = linalg.svd(input, full_matrices=False)
            hi, lo = S[..., :1], S[..., -1:]
            g = dy.unsqueeze(-1)
            if p == -2:
                g_hi, g_lo = -g * lo / (hi * hi), g / hi
            else:
                g_hi, g_lo = g / lo, -g * hi / (lo * lo)
            k = S.shape[-1]
            gS = torch.cat([g_hi, torch.zeros_like(S[..., 1:])], -1) + \
                torch.cat([torch.zeros_like(S[..., :k - 1]), g_lo], -1)
            return NoTangent(), _svd_grad(U, S, Vh, None, gS, None, False), NoTangent()
        g = torch.where(torch.isfinite(y), dy, torch.zeros((), dtype=dy.dtype, device=dy.device))
        B = linalg.inv_ex(input).inverse
        n1, grad1 = _matrix_norm(input, p, (-2, -1), False, None)
        n2, grad2 = _matrix_norm(B, p, (-2, -1), False, None)
        return NoTangent(), grad1(g * n2) + _inv_grad(B, grad2(g * n1)), NoTangent()

    return y, pullback


@rrule(linalg.tensorinv)
def tensorinv(input, ind=2, *, out=None):
    """Y = the inverse of A as a map of its first ``ind`` dims to the rest: inv of the reshaped
    square matrix;  dA = -Y^H dY Y^H in matrix form, reshaped back."""
    no_out(out)
    Y = linalg.tensorinv(input, ind)

    def pullback(dY):
        q = math.prod(input.shape[ind:])
        p_ = math.prod(input.shape[:ind])
        Ym, gYm = Y.reshape(q, p_), dY.reshape(q, p_)
        return NoTangent(), _inv_grad(Ym, gYm).reshape(input.shape), NoTangent()

    return Y, pullback


@rrule(linalg.tensorsolve)
def tensorsolve(input, other, dims=None, *, out=None):
    """X with tensordot(A, X, X.ndim) = B: a solve of the reshaped square system (after moving
    ``dims`` of A to the end);  dB = A^{-H} dX, dA = -dB conj(X)^T, reshaped (and moved) back."""
    no_out(out)
    X = linalg.tensorsolve(input, other, dims)

    def pullback(dX):
        A_ = input
        if dims is not None:
            src = list(dims)
            dst = list(range(input.dim() - len(src), input.dim()))
            A_ = torch.movedim(input, src, dst)
        n = other.numel()
        Am = A_.reshape(n, n)
        gb = linalg.solve(Am.mH, dX.reshape(n))
        gA = -torch.outer(gb, _c(X.reshape(n))).reshape(A_.shape)
        if dims is not None:
            gA = torch.movedim(gA, dst, src)
        gB = gb.reshape(other.shape) if is_float_tensor(other) else NoTangent()
        return NoTangent(), gA, gB, NoTangent()

    return X, pullback


@rrule(linalg.vander)
def vander(x, *, N=None):
    """Y[..., k] = x^k, k < N;  dx = sum_{k >= 1} dY[..., k] conj(k x^(k-1)) (x^(k-1) read from Y)."""
    Y = linalg.vander(x, N=N)

    def pullback(dY):
        n = Y.shape[-1]
        k = torch.arange(1, n, dtype=Y.real.dtype if Y.is_complex() else Y.dtype, device=Y.device)
        g = (dY[..., 1:] * _c(k * Y[..., :-1])).sum(-1)
        return NoTangent(), g.reshape(x.shape) if is_float_tensor(x) else NoTangent()

    return Y, pullback
