"""Rules that take and return structures (ChainRules' ``Tangent``): a dataclass, a dict, an object
with tensor attributes as a rule's argument gets its leaves' cotangents from the rule's structured
cotangent; a structured output hands its pullback a cotangent of its own structure. Each compared
with torch.autograd of the same math in float64.

Regression: the tape keyed only tensors and sequences of tensors, so a dataclass argument's
gradient came back None (silently) and, with only the dataclass tracked, the rule was never called;
staged capture crashed inside FakeTensorMode."""
from dataclasses import dataclass

import pytest
import torch

import zygote_torch as zt
from zygote_torch.ad.tangents import is_zero, unthunk
from zygote_torch.errors import RuleError, TraceError
from helpers import rand


@dataclass
class Pair:
    a: torch.Tensor
    b: torch.Tensor
    scale: float = 2.0


def energy(p, x):
    return p.scale * (p.a * x).sum() + (p.b ** 2).sum()


def energy_reference(a, b, x, scale=2.0):
    return scale * (a * x).sum() + (b ** 2).sum()


class Attrs:  # a plain object: its gradient is a dict keyed by attribute name
    def __init__(self, w, c):
        self.w, self.c = w, c


def weighted(o, x):
    return (o.w * x).sum() * o.c


def split(x):
    return Pair(x * 2.0, x.sin())


@dataclass
class Named:  # a field that is not a tensor comes first
    name: str
    value: torch.Tensor


def named(x):
    return Named("x", x * 3.0)


@pytest.fixture
def calls():
    return []


@pytest.fixture
def energy_rule(calls):
    @zt.rrule(energy)
    def _energy(p, x):
        calls.append("energy")
        return energy(p, x), lambda dy: (zt.NoTangent(), Pair(dy * p.scale * x, dy * 2 * p.b, zt.NoTangent()),
                                         dy * p.scale * p.a)
    return _energy


def _autograd(fn, *tensors):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    return torch.autograd.grad(fn(*ts), ts)


def test_a_rule_taking_a_dataclass_gives_each_field_its_cotangent(energy_rule, calls):
    p, x = Pair(rand(3), rand(3, seed=1)), rand(3, seed=2)
    gp, gx = zt.gradient(lambda p, x: energy(p, x) * 3.0, p, x)
    ga, gb, gx_ref = _autograd(lambda a, b, x: energy_reference(a, b, x) * 3.0, p.a, p.b, x)
    assert isinstance(gp, Pair) and calls == ["energy"]
    torch.testing.assert_close(gp.a, ga)
    torch.testing.assert_close(gp.b, gb)
    torch.testing.assert_close(gx, gx_ref)


def test_the_rule_is_called_when_only_the_dataclass_is_differentiated(energy_rule, calls):
    p, x = Pair(rand(3), rand(3, seed=1)), rand(3, seed=2)
    (gp,) = zt.gradient(lambda p: energy(p, x), p)
    ga, gb = _autograd(lambda a, b: energy_reference(a, b, x), p.a, p.b)
    assert calls == ["energy"]
    torch.testing.assert_close(gp.a, ga)
    torch.testing.assert_close(gp.b, gb)


def test_implicit_parameters_inside_a_dataclass(energy_rule, calls):
    p, x = Pair(rand(3), rand(3, seed=1)), rand(3, seed=2)
    gs = zt.gradient(lambda: energy(p, x), zt.Params([p.a, p.b]))
    ga, gb = _autograd(lambda a, b: energy_reference(a, b, x), p.a, p.b)
    assert calls == ["energy"]
    torch.testing.assert_close(gs[p.a], ga)
    torch.testing.assert_close(gs[p.b], gb)


def test_a_cotangent_given_as_a_dict_of_fields_and_a_plain_object():
    @zt.rrule(weighted)
    def _weighted(o, x):
        y = weighted(o, x)
        return y, lambda dy: (zt.NoTangent(), {"w": dy * o.c * x}, dy * o.c * o.w)

    o, x = Attrs(rand(4), 1.5), rand(4, seed=1)
    go, gx = zt.gradient(lambda o, x: weighted(o, x), o, x)
    gw, gx_ref = _autograd(lambda w, x: (w * x).sum() * 1.5, o.w, x)
    torch.testing.assert_close(go["w"], gw)
    torch.testing.assert_close(gx, gx_ref)


def test_a_rule_taking_a_dict():
    def dict_energy(d):
        return (d["u"] * d["v"]).sum()

    @zt.rrule(dict_energy)
    def _dict_energy(d):
        return dict_energy(d), lambda dy: (zt.NoTangent(), {"u": dy * d["v"], "v": dy * d["u"]})

    d = {"u": rand(3), "v": rand(3, seed=1)}
    (gd,) = zt.gradient(lambda d: dict_energy(d) ** 2, d)
    gu, gv = _autograd(lambda u, v: (u * v).sum() ** 2, d["u"], d["v"])
    torch.testing.assert_close(gd["u"], gu)
    torch.testing.assert_close(gd["v"], gv)


def test_a_rule_returning_a_dataclass_gets_a_dataclass_cotangent():
    seen = []

    @zt.rrule(split)
    def _split(x):
        def pullback(dp):
            seen.append(dp)
            return zt.NoTangent(), unthunk(dp.a) * 2.0 + unthunk(dp.b) * x.cos() if not is_zero(dp.b) \
                else unthunk(dp.a) * 2.0
        return split(x), pullback

    x = rand(3)
    (g,) = zt.gradient(lambda x: (split(x).a * split(x).b).sum(), x)
    (g_ref,) = _autograd(lambda x: ((x * 2.0) * x.sin()).sum(), x)
    torch.testing.assert_close(g, g_ref)
    assert all(isinstance(dp, Pair) for dp in seen)
    (g_a,) = zt.gradient(lambda x: split(x).a.sum(), x)  # b unused: a symbolic zero reaches the rule
    torch.testing.assert_close(g_a, torch.full((3,), 2.0, dtype=torch.float64))
    assert is_zero(seen[-1].b)


def test_a_structured_cotangent_naming_an_unknown_field_is_refused():
    def bad_energy(p):
        return p.a.sum()

    @zt.rrule(bad_energy)
    def _bad_energy(p):
        return bad_energy(p), lambda dy: (zt.NoTangent(), {"nope": dy})

    with pytest.raises(RuleError, match="bad_energy.*nope"):
        zt.gradient(lambda p: bad_energy(p), Pair(rand(3), rand(3)))


def test_staged_capture_refuses_a_call_given_a_dataclass_naming_the_line(energy_rule):
    p, x = Pair(rand(3), rand(3, seed=1)), rand(3, seed=2)
    step = zt.compile(lambda p, x: zt.gradient(lambda p, x: energy(p, x), p, x))
    with pytest.raises(TraceError, match="energy.*is given a Pair holding tensors"):
        step(p, x)


def test_a_structured_output_with_a_leading_non_tensor_field():
    # the pullback's cotangent must line up with the fields (the tape gathers one part per leaf)
    @zt.rrule(named)
    def _named(x):
        return named(x), lambda dn: (zt.NoTangent(), 3.0 * unthunk(dn.value))

    x = rand(3)
    (g,) = zt.gradient(lambda x: (named(x).value ** 2).sum(), x)
    (g_ref,) = _autograd(lambda x: ((x * 3.0) ** 2).sum(), x)
    torch.testing.assert_close(g, g_ref)
