"""The rest of Zygote's and torch.func's API (issue 14 items 1, 3, 8), each against torch.autograd /
torch.func in float64 or known values."""
import collections
import dataclasses

import pytest
import torch

import zygote_torch as zt
from helpers import rand



pytestmark = pytest.mark.usefixtures("float64")  # every tensor of these tests in float64


# -- item 8: argnums, has_aux, keyword arguments, isderiving, complex outputs -------------------

def test_argnums_selects_arguments_as_torch_func_grad():
    x, y = rand(3), rand(3, seed=1)
    f = lambda x, y: (x.sin() * y ** 2).sum()  # noqa: E731
    for argnums in (0, 1, (0, 1), (1,), -1):
        ours = zt.gradient(f, x, y, argnums=argnums)
        reference = torch.func.grad(f, argnums=argnums)(x, y)
        torch.testing.assert_close(ours, reference)


def test_arguments_not_in_argnums_are_constants():
    x, y = rand(3), rand(3, seed=1)
    (gy,) = zt.gradient(lambda x, y: (x * y).sum(), x, y, argnums=(1,))
    torch.testing.assert_close(gy, x)
    with pytest.raises(zt.ZygoteError, match="argnums=5"):
        zt.gradient(lambda x: x.sum(), x, argnums=5)
    with pytest.raises(zt.ZygoteError, match="repeats"):
        zt.gradient(lambda x, y: x.sum(), x, y, argnums=(0, 0))


def test_has_aux_as_torch_func_grad():
    x = rand(4)
    f = lambda x: ((x ** 3).sum(), {"norm": x.norm()})  # noqa: E731
    (g,), aux = zt.gradient(f, x, has_aux=True)
    rg, raux = torch.func.grad(f, has_aux=True)(x)
    torch.testing.assert_close(g, rg)
    torch.testing.assert_close(aux["norm"], raux["norm"])
    g0, aux = zt.gradient(f, x, has_aux=True, argnums=0)
    torch.testing.assert_close(g0, rg)
    with pytest.raises(zt.ZygoteError, match="has_aux=True"):
        zt.gradient(lambda x: x.sum(), x, has_aux=True)


def test_keyword_arguments_are_passed_through_and_not_differentiated():
    x, w = rand(3), rand(3, seed=1)
    f = lambda x, *, w, scale=1.0: (x * w).sum() * scale  # noqa: E731
    (g,) = zt.gradient(f, x, w=w, scale=3.0)
    torch.testing.assert_close(g, 3 * w)
    y, (g,) = zt.withgradient(f, x, w=w)
    torch.testing.assert_close(y, (x * w).sum())
    (J,) = zt.jacobian(lambda x, k: x * k, x, k=2.0)
    torch.testing.assert_close(J, 2 * torch.eye(3))
    y, back = zt.pullback(lambda x, k: x * k, x, k=w)
    torch.testing.assert_close(back(torch.ones(3))[0], w)


def test_withgradient_aux_output_as_zygote():
    # Zygote 0.6.6: withgradient(x -> (sum(1 ./ x), 1 ./ x), [1, 2, 4]) == (val = (1.75, z), grad = ...)
    x = torch.tensor([1.0, 2.0, 4.0])
    (val, z), (g,) = zt.withgradient(lambda x: ((1 / x).sum(), 1 / x), x)
    torch.testing.assert_close(val, torch.tensor(1.75))
    torch.testing.assert_close(z, torch.tensor([1.0, 0.5, 0.25]))
    torch.testing.assert_close(g, torch.tensor([-1.0, -0.25, -0.0625]))
    val, (g,) = zt.withgradient(lambda x: (x ** 2, "info"), 3.0)
    assert val == (9.0, "info") and g == 6.0


def test_gradient_of_a_tuple_output_is_refused_with_advice():
    with pytest.raises(zt.ZygoteError, match="withgradient"):
        zt.gradient(lambda x: (x.sum(), x), rand(2))


def test_complex_outputs_are_refused_as_torch_refuses():
    x = rand(2)
    with pytest.raises(RuntimeError):  # torch.autograd refuses it too
        torch.autograd.grad((x.requires_grad_() * 1j).sum(), x)
    with pytest.raises(zt.ZygoteError, match="complex"):
        zt.gradient(lambda x: (x * 1j).sum(), x.detach())
    (g,) = zt.gradient(lambda x: (x * (1 + 2j)).abs().sum(), x.detach())  # a real function of complex values
    torch.testing.assert_close(g, torch.full((2,), 5 ** 0.5) * x.detach().sign())


