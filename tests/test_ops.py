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


# ---------------------------------------------------------------------------------------------
# the vectorised CPU kernels: lengths that are not a multiple of the vector width (the partial
# chunk), float16, ranges split over threads, inf / NaN, each instruction set

TAIL_COLS = [1, 7, 17, 33, 257]
ALL_DTYPES = DTYPES + [torch.float16]


def _ref64(f, *ts):
    """The reference formula on float64 copies of the inputs."""
    return f(*[t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("cols", TAIL_COLS)
def test_row_kernels_partial_chunks(dtype, cols):
    torch.manual_seed(cols)
    rows = 5
    x, dy = (2 * rnd(rows, cols) + 0.5).to(dtype), rnd(rows, cols, dtype=dtype)
    w = rnd(cols, dtype=dtype)
    # cross-entropy, with an ignored row and label smoothing
    t = torch.randint(0, cols, (rows,))
    t[2] = -100
    for eps in (0.0, 0.1):
        loss, lse = zo.cross_entropy_forward(x, t, -100, eps, "none")
        rloss, rlse = _ref64(lambda a: ref.cross_entropy_forward(a, t, -100, eps, "none"), x)
        close(loss, rloss, dtype)
        close(lse, rlse, dtype if dtype == torch.float64 else torch.float32)
        dl = rnd(rows, dtype=dtype)
        close(zo.cross_entropy_backward(dl, x, t, lse, -100, eps, "none"),
              _ref64(lambda d, a: ref.cross_entropy_backward(d, a, t, rlse, -100, eps, "none"), dl, x), dtype)
    # layer_norm, rms_norm (with and without weight and saved rstd)
    xd = x.double()
    mean, rstd = xd.mean(1), torch.rsqrt(xd.var(1, unbiased=False) + 1e-5)
    for weight in (w, None):
        got = zo.layer_norm_backward(dy, x, mean.to(ref.acc_dtype(dtype)), rstd.to(ref.acc_dtype(dtype)), weight,
                                     normalized_shape=(cols,))
        want = _ref64(lambda g, a, ww: ref.layer_norm_backward(g, a, mean, rstd, ww, rows, cols), dy, x, weight)
        close(got[0], want[0], dtype, scale=5)
        if weight is not None:
            close(got[1], want[1], dtype, scale=10)
        close(got[2], want[2], dtype, scale=10)
        for saved in (False, True):
            r = torch.rsqrt(xd.pow(2).mean(1) + 1e-6)
            got = zo.rms_norm_backward(dy, x, (cols,), weight, 1e-6, r.to(ref.acc_dtype(dtype)) if saved else None)
            want = _ref64(lambda g, a, ww: ref.rms_norm_backward(g, a, r if saved else None, ww, 1e-6, rows, cols),
                          dy, x, weight)
            close(got[0], want[0], dtype, scale=5)
            if weight is not None:
                close(got[1], want[1], dtype, scale=10)
    # softmax, log_softmax
    y = torch.softmax(xd, 1).to(dtype)
    close(zo.softmax_backward(dy, y, 1), _ref64(lambda g, a: ref.softmax_backward(g, a, 1), dy, y), dtype)
    ly = torch.log_softmax(xd, 1).to(dtype)
    close(zo.log_softmax_backward(dy, ly, 1), _ref64(lambda g, a: ref.log_softmax_backward(g, a, 1), dy, ly), dtype)
    # embedding (rows of `cols` features)
    idx = torch.tensor([3, 0, 3, 1, 0])
    close(zo.embedding_backward(dy, idx, 4, 1), _ref64(lambda g: ref.embedding_backward(g, idx, 4, 1), dy), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", TAIL_COLS + [70001])
def test_elementwise_kernels_partial_chunks_and_threads(dtype, n):
    """n = 70001 with 2 threads: ranges split mid-vector (grain 32768), each with its partial chunk."""
    torch.manual_seed(n)
    x, dy, b = 3 * rnd(n, dtype=dtype), rnd(n, dtype=dtype), rnd(n, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for approximate in ("none", "tanh"):
            close(zo.gelu_backward(dy, x, approximate),
                  _ref64(lambda g, a: ref.gelu_backward(g, a, approximate), dy, x), dtype)
        close(zo.silu_backward(dy, x), _ref64(ref.silu_backward, dy, x), dtype)
        close(zo.swiglu_forward(x, b), _ref64(ref.swiglu_forward, x, b), dtype)
        for got, want in zip(zo.swiglu_backward(dy, x, b), _ref64(ref.swiglu_backward, dy, x, b)):
            close(got, want, dtype)
    finally:
        torch.set_num_threads(threads)


def _same_nan_and_close(got, want, dtype):
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    ok = ~torch.isnan(want)
    assert torch.equal(torch.isinf(got[ok]), torch.isinf(want[ok])), (got, want)
    fin = ok & torch.isfinite(want)
    close(got[fin], want[fin], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kernels_inf_and_nan(dtype):
    """inf / NaN inputs give what the reference formulas give (exp's fast path keeps NaN, +inf, 0)."""
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), -100.0, 100.0, 0.0, -30.0, 30.0, 1.5],
                           dtype=torch.float64)
    x = special.repeat(4)[:35].to(dtype)  # 35 elements: one full chunk and a partial one (float, AVX512)
    dy = torch.linspace(-1, 1, 35, dtype=torch.float64).to(dtype)
    for approximate in ("none", "tanh"):
        _same_nan_and_close(zo.gelu_backward(dy, x, approximate),
                            _ref64(lambda g, a: ref.gelu_backward(g, a, approximate), dy, x), dtype)
    _same_nan_and_close(zo.silu_backward(dy, x), _ref64(ref.silu_backward, dy, x), dtype)
    for got, want in zip(zo.swiglu_backward(dy, x, dy), _ref64(ref.swiglu_backward, dy, x, dy)):
        _same_nan_and_close(got, want, dtype)
    # cross-entropy rows: a +inf logit, a NaN logit, a -inf logit, plain
    rows = torch.randn(4, 40, dtype=torch.float64)
    rows[0, 3], rows[1, 5], rows[2, 7] = float("inf"), float("nan"), -float("inf")
    logits = rows.to(dtype)
    t = torch.tensor([3, 0, 1, 2])
    loss, lse = zo.cross_entropy_forward(logits, t, -100, 0.0, "none")
    rloss, rlse = _ref64(lambda a: ref.cross_entropy_forward(a, t, -100, 0.0, "none"), logits)
    _same_nan_and_close(lse, rlse, dtype if dtype == torch.float64 else torch.float32)
    _same_nan_and_close(loss, rloss, dtype)
    dl = torch.ones(4, dtype=dtype)
    _same_nan_and_close(zo.cross_entropy_backward(dl, logits, t, lse, -100, 0.0, "none"),
                        _ref64(lambda d, a: ref.cross_entropy_backward(d, a, t, rlse, -100, 0.0, "none"), dl, logits),
                        dtype)
    # log_softmax backward at log-probabilities -inf (probability 0) and NaN
    ly = torch.log_softmax(rows[2:], 1)
    ly[1, 0] = float("nan")
    ly = ly.to(dtype)
    g = torch.randn(2, 40, dtype=torch.float64).to(dtype)
    _same_nan_and_close(zo.log_softmax_backward(g, ly, 1), _ref64(lambda a, b: ref.log_softmax_backward(a, b, 1), g, ly),
                        dtype)


def test_norm_parameter_gradients_do_not_depend_on_the_thread_count():
    torch.manual_seed(6)
    x, dy, w = rnd(3000, 70, dtype=torch.float32), rnd(3000, 70, dtype=torch.float32), rnd(70, dtype=torch.float32)
    _, mean, rstd = torch.native_layer_norm(x, (70,), w, None, 1e-5)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(zo.layer_norm_backward(dy, x, mean, rstd, w) + zo.rms_norm_backward(dy, x, (70,), w, 1e-6))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out):
        assert torch.equal(a, b)


_ISA_CHECK = r"""
import sys, torch, importlib
import zygote_torch.ops as zo
from zygote_torch.ops import _loader, reference as ref
isa = importlib.import_module(_loader.MODULE).cpu_capability()
torch.manual_seed(0)
for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
    for m, n in ((3, 33), (5, 257)):
        x, dy = torch.randn(m, n, dtype=torch.float64).to(dtype), torch.randn(m, n, dtype=torch.float64).to(dtype)
        t = torch.randint(0, n, (m,))
        def chk(got, want):
            err = (got.double() - want.double()).abs().max().item()
            assert err <= tol * max(1.0, want.double().abs().max().item()), (isa, dtype, m, n, err)
        d = lambda *ts: [a.double() if a.is_floating_point() else a for a in ts]
        loss, lse = zo.cross_entropy_forward(x, t, -100, 0.1, "none")
        rl, rlse = ref.cross_entropy_forward(*d(x), t, -100, 0.1, "none")
        chk(loss, rl)
        chk(zo.cross_entropy_backward(dy[:, 0], x, t, lse, -100, 0.1, "none"),
            ref.cross_entropy_backward(*d(dy[:, 0], x), t, rlse, -100, 0.1, "none"))
        mean, rstd = x.double().mean(1), torch.rsqrt(x.double().var(1, unbiased=False) + 1e-5)
        chk(zo.layer_norm_backward(dy, x, mean, rstd, None, (n,))[0],
            ref.layer_norm_backward(*d(dy, x), mean, rstd, None, m, n)[0])
        chk(zo.rms_norm_backward(dy, x, (n,), None, 1e-6)[0], ref.rms_norm_backward(*d(dy, x), None, None, 1e-6, m, n)[0])
        y = torch.softmax(x.double(), 1).to(dtype)
        chk(zo.softmax_backward(dy, y, 1), ref.softmax_backward(*d(dy, y), 1))
        chk(zo.log_softmax_backward(dy, y.double().log().to(dtype), 1),
            ref.log_softmax_backward(*d(dy, y.double().log().to(dtype)), 1))
        for a in ("none", "tanh"):
            chk(zo.gelu_backward(dy, x, a), ref.gelu_backward(*d(dy, x), a))
        chk(zo.silu_backward(dy, x), ref.silu_backward(*d(dy, x)))
        chk(zo.swiglu_backward(dy, x, dy)[0], ref.swiglu_backward(*d(dy, x, dy))[0])
        chk(zo.embedding_backward(dy, t % 4, 4, 1), ref.embedding_backward(*d(dy), t % 4, 4, 1))
print(isa)
"""


@pytest.mark.skipif(not KERNEL, reason="compiled extension not built")
def test_each_instruction_set_of_the_kernels():
    """Our kernels follow torch's CPU capability (ATEN_CPU_CAPABILITY): run a check of every op
    under each capability this CPU supports, in a fresh process."""
    import os
    import subprocess
    import sys
    from zygote_torch.ops import _loader
    import importlib
    here = importlib.import_module(_loader.MODULE).cpu_capability()
    assert here in ("avx512", "avx2", "default")
    order = ["default", "avx2", "avx512"]
    for isa in order[:order.index(here) + 1]:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.strip().splitlines()[-1] == isa
