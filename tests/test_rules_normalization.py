"""F.batch_norm's rule against torch.autograd: batch and running statistics, with and without affine
parameters, 2-D to 4-D inputs; running statistics updated exactly once."""
import pytest
import torch
import torch.nn.functional as F

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
