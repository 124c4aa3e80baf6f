"""Rules of zygote_torch/rules/nn.py against torch.autograd (float64) and finite differences."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt
from zygote_torch.runtime import staged
from helpers import check_gradient, gradcheck, noncontiguous, rand

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# softmax / log_softmax

SOFTMAX_FORMS = {
    "torch.softmax": lambda x, d: torch.softmax(x, d),
    "torch.softmax kw": lambda x, d: torch.softmax(x, dim=d),
    "Tensor.softmax": lambda x, d: x.softmax(d),
    "Tensor.softmax kw": lambda x, d: x.softmax(dim=d),
    "F.softmax": lambda x, d: F.softmax(x, d),
    "F.softmax kw": lambda x, d: F.softmax(x, dim=d),
    "F.softmax positional stacklevel": lambda x, d: F.softmax(x, d, 3),
    "torch.special.softmax": lambda x, d: torch.special.softmax(x, d),
    "torch.log_softmax": lambda x, d: torch.log_softmax(x, d),
    "torch.log_softmax kw": lambda x, d: torch.log_softmax(x, dim=d),
    "Tensor.log_softmax": lambda x, d: x.log_softmax(d),
    "Tensor.log_softmax kw": lambda x, d: x.log_softmax(dim=d),
    "F.log_softmax": lambda x, d: F.log_softmax(x, d),
    "F.log_softmax kw": lambda x, d: F.log_softmax(x, dim=d),
    "torch.special.log_softmax": lambda x, d: torch.special.log_softmax(x, d),
}


@pytest.mark.parametrize("form", list(SOFTMAX_FORMS))
@pytest.mark.parametrize("shape,dim", [((3, 5), 1), ((3, 5), 0), ((2, 3, 4), -1), ((2, 3, 4), 1), ((6,), 0),
                                       ((), -1), ((0, 4), 1)])
def test_softmax_forms(form, shape, dim):
    f = SOFTMAX_FORMS[form]
    check_gradient(lambda x: f(x, dim), rand(*shape))


@pytest.mark.parametrize("fn", [torch.softmax, torch.log_softmax, F.softmax, F.log_softmax])
def test_softmax_noncontiguous_and_large_values(fn):
    x = noncontiguous(rand(4, 6) * 30)
    check_gradient(lambda x: fn(x, 1), x)
    check_gradient(lambda x: fn(x, 0), x)


@pytest.mark.parametrize("fn", [torch.softmax, torch.log_softmax, Tensor.softmax, Tensor.log_softmax,
                                F.softmax, F.log_softmax, torch.special.softmax, torch.special.log_softmax])
def test_softmax_dtype(fn):
    """dtype= computes in that dtype; the cotangent comes back in the input's dtype."""
    x32 = rand(3, 4).float()
    y, back = zt.pullback(lambda x: fn(x, 1, dtype=torch.float64), x32)
    assert y.dtype == torch.float64
    dy = rand(3, 4, seed=1)
    (dx,) = back(dy)
    assert dx.dtype == torch.float32
    x_ref = x32.clone().requires_grad_()
    fn(x_ref, 1, dtype=torch.float64).backward(dy)
    torch.testing.assert_close(dx, x_ref.grad)
    check_gradient(lambda x: fn(x, -1, dtype=torch.float64), rand(3, 4))


