"""One classification of ops (zygote_torch/capture/op_classes.py): written into every node where it
is created, and what every pass decides by. A random op, an in-place op, a view and a
data-dependent op, each classified, and each respected by constant folding, CSE and DCE."""
import operator

import pytest
import torch
import torch.fx as fx

import zygote_torch as zt
from zygote_torch.capture.op_classes import (METADATA_CALL, OP_CLASS, OpClass, call_kind, classify,
                                             is_data_dependent, op_class)
from zygote_torch.capture.trace import trace
from zygote_torch.passes import eliminate_common_subexpressions, eliminate_dead_code, fold_constants
from helpers import rand


def _calls(graph: fx.Graph) -> list:
    return [n for n in graph.nodes if n.op in ("call_function", "call_method")]


# -- the classes -----------------------------------------------------------------------------------

def test_a_random_op_is_random():
    assert classify("call_function", torch.rand).random
    assert classify("call_function", torch.nn.functional.dropout).random
    assert classify("call_method", "uniform_", torch.Tensor.uniform_).random
    assert not classify("call_function", torch.sin).random


def test_an_in_place_op_is_effectful_and_in_place():
    add_ = classify("call_method", "add_", torch.Tensor.add_)
    assert add_.effectful and add_.inplace
    iadd = classify("call_method", "__iadd__", torch.Tensor.__iadd__)
    assert iadd.effectful and not iadd.inplace  # (written as an operator: the call says it writes)
    assert not classify("call_method", "add", torch.Tensor.add).effectful
    assert not classify("call_method", "add_").effectful  # made by a pass: no call to ask


def test_a_view_is_a_cheap_view():
    for op, target in (("call_method", "view"), ("call_method", "transpose"), ("call_function", operator.getitem)):
        cls = classify(op, target)
        assert cls.view and cls.cheap and not cls.random and not cls.effectful
    assert not classify("call_function", torch.matmul).cheap


def test_activations_and_their_cost_on_the_cpu():
    gelu, relu = classify("call_function", torch.nn.functional.gelu), classify("call_method", "relu")
    assert gelu.activation and gelu.transcendental and gelu.cheap
    assert relu.activation and not relu.transcendental


def test_a_data_dependent_call_is_data_dependent():
    assert is_data_dependent(torch.Tensor.item) and is_data_dependent(torch.Tensor.__bool__)
    assert not is_data_dependent(torch.Tensor.sum)
    assert call_kind(torch.Tensor.shape.__get__) is METADATA_CALL


def test_placeholders_and_outputs_are_no_op():
    assert classify("placeholder", "rand") == OpClass() == classify("output", "output")


# -- written where nodes are created ---------------------------------------------------------------

def test_capture_writes_every_nodes_class():
    traced = trace(lambda x: (torch.rand(3) + x).view(3, 1).add_(1), (rand(3),))
    calls = _calls(traced.graph)
    assert calls and all(OP_CLASS in n.meta for n in calls)
    classes = {n.target if isinstance(n.target, str) else n.target.__name__: n.meta[OP_CLASS] for n in calls}
    assert classes["rand"].random and classes["view"].view and classes["add_"].effectful


def test_nodes_made_by_passes_have_the_same_class_as_from_the_function():
    step = zt.compile(lambda x: zt.gradient(lambda x: (x.sin() * torch.ones(3, dtype=x.dtype).sum()).sum(), x)[0])
    x = rand(3)
    torch.testing.assert_close(step(x), x.cos() * 3)
    graph = step.program((x,)).module.graph
    for n in graph.nodes:
        assert op_class(n) == classify(n.op, n.target, n.meta.get("func")), n.format_node()


def test_the_passes_read_the_class_not_the_name():
    def f(x):
        return x + torch.ones(3, dtype=x.dtype) * 2 + torch.ones(3, dtype=x.dtype) * 2

    assert fold_constants(_graph_of(f, rand(3))) > 0
    assert eliminate_common_subexpressions(_graph_of(f, rand(3)).graph) > 0
    gm = _graph_of(f, rand(3))
    for n in _calls(gm.graph):
        n.meta[OP_CLASS] = OpClass(random=True)  # as a random op is classified
    assert eliminate_common_subexpressions(gm.graph) == 0
    assert fold_constants(gm) == 0


def _graph_of(f, *args) -> fx.GraphModule:
    return trace(f, args).builder.module()


# -- respected by the passes -----------------------------------------------------------------------

def test_a_random_op_is_neither_folded_nor_merged():
    step = zt.compile(lambda x: (x + torch.rand(3, dtype=x.dtype), x + torch.rand(3, dtype=x.dtype)))
    x = torch.zeros(3, dtype=torch.float64)
    a, b = step(x)
    c, _ = step(x)
    assert not torch.equal(a, b)  # CSE kept both draws
    assert not torch.equal(a, c)  # constant folding drew nothing ahead of time
    assert step.code(x).count("torch.rand(") == 2


def test_an_in_place_op_is_kept_and_what_it_writes_is_not_folded_or_merged():
    def f(x):
        buf = torch.zeros(3, dtype=x.dtype)
        buf.add_(1)  # its result is unused: dead-code elimination keeps it anyway
        a = x.sin()
        x.mul_(2)
        return buf * a, x.sin()

    x = rand(3)
    expected = f(x.clone())
    got = zt.compile(f)(x)
    torch.testing.assert_close(got, expected)  # folding left buf to each call, CSE kept x.sin() twice


def test_dead_code_elimination_keeps_an_in_place_op_and_drops_an_unused_view():
    gm = _graph_of(lambda: _writes_and_views(torch.zeros(4)))
    eliminate_dead_code(gm.graph)
    kept = [n.target for n in _calls(gm.graph)]
    assert "add_" in kept and "view" not in kept


def _writes_and_views(buf):
    buf.view(2, 2)  # unused: removed
    buf.add_(1)  # unused too, but it writes: kept
    return torch.ones(1)


def test_a_view_of_memory_written_later_reads_the_write():
    def f(x):
        buf = torch.zeros(4, dtype=x.dtype)
        v = buf.view(2, 2)
        buf.add_(x)
        return v * 1, buf.view(2, 2)

    x = rand(4)
    for got, expected in zip(zt.compile(f)(x), f(x)):
        torch.testing.assert_close(got, expected)


def test_a_data_dependent_op_is_refused_by_staged_capture_and_runs_dynamically():
    def f(x):
        return x * x.detach().sum().item()

    x = rand(3)
    with pytest.raises(zt.TraceError, match="item"):
        trace(f, (x,))
    torch.testing.assert_close(zt.gradient(lambda x: f(x).sum(), x)[0], torch.full_like(x, float(x.sum())))
