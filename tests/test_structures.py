"""Structures (issue 14 item 6): torch's pytree nodes, user registrations, plain objects with tensor
attributes; each gradient against torch.autograd in float64."""
import collections
import dataclasses
import time

import pytest
import torch
import torch.utils._pytree as torch_pytree

import zygote_torch as zt
from helpers import rand
from zygote_torch.capture.pytree import flatten, structure


def autograd_of(f, *tensors):
    fresh = [t.detach().clone().requires_grad_() for t in tensors]
    return torch.autograd.grad(f(*fresh), fresh, allow_unused=True)


def test_deque_ordered_dict_and_defaultdict_arguments():
    a, b = rand(3), rand(3, seed=1)
    (g,) = zt.gradient(lambda d: (d[0] * d[1].exp()).sum(), collections.deque([a, b], maxlen=5))
    assert isinstance(g, collections.deque) and g.maxlen == 5
    ra, rb = autograd_of(lambda a, b: (a * b.exp()).sum(), a, b)
    torch.testing.assert_close(g[0], ra)
    torch.testing.assert_close(g[1], rb)
    (g,) = zt.gradient(lambda d: (d["x"] ** 2).sum(), collections.OrderedDict(x=a))
    assert isinstance(g, collections.OrderedDict)
    torch.testing.assert_close(g["x"], 2 * a)
    dd = collections.defaultdict(list, {"x": a})
    (g,) = zt.gradient(lambda d: d["x"].sin().sum(), dd)
    assert isinstance(g, collections.defaultdict)
    torch.testing.assert_close(g["x"], a.cos())


class Pair:
    """A user class registered with torch's pytree."""

    def __init__(self, left, right):
        self.left, self.right = left, right


torch_pytree.register_pytree_node(Pair, lambda p: ([p.left, p.right], None), lambda xs, _: Pair(*xs))


def test_a_class_registered_with_torch_pytree():
    a, b = rand(2), rand(2, seed=1)
    (g,) = zt.gradient(lambda p: (p.left * p.right ** 2).sum(), Pair(a, b))
    assert isinstance(g, Pair)
    ra, rb = autograd_of(lambda a, b: (a * b ** 2).sum(), a, b)
    torch.testing.assert_close(g.left, ra)
    torch.testing.assert_close(g.right, rb)


class Layer:
    """A plain Python object (not a dataclass, not registered) holding tensors."""

    def __init__(self, n):
        self.weight = rand(n, n)
        self.bias = rand(n, seed=1)
        self.activation = torch.tanh
        self.name = "layer"

    def __call__(self, x):
        return self.activation(self.weight @ x + self.bias)


def test_a_plain_object_with_tensor_attributes_gets_a_dict_of_them():
    layer, x = Layer(3), rand(3, seed=2)
    (g,) = zt.gradient(lambda layer: layer(x).sum(), layer)
    assert set(g) == {"weight", "bias"}
    rw, rb = autograd_of(lambda w, b: torch.tanh(w @ x + b).sum(), layer.weight, layer.bias)
    torch.testing.assert_close(g["weight"], rw)
    torch.testing.assert_close(g["bias"], rb)


def test_a_plain_object_holding_a_module_and_a_list():
    class Model:
        def __init__(self):
            self.net = torch.nn.Linear(2, 2).double()
            self.extra = [rand(2)]

    m, x = Model(), rand(2, seed=3)
    (g,) = zt.gradient(lambda m: (m.net(x) * m.extra[0]).sum(), m)
    assert set(g) == {"net", "extra"} and set(g["net"]) == {"weight", "bias"}
    rw, re = autograd_of(lambda w, e: (torch.nn.functional.linear(x, w, m.net.bias) * e).sum(),
                         m.net.weight, m.extra[0])
    torch.testing.assert_close(g["net"]["weight"], rw)
    torch.testing.assert_close(g["extra"][0], re)


def test_a_plain_object_passed_as_an_argument_is_not_copied_unless_needed():
    layer = Layer(2)
    seen = []
    zt.gradient(lambda l: (seen.append(l), l(rand(2)).sum())[1], layer)
    assert seen[0] is layer


@dataclasses.dataclass
class Scaled:
    w: torch.Tensor
    k: float = 2.0


def test_structured_cotangents_map_back_to_leaves():
    """The helper a tape needs to hand a rule's structured cotangent (same type, or a dict of field
    names, ChainRules' Tangent) back to the argument's leaves."""
    from zygote_torch.capture.pytree import cotangent_leaves
    arg, g = Scaled(rand(2)), rand(2, seed=1)
    assert cotangent_leaves(arg, Scaled(g, 3.0)) == [g, 3.0]
    assert cotangent_leaves(arg, {"w": g}) == [g, None]
    assert cotangent_leaves(arg, None) == [None, None]
    layer = Layer(2)
    leaves = cotangent_leaves(layer, {"bias": g})
    assert leaves[0] is None and leaves[1] is g
    with pytest.raises(ValueError, match="does not have"):
        cotangent_leaves(arg, {"v": g})


def test_cycles_and_opaque_objects_are_leaves():
    class Node:
        def __init__(self):
            self.t = rand(2)
            self.me = self

    n = Node()
    leaves, shape = structure(n)
    assert any(isinstance(x, torch.Tensor) for x in leaves)
    assert shape.argument(leaves) is n
    assert flatten(torch.Generator())[0][0].__class__ is torch.Generator


def test_flatten_is_as_fast_as_torch_pytree_on_2000_leaves():
    tree = {f"layer{i}": (torch.zeros(1), [torch.zeros(1)]) for i in range(1000)}

    def best(fn):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    ours = best(lambda: structure(tree)[1].gradient(structure(tree)[0]))
    theirs = best(lambda: torch_pytree.tree_unflatten(*torch_pytree.tree_flatten(tree)))
    assert ours < 2.0 * theirs, f"flatten and rebuild took {ours * 1e3:.1f} ms, torch's pytree {theirs * 1e3:.1f} ms"