def test_softmax_positional_dtype():
    x32 = rand(3, 4).float()
    for fn in (torch.softmax, torch.log_softmax):
        y, back = zt.pullback(lambda x: fn(x, 1, torch.float64), x32)
        assert y.dtype == torch.float64
        assert back(torch.ones(3, 4, dtype=torch.float64))[0].dtype == torch.float32


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 3, 4, 5)])
def test_f_softmax_implicit_dim(fn, shape):
    """F.softmax(x) with no dim: torch's legacy implicit choice, with its warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_gradient(lambda x: fn(x), rand(*shape))
    with pytest.warns(UserWarning, match="Implicit dimension"):
        zt.gradient(lambda x: fn(x).sum(), rand(*shape))


def test_softmax_input_keyword():
    check_gradient(lambda x: torch.softmax(input=x, dim=1), rand(3, 4))


def test_softmax_gradcheck():
    gradcheck(lambda x: torch.softmax(x, 1) * torch.log_softmax(x, 0), rand(3, 4))
    gradcheck(lambda x: F.log_softmax(x, dim=-1, dtype=torch.float64), rand(2, 3, 4))


# ---------------------------------------------------------------------------------------------
# activations

EDGES = torch.tensor([-7.0, -6.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 6.0, 7.0, 25.0, -25.0], dtype=torch.float64)

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu none kw": lambda x: F.gelu(x, approximate="none"),
    "gelu tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": lambda x: F.silu(x),
    "silu inplace=False": lambda x: F.silu(x, inplace=False),
    "mish": lambda x: F.mish(x),
    "elu": lambda x: F.elu(x),
    "elu alpha": lambda x: F.elu(x, alpha=2.5),
    "elu alpha positional": lambda x: F.elu(x, 0.3),
    "leaky_relu": lambda x: F.leaky_relu(x),
    "leaky_relu slope": lambda x: F.leaky_relu(x, negative_slope=0.2),
    "leaky_relu slope positional": lambda x: F.leaky_relu(x, 0.3),
    "softplus": lambda x: F.softplus(x),
    "softplus beta threshold": lambda x: F.softplus(x, beta=2.0, threshold=3.0),
    "softplus positional": lambda x: F.softplus(x, 0.5, 1.0),
    "hardtanh": lambda x: F.hardtanh(x),
    "hardtanh bounds": lambda x: F.hardtanh(x, min_val=-0.5, max_val=2.0),
    "hardtanh bounds positional": lambda x: F.hardtanh(x, -6.0, 6.0),
    "relu6": lambda x: F.relu6(x),
    "logsigmoid": lambda x: F.logsigmoid(x),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("x", [rand(3, 4) * 3, EDGES, noncontiguous(rand(2, 5) * 3), rand(), rand(0, 3)],
                         ids=["random", "edges", "noncontiguous", "0-d", "empty"])
def test_activations(name, x):
    check_gradient(ACTIVATIONS[name], x)


@pytest.mark.parametrize("name", ["silu", "mish", "elu", "leaky_relu", "hardtanh", "relu6"])
def test_activation_inplace_flag(name):
    """inplace=True mutates an intermediate as in eager mode (whether or not the result is used);
    on an argument being differentiated it is an error, as eager's leaf check is."""
    fn = getattr(F, name)
    x = rand(3, 4) * 3

    def f(x):
        h = x * 1.5
        fn(h, inplace=True)
        return h

    dy = rand(3, 4, seed=3)
    y, back = zt.pullback(f, x)
    ref = x.clone().requires_grad_()
    y_ref = fn(ref * 1.5)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref.detach())
    torch.testing.assert_close(back(dy)[0], ref.grad)
    with pytest.raises(zt.ZygoteError, match="mutates a tensor being differentiated"):
        zt.pullback(lambda x: fn(x, inplace=True), x)


def test_gelu_approximate_is_keyword_only():
    with pytest.raises(TypeError):
        zt.gradient(lambda x: F.gelu(x, "tanh").sum(), rand(3))


def test_gelu_rejects_bad_approximate():
    with pytest.raises(Exception, match="approximate"):
        zt.gradient(lambda x: F.gelu(x, approximate="cubic").sum(), rand(3))


@pytest.mark.parametrize("name", ["gelu", "gelu tanh", "silu", "mish", "elu alpha", "softplus beta threshold",
                                  "logsigmoid"])
def test_activations_gradcheck(name):
    gradcheck(ACTIVATIONS[name], rand(2, 5) * 2)


def test_activation_float32():
    x = (rand(4, 5) * 3).float()
    dy = rand(4, 5, seed=7).float()
    for name, f in ACTIVATIONS.items():
        y, back = zt.pullback(f, x)
        ref = x.clone().requires_grad_()
        f(ref).backward(dy)
        (dx,) = back(dy)
        assert dx.dtype == torch.float32, name
        torch.testing.assert_close(dx, ref.grad, msg=name)


# ---------------------------------------------------------------------------------------------
# layer_norm, rms_norm

LN_CASES = [
    ((4, 5), (5,)),
    ((2, 3, 4), (4,)),
    ((2, 3, 4, 5), (4, 5)),
    ((2, 3, 4), (2, 3, 4)),
    ((7,), (7,)),
    ((0, 5), (5,)),
]


