"""Rules for products: matmul (``@``) in all of torch's cases, mm, bmm, mv, dot, vdot, outer/ger,
the fused ``beta*input + alpha*product`` forms (addmm, baddbmm, addbmm, addmv, addr), F.linear,
F.bilinear, einsum, tensordot, inner and trace, and the grouped product of mixture-of-experts layers
(``torch._grouped_mm``).

For ``y = a @ b`` the cotangents are ``da = dy @ b^H`` and ``db = a^H @ dy`` (``^H``: conjugate
transpose; a plain transpose for real tensors). torch.matmul's 1-D operands are handled by
promoting them to matrices (``a`` to a row, ``b`` to a column) and its broadcast batch dimensions
by summing the cotangent back to each operand's shape.

einsum's cotangent for operand ``i`` is itself an einsum: the output's cotangent contracted with
the (conjugated) other operands, ``'<output>,<others> -> <operand i>'``. Indices that operand
``i`` sums away on its own are broadcast back, repeated indices (diagonals, ``'ii->i'``) are
scattered onto the diagonal, and ``...`` is rewritten to fresh letters first.

Products are the expensive part of a backward pass, so each cotangent is a :class:`Thunk`: it is
only computed when its argument is tracked (the weights of a frozen layer cost nothing).
"""
from __future__ import annotations

import math
import string
from collections import Counter

import torch
import torch.nn.functional as F

from ..ad.registry import rrule
from ..ad.tangents import Thunk
from ..ops.grouped_mm import jagged_dim as _jagged_dim, layout as _grouped_mm_layout
from ._util import NoTangent, _via_rules, grad_like, is_float_tensor, no_out, unbroadcast

Tensor = torch.Tensor


def _conj(x):
    """Complex conjugate of a tensor or number (identity for real ones)."""
    if isinstance(x, Tensor):
        return x.conj() if x.is_complex() else x
    return x.conjugate() if isinstance(x, complex) else x


def _h(x):
    """Conjugate transpose of the last two dimensions."""
    return _conj(x.mT)


def _scaled(g, s):
    """``g * s`` that skips the multiplication for ``s == 1``."""
    return g if isinstance(s, (int, float)) and not isinstance(s, bool) and s == 1 else g * s


def _lazy(x, compute):
    """A lazily computed cotangent for a floating tensor argument, NoTangent otherwise."""
    return Thunk(compute) if is_float_tensor(x) else NoTangent()


# -- matmul ----------------------------------------------------------------------------------------

def matmul_cotangents(a, b, dy):
    """(da, db) for ``y = torch.matmul(a, b)``, as thunks (NoTangent for non-float operands).

    1-D operands become a row (``a``) or a column (``b``); ``dy`` gets the matching unit
    dimensions back. Batch dimensions broadcast by matmul are summed away; when ``b`` is a matrix
    and ``a`` is batched, ``db`` folds the batch into one matrix product instead.
    """
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    g = dy.unsqueeze(-1) if b.dim() == 1 else dy
    g = g.unsqueeze(-2) if a.dim() == 1 else g

    def da():
        d = torch.matmul(g, _h(b2))
        return unbroadcast(d, a2.shape).reshape(a.shape)

    def db():
        if b2.dim() == 2 and a2.dim() > 2:
            rows = math.prod(a2.shape[:-1])
            d = torch.matmul(_h(a2.reshape(rows, a2.shape[-1])), g.reshape(rows, g.shape[-1]))
        else:
            d = unbroadcast(torch.matmul(_h(a2), g), b2.shape)
        return d.reshape(b.shape)

    return _lazy(a, da), _lazy(b, db)


@rrule(torch.matmul, torch.linalg.matmul, Tensor.matmul, Tensor.__matmul__)
def matmul(input, other, *, out=None):
    """y = a @ b (with torch.matmul's 1-D and broadcast-batch cases);  da = dy @ b^H,  db = a^H @ dy,
    each summed back over broadcast batch dimensions."""
    no_out(out)
    y = torch.matmul(input, other)
    return y, lambda dy: (NoTangent(),) + matmul_cotangents(input, other, dy)


@rrule(Tensor.__rmatmul__)
def rmatmul(input, other):
    """y = other @ input (``other.__matmul__`` declined);  the matmul rule with operands swapped."""
    y = torch.matmul(other, input)

    def pullback(dy):
        d_other, d_input = matmul_cotangents(other, input, dy)
        return NoTangent(), d_input, d_other

    return y, pullback


