"""gradient / withgradient / pullback / derivative: semantics of DESIGN section 1."""
import collections
import dataclasses

import pytest
import torch

import zygote_torch as zt
from helpers import check_gradient, rand
from zygote_torch.runtime import staged


def test_one_entry_per_argument_and_none_without_dependence():
    x, y = rand(3), rand(3)
    gx, gy, gn = zt.gradient(lambda x, y, n: (x * 2).sum(), x, y, 4)
    torch.testing.assert_close(gx, torch.full((3,), 2.0, dtype=torch.float64))
    assert gy is None and gn is None


def test_constant_output_gives_all_none():
    assert zt.gradient(lambda x: torch.ones(()), rand(3)) == (None,)


def test_python_numbers_are_reals_and_ints_are_not():
    g = zt.gradient(lambda a, b, n: a * b * n, 2.0, 3.0, 4)
    assert g == (12.0, 8.0, None)
    assert all(isinstance(v, float) for v in g[:2])


def test_integer_and_bool_tensors_get_none():
    x = rand(3)
    idx = torch.tensor([0, 2])
    mask = torch.tensor([True, False, True])
    assert zt.gradient(lambda x, i, m: (x * m).sum() + x.sum() * i.sum(), x, idx, mask)[1:] == (None, None)


def test_same_tensor_passed_twice_gets_separate_cotangents():
    x = rand(3)
    ga, gb = zt.gradient(lambda a, b: (a * b * b).sum(), x, x)
    torch.testing.assert_close(ga, x * x)
    torch.testing.assert_close(gb, 2 * x * x)


Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass
class Affine:
    w: torch.Tensor
    b: torch.Tensor
    name: str = "affine"
    scale: float = 2.0


def test_structural_gradients_mirror_their_inputs():
    w, b, x = rand(3), rand(3), rand(3)
    (gt,) = zt.gradient(lambda t: (t[0] * t[1]).sum(), (w, b))
    assert isinstance(gt, tuple)
    torch.testing.assert_close(gt[0], b)
    (gl,) = zt.gradient(lambda l: (l[0] * 3).sum(), [w, b])
    assert isinstance(gl, list) and gl[1] is None
    (gd,) = zt.gradient(lambda d: (d["w"] * d["b"]).sum(), {"w": w, "b": b})
    assert set(gd) == {"w", "b"}
    torch.testing.assert_close(gd["w"], b)
    (gp,) = zt.gradient(lambda p: (p.x - p.y).sum(), Point(w, b))
    assert isinstance(gp, Point)
    torch.testing.assert_close(gp.y, -torch.ones(3, dtype=torch.float64))
    (ga,) = zt.gradient(lambda a: ((a.w * x + a.b) * a.scale).sum(), Affine(w, b))
    assert isinstance(ga, Affine) and ga.name is None
    torch.testing.assert_close(ga.w, 2 * x)
    assert ga.scale == pytest.approx((w * x + b).sum().item())


def test_nested_structures():
    w = rand(2)
    (g,) = zt.gradient(lambda s: (s["layers"][0][1] * s["k"]).sum(), {"layers": [(w, w * 0 + 1)], "k": 3.0})
    assert g["layers"][0][0] is None
    torch.testing.assert_close(g["layers"][0][1], torch.full((2,), 3.0, dtype=torch.float64))
    assert g["k"] == pytest.approx(2.0)


def test_withgradient_returns_value_and_gradient():
    x = rand(4)
    y, (g,) = zt.withgradient(lambda x: (x * x).sum(), x)
    torch.testing.assert_close(y, (x * x).sum())
    torch.testing.assert_close(g, 2 * x)


def test_pullback_is_a_vjp_and_can_be_called_twice():
    x = rand(3)
    y, back = zt.pullback(lambda x: x * x, x)
    torch.testing.assert_close(y, x * x)
    dy = rand(3, seed=1)
    torch.testing.assert_close(back(dy)[0], 2 * x * dy)
    torch.testing.assert_close(back(dy)[0], 2 * x * dy)


def test_pullback_of_tuple_output():
    x = rand(3)
    (a, b), back = zt.pullback(lambda x: (x * 2, x * x), x)
    (g,) = back((torch.ones(3, dtype=torch.float64), None))
    torch.testing.assert_close(g, torch.full((3,), 2.0, dtype=torch.float64))


def test_derivative_of_derivative_like_use():
    assert zt.derivative(lambda x: x * x * x)(2.0) == pytest.approx(12.0)
    assert zt.derivative(lambda x: 7.0)(1.0) == 0.0


def test_broadcasting_against_autograd():
    check_gradient(lambda a, b: a * b + a / (b * b + 1) - b, rand(3, 4), rand(4))
    check_gradient(lambda a, b: a * b - b, rand(3, 1), rand(1, 4))
    check_gradient(lambda a, b: a + b * 2.5, rand(), rand(2, 3))