@pytest.mark.parametrize("shape,nshape", LN_CASES)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("fn", ["F", "torch"])
def test_layer_norm(shape, nshape, affine, fn):
    w = rand(*nshape, seed=1) if affine in ("both", "weight") else None
    b = rand(*nshape, seed=2) if affine in ("both", "bias") else None
    ln = F.layer_norm if fn == "F" else torch.layer_norm
    x = rand(*shape) * 2 + 1
    if affine == "both":
        check_gradient(lambda x, w, b: ln(x, nshape, w, b), x, w, b)
    elif affine == "weight":
        check_gradient(lambda x, w: ln(x, nshape, w), x, w)
    elif affine == "bias":
        check_gradient(lambda x, b: ln(x, nshape, None, b), x, b)
    else:
        check_gradient(lambda x: ln(x, nshape), x)


def test_layer_norm_keywords_and_eps():
    x, w, b = rand(3, 4, 6), rand(6, seed=1), rand(6, seed=2)
    check_gradient(lambda x, w, b: F.layer_norm(x, normalized_shape=[6], weight=w, bias=b, eps=0.1), x, w, b)
    check_gradient(lambda x, w, b: F.layer_norm(x, (6,), w, b, 1e-3), x, w, b)
    check_gradient(lambda x, w, b: torch.layer_norm(x, [6], w, b, 1e-3, False), x, w, b)
    check_gradient(lambda x, w, b: F.layer_norm(x, torch.Size([4, 6]), w, b), x, rand(4, 6, seed=3), rand(4, 6, seed=4))
    check_gradient(lambda x, w, b: F.layer_norm(x, (6,), w, b), noncontiguous(x), noncontiguous(w), b)


def test_layer_norm_module():
    m = torch.nn.LayerNorm(6).double()
    with torch.no_grad():
        m.weight.copy_(rand(6, seed=1))
        m.bias.copy_(rand(6, seed=2))
    x = rand(2, 3, 6)
    check_gradient(lambda x, w, b: F.layer_norm(x, m.normalized_shape, w, b, m.eps), x, m.weight.detach(),
                   m.bias.detach())


def test_layer_norm_weight_only_tracked():
    """x is data, only the (keyword-forwarded) weight is differentiated."""
    x = rand(3, 6)
    check_gradient(lambda w: F.layer_norm(x, (6,), w), rand(6, seed=1))
    check_gradient(lambda b: F.layer_norm(x, (6,), bias=b), rand(6, seed=1))
    check_gradient(lambda w: F.rms_norm(x, (6,), weight=w), rand(6, seed=1))


def test_layer_norm_gradcheck():
    gradcheck(lambda x, w, b: F.layer_norm(x, (3, 4), w, b), rand(2, 3, 4), rand(3, 4, seed=1), rand(3, 4, seed=2))


@pytest.mark.parametrize("shape,nshape", LN_CASES)
@pytest.mark.parametrize("fn", [F.rms_norm, torch.rms_norm])
@pytest.mark.parametrize("eps", [None, 1e-2])
def test_rms_norm(shape, nshape, fn, eps):
    x = rand(*shape)
    check_gradient(lambda x, w: fn(x, nshape, w, eps), x, rand(*nshape, seed=1))
    check_gradient(lambda x: fn(x, nshape, eps=eps), x)


def test_rms_norm_keywords_gradcheck_float32():
    x, w = rand(3, 4, 6), rand(6, seed=1)
    check_gradient(lambda x, w: F.rms_norm(x, normalized_shape=(6,), weight=w, eps=1e-4), x, w)
    check_gradient(lambda x, w: F.rms_norm(x, (4, 6), w), noncontiguous(x), noncontiguous(rand(4, 6, seed=3)))
    gradcheck(lambda x, w: F.rms_norm(x, (4, 6), w), x, rand(4, 6, seed=2))
    x32, w32, dy = x.float(), w.float(), rand(3, 4, 6, seed=4).float()
    _, back = zt.pullback(lambda x, w: F.rms_norm(x, (6,), w), x32, w32)
    xr, wr = x32.clone().requires_grad_(), w32.clone().requires_grad_()
    F.rms_norm(xr, (6,), wr).backward(dy)
    dx, dw = back(dy)
    assert dx.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(dx, xr.grad)
    torch.testing.assert_close(dw, wr.grad)


# ---------------------------------------------------------------------------------------------
# normalize

@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 1.5, 0.5, math.inf])
@pytest.mark.parametrize("dim", [1, 0, -1])
def test_normalize(p, dim):
    check_gradient(lambda x: F.normalize(x, p=p, dim=dim), rand(3, 4) * 2)