@rrule(torch.mm, Tensor.mm)
def mm(input, mat2, *, out=None):
    """Y = A B (matrices);  dA = dY B^H,  dB = A^H dY."""
    no_out(out)
    y = torch.mm(input, mat2)
    return y, lambda dy: (NoTangent(), _lazy(input, lambda: torch.mm(dy, _h(mat2))),
                          _lazy(mat2, lambda: torch.mm(_h(input), dy)))


@rrule(torch.bmm, Tensor.bmm)
def bmm(input, mat2, *, out=None):
    """Y[b] = A[b] B[b];  dA = dY B^H,  dB = A^H dY (per batch)."""
    no_out(out)
    y = torch.bmm(input, mat2)
    return y, lambda dy: (NoTangent(), _lazy(input, lambda: torch.bmm(dy, _h(mat2))),
                          _lazy(mat2, lambda: torch.bmm(_h(input), dy)))


@rrule(torch.mv, Tensor.mv)
def mv(input, vec, *, out=None):
    """y = A v;  dA = outer(dy, conj(v)),  dv = A^H dy."""
    no_out(out)
    y = torch.mv(input, vec)
    return y, lambda dy: (NoTangent(), _lazy(input, lambda: torch.outer(dy, _conj(vec))),
                          _lazy(vec, lambda: torch.mv(_h(input), dy)))


@rrule(torch.dot, Tensor.dot)
def dot(input, tensor, *, out=None):
    """y = sum(a*b) (no conjugation);  da = dy*conj(b),  db = dy*conj(a)."""
    no_out(out)
    y = torch.dot(input, tensor)
    return y, lambda dy: (NoTangent(), _lazy(input, lambda: dy * _conj(tensor)),
                          _lazy(tensor, lambda: dy * _conj(input)))


@rrule(torch.vdot, Tensor.vdot)
def vdot(input, other, *, out=None):
    """y = sum(conj(a)*b);  da = conj(dy)*b,  db = dy*a."""
    no_out(out)
    y = torch.vdot(input, other)
    return y, lambda dy: (NoTangent(), _lazy(input, lambda: _conj(dy) * other),
                          _lazy(other, lambda: dy * input))


@rrule(torch.outer, torch.ger, Tensor.outer, Tensor.ger)
def outer(input, vec2, *, out=None):
    """Y = a b^T;  da = dY conj(b),  db = dY^T conj(a)."""
    no_out(out)
    y = torch.outer(input, vec2)
    return y, lambda dy: (NoTangent(), _lazy(input, lambda: torch.mv(dy, _conj(vec2))),
                          _lazy(vec2, lambda: torch.mv(dy.mT, _conj(input))))


# -- beta*input + alpha*product --------------------------------------------------------------------

def _input_cotangent(dy, input, beta):
    """d(input) for ``beta*input + ...``: dy*conj(beta), summed to input's shape."""
    if not is_float_tensor(input):
        return NoTangent()
    return Thunk(lambda: grad_like(_scaled(dy, _conj(beta)), input))


@rrule(torch.addmm, Tensor.addmm)
def addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    """Y = beta*C + alpha*A B;  dC = unbroadcast(conj(beta) dY),  dA = conj(alpha) dY B^H,
    dB = conj(alpha) A^H dY."""
    no_out(out)
    y = torch.addmm(input, mat1, mat2, beta=beta, alpha=alpha)

    def pullback(dy):
        g = _scaled(dy, _conj(alpha))
        return (NoTangent(), _input_cotangent(dy, input, beta),
                _lazy(mat1, lambda: torch.mm(g, _h(mat2))), _lazy(mat2, lambda: torch.mm(_h(mat1), g)))

    return y, pullback


@rrule(torch.baddbmm, Tensor.baddbmm)
def baddbmm(input, batch1, batch2, *, beta=1, alpha=1, out=None):
    """Y = beta*C + alpha*A B (batched);  dC = unbroadcast(conj(beta) dY),
    dA = conj(alpha) dY B^H,  dB = conj(alpha) A^H dY."""
    no_out(out)
    y = torch.baddbmm(input, batch1, batch2, beta=beta, alpha=alpha)

    def pullback(dy):
        g = _scaled(dy, _conj(alpha))
        return (NoTangent(), _input_cotangent(dy, input, beta),
                _lazy(batch1, lambda: torch.bmm(g, _h(batch2))), _lazy(batch2, lambda: torch.bmm(_h(batch1), g)))

    return y, pullback