def test_tensor_captured_from_closure_is_a_constant_for_gradient():
    w = rand(3)
    x = rand(3, seed=2)
    (g,) = zt.gradient(lambda x: (w * x).sum(), x)
    torch.testing.assert_close(g, w)


def test_staged_program_reads_captured_tensors_as_inputs():
    w = rand(3)
    x = rand(3, seed=2)
    program = staged.build(lambda x: (w * x).sum(), (x,), seeded=True)
    assert any(inp.tensor is w for inp in program.traced.inputs)


def test_module_argument_gradient_is_dict_of_named_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x = rand(7, 4)
    (g,) = zt.gradient(lambda m: (m(x) ** 2).mean(), model)
    assert list(g) == [n for n, _ in model.named_parameters()]
    model.zero_grad()
    (model(x) ** 2).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g[name], p.grad)


def test_module_traced_through_with_parameters_as_inputs():
    model = torch.nn.Linear(3, 2).double()
    program = staged.build(lambda m, x: m(x).sum(), (model, rand(4, 3)), seeded=False)
    names = [n.name for n in program.traced.graph.nodes if n.op == "placeholder"]
    assert names[:3] == ["m_weight", "m_bias", "x"]
    y, back = staged.pullback(lambda m, x: m(x).sum(), model, rand(4, 3))
    (gm, gx) = back(torch.tensor(1.0, dtype=torch.float64))
    model.zero_grad()
    model(rand(4, 3)).sum().backward()
    torch.testing.assert_close(gm["weight"], model.weight.grad)


def test_numpy_arrays_are_arguments_and_get_array_gradients():
    import numpy as np
    a = np.array([1.0, 2.0, 3.0])
    (g,) = zt.gradient(lambda a: (a ** 2).sum(), a)
    assert isinstance(g, np.ndarray)
    np.testing.assert_allclose(g, 2 * a)


W_GLOBAL = torch.linspace(-1, 1, 3, dtype=torch.float64)


def test_torch_func_vmap_inside_f():
    x, w = rand(4, 3), rand(3)
    model = torch.nn.Linear(3, 2).double()
    cases = [
        (lambda w: torch.func.vmap(lambda r: (r * w).sum())(x).sum(), (w,)),                  # closure tensor
        (lambda w: torch.func.vmap(lambda r, w: (r * w).sum(), in_dims=(0, None))(x, w).sum(), (w,)),  # argument
        (lambda x: torch.func.vmap(lambda r: (r.sin() * W_GLOBAL).sum())(x).sum(), (x,)),     # global tensor
    ]
    for f, args in cases:
        check_gradient(f, *args)
    (g,) = zt.gradient(lambda m: torch.func.vmap(lambda r: m(r).pow(2).sum())(x).sum(), model)  # closure module
    model.zero_grad()
    model(x).pow(2).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g[name], p.grad)


def test_torch_func_grad_inside_f_is_differentiated_not_a_silent_none():
    w = rand(3)
    f = lambda w: torch.func.grad(lambda r: (r * w).sin().sum())(rand(3, seed=1)).sum()  # noqa: E731
    torch.testing.assert_close(zt.gradient(f, w)[0], torch.func.grad(f)(w))
    with pytest.raises(zt.ZygoteError, match="torch.func transform"):
        zt.gradient(lambda w: torch.func.jacrev(lambda r: r * r)(w).sum(), w)


def test_a_frozen_parameter_of_a_module_is_a_constant():
    """As for loss.backward(): a parameter with requires_grad=False (Whisper's position embeddings,
    a fine-tuned model's backbone) gets no gradient, through the module argument, Params and the
    staged path; passing the parameter itself still asks for its gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(5, 3, dtype=torch.float64)
    loss = lambda m: m(x).square().sum()  # noqa: E731
    loss(model).backward()
    (g,) = zt.gradient(loss, model)
    staged = zt.compile(lambda m: zt.gradient(loss, m)[0])(model)
    gs = zt.gradient(lambda: loss(model), zt.Params(model.parameters()))
    for n, p in model.named_parameters():
        for ours, how in ((g[n], "module"), (staged[n], "staged"), (gs[p], "Params")):
            if p.grad is None:
                assert ours is None, f"{how} {n}: a gradient for a frozen parameter"
            else:
                torch.testing.assert_close(ours, p.grad, msg=f"{how} {n}")
    w = model[0].weight
    (dw,) = zt.gradient(lambda w: torch.nn.functional.linear(x, w).sum(), w)
    torch.testing.assert_close(dw, torch.ones(4, 5, dtype=torch.float64) @ x)