def test_normalize_forms_and_edges():
    x = rand(2, 3, 4)
    check_gradient(lambda x: F.normalize(x), x)
    check_gradient(lambda x: F.normalize(x, 2.0, 2, 1e-6), x)
    check_gradient(lambda x: F.normalize(x, dim=(1, 2)), x)
    check_gradient(lambda x: F.normalize(x, dim=-1), noncontiguous(x))
    check_gradient(lambda x: F.normalize(x, dim=0), rand(5))
    check_gradient(lambda x: F.normalize(x, dim=1), rand(0, 3))
    # a zero row (norm below eps: the denominator is the constant eps), and a row with ties for p=inf
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 2.0], [1e-14, 0.0, -1e-14]], dtype=torch.float64)
    for p in (2.0, 1.0, 3.0, math.inf):
        check_gradient(lambda x: F.normalize(x, p=p, dim=1), z)
    check_gradient(lambda x: F.normalize(x, eps=1.0), rand(3, 4) * 0.1)
    gradcheck(lambda x: F.normalize(x, p=3.0, dim=0), rand(3, 4))


def test_normalize_out_is_an_error():
    with pytest.raises(zt.ZygoteError, match="out="):
        zt.gradient(lambda x: F.normalize(x, out=torch.empty(3, 4, dtype=torch.float64)).sum(), rand(3, 4))


# ---------------------------------------------------------------------------------------------
# dropout

@pytest.mark.parametrize("call", [lambda x: F.dropout(x, 0.3, False), lambda x: F.dropout(x, p=0.3, training=False),
                                  lambda x: F.dropout(x, 0.0), lambda x: torch.dropout(x, 0.4, False),
                                  lambda x: torch.dropout(x, 0.0, True)])
def test_dropout_identity(call):
    x = rand(3, 4)
    check_gradient(call, x)
    y, back = zt.pullback(call, x)
    assert torch.equal(y, x)
    dy = rand(3, 4, seed=1)
    assert torch.equal(back(dy)[0], dy)


@pytest.mark.parametrize("call,p", [(lambda x: F.dropout(x), 0.5), (lambda x: F.dropout(x, 0.3), 0.3),
                                    (lambda x: F.dropout(x, p=0.7, training=True), 0.7),
                                    (lambda x: F.dropout(x * 1.0, 0.2, True, True), 0.2),
                                    (lambda x: torch.dropout(x, 0.25, True), 0.25)])
def test_dropout_training(call, p):
    x = rand(40, 50).abs() + 0.1  # no zeros: y == 0 exactly where the mask dropped
    y, back = zt.pullback(call, x)
    kept = y != 0
    assert 0 < kept.sum() < x.numel()
    torch.testing.assert_close(y, torch.where(kept, x / (1 - p), torch.zeros_like(x)))
    dy = rand(40, 50, seed=5)
    (dx,) = back(dy)
    torch.testing.assert_close(dx, dy * kept / (1 - p))
    torch.testing.assert_close(back(dy)[0], dx)  # the same mask on every call of back
    # the mask is drawn from the stream torch's own dropout draws from
    with torch.random.fork_rng():
        torch.manual_seed(11)
        y1, _ = zt.pullback(call, x)
        torch.manual_seed(11)
        y2 = call(x)
    torch.testing.assert_close(y1, y2)


def test_dropout_eval_returns_its_input():
    """As in torch, eval-mode dropout returns its input itself, so a later in-place op on the
    result mutates that tensor too (``out = dropout(h); out += r``)."""
    def f(x, r):
        h = x * 2
        y = F.dropout(h, 0.5, training=False)
        y += r
        return y * h

    check_gradient(f, rand(5), rand(5, seed=1))


def test_dropout_staged():
    """Staged: the mask is drawn in the forward program and handed to the backward."""
    x = rand(30, 40).abs() + 0.1
    for call, p in ((lambda x: F.dropout(x, 0.4) * 2, 0.4), (lambda x: torch.dropout(x, 0.3, True) * 2, 0.3)):
        y, back = staged.pullback(call, x)
        kept = y != 0
        assert 0 < kept.sum() < x.numel()
        torch.testing.assert_close(y, torch.where(kept, 2 * x / (1 - p), torch.zeros_like(x)))
        dy = rand(30, 40, seed=5)
        torch.testing.assert_close(back(dy)[0], 2 * dy * kept / (1 - p))