@rrule(torch.addbmm, Tensor.addbmm)
def addbmm(input, batch1, batch2, *, beta=1, alpha=1, out=None):
    """Y = beta*C + alpha*sum_b A[b] B[b];  dC = unbroadcast(conj(beta) dY),
    dA[b] = conj(alpha) dY B[b]^H,  dB[b] = conj(alpha) A[b]^H dY."""
    no_out(out)
    y = torch.addbmm(input, batch1, batch2, beta=beta, alpha=alpha)

    def pullback(dy):
        g = _scaled(dy, _conj(alpha))
        return (NoTangent(), _input_cotangent(dy, input, beta),
                _lazy(batch1, lambda: torch.matmul(g, _h(batch2))),
                _lazy(batch2, lambda: torch.matmul(_h(batch1), g)))

    return y, pullback


@rrule(torch.addmv, Tensor.addmv)
def addmv(input, mat, vec, *, beta=1, alpha=1, out=None):
    """y = beta*c + alpha*A v;  dc = unbroadcast(conj(beta) dy),  dA = conj(alpha) outer(dy, conj(v)),
    dv = conj(alpha) A^H dy."""
    no_out(out)
    y = torch.addmv(input, mat, vec, beta=beta, alpha=alpha)

    def pullback(dy):
        g = _scaled(dy, _conj(alpha))
        return (NoTangent(), _input_cotangent(dy, input, beta),
                _lazy(mat, lambda: torch.outer(g, _conj(vec))), _lazy(vec, lambda: torch.mv(_h(mat), g)))

    return y, pullback


@rrule(torch.addr, Tensor.addr)
def addr(input, vec1, vec2, *, beta=1, alpha=1, out=None):
    """Y = beta*C + alpha*outer(a, b);  dC = unbroadcast(conj(beta) dY),
    da = conj(alpha) dY conj(b),  db = conj(alpha) dY^T conj(a)."""
    no_out(out)
    y = torch.addr(input, vec1, vec2, beta=beta, alpha=alpha)

    def pullback(dy):
        g = _scaled(dy, _conj(alpha))
        return (NoTangent(), _input_cotangent(dy, input, beta),
                _lazy(vec1, lambda: torch.mv(g, _conj(vec2))), _lazy(vec2, lambda: torch.mv(g.mT, _conj(vec1))))

    return y, pullback


# -- linear ----------------------------------------------------------------------------------------

@rrule(torch.nn.functional.linear)
def linear(input, weight, bias=None):
    """y = x W^T + b (W of shape (out, in), or (in,); x of any leading dimensions);
    dx = dy W conj,  dW = dy^T x (leading dimensions folded),  db = dy summed to b's shape."""
    y = torch.nn.functional.linear(input, weight, bias)

    def pullback(dy):
        if input.dim() == 2 and weight.dim() == 2 and not dy.is_complex():  # the common case, fewer views
            return NoTangent(), _lazy(input, lambda: dy.mm(weight)), _lazy(weight, lambda: dy.t().mm(input)), db(dy)
        if weight.dim() == 2:
            dx, dwt = matmul_cotangents(input, weight.mT, dy)
            dw = Thunk(lambda: dwt().mT) if isinstance(dwt, Thunk) else dwt
        else:
            dx, dw = matmul_cotangents(input, weight, dy)
        return NoTangent(), dx, dw, db(dy)

    def db(dy):
        return Thunk(lambda: grad_like(dy, bias)) if is_float_tensor(bias) else NoTangent()

    return y, pullback


@rrule(torch.bilinear, F.bilinear)
def bilinear(input1, input2, weight, bias=None):
    """y[..., k] = x1 W_k x2 + b_k;  through einsum's rule."""
    def decomposition(a, b, w, bb):
        out = torch.einsum("...i,kij,...j->...k", a, w, b)
        return out + bb if bb is not None else out
    return _via_rules(decomposition, input1, input2, weight, bias,
                      value=lambda: torch.bilinear(input1, input2, weight, bias))


# -- grouped products (mixture of experts) --------------------------------------------------------

