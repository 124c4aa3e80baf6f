"""The custom ops of zygote_torch.ops on CPU: the compiled kernel (when the extension is built) against
the pure-torch formula (zygote_torch.ops.reference) and against torch.autograd, in float64, float32
and bfloat16, on odd sizes, non-contiguous inputs, ignore_index, label smoothing and every reduction.
Without the extension the same tests check the pure-torch path (test_report_path says which ran).
"""
import pytest
import torch
import torch.nn.functional as F

import zygote_torch.ops as zo
from zygote_torch.ops import reference as ref

KERNEL = zo.available()["cpu"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


def test_report_path(capsys):
    from zygote_torch.ops import _loader
    with capsys.disabled():
        path = f"compiled kernels ({_loader.MODULE})" if KERNEL else f"pure-torch fallback ({_loader.ERRORS})"
        print(f"\n[test_ops] zygote_torch.ops.available() = {zo.available()}: testing the {path}")
    assert isinstance(zo.available(), dict)


def close(a, b, dtype, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol["rtol"], atol=tol["atol"] * scale)


def rnd(*shape, dtype=torch.float64, noncontig=False, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    if noncontig and len(shape) >= 1:
        t = torch.randn(*shape[:-1], shape[-1] * 2, dtype=torch.float64)[..., ::2]
        assert not t.is_contiguous() or t.numel() <= 1
    else:
        t = torch.randn(*shape, dtype=torch.float64)
    return t.to(dtype)


def grads(f, inputs, dy):
    inputs = [i.detach().double().requires_grad_() for i in inputs]
    y = f(*inputs)
    return y, torch.autograd.grad(y, inputs, dy.double(), allow_unused=True)


# ---------------------------------------------------------------------------------------------
# cross-entropy

CE_SHAPES = [(1, 1), (3, 1), (5, 7), (17, 33), (4, 1000), (64, 37)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(dtype, shape, reduction, smoothing):
    n, c = shape
    torch.manual_seed(n * 131 + c)
    x = (3 * rnd(n, c)).to(dtype)
    t = torch.randint(0, c, (n,))
    if n > 2:
        t[1] = -100
    loss, lse = zo.cross_entropy_forward(x, t, -100, smoothing, reduction)
    rloss, rlse = ref.cross_entropy_forward(x, t, -100, smoothing, reduction)
    assert loss.dtype == dtype and lse.dtype == ref.acc_dtype(dtype)
    close(loss, rloss, dtype)
    close(lse, rlse, torch.float32 if dtype != torch.float64 else dtype)
    dl = torch.rand_like(rloss.double()).to(dtype) + 0.5
    dx = zo.cross_entropy_backward(dl, x, t, lse, -100, smoothing, reduction)
    rdx = ref.cross_entropy_backward(dl, x, t, rlse, -100, smoothing, reduction)
    assert dx.dtype == dtype and dx.shape == x.shape
    close(dx.reshape(rdx.shape), rdx, dtype)
    # against torch.autograd in float64
    y, (g,) = grads(lambda a: F.cross_entropy(a, t, ignore_index=-100, reduction=reduction,
                                              label_smoothing=smoothing), [x], dl)
    close(loss, y, dtype, scale=10)
    close(dx, g, dtype)
    if n > 2:
        assert (dx[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_entropy_noncontiguous_custom_ignore_and_per_row(dtype):
    torch.manual_seed(0)
    x = rnd(9, 13, dtype=dtype, noncontig=True)
    t = torch.randint(0, 13, (18,))[::2]
    t[0] = 5
    t[3] = 5  # ignore_index = 5: rows with target 5 are ignored
    loss, lse = zo.cross_entropy_forward(x, t, 5, 0.2, "none")
    dl = rnd(9, dtype=dtype)
    dx = zo.cross_entropy_backward(dl, x, t, lse, 5, 0.2, "none")
    y, (g,) = grads(lambda a: F.cross_entropy(a, t, ignore_index=5, reduction="none", label_smoothing=0.2), [x], dl)
    close(loss, y, dtype)
    close(dx, g, dtype)
    # all rows ignored: mean is NaN (as torch), gradient zero
    t_all = torch.full((9,), 5)
    loss, lse = zo.cross_entropy_forward(x, t_all, 5, 0.0, "mean")
    assert torch.isnan(loss)
    assert (zo.cross_entropy_backward(torch.tensor(1.0, dtype=dtype), x, t_all, lse, 5, 0.0, "mean") == 0).all()


def test_cross_entropy_masked_logits_and_bad_target():
    x = torch.randn(4, 6, dtype=torch.float64)
    x[:, 2] = float("-inf")
    t = torch.tensor([0, 1, 3, 5])
    loss, lse = zo.cross_entropy_forward(x, t)
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
    dx = zo.cross_entropy_backward(torch.tensor(1.0, dtype=torch.float64), x, t, lse)
    assert torch.isfinite(dx).all() and (dx[:, 2] == 0).all()
    with pytest.raises((RuntimeError, IndexError)):
        zo.cross_entropy_forward(x, torch.tensor([0, 1, 6, 2]))


def test_cross_entropy_empty_batch():
    x = torch.randn(0, 5)
    t = torch.zeros(0, dtype=torch.long)
    loss, lse = zo.cross_entropy_forward(x, t, reduction="sum")
    assert loss.item() == 0 and lse.shape == (0,)
    assert zo.cross_entropy_backward(torch.tensor(1.0), x, t, lse, reduction="sum").shape == (0, 5)


# ---------------------------------------------------------------------------------------------
# linear + cross-entropy (chunked)

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_linear_cross_entropy(dtype, bias, reduction, chunk):
    torch.manual_seed(1)
    n, h, v = 11, 6, 17
    x, w = rnd(n, h, dtype=dtype), rnd(v, h, dtype=dtype)
    b = rnd(v, dtype=dtype) if bias else None
    t = torch.randint(0, v, (n,))
    t[4] = -100
    ins = [x, w] + ([b] if bias else [])
    xs = [i.clone().requires_grad_() for i in ins]
    loss = zo.linear_cross_entropy(xs[0], xs[1], xs[2] if bias else None, t, -100, 0.1, reduction, chunk)
    dl = torch.rand_like(loss) + 0.5
    got = torch.autograd.grad(loss, xs, dl)
    y, want = grads(lambda *a: F.cross_entropy(F.linear(a[0], a[1], a[2] if bias else None), t,
                                               reduction=reduction, label_smoothing=0.1), ins, dl)
    close(loss, y, dtype)
    for g, r in zip(got, want):
        close(g, r, dtype, scale=5)


def test_linear_cross_entropy_bf16():
    torch.manual_seed(2)
    x, w, t = rnd(8, 16, dtype=torch.bfloat16), rnd(24, 16, dtype=torch.bfloat16), torch.randint(0, 24, (8,))
    loss, lse = zo.linear_cross_entropy_forward(x, w, None, t, chunk_size=3)
    dx, dw, db = zo.linear_cross_entropy_backward(torch.tensor(1.0), x, w, None, t, lse, chunk_size=3)
    y, (gx, gw) = grads(lambda a, b: F.cross_entropy(F.linear(a, b), t), [x, w], torch.tensor(1.0))
    assert db is None and dx.dtype == dw.dtype == torch.bfloat16
    close(loss, y, torch.bfloat16)
    close(dx, gx, torch.bfloat16)
    close(dw, gw, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# layer_norm, rms_norm

NORM_SHAPES = [((1, 1), 1), ((3, 1), 1), ((5, 7), 1), ((4, 3, 33), 1), ((2, 3, 5, 8), 2), ((6, 1000), 1),
               ((37, 64), 1), ((300, 16), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", NORM_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_backward(dtype, shape, k, affine):
    torch.manual_seed(len(shape) * 7 + shape[-1])
    nshape = shape[len(shape) - k:]
    x, dy = (rnd(*shape, dtype=dtype) * 2 + 0.5), rnd(*shape, dtype=dtype)
    w = rnd(*nshape, dtype=dtype) if affine else None
    b = rnd(*nshape, dtype=dtype) if affine else None
    _, mean, rstd = torch.native_layer_norm(x, nshape, w, b, 1e-5)
    dx, dw, db = zo.layer_norm_backward(dy, x, mean, rstd, w, normalized_shape=None if affine else nshape)
    n = x[(0,) * (x.dim() - k)].numel()
    rdx, rdw, rdb = ref.layer_norm_backward(dy, x, mean, rstd, w, x.numel() // n, n)
    assert dx.shape == x.shape and dx.dtype == dtype and db.shape == nshape
    close(dx.reshape(rdx.shape), rdx, dtype)
    close(db, rdb.reshape(nshape), dtype, scale=10)
    if affine:
        assert dw.shape == nshape and dw.dtype == dtype
        close(dw, rdw.reshape(nshape), dtype, scale=10)
    else:
        assert dw is None
    ins = [x] + ([w, b] if affine else [])
    _, want = grads(lambda a, *p: F.layer_norm(a, nshape, *p, eps=1e-5), ins, dy)
    close(dx, want[0], dtype, scale=5)
    if affine:
        close(dw, want[1], dtype, scale=20)
        close(db, want[2], dtype, scale=20)


def test_layer_norm_backward_noncontiguous_and_empty():
    torch.manual_seed(3)
    x, dy = rnd(7, 9, noncontig=True), rnd(7, 9, noncontig=True)
    w, b = rnd(9), rnd(9)
    _, mean, rstd = torch.native_layer_norm(x, (9,), w, b, 1e-5)
    dx, dw, db = zo.layer_norm_backward(dy, x, mean, rstd, w)
    _, want = grads(lambda a, p, q: F.layer_norm(a, (9,), p, q), [x, w, b], dy)
    for g, r in zip((dx, dw, db), want):
        close(g, r, torch.float64)
    # normalised shape inferred from the keepdim mean when there is no weight
    x4, dy4 = rnd(2, 3, 5, 8), rnd(2, 3, 5, 8)
    _, mean, rstd = torch.native_layer_norm(x4, (5, 8), None, None, 1e-5)
    dx, dw, db = zo.layer_norm_backward(dy4, x4, mean, rstd)
    _, (g,) = grads(lambda a: F.layer_norm(a, (5, 8)), [x4], dy4)
    assert dw is None and db.shape == (5, 8)
    close(dx, g, torch.float64)
    close(db, dy4.sum((0, 1)), torch.float64)
    # empty batch: zero gradients of the right shapes
    x0 = torch.randn(0, 9, dtype=torch.float64)
    _, mean, rstd = torch.native_layer_norm(x0, (9,), w, b, 1e-5)
    dx, dw, db = zo.layer_norm_backward(x0, x0, mean, rstd, w)
    assert dx.shape == (0, 9) and (dw == 0).all() and (db == 0).all() and dw.shape == (9,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", NORM_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("saved_rstd", [False, True])
def test_rms_norm_backward(dtype, shape, k, affine, saved_rstd):
    torch.manual_seed(len(shape) * 5 + shape[-1])
    nshape = shape[len(shape) - k:]
    x, dy = rnd(*shape, dtype=dtype), rnd(*shape, dtype=dtype)
    w = rnd(*nshape, dtype=dtype) if affine else None
    eps = 1e-6
    rstd = None
    if saved_rstd:
        dims = tuple(range(x.dim() - k, x.dim()))
        rstd = torch.rsqrt(x.double().pow(2).mean(dims, keepdim=True) + eps).to(ref.acc_dtype(dtype))
    dx, dw = zo.rms_norm_backward(dy, x, nshape, w, eps, rstd)
    assert dx.shape == x.shape and dx.dtype == dtype
    ins = [x] + ([w] if affine else [])
    _, want = grads(lambda a, *p: F.rms_norm(a, nshape, *p, eps=eps), ins, dy)
    close(dx, want[0], dtype, scale=5)
    if affine:
        assert dw.shape == nshape and dw.dtype == dtype
        close(dw, want[1], dtype, scale=20)
    else:
        assert dw is None
    n = x[(0,) * (x.dim() - k)].numel()
    rdx, _ = ref.rms_norm_backward(dy, x, rstd, w, eps, x.numel() // n, n)
    close(dx.reshape(rdx.shape), rdx, dtype)


def test_rms_norm_backward_default_eps_noncontiguous():
    torch.manual_seed(4)
    x, dy, w = rnd(6, 10, dtype=torch.float32, noncontig=True), rnd(6, 10, dtype=torch.float32), rnd(10).float()
    dx, dw = zo.rms_norm_backward(dy, x, (10,), w)
    _, (gx, gw) = grads(lambda a, p: F.rms_norm(a, (10,), p, eps=torch.finfo(torch.float32).eps), [x, w], dy)
    close(dx, gx, torch.float32)
    close(dw, gw, torch.float32)


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax

SOFTMAX_CASES = [((1, 1), -1), ((4, 1), -1), ((5, 7), -1), ((5, 7), 0), ((3, 4, 33), 1), ((2, 1000), -1),
                 ((0, 5), -1), ((6,), 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SOFTMAX_CASES)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("noncontig", [False, True])
def test_softmax_backward(dtype, shape, dim, log, noncontig):
    torch.manual_seed(sum(shape) + dim)
    x = rnd(*shape, noncontig=noncontig)
    f = torch.log_softmax if log else torch.softmax
    y = f(x, dim).to(dtype)
    dy = rnd(*shape, dtype=dtype, noncontig=noncontig)
    op, rop = (zo.log_softmax_backward, ref.log_softmax_backward) if log else (zo.softmax_backward,
                                                                              ref.softmax_backward)
    dx = op(dy, y, dim)
    assert dx.shape == y.shape and dx.dtype == dtype
    close(dx, rop(dy, y, dim), dtype)
    _, (g,) = grads(lambda a: f(a, dim), [x], dy)
    close(dx, g, dtype, scale=5)


# ---------------------------------------------------------------------------------------------
# elementwise: GELU, SiLU, SwiGLU

EW_SHAPES = [(1,), (7,), (3, 5), (2, 3, 17), (1000,), (0, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EW_SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("noncontig", [False, True])
def test_gelu_backward(dtype, shape, approximate, noncontig):
    torch.manual_seed(len(shape) + shape[-1])
    x, dy = 3 * rnd(*shape, dtype=dtype, noncontig=noncontig), rnd(*shape, dtype=dtype)
    dx = zo.gelu_backward(dy, x, approximate)
    assert dx.shape == x.shape and dx.dtype == dtype
    close(dx, ref.gelu_backward(dy, x, approximate), dtype)
    _, (g,) = grads(lambda a: F.gelu(a, approximate=approximate), [x], dy)
    close(dx, g, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EW_SHAPES)
@pytest.mark.parametrize("noncontig", [False, True])
def test_silu_and_swiglu(dtype, shape, noncontig):
    torch.manual_seed(len(shape) * 3 + shape[-1])
    a, b = 3 * rnd(*shape, dtype=dtype, noncontig=noncontig), rnd(*shape, dtype=dtype)
    dy = rnd(*shape, dtype=dtype, noncontig=noncontig)
    dx = zo.silu_backward(dy, a)
    close(dx, ref.silu_backward(dy, a), dtype)
    _, (g,) = grads(F.silu, [a], dy)
    close(dx, g, dtype)

    y = zo.swiglu_forward(a, b)
    assert y.dtype == dtype and y.shape == a.shape
    close(y, ref.swiglu_forward(a, b), dtype)
    want_y, (ga, gb) = grads(lambda p, q: F.silu(p) * q, [a, b], dy)
    close(y, want_y, dtype)
    da, db = zo.swiglu_backward(dy, a, b)
    rda, rdb = ref.swiglu_backward(dy, a, b)
    close(da, rda, dtype)
    close(db, rdb, dtype)
    close(da, ga, dtype)
    close(db, gb, dtype)


def test_elementwise_mixed_dtypes_fall_back():
    x = torch.randn(5, dtype=torch.float64)
    dy = torch.randn(5, dtype=torch.float32)
    dx = zo.silu_backward(dy, x)
    assert dx.dtype == torch.float64
    torch.testing.assert_close(dx, ref.silu_backward(dy, x))
    with pytest.raises(ValueError):
        zo.gelu_backward(dy, dy, "erf")


# ---------------------------------------------------------------------------------------------
# embedding

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_shape,num,dim", [((1,), 1, 1), ((7,), 5, 3), ((4, 9), 11, 17), ((300,), 50, 8),
                                               ((0,), 4, 3)])
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding_backward(dtype, idx_shape, num, dim, padding_idx):
    torch.manual_seed(num * dim)
    if padding_idx is not None and padding_idx >= num:
        padding_idx = None
    idx = torch.randint(0, num, idx_shape)
    W = rnd(num, dim)
    dy = rnd(*idx_shape, dim, dtype=dtype)
    dW = zo.embedding_backward(dy, idx, num, padding_idx)
    assert dW.shape == (num, dim) and dW.dtype == dtype
    close(dW, ref.embedding_backward(dy, idx, num, None if padding_idx is None else padding_idx % num), dtype)
    _, (g,) = grads(lambda w: F.embedding(idx, w, padding_idx=padding_idx), [W], dy)
    close(dW, g, dtype, scale=5)


def test_embedding_backward_deterministic_int32_noncontiguous():
    torch.manual_seed(5)
    idx = torch.randint(0, 7, (200,), dtype=torch.int32)
    dy = rnd(200, 33, dtype=torch.float32, noncontig=True)
    a = zo.embedding_backward(dy, idx, 7)
    b = zo.embedding_backward(dy, idx, 7)
    assert torch.equal(a, b)
    close(a, ref.embedding_backward(dy, idx, 7), torch.float32)
    with pytest.raises((RuntimeError, IndexError)):
        zo.embedding_backward(dy, torch.full((200,), 9), 7)


# ---------------------------------------------------------------------------------------------
# dispatch rules, fake kernels

def test_inputs_requiring_grad_take_the_formula():
    """Higher-order AD: with grad mode on and an input that requires grad, the result is
    differentiable (the pure-torch formula ran)."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.softmax(x, -1)
    dy = torch.randn(3, 4, dtype=torch.float64)
    dx = zo.softmax_backward(dy, y, -1)
    assert dx.requires_grad
    (h,) = torch.autograd.grad(dx.sum(), x)
    assert torch.isfinite(h).all()


@pytest.mark.skipif(not KERNEL, reason="compiled extension not built: no custom ops to check")
def test_fake_kernels_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = torch.ops.zygote_torch
    x, dy = torch.randn(6, 10), torch.randn(6, 10)
    w = torch.randn(10)
    t = torch.randint(0, 10, (6,))
    _, mean, rstd = torch.native_layer_norm(x, (10,), w, None, 1e-5)
    samples = [
        (ops.cross_entropy_fwd, (x, t, -100, 0.1)),
        (ops.cross_entropy_bwd, (torch.ones(1), x, t, torch.logsumexp(x, 1), -100, 0.1)),
        (ops.layer_norm_bwd, (dy, x, mean.reshape(6), rstd.reshape(6), w)),
        (ops.layer_norm_bwd, (dy, x, mean.reshape(6), rstd.reshape(6), None)),
        (ops.rms_norm_bwd, (dy, x, None, w, 1e-6)),
        (ops.softmax_bwd, (dy, torch.softmax(x, -1))),
        (ops.log_softmax_bwd, (dy, torch.log_softmax(x, -1))),
        (ops.gelu_bwd, (dy, x, "tanh")),
        (ops.silu_bwd, (dy, x)),
        (ops.swiglu_fwd, (x, dy)),
        (ops.swiglu_bwd, (dy, x, x)),
        (ops.embedding_bwd, (dy, t, 10, -1)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    with FakeTensorMode():
        fx, fdy = torch.empty(4, 8, dtype=torch.bfloat16), torch.empty(4, 8, dtype=torch.bfloat16)
        dxf, dwf, dbf = zo.layer_norm_backward(fdy, fx, torch.empty(4, 1), torch.empty(4, 1),
                                               torch.empty(8, dtype=torch.bfloat16))
        assert dxf.shape == (4, 8) and dwf.dtype == torch.bfloat16 and dbf.shape == (8,)
        loss, lse = zo.cross_entropy_forward(fx, torch.zeros(4, dtype=torch.long))
        assert loss.shape == () and lse.dtype == torch.float32