def test_atan2_at_the_origin_as_torch():
    x, y = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    rx, ry = torch.autograd.grad(torch.atan2(x, y).sum(), (x, y))
    gx, gy = zt.gradient(lambda x, y: torch.atan2(x, y).sum(), torch.zeros(3), torch.zeros(3))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gy, ry)
    a, b = rand(3), rand(3, seed=1)
    ra, rb = torch.autograd.grad(torch.atan2(a.requires_grad_(), b.requires_grad_()).sum(), (a, b))
    ga, gb = zt.gradient(lambda a, b: torch.atan2(a, b).sum(), a.detach(), b.detach())
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)


def test_isderiving():
    seen = []
    zt.gradient(lambda x: (seen.append(zt.isderiving()), x * 2)[1], 1.0)
    assert seen == [True] and not zt.isderiving()


# -- item 1: Jacobians of structured outputs, Params, Hessians ----------------------------------

def test_jacobian_of_tuple_and_dict_outputs_mirrors_both_structures():
    x, w = rand(3), rand(2, 3, seed=1)
    f = lambda x, w: (w @ x, {"s": x.sin(), "n": x.norm()})  # noqa: E731
    jx, jw = zt.jacobian(f, x, w)
    reference = torch.func.jacrev(f, argnums=(0, 1))(x, w)  # output structure outside, argnums inside
    torch.testing.assert_close(jx[0], reference[0][0])
    torch.testing.assert_close(jw[0], reference[0][1])
    torch.testing.assert_close(jx[1]["s"], reference[1]["s"][0])
    torch.testing.assert_close(jx[1]["n"], reference[1]["n"][0])
    assert jw[1] == {"s": None, "n": None}  # the dict does not depend on w


@dataclasses.dataclass
class State:
    pos: torch.Tensor
    vel: torch.Tensor


def test_jacobian_of_a_dataclass_output_with_respect_to_a_dataclass():
    s = State(rand(2), rand(2, seed=1))
    step = lambda s: State(s.pos + 0.1 * s.vel, s.vel - 0.1 * s.pos.sin())  # noqa: E731
    (J,) = zt.jacobian(step, s)
    assert isinstance(J, State) and isinstance(J.pos, State)
    torch.testing.assert_close(J.pos.pos, torch.eye(2))
    torch.testing.assert_close(J.pos.vel, 0.1 * torch.eye(2))
    torch.testing.assert_close(J.vel.pos, torch.diag(-0.1 * s.pos.cos()))


def test_jacobian_and_hessian_with_params():
    W, b = rand(2, 3), rand(2, seed=1)
    x = rand(3, seed=2)
    ps = zt.Params([W, b])
    J = zt.jacobian(lambda: torch.tanh(W @ x + b), ps)
    assert isinstance(J, zt.Grads)
    rW, rb = torch.func.jacrev(lambda W, b: torch.tanh(W @ x + b), argnums=(0, 1))(W, b)
    torch.testing.assert_close(J[W], rW)
    torch.testing.assert_close(J[b], rb)

    loss = lambda W, b: (torch.tanh(W @ x + b) ** 2).sum()  # noqa: E731
    H = zt.hessian(lambda: loss(W, b), ps)
    reference = torch.func.hessian(loss, argnums=(0, 1))(W, b)
    torch.testing.assert_close(H[W][W], reference[0][0])
    torch.testing.assert_close(H[W][b], reference[0][1])
    torch.testing.assert_close(H[b][W], reference[1][0])
    torch.testing.assert_close(H[b][b], reference[1][1])


def test_hessian_of_several_arguments_as_torch_func():
    x, y = rand(3), rand(2, seed=1)
    f = lambda x, y: (x.sin().outer(y.exp()) ** 2).sum()  # noqa: E731
    H = zt.hessian(f, x, y)
    reference = torch.func.hessian(f, argnums=(0, 1))(x, y)
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(H[i][j], reference[i][j])
    torch.testing.assert_close(zt.hessian(f, x, y, argnums=1), reference[1][1])
    torch.testing.assert_close(zt.hessian_reverse(f, x, y)[0][1], reference[0][1])


def test_hessian_of_a_structured_argument_and_of_numbers():
    t = (rand(2), rand(2, seed=1))
    f = lambda t: (t[0] * t[1].exp()).sum() + (t[0] ** 4).sum()  # noqa: E731
    H = zt.hessian(f, t)
    reference = torch.func.hessian(lambda a, b: f((a, b)), argnums=(0, 1))(*t)
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(H[i][j], reference[i][j])
    assert zt.hessian(lambda x: x ** 3, 2.0) == pytest.approx(12.0)
    h = zt.hessian(lambda a, b: a * a * b, 2.0, 3.0)
    assert h == ((6.0, 4.0), (4.0, 0.0))