def _grouped_cotangents(a, b, offs, dy):
    """(da, db) of ``y = torch._grouped_mm(a, b, offs)``, each a grouped product of the other
    operand (transposed) with ``dy`` in the layout that contracts the right dimension:

    - (T,K) x (G,K,N):  da = dy @grouped b^T (rows grouped),  db[g] = a_g^T dy_g  ((K,T) x (T,N), T grouped)
    - (G,M,K) x (G,K,N): da = dy b^T,  db = a^T dy  (batched)
    - (M,T) x (T,N) -> (G,M,N):  da[:, s_g] = dy[g] b_g^T  ((G,M,N) x (N,T)),  db[s_g] = a_g^T dy[g]
    - (G,M,K) x (K,T) -> (M,T):  da[g] = dy[:, s_g] b_g^T  ((M,T) x (T,K), T grouped),  db[:, s_g] = a[g]^T dy[:, s_g]

    Entries of the jagged dimension past ``offs[-1]`` take no part in the product: their cotangent is 0.
    """
    gmm = torch._grouped_mm
    dy = dy.to(a.dtype).contiguous()
    kind = _grouped_mm_layout(a, b)
    if kind == "3d3d":
        return _lazy(a, lambda: gmm(dy, b.mT)), _lazy(b, lambda: gmm(a.mT, dy))
    operand, dim = _jagged_dim(a, b)
    n = (a if operand == "a" else b).shape[dim]

    def past_last_group_zeroed(x, x_dim):
        """``x`` with 0 where its ``x_dim`` (of size ``n``, the jagged one) is past ``offs[-1]``."""
        past = torch.arange(n, device=x.device) >= offs[-1]
        return x.masked_fill(past.view((-1,) + (1,) * (x.dim() - 1 - x_dim)), 0)

    if kind == "2d3d":
        return (_lazy(a, lambda: past_last_group_zeroed(gmm(dy, b.mT, offs=offs), 0)),
                _lazy(b, lambda: gmm(a.t(), dy, offs=offs)))
    if kind == "2d2d":
        return (_lazy(a, lambda: past_last_group_zeroed(gmm(dy, b.t(), offs=offs), 1)),
                _lazy(b, lambda: past_last_group_zeroed(gmm(a.t(), dy, offs=offs), 0)))
    return (_lazy(a, lambda: gmm(dy, b.t(), offs=offs)),
            _lazy(b, lambda: past_last_group_zeroed(gmm(a.mT, dy, offs=offs), 1)))


@rrule(torch._grouped_mm)
def grouped_mm(input, mat2, offs=None, bias=None, out_dtype=None):
    """y = input @grouped mat2 (``offs`` delimiting the groups along the jagged dimension; see
    ``zygote_torch.ops.grouped_mm`` for the four layouts). The cotangents are grouped products too
    (:func:`_grouped_cotangents`); ``offs`` is an integer argument and ``bias`` is refused by torch."""
    y = torch._grouped_mm(input, mat2, offs=offs, bias=bias, out_dtype=out_dtype)

    def pullback(dy):
        da, db = _grouped_cotangents(input, mat2, offs, dy)
        return NoTangent(), da, db, NoTangent(), NoTangent(), NoTangent()

    return y, pullback


# -- einsum ----------------------------------------------------------------------------------------

# torch orders subscripts A-Z before a-z (implicit-mode output is sorted that way).
_LETTERS = string.ascii_uppercase + string.ascii_lowercase