def test_dropout_edges():
    x = rand(3, 4)
    y, back = zt.pullback(lambda x: F.dropout(x, 1.0), x)
    assert torch.equal(y, torch.zeros_like(x))
    assert torch.equal(back(torch.ones_like(x))[0], torch.zeros_like(x))
    y, back = zt.pullback(lambda x: F.dropout(x, 0.5), rand(0, 3))
    assert y.shape == (0, 3) and back(torch.ones(0, 3, dtype=torch.float64))[0].shape == (0, 3)
    with pytest.raises(ValueError, match="dropout probability"):
        zt.gradient(lambda x: F.dropout(x, 1.5).sum(), x)


def test_dropout_gradcheck_same_mask():
    """Every evaluation draws the same mask (fixed seed): finite differences see one linear map,
    which the pullback must reproduce, so it reuses the forward's mask."""
    gradcheck(lambda x: F.dropout(x, 0.4) * x, rand(4, 5), seed=3)
    gradcheck(lambda x: torch.dropout(x.sin(), 0.5, True), rand(4, 5), seed=4)


# ---------------------------------------------------------------------------------------------
# embedding

IDX = torch.tensor([[0, 2, 2, 4], [4, 4, 1, 2]])


@pytest.mark.parametrize("call", [
    lambda w: F.embedding(IDX, w),
    lambda w: F.embedding(IDX, weight=w),
    lambda w: F.embedding(IDX, w, padding_idx=2),
    lambda w: F.embedding(IDX, w, -1),
    lambda w: F.embedding(IDX, w, padding_idx=0, scale_grad_by_freq=True),
    lambda w: F.embedding(IDX, w, scale_grad_by_freq=True),
    lambda w: F.embedding(torch.tensor(3), w),
    lambda w: F.embedding(torch.tensor([1, 1, 1]), w),
    lambda w: F.embedding(torch.zeros(0, 3, dtype=torch.long), w),
    lambda w: F.embedding(IDX.T, w),
    lambda w: torch.embedding(w, IDX),
    lambda w: torch.embedding(w, IDX, 4, True),
    lambda w: torch.embedding(w, IDX, padding_idx=1),
    lambda w: torch.nn.functional.embedding(IDX.int(), w, padding_idx=4),
], ids=lambda c: None)
def test_embedding(call):
    check_gradient(call, rand(5, 3))


def test_embedding_all_keywords_noncontiguous():
    check_gradient(lambda w: F.embedding(input=IDX, weight=w), noncontiguous(rand(5, 3)))


def test_embedding_errors_and_sparse():
    w = rand(5, 3)
    with pytest.raises(zt.ZygoteError, match="max_norm"):
        zt.gradient(lambda w: F.embedding(IDX, w, max_norm=1.0).sum(), w)
    with pytest.raises(AssertionError, match="Padding_idx"):
        zt.gradient(lambda w: F.embedding(IDX, w, padding_idx=5).sum(), w)
    with pytest.warns(UserWarning, match="dense"):
        (g,) = zt.gradient(lambda w: F.embedding(IDX, w, sparse=True).sum(), w)
    ref = w.clone().requires_grad_()
    F.embedding(IDX, ref).sum().backward()
    torch.testing.assert_close(g, ref.grad)


def test_embedding_gradcheck():
    # (scale_grad_by_freq rescales the gradient on purpose: not a derivative, checked against autograd above)
    gradcheck(lambda w: F.embedding(IDX, w) ** 2, rand(5, 3))


# ---------------------------------------------------------------------------------------------
# second order: the pullbacks are made of differentiable ops, so nested AD (Hessians) is exact

_W = rand(4, positive=True, seed=1)
SECOND_ORDER = {
    "softmax": lambda x: (F.softmax(x, 1) ** 2).sum(),
    "log_softmax": lambda x: (torch.log_softmax(x, 0) ** 2).sum(),
    "gelu": lambda x: F.gelu(x).pow(2).sum() + F.gelu(x, approximate="tanh").sum(),
    "activations": lambda x: (F.silu(x).pow(2) + F.mish(x) + F.softplus(x).pow(2) + F.logsigmoid(x)
                              + F.elu(x).pow(2)).sum(),
    "layer_norm": lambda x: F.layer_norm(x, (4,), _W, _W).pow(2).sum(),
    "rms_norm": lambda x: F.rms_norm(x, (4,), _W).pow(3).sum(),
    "normalize": lambda x: F.normalize(x, dim=1).pow(3).sum(),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_hessian(name):
    f = SECOND_ORDER[name]
    x = rand(3, 4)
    torch.testing.assert_close(zt.hessian(f, x), torch.autograd.functional.hessian(f, x))
