"""Which graph values share memory, and where memory is written: what the passes must respect.

Every node's recorded value (``meta['val']``, a fake tensor) carries its storage, so views, their
bases and values returned as themselves (``x.add_(1)`` returns ``x``) share one storage key, as
they share memory when the program runs; inputs that alias each other at trace time do too. A node
writes memory when it is an in-place op (``add_``, ``copy_``, ``x[i] = v``: its first argument; the
node's class, :mod:`..capture.op_classes`, says),
when it returns one of its inputs as itself (``F.relu(x, inplace=True)``), through ``out=``, through
an argument its schema marks written (``Tensor(a!)``), or as batch and instance norm update their
running statistics in training mode (their schemas do not say so).

From that, the rule every pass follows: a value whose memory is written after it was computed, or
that aliases such memory, is not folded, merged or simplified away; nor is a value the program
returns replaced by one the caller or the program itself holds.
"""
from __future__ import annotations

import bisect
import collections

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from ..capture.op_classes import op_class


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def storages_of(value) -> frozenset:
    """The storage keys of the tensors in ``value`` (a fake or real tensor, or a tuple of them)."""
    keys = set()
    for t in _tensors(value):
        try:
            keys.add(StorageWeakRef(t.untyped_storage()))
        except (RuntimeError, NotImplementedError, TypeError):  # no storage (sparse, nested...): its own key
            keys.add(id(t))
    return frozenset(keys)


def _val(arg):
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None


def written_nodes(node: fx.Node) -> list:
    """The argument nodes whose memory ``node`` writes."""
    if node.op not in ("call_function", "call_method"):
        return []
    out = []
    first = node.args[0] if node.args else None
    cls = op_class(node)
    if cls.effectful or cls.inplace:
        out += _flat_nodes(first)  # a tensor, or the list a _foreach_*_ op updates
    result = _val(node)
    if isinstance(result, torch.Tensor):
        out += [a for a in node.all_input_nodes if _val(a) is result and a not in out]
    target = node.kwargs.get("out")
    out += [a for a in _flat_nodes(target) + _statistics_written(node) + _schema_written(node) if a not in out]
    return out


def _running_statistics():
    """function -> (positions and names of running mean and variance, position and name of the
    flag under which they are updated)."""
    import torch.nn.functional as F
    aten = torch.ops.aten
    stats = {}
    for fn, (mean, var, flag) in (
            (F.batch_norm, ((1, "running_mean"), (2, "running_var"), (5, "training"))),
            (torch.batch_norm, ((3, "running_mean"), (4, "running_var"), (5, "training"))),
            (aten.native_batch_norm, ((3, "running_mean"), (4, "running_var"), (5, "training"))),
            (aten.native_batch_norm.default, ((3, "running_mean"), (4, "running_var"), (5, "training"))),
            (F.instance_norm, ((1, "running_mean"), (2, "running_var"), (5, "use_input_stats"))),
            (torch.instance_norm, ((3, "running_mean"), (4, "running_var"), (5, "use_input_stats")))):
        stats[fn] = (mean, var, flag)
    return stats


_STATISTICS: dict | None = None


def _argument(node: fx.Node, position: int, name: str, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _statistics_written(node: fx.Node) -> list:
    global _STATISTICS
    if _STATISTICS is None:
        _STATISTICS = _running_statistics()
    try:
        spec = _STATISTICS.get(node.target)
    except TypeError:
        return []
    if spec is None:
        return []
    mean, var, (flag_position, flag_name) = spec
    default = node.target in (torch.nn.functional.instance_norm, torch.instance_norm)
    if not _argument(node, flag_position, flag_name, default):
        return []
    return [a for a in (_argument(node, *mean), _argument(node, *var)) if isinstance(a, fx.Node)]


def _schema_written(node: fx.Node) -> list:
    """Arguments an ``OpOverload``'s schema marks written (``Tensor(a!)``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
            out += _flat_nodes(value)
    return out


def _flat_nodes(arg) -> list:
    if isinstance(arg, fx.Node):
        return [arg]
    if isinstance(arg, (tuple, list)):
        return [n for a in arg for n in _flat_nodes(a)]
    return []


def writes(node: fx.Node) -> bool:
    """Whether ``node`` writes memory (so it is never removed, merged or evaluated ahead of time)."""
    return bool(written_nodes(node))


class Aliasing:
    """Storages and writes of one graph, in program order (recompute after a pass changes it)."""

    def __init__(self, graph: fx.Graph):
        self.position = {n: i for i, n in enumerate(graph.nodes)}
        self.storages = {n: storages_of(n.meta.get("val")) for n in graph.nodes}
        self.write_positions: dict = collections.defaultdict(list)  # storage -> sorted positions
        self.written_directly: set = set()  # nodes that are the target of a write
        for n in graph.nodes:
            for target in written_nodes(n):
                self.written_directly.add(target)
                for s in self.storages.get(target, ()):
                    self.write_positions[s].append(self.position[n])
        output = next((n for n in graph.nodes if n.op == "output"), None)
        self.escaping = frozenset().union(*(self.storages.get(n, frozenset())
                                            for n in (_flat_nodes(output.args) if output is not None else [])))

    def written_after(self, node: fx.Node, start: int | None = None, end: float = float("inf"),
                      storages=None) -> bool:
        """Whether memory of ``node`` (or ``storages``) is written at a position in (start, end)."""
        start = self.position[node] if start is None else start
        for s in self.storages.get(node, frozenset()) if storages is None else storages:
            positions = self.write_positions.get(s)
            if positions:
                k = bisect.bisect_right(positions, start)
                if k < len(positions) and positions[k] < end:
                    return True
        return False

    def written_anywhere(self, node: fx.Node) -> bool:
        return any(self.write_positions.get(s) for s in self.storages.get(node, ()))

    def inputs_written_between(self, node: fx.Node, start: int, end: float) -> bool:
        """Whether memory that ``node`` reads is written at a position in (start, end)."""
        return any(self.written_after(a, start, end) for a in node.all_input_nodes)

    def is_view_of_inputs(self, node: fx.Node) -> bool:
        """Whether ``node``'s value lives in memory one of its inputs owns (a view, or itself)."""
        mine = self.storages.get(node, frozenset())
        if not mine:
            return False
        theirs = frozenset().union(*(self.storages.get(a, frozenset()) for a in node.all_input_nodes))
        return mine <= theirs

    def escapes(self, node: fx.Node) -> bool:
        """Whether ``node``'s memory is (part of) what the program returns."""
        return bool(self.storages.get(node, frozenset()) & self.escaping)

    def stable(self, node: fx.Node) -> bool:
        """Whether ``node``'s value, and every value it reads, stay as they are from ``node`` on:
        computing it again later gives the same value."""
        start = self.position[node]
        return not self.written_after(node, start) and not self.inputs_written_between(node, start, float("inf"))