def parse_einsum(equation: str, shapes) -> tuple[list[str], str]:
    """(operand subscripts, output subscripts) of an einsum equation, explicit, with ``...``
    replaced by fresh letters (right-aligned across operands, as torch broadcasts them)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum(): the equation {equation!r} names {len(terms)} operands, "
                         f"{len(shapes)} given")
    used = {c for c in eq if c.isalpha()}
    fresh = [c for c in _LETTERS if c not in used]
    n_ell = [len(shape) - (len(term) - 3) if "..." in term else 0 for term, shape in zip(terms, shapes)]
    width = max(n_ell, default=0)
    if width > len(fresh):
        raise ValueError("einsum(): too many dimensions under '...'")
    ell = "".join(fresh[:width])
    subs = [term.replace("...", ell[width - n:] if n else "") for term, n in zip(terms, n_ell)]
    if arrow:
        out = rhs.replace("...", ell)
    else:
        counts = Counter("".join(subs))
        out = ell + "".join(sorted((c for c in counts if counts[c] == 1 and c not in ell), key=_LETTERS.index))
    return subs, out


def _einsum_operand_cotangent(i, subs, out, operands, dy):
    """The cotangent of operand ``i`` of ``einsum(','.join(subs) + '->' + out, *operands)``."""
    x = operands[i]
    sub = subs[i]
    labels = list(dict.fromkeys(sub))  # unique, in order of first appearance
    size = {c: x.shape[sub.index(c)] for c in labels}
    available = set(out).union(*(subs[j] for j in range(len(subs)) if j != i))
    kept = [c for c in labels if c in available]
    others = [_conj(operands[j]) for j in range(len(operands)) if j != i]
    eq = ",".join([out] + [subs[j] for j in range(len(subs)) if j != i]) + "->" + "".join(kept)
    g = torch.einsum(eq, dy, *others)
    # indices that only operand i has were summed away, and size-1 dimensions of the others were
    # broadcast against operand i: expand them back
    for pos, c in enumerate(labels):
        if c not in available:
            g = g.unsqueeze(pos)
    g = g.expand([size[c] if g.shape[p] == 1 else -1 for p, c in enumerate(labels)])
    # dimensions of size 1 in operand i that were broadcast against the others: sum them back
    g = unbroadcast(g, [size[c] for c in labels])
    if len(labels) == len(sub):
        return g
    # repeated indices: the cotangent lives on the (generalised) diagonal
    base = x.new_zeros(x.shape)
    strides = base.stride()
    diag_strides = [sum(strides[p] for p, s in enumerate(sub) if s == c) for c in labels]
    return torch.as_strided_scatter(base, g, [size[c] for c in labels], diag_strides, 0)


@rrule(torch.einsum)
def einsum(equation, *operands):
    """y = einsum(eq, x_1, ..., x_n);  dx_i = einsum('<out>,<others> -> <x_i>', dy, conj(others)),
    broadcast over indices only x_i sums, placed on the diagonal for indices x_i repeats.
    The operands may be given one by one or as one list."""
    listed = len(operands) == 1 and isinstance(operands[0], (list, tuple))
    tensors = list(operands[0]) if listed else list(operands)
    y = torch.einsum(equation, *tensors)
    subs, out = parse_einsum(equation, [t.shape for t in tensors])

    cotangents = _einsum_pullback(subs, out, tensors)

    def pullback(dy):
        grads = cotangents(dy)
        if listed:
            return NoTangent(), NoTangent(), type(operands[0])(grads)
        return (NoTangent(), NoTangent()) + tuple(grads)

    return y, pullback


def _einsum_pullback(subs, out, tensors):
    """Cotangents (as thunks) of every operand of ``einsum(','.join(subs) + '->' + out, *tensors)``."""
    def cotangents(dy):
        return tuple(_lazy(t, lambda i=i: _einsum_operand_cotangent(i, subs, out, tensors, dy))
                     for i, t in enumerate(tensors))
    return cotangents


def _tensordot_dims(a, b, dims):
    """(dims of a, dims of b) contracted by ``tensordot(a, b, dims)``, as torch reads ``dims``."""
    if isinstance(dims, Tensor):
        raise NotImplementedError("tensordot: give dims as an int or two lists (a tensor dims would "
                                  "be read into Python)")
    if isinstance(dims, (tuple, list)):
        da, db = dims
        da = [da] if isinstance(da, int) else list(da)
        db = [db] if isinstance(db, int) else list(db)
        return [d % a.dim() for d in da], [d % b.dim() for d in db]
    return list(range(a.dim() - dims, a.dim())), list(range(dims))


@rrule(torch.tensordot)
def tensordot(a, b, dims=2, out=None):
    """y = tensordot(a, b, dims) (contract the listed dims of a with those of b): an einsum, whose
    rule gives da and db."""
    no_out(out)
    y = torch.tensordot(a, b, dims=dims)
    dims_a, dims_b = _tensordot_dims(a, b, dims)
    sa = list(_LETTERS[:a.dim()])
    sb = list(_LETTERS[a.dim():a.dim() + b.dim()])
    for i, j in zip(dims_a, dims_b):
        sb[j] = sa[i]
    out_sub = "".join(c for k, c in enumerate(sa) if k not in dims_a) + \
        "".join(c for k, c in enumerate(sb) if k not in dims_b)
    cotangents = _einsum_pullback(["".join(sa), "".join(sb)], out_sub, [a, b])
    return y, lambda dy: (NoTangent(),) + cotangents(dy) + (NoTangent(), NoTangent())


@rrule(torch.inner, Tensor.inner)
def inner(input, other, *, out=None):
    """y = sum over the last dimension of a and b (a product when either is 0-d): an einsum,
    whose rule gives da and db."""
    no_out(out)
    y = torch.inner(input, other)
    sa = list(_LETTERS[:input.dim()])
    sb = list(_LETTERS[input.dim():input.dim() + other.dim()])
    if sa and sb:
        sb[-1] = sa[-1]
        out_sub = "".join(sa[:-1] + sb[:-1])
    else:
        out_sub = "".join(sa + sb)
    cotangents = _einsum_pullback(["".join(sa), "".join(sb)], out_sub, [input, other])
    return y, lambda dy: (NoTangent(),) + cotangents(dy)


@rrule(torch.trace, Tensor.trace)
def trace(input):
    """y = sum of the diagonal of a matrix;  dx = dy * I (the identity, rectangular if x is)."""
    y = torch.trace(input)
    n, m = input.shape
    return y, lambda dy: (NoTangent(), dy * torch.eye(n, m, dtype=input.dtype, device=input.device))