def test_hessian_reverse_equals_hessian():
    x = rand(4)
    f = lambda x: (x.exp() * x.roll(1)).sum() / (1 + x.norm())  # noqa: E731
    torch.testing.assert_close(zt.hessian_reverse(f, x), torch.func.hessian(f)(x))
    torch.testing.assert_close(zt.hessian(f, x), torch.func.hessian(f)(x))


def test_diaghessian_of_several_and_structured_arguments():
    x, y = rand(3), rand(2, seed=1)
    f = lambda x, d, k: (x ** 3).sum() * d["a"].exp().sum() + k * (x * x).sum()  # noqa: E731
    dx, dd, dk = zt.diaghessian(f, x, {"a": y}, 2.0)
    full = torch.func.hessian(lambda x, a, k: f(x, {"a": a}, k), argnums=(0, 1, 2))(x, y, torch.tensor(2.0))
    torch.testing.assert_close(dx, full[0][0].diagonal())
    torch.testing.assert_close(dd["a"], full[1][1].diagonal())
    assert dk == 0.0


# -- item 3: Grads algebra, Params push/delete, destructure ------------------------------------

def grads_pair():
    W, b = rand(2, 2), rand(2, seed=1)
    ps = zt.Params([W, b])
    g1 = zt.gradient(lambda: (W * 2).sum(), ps)          # b: None
    g2 = zt.gradient(lambda: (W.sum() + 3 * b.sum()), ps)
    return W, b, ps, g1, g2


def test_grads_algebra_with_numbers_and_grads():
    W, b, ps, g1, g2 = grads_pair()
    two = torch.full((2, 2), 2.0)
    torch.testing.assert_close((g1 / 2)[W], two / 2)
    torch.testing.assert_close((2 * g1)[W], 2 * two)
    torch.testing.assert_close((g2 / g2)[b], torch.ones(2))
    torch.testing.assert_close((1 - g2)[b], torch.full((2,), -2.0))
    torch.testing.assert_close((g1 - g2)[b], torch.full((2,), -3.0))  # None is a zero
    assert (g1 / 2)[b] is None and (g1 * 3)[b] is None
    g = g1.copy()
    g /= 4
    torch.testing.assert_close(g[W], two / 4)
    torch.testing.assert_close(g1[W], two)


def test_grads_map_merge_and_vectors():
    W, b, ps, g1, g2 = grads_pair()
    assert list(map(lambda p: p is W, g1)) == [True, False]  # Python's map iterates the parameters
    torch.testing.assert_close(g1.map(torch.square)[W], torch.full((2, 2), 4.0))
    torch.testing.assert_close(g2.map(lambda a, c: a * c, g1)[W], torch.full((2, 2), 2.0))
    merged = g1.copy().merge_(g2)  # Zygote's merge!
    torch.testing.assert_close(merged[W], torch.full((2, 2), 3.0))
    torch.testing.assert_close(merged[b], torch.full((2,), 3.0))
    v = g1.to_vector()  # copy!(v, gs): zeros for None
    torch.testing.assert_close(v, torch.cat([torch.full((4,), 2.0), torch.zeros(2)]))
    g = g1.copy().from_vector(torch.arange(6.0))  # copy!(gs, v)
    torch.testing.assert_close(g[b], torch.tensor([4.0, 5.0]))
    with pytest.raises(ValueError):
        g.from_vector(torch.zeros(5))


def test_params_push_delete_union():
    a, b, c = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    ps = zt.Params().push(a, b, a)
    assert list(ps) == [a, b]
    ps.delete(a)
    assert list(ps) == [b]
    ps.union([c], zt.Params([a]))
    assert list(ps) == [b, c, a]
    model = torch.nn.Linear(2, 2)
    assert len(zt.Params().union(model)) == 2


def test_destructure_a_module_and_differentiate_through_rebuild():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x = rand(5, 3)
    flat, rebuild = zt.destructure(model)
    assert flat.shape == (sum(p.numel() for p in model.parameters()),)
    torch.testing.assert_close(rebuild(flat)(x), model(x))
    (g,) = zt.gradient(lambda v: rebuild(v)(x).pow(2).sum(), flat)
    model.zero_grad()
    model(x).pow(2).sum().backward()
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))


def test_destructure_a_structure():
    tree = {"w": rand(2, 2), "layers": [rand(3, seed=1)], "n": 4}
    flat, rebuild = zt.destructure(tree)
    assert flat.shape == (7,)
    again = rebuild(flat * 2)
    torch.testing.assert_close(again["w"], 2 * tree["w"])
    assert again["n"] == 4
    Point = collections.namedtuple("Point", "x y")
    flat, rebuild = zt.destructure(Point(rand(2), rand(1)))
    assert isinstance(rebuild(flat), Point)
