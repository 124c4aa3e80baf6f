"""zt's results compose with torch.autograd and torch.func (issue 11 item 5, issue 14 item 5):
each against torch.autograd with create_graph=True or torch.func, in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F

import zygote_torch as zt



pytestmark = pytest.mark.usefixtures("float64")  # every tensor of these tests in float64


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def twins(*tensors):
    """Fresh leaves with the same values, for the torch.autograd reference."""
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def mlp(seed=0, width=6):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)).double()


def assert_grads_equal(ours, reference):
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a.grad, b.grad)


def test_a_loss_of_the_gradient_backpropagates_as_create_graph_autograd():
    x, W = leaves(5, (5, 5))
    g = lambda x: torch.tanh(x @ W).pow(2).sum()  # noqa: E731
    (gx,) = zt.gradient(g, x)
    assert gx.requires_grad
    (gx.sin() ** 2).sum().backward()

    x2, W2 = twins(x, W)
    (r,) = torch.autograd.grad(torch.tanh(x2 @ W2).pow(2).sum(), x2, create_graph=True)
    torch.testing.assert_close(gx.detach(), r.detach())
    (r.sin() ** 2).sum().backward()
    assert_grads_equal([x, W], [x2, W2])


def test_wgan_gradient_penalty_trains_the_critic_on_the_right_gradient():
    critic = mlp()
    reference = copy.deepcopy(critic)
    real, fake = leaves((8, 3), (8, 3), seed=1)
    eps = torch.rand(8, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_hat = (eps * real + (1 - eps) * fake).detach()  # not requiring grad: the critic's weights do

    (g,) = zt.gradient(lambda x: critic(x).sum(), x_hat)
    penalty = ((g.norm(dim=1) - 1) ** 2).mean()
    penalty.backward()

    x_ref = x_hat.clone().requires_grad_()
    (r,) = torch.autograd.grad(reference(x_ref).sum(), x_ref, create_graph=True)
    ((r.norm(dim=1) - 1) ** 2).mean().backward()
    assert_grads_equal(critic.parameters(), reference.parameters())


def test_maml_meta_gradient_through_params_and_grads():
    model = mlp(seed=3)
    reference = copy.deepcopy(model)
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    xq, yq = torch.randn(10, 3), torch.randn(10, 1)
    ps = zt.Params(model)

    gs = zt.gradient(lambda: F.mse_loss(model(x), y), ps)
    fast = {name: p - 0.1 * gs[p] for name, p in model.named_parameters()}
    torch.func.functional_call(model, fast, (xq,)).sub(yq).pow(2).mean().backward()

    params = dict(reference.named_parameters())
    grads = torch.autograd.grad(F.mse_loss(reference(x), y), list(params.values()), create_graph=True)
    fast_ref = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
    torch.func.functional_call(reference, fast_ref, (xq,)).sub(yq).pow(2).mean().backward()
    assert_grads_equal(model.parameters(), reference.parameters())


def test_physics_informed_loss_through_an_explicit_argument():
    net = mlp(seed=4)
    reference = copy.deepcopy(net)
    t = torch.linspace(0, 1, 7).reshape(7, 1).repeat(1, 3)
    (du,) = zt.gradient(lambda t: net(t).sum(), t)
    ((du[:, 0] - torch.cos(t[:, 0])) ** 2).mean().backward()

    t_ref = t.clone().requires_grad_()
    (r,) = torch.autograd.grad(reference(t_ref).sum(), t_ref, create_graph=True)
    ((r[:, 0] - torch.cos(t[:, 0])) ** 2).mean().backward()
    assert_grads_equal(net.parameters(), reference.parameters())


def test_withgradient_value_and_pullback_are_connected_too():
    x, W = leaves(4, (4, 4), seed=5)
    f = lambda x: (x @ W).exp().sum()  # noqa: E731
    y, (g,) = zt.withgradient(f, x)
    (y + g.pow(2).sum()).backward()
    x2, W2 = twins(x, W)
    y2 = (x2 @ W2).exp().sum()
    (g2,) = torch.autograd.grad(y2, x2, create_graph=True)
    (y2 + g2.pow(2).sum()).backward()
    assert_grads_equal([x, W], [x2, W2])

    (dy,) = leaves(4, seed=6)
    x.grad = W.grad = None
    y, back = zt.pullback(lambda x: torch.tanh(x @ W), x)
    (vjp,) = back(dy)
    (vjp.pow(3).sum() + y.sum()).backward()
    x3, W3, dy3 = twins(x, W, dy)
    y3 = torch.tanh(x3 @ W3)
    (v3,) = torch.autograd.grad(y3, x3, dy3, create_graph=True)
    (v3.pow(3).sum() + y3.sum()).backward()
    assert_grads_equal([x, W, dy], [x3, W3, dy3])


def test_third_derivatives_through_torch_autograd():
    (x,) = leaves(3, seed=7)
    f = lambda x: (x.sin() * x.pow(3)).sum()  # noqa: E731
    (g,) = zt.gradient(f, x)
    (h,) = torch.autograd.grad(g.sum(), x, create_graph=True)
    (t,) = torch.autograd.grad(h.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    (g2,) = torch.autograd.grad(f(x2), x2, create_graph=True)
    (h2,) = torch.autograd.grad(g2.sum(), x2, create_graph=True)
    (t2,) = torch.autograd.grad(h2.sum(), x2)
    torch.testing.assert_close(h, h2)
    torch.testing.assert_close(t, t2)


def test_a_hessian_is_connected_to_its_argument():
    (x,) = leaves(3, seed=8)
    f = lambda x: (x.exp() * x.roll(1)).sum()  # noqa: E731
    zt.hessian(f, x).trace().backward()
    x2 = x.detach().clone().requires_grad_()
    torch.autograd.functional.hessian(f, x2, create_graph=True).trace().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_nothing_requires_grad_nothing_is_connected():
    x = torch.randn(3)
    (g,) = zt.gradient(lambda x: (x ** 3).sum(), x)
    assert not g.requires_grad and g.grad_fn is None
    (x,) = leaves(3)
    with torch.no_grad():
        (g,) = zt.gradient(lambda x: (x ** 3).sum(), x)
    assert not g.requires_grad


def test_numbers_stay_numbers_unless_connected():
    assert zt.gradient(lambda a: a ** 3, 2.0) == (12.0,)
    (w,) = leaves((), seed=9)
    (g,) = zt.gradient(lambda a: a ** 2 * w, 3.0)
    assert isinstance(g, torch.Tensor) and g.requires_grad   # 2 a w depends on w: it stays connected
    g.backward()
    torch.testing.assert_close(w.grad, torch.tensor(6.0))


def test_torch_func_grad_over_a_function_calling_zt_gradient():
    x = torch.randn(4)
    f = lambda x: (x.sin() * x).sum()  # noqa: E731
    ours = torch.func.grad(lambda x: zt.gradient(f, x)[0].pow(2).sum())(x)
    reference = torch.func.grad(lambda x: torch.func.grad(f)(x).pow(2).sum())(x)
    torch.testing.assert_close(ours, reference)
    ours = torch.func.jacrev(lambda x: zt.gradient(f, x)[0])(x)
    torch.testing.assert_close(ours, torch.func.hessian(f)(x))


def test_vmap_over_zt_gradient_gives_per_sample_gradients():
    model = mlp(seed=10)
    params = {k: v.detach() for k, v in model.named_parameters()}
    X, Y = torch.randn(5, 3), torch.randn(5, 1)

    def loss(p, x, y):
        return F.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    ours = torch.func.vmap(lambda x, y: zt.gradient(loss, params, x, y)[0], in_dims=(0, 0))(X, Y)
    reference = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, X, Y)
    assert set(ours) == set(reference)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name])


def test_grad_of_vmap_of_zt_gradient():
    X = torch.randn(3, 4)
    f = lambda x: (x.cos() * x).sum()  # noqa: E731
    ours = torch.func.grad(lambda X: torch.func.vmap(lambda x: zt.gradient(f, x)[0])(X).sum())(X)
    reference = torch.func.grad(lambda X: torch.func.vmap(torch.func.grad(f))(X).sum())(X)
    torch.testing.assert_close(ours, reference)


def test_dropout_is_replayed_with_the_same_mask():
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.5), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1)).double().train()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 3)
    torch.manual_seed(11)
    (g,) = zt.gradient(lambda x: model(x).sum(), x)
    torch.randn(100)  # the generator moves on before the backward
    g.pow(2).sum().backward()

    torch.manual_seed(11)
    x2 = x.clone().requires_grad_()
    (r,) = torch.autograd.grad(reference(x2).sum(), x2, create_graph=True)
    r.pow(2).sum().backward()
    torch.testing.assert_close(g.detach(), r.detach())
    assert_grads_equal(model.parameters(), reference.parameters())


def test_batchnorm_running_statistics_are_updated_once():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 1)).double().train()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3)
    (g,) = zt.gradient(lambda x: model(x).sum(), x)
    g.pow(2).sum().backward()

    x2 = x.clone().requires_grad_()
    (r,) = torch.autograd.grad(reference(x2).sum(), x2, create_graph=True)
    r.pow(2).sum().backward()
    assert_grads_equal(model.parameters(), reference.parameters())
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert model[1].num_batches_tracked == reference[1].num_batches_tracked == 1


def test_a_function_that_changes_between_forward_and_backward_is_refused():
    (w,) = leaves(3, seed=12)
    scale = {"k": 2.0}
    (g,) = zt.gradient(lambda x: (x * w).sum() * scale["k"] * (x * x).sum(), torch.ones(3))
    scale["k"] = 5.0
    with pytest.raises(zt.ZygoteError, match="second run gave a different result"):
        g.sum().backward()


def test_backward_inside_f_is_a_clear_error_naming_the_line():
    (x,) = leaves(3, seed=13)
    with pytest.raises(zt.ZygoteError, match=r"test_composition.py:\d+"):
        zt.gradient(lambda x: (x.sum().backward(), x.sum())[1], x)
    with pytest.raises(zt.ZygoteError, match="torch.autograd"):
        zt.gradient(lambda x: torch.autograd.grad(x.sum(), x)[0].sum(), x)


def test_inference_mode_tensors_and_calls_inside_inference_mode():
    with torch.inference_mode():
        x = torch.randn(3)
        W = torch.randn(3, 3)
    f = lambda x: torch.tanh(W @ x).sum()  # noqa: E731
    (g,) = zt.gradient(f, x)
    x2, W2 = x.clone().requires_grad_(), W.clone()
    (r,) = torch.autograd.grad(torch.tanh(W2 @ x2).sum(), x2)
    torch.testing.assert_close(g, r)
    with torch.inference_mode():
        (g,) = zt.gradient(f, x)
    torch.testing.assert_close(g, r)


# -- torch.func transforms inside f: torch's answer or a clear error, never None ----------------

def test_torch_func_grad_inside_f_over_an_argument_and_a_closure():
    w, x = torch.randn(3), torch.randn(3)
    f = lambda w: torch.func.grad(lambda z: (z ** 3 * w.exp()).sum())(w).sum()  # noqa: E731
    torch.testing.assert_close(zt.gradient(f, w)[0], torch.func.grad(f)(w))
    g = lambda w: torch.func.grad(lambda z: (z * w).sin().sum())(x).pow(2).sum()  # noqa: E731
    torch.testing.assert_close(zt.gradient(g, w)[0], torch.func.grad(g)(w))
    gv = lambda w: sum(torch.func.grad_and_value(lambda z: (z * w).cos().sum())(x)).sum()  # noqa: E731
    torch.testing.assert_close(zt.gradient(gv, w)[0], torch.func.grad(gv)(w))


def test_torch_func_jvp_and_nested_vmap_inside_f():
    w, X = torch.randn(3), torch.randn(4, 3)
    f = lambda w: torch.func.jvp(lambda z: z.sin() * z * w, (w,), (torch.ones(3),))[1].sum()  # noqa: E731
    torch.testing.assert_close(zt.gradient(f, w)[0], torch.func.grad(f)(w))
    nested = lambda w: torch.func.vmap(torch.func.vmap(lambda r: (r * w).tanh().sum()))(X[None]).sum()  # noqa: E731
    torch.testing.assert_close(zt.gradient(nested, w)[0], torch.func.grad(nested)(w))
    per_sample = lambda w: torch.func.vmap(torch.func.grad(lambda r: (r * w).sin().sum()))(X).pow(2).sum()  # noqa: E731
    torch.testing.assert_close(zt.gradient(per_sample, w)[0], torch.func.grad(per_sample)(w))


def test_torch_func_transforms_zt_cannot_see_through_are_refused_by_name():
    w = torch.randn(3)
    for transform in (lambda w: torch.func.jacrev(lambda z: z ** 3)(w).sum(),
                      lambda w: torch.func.jacfwd(lambda z: z ** 3)(w).sum(),
                      lambda w: torch.func.hessian(lambda z: (z ** 3).sum())(w).sum(),
                      lambda w: torch.func.vjp(lambda z: z.sin(), w)[1](torch.ones(3))[0].sum()):
        with pytest.raises(zt.ZygoteError, match=r"test_composition.py:\d+"):
            zt.gradient(transform, w)


def test_torch_func_forward_mode_over_a_zt_call_is_a_clear_error():
    x = torch.randn(3)
    with pytest.raises(zt.ZygoteError, match="forward mode"):
        torch.func.jacfwd(lambda x: zt.gradient(lambda x: (x.sin() * x).sum(), x)[0])(x)


def test_an_input_modified_in_place_before_the_outer_backward_is_refused():
    """The connected node keeps its inputs' versions, not saved copies: a parameter changed in place
    between zt.gradient and loss.backward() would make the rerun differentiate another function
    (torch.autograd refuses it too, "modified by an inplace operation")."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    g = zt.gradient(lambda x: (x.sin() ** 2).sum(), x)[0]
    with torch.no_grad():
        x.mul_(2.0)
    with pytest.raises(zt.ZygoteError, match="modified in place after the call"):
        g.sum().backward()
