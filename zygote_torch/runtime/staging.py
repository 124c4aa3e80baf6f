"""What ``zt.compile(f)`` and ``zt.compile(module)`` share: tracing under guards, generated programs,
and their bounded cache.

- :func:`signature`: the call signature a program is cached under (argument structure, shapes,
  dtypes, devices, the values of non-tensor leaves, tensors passed twice);
- :func:`guarded_trace`: a trace with the guards of ``runtime/guards.py``, refused
  (:class:`TraceWroteState`) where tracing wrote to state the guards read;
- :class:`Staged` (:func:`stage`): one traced, optimised and generated program, run as Python,
  through ``torch.compile`` or from a CUDA graph; :class:`Eager`: an entry that runs eagerly while
  hooks are registered;
- :class:`ProgramCache`: the programs of one compiled callable, by signature, up to its limit.

``runtime/compile.py`` (functions) and ``runtime/module.py`` (modules) build on this module and
not on each other.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..capture.trace import Traced, is_python_float, trace
from ..passes import optimize
from ..passes.aliasing import Aliasing
from .guards import Guards, InputReader, leaves_of, metadata_guards, walk

CACHE_LIMIT = 8  # programs per compiled function (torch.compile's cache_size_limit is 8 too)


def _leaf_signature(x):
    if isinstance(x, torch.Tensor):
        return (x.shape, x.dtype, x.device)
    if is_python_float(x):
        return ("float",)
    try:
        hash(x)
        return ("const", type(x), x)
    except TypeError:
        return ("object", id(x))


def _structure_signature(obj):
    """The shape of an argument structure: container types, keys, module identities."""
    if isinstance(obj, torch.nn.Module):
        return ("module", id(obj))
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(_structure_signature(x) for x in obj))
    if isinstance(obj, dict):
        return (type(obj), tuple((k, _structure_signature(v)) for k, v in obj.items()))
    if isinstance(obj, torch.Tensor) or is_python_float(obj):
        return type(obj)
    return (type(obj), id(obj))  # an object: the guards walked this one


def signature(args: tuple, flats: list | None = None) -> tuple:
    """The call signature (see the module docstring); a tensor passed twice is part of it.
    ``flats``: each argument's leaves, when computed already."""
    flat = [x for leaves in (flats or [leaves_of(a) for a in args]) for x in leaves]
    tensor_ids = [id(x) for x in flat if isinstance(x, torch.Tensor)]
    repeats = None if len(set(tensor_ids)) == len(tensor_ids) else tuple(map(tensor_ids.index, tensor_ids))
    return (tuple(map(_structure_signature, args)), tuple(map(_leaf_signature, flat)), repeats)


class TraceWroteState(Exception):
    """Tracing changed Python state the guards read (so a program could not replay it)."""


def guarded_trace(f, args: tuple, unhooked=()) -> tuple[Traced, Guards]:
    """Trace ``f(*args)`` with its guards; :class:`TraceWroteState` (state restored) if tracing
    wrote to what the guards read. ``unhooked``: see :func:`.guards.walk`."""
    guards = walk(f, args, unhooked)
    if guards.hooked:
        return None, guards
    traced = trace(f, args)
    metadata_guards(guards, traced)
    if not guards.check():
        changed = guards.failing()
        guards.restore()
        raise TraceWroteState(", ".join(changed[:5]) or "global state")
    return traced, guards


def writes_inputs(graph: fx.Graph) -> bool:
    """Whether the program writes memory one of its inputs owns."""
    aliasing = Aliasing(graph)
    return any(aliasing.written_anywhere(n) for n in graph.nodes if n.op == "placeholder")


@dataclass
class Staged:
    """One traced and generated program, run as Python, through torch.compile, or in a CUDA graph."""

    traced: Traced
    module: fx.GraphModule
    guards: Guards
    reader: InputReader
    backend: str | None = None
    cuda_graphs: bool = False

    def __post_init__(self):
        # the generated function itself: nn.Module.__call__'s hook handling costs microseconds a call
        self.run_module = self.module.forward if self.backend is None \
            else torch.compile(self.module, backend=self.backend)
        self.graph_runner = None

    def run(self, inputs: list):
        if self.cuda_graphs:
            outputs = self.graph_runner(inputs) if self.graph_runner is not None else None
            if outputs is None:  # not captured yet, or a captured tensor was rebound: capture anew
                from .cudagraphs import CudaGraphRunner
                static = [inp.arg_index is None for inp in self.traced.inputs]
                self.graph_runner = CudaGraphRunner(self.run_module, inputs, static)
                outputs = self.graph_runner(inputs)
        else:
            outputs = self.run_module(*inputs)
        return self.traced.output_structure(list(outputs))

    def __call__(self, args: tuple):
        """Run at ``args`` (the caller checked the guards)."""
        inputs = self.reader(args)
        return self.run(inputs if inputs is not None else self.traced.input_values(args))


def stage(f, args: tuple, backend: str | None = None, cuda_graphs: bool = False) -> Staged | None:
    """Trace and generate ``f`` at ``args``; None where ``f`` reaches a module with hooks."""
    traced, guards = guarded_trace(f, args)
    if traced is None:
        return None
    gm = traced.builder.module()
    reader = InputReader(traced, guards, args, writes_inputs(traced.graph))
    optimize(gm, recompute=True)
    return Staged(traced, gm, guards, reader, backend, cuda_graphs)


class Eager:
    """A cache entry that runs the function eagerly while its guards hold (hooks are registered)."""

    def __init__(self, guards: Guards):
        self.guards = guards


class ProgramCache:
    """Programs of one compiled callable, by call signature, each with its guards; bounded."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit = name, limit
        self.entries: dict = {}
        self.count = 0
        self.warned = False

    def __len__(self) -> int:
        return self.count

    def lookup(self, key):
        """(entry, inputs) of the first entry for ``key`` whose guards hold, else (None, None);
        ``inputs`` is a function of the arguments returning the program's inputs or None."""
        return self.entries.get(key, ())

    def full(self, key) -> bool:
        if self.count < self.limit:
            return False
        if not self.warned:
            self.warned = True
            reason = "its guards failed on " + (", ".join(self._failing(key)[:5]) or "global state") \
                if key in self.entries else "a new call signature (shapes, dtypes, structure, constants)"
            warnings.warn(f"zt.compile: {self.name} has {self.count} programs, its cache limit (cache_limit="
                          f"{self.limit}); calls that match none of them now run eagerly, on the dynamic path. "
                          f"The call that reached the limit needed a new program for {reason}.", stacklevel=4)
        return True

    def _failing(self, key) -> list[str]:
        return [d for entry in self.entries[key] for d in entry.guards.failing()]

    def add(self, key, entry) -> None:
        """Keep ``entry`` for ``key``. An :class:`Eager` entry replaces the key's earlier one and does
        not count towards the limit (hooks that change at every call would fill it)."""
        entries = self.entries.setdefault(key, [])
        if isinstance(entry, Eager):
            entries[:] = [e for e in entries if not isinstance(e, Eager)]
        else:
            self.count += 1
        entries.append(entry)
