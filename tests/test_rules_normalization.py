"""F.batch_norm's rule against torch.autograd: batch and running statistics, with and without affine
parameters, 2-D to 4-D inputs; running statistics updated exactly once. torch._weight_norm's."""
import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt

from helpers import check_gradient, noncontiguous, rand


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 4)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm(shape, training, affine):
    x = rand(*shape)
    w, b = (rand(3, seed=1), rand(3, seed=2)) if affine else (None, None)
    rm, rv = rand(3, seed=3) * 0.1, rand(3, positive=True, seed=4)

    def f(x, w, b):  # in training the running statistics move at each call; the output ignores them
        return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-3)
    check_gradient(f, x, w, b)
    check_gradient(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), noncontiguous(x), w, b)


def test_running_statistics_updated_once():
    import zygote_torch as zt
    x = rand(8, 3)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    zt.gradient(lambda x: F.batch_norm(x, rm, rv, training=True).pow(2).sum(), x)
    F.batch_norm(x, rm_ref, rv_ref, training=True)
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_second_derivatives(training):
    """The pullback is torch's backward kernel; its own rule differentiates the formula."""
    from helpers import check_hvp
    rm, rv = rand(3, seed=3) * 0.1, rand(3, positive=True, seed=4)
    check_hvp(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=training).pow(3).sum(),
              rand(4, 3, 5), rand(3, seed=1), rand(3, seed=2))


@pytest.mark.parametrize("shape,dim", [((4, 3, 5), 0), ((4, 3, 5), 2), ((4, 3, 5), -1), ((4, 3, 5), -2), ((6, 5), 1)])
def test_weight_norm(shape, dim):
    """torch._weight_norm, what nn.utils.weight_norm and parametrizations.weight_norm call
    (wav2vec2's positional convolution reached the fallback through it)."""
    v = rand(*shape)
    g_shape = () if dim == -1 else [n if d == dim % len(shape) else 1 for d, n in enumerate(shape)]
    check_gradient(lambda v, g: torch._weight_norm(v, g, dim), v, rand(*g_shape, seed=1))


def test_weight_norm_parametrization_in_a_module():
    torch.manual_seed(0)
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(4, 6, 3), dim=2).double()
    x = rand(2, 4, 9)
    (ours,) = zt.gradient(lambda m: m(x).square().sum(), conv)
    conv(x).square().sum().backward()
    for n, p in conv.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, msg=n)
    assert not zt.fallbacks(lambda m: m(x).square().sum(), conv)
