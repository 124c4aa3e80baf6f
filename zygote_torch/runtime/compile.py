"""``zt.compile``: staged, cached execution, guarded as ``torch.compile`` is.

``zt.compile(f)`` traces ``f`` on fake tensors into a forward graph, optimises it, generates Python,
and runs that on later calls. A program is reused for a call when

- the call signature matches: the pytree structure of the arguments, their tensors' shapes, dtypes
  and devices, the values of their non-tensor leaves, the identities of modules and objects passed;
- its guards hold (``runtime/guards.py``): every Python value the trace could read through ``f``'s
  closure, globals, defaults and arguments is what it was (numbers, flags, module training flags,
  hooks, which objects are where), and so is the global state (registry version, autocast, default
  dtype, kernel settings);
- the tensors it captured (parameters, buffers, globals), read afresh at each call from where they
  were found, have their traced shapes, dtypes and devices.

Otherwise ``f`` is traced again, up to ``cache_limit`` programs per compiled function (as
``torch.compile``'s cache size limit); past it a warning says why, and calls that match no program
run ``f`` eagerly: the dynamic path (``zt.gradient`` inside ``f`` records as it runs), exactly, and
bounded in memory. So does a call reaching a module with hooks (the hooks run at every call), and,
from then on, a function whose tracing wrote to Python state the guards cover (``self.count += 1``):
a trace cannot replay that, so the state is restored and ``f`` runs eagerly.

``zt.gradient``, ``zt.withgradient`` and ``zt.pullback`` called inside ``f`` record their backward
into the same graph, so ``zt.compile(lambda m, x, y: zt.withgradient(loss, m))`` is one program;
so is a whole training step that updates the parameters in place.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..capture.trace import Traced, is_python_float, trace
from ..errors import ZygoteError
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


def guarded_trace(f, args: tuple) -> tuple[Traced, Guards]:
    """Trace ``f(*args)`` with its guards; :class:`TraceWroteState` (state restored) if tracing
    wrote to what the guards read."""
    guards = walk(f, args)
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


class CompiledFunction:
    """A function staged once per input signature and guard state; ``.code(*args)`` shows the
    generated program."""

    def __init__(self, f, backend: str | None = None, cuda_graphs: bool = False, cache_limit: int = CACHE_LIMIT):
        self.f, self.backend, self.cuda_graphs = f, backend, cuda_graphs
        self.__name__ = getattr(f, "__name__", "compiled")
        self.__doc__ = getattr(f, "__doc__", None)
        self.cache = ProgramCache(getattr(f, "__qualname__", self.__name__), cache_limit)
        self.eager_reason: str | None = None

    def _lookup(self, args: tuple):
        """The program that runs ``args`` (traced now if none matches) and its inputs; (None, None)
        for an eager call."""
        if self.eager_reason is not None:
            return None, None
        flats = [leaves_of(a) for a in args]
        key = signature(args, flats)
        for entry in self.cache.lookup(key):
            if entry.guards.check():
                if isinstance(entry, Eager):
                    return None, None
                inputs = entry.reader.read(args, flats)
                if inputs is not None:
                    return entry, inputs
        if self.cache.full(key):
            return None, None
        try:
            staged = stage(self.f, args, self.backend, self.cuda_graphs)
        except TraceWroteState as changed:
            self.eager_reason = str(changed)
            warnings.warn(f"zt.compile: tracing {self.cache.name} changed Python state it reads ({changed}), "
                          "which a staged program cannot do again at each call: it runs eagerly from now on.",
                          stacklevel=3)
            return None, None
        if staged is None:  # a module with hooks: eager while they are registered
            self.cache.add(key, Eager(walk(self.f, args)))
            return None, None
        self.cache.add(key, staged)
        return staged, staged.reader(args)

    def __call__(self, *args):
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # (torch.no_grad() as a context costs more, at every call)
        try:
            staged, inputs = self._lookup(args)
            if staged is None:
                return self.f(*args)
            return staged.run(inputs)
        finally:
            torch._C._set_grad_enabled(enabled)

    def program(self, args: tuple) -> Staged:
        """The program that runs ``args`` (an error where they run eagerly)."""
        with torch.no_grad():
            staged, _ = self._lookup(args)
        if staged is None:
            raise ZygoteError(f"zt.compile: {self.cache.name} runs eagerly at these arguments (hooks, its cache "
                              "limit, or tracing that writes Python state): there is no program to show")
        return staged

    def code(self, *args) -> str:
        return self.program(args).module.code


def compile(f, *, backend: str | None = None, cuda_graphs: bool = False, memory_budget: float | None = None,
            cache_limit: int = CACHE_LIMIT):
    """Stage ``f`` (see the module docstring): ``step = zt.compile(f); step(*args)``.

    ``backend="inductor"`` (or any ``torch.compile`` backend) hands the generated program to
    ``torch.compile``; ``cuda_graphs=True`` captures it into a CUDA graph and replays it (static
    shapes; a new signature is captured anew; outputs are overwritten by the next call);
    ``cache_limit``: programs kept per compiled function before calls run eagerly.
    An ``nn.Module`` gives a module for an unchanged PyTorch loop (see ``runtime/module.py``), whose
    forward keeps at most ``memory_budget`` bytes of residuals for its backward where it can. A
    function's backward is part of its one program, with no residuals to bound: ``memory_budget``
    is refused there."""
    if isinstance(f, torch.nn.Module):
        from .module import CompiledModule
        return CompiledModule(f, memory_budget=memory_budget, backend=backend, cuda_graphs=cuda_graphs,
                              cache_limit=cache_limit)
    if memory_budget is not None:
        raise ZygoteError("zt.compile(f, memory_budget=...): a function's program computes its forward and "
                          "backward in one go, with nothing kept between them to bound; memory_budget applies "
                          "to zt.compile(module), whose backward runs later from kept residuals")
    return CompiledFunction(f, backend, cuda_graphs, cache_limit)
