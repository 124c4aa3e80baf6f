"""``zt.compile``: staged, cached execution with JAX-jit semantics.

``zt.compile(f)`` traces ``f`` on fake tensors once per input signature (pytree structure, shapes,
dtypes, devices, the values of non-tensor leaves, the registry version) into a forward graph,
optimises it, generates Python, and runs that on later calls with the same signature. Tensors ``f``
reaches by itself (parameters, globals) are inputs of the graph, read at each call: in-place
optimizer updates are seen. Python-level state is frozen at trace time, as under ``jax.jit``: a
global number rebound, a branch on a Python flag, a ``len`` of a global list keep their traced value.

``zt.gradient``, ``zt.withgradient`` and ``zt.pullback`` called inside ``f`` record their backward
into the same graph, so ``zt.compile(lambda m, x, y: zt.withgradient(loss, m))`` is one program;
so is a whole training step that updates the parameters in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ad.registry import REGISTRY
from ..capture.pytree import flatten
from ..capture.trace import Traced, is_python_float, trace
from ..passes import optimize


def _leaf_signature(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device.type, x.device.index)
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
        return ("module", id(obj), tuple(id(p) for p in obj.parameters()), obj.training)
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(_structure_signature(x) for x in obj))
    if isinstance(obj, dict):
        return (type(obj), tuple((k, _structure_signature(v)) for k, v in obj.items()))
    return type(obj)


def _autocast_state() -> tuple | None:
    """Autocast changes the ops' dtypes, so a program traced under it is another program."""
    if not torch._C._is_any_autocast_enabled():
        return None
    return tuple((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                 for device in ("cpu", "cuda"))


def signature(args: tuple) -> tuple:
    leaves = [_leaf_signature(x) for a in args for x in flatten(a)[0]]
    return (REGISTRY.version, _autocast_state(), tuple(_structure_signature(a) for a in args), tuple(leaves))


@dataclass
class Staged:
    """One traced and generated program, run as Python, through torch.compile, or in a CUDA graph."""

    traced: Traced
    module: fx.GraphModule
    backend: str | None = None
    cuda_graphs: bool = False

    def __post_init__(self):
        self.run = self.module if self.backend is None else torch.compile(self.module, backend=self.backend)
        self.graph_runner = None

    def __call__(self, args: tuple):
        inputs = self.traced.input_values(args)
        if self.cuda_graphs:
            if self.graph_runner is None:
                from .cudagraphs import CudaGraphRunner
                static = [inp.arg_index is None for inp in self.traced.inputs]
                self.graph_runner = CudaGraphRunner(self.run, inputs, static)
            outputs = self.graph_runner(inputs)
        else:
            outputs = self.run(*inputs)
        return self.traced.output_structure(list(outputs))


def stage(f, args: tuple, backend: str | None = None, cuda_graphs: bool = False) -> Staged:
    traced = trace(f, args)
    gm = traced.builder.module()
    optimize(gm, recompute=True)
    return Staged(traced, gm, backend, cuda_graphs)


class CompiledFunction:
    """A function staged once per input signature; ``.code(*args)`` shows the generated program."""

    def __init__(self, f, backend: str | None = None, cuda_graphs: bool = False):
        self.f, self.backend, self.cuda_graphs = f, backend, cuda_graphs
        self.cache: dict = {}
        self.__name__ = getattr(f, "__name__", "compiled")
        self.__doc__ = getattr(f, "__doc__", None)

    def program(self, args: tuple) -> Staged:
        key = signature(args)
        staged = self.cache.get(key)
        if staged is None:
            staged = self.cache[key] = stage(self.f, args, self.backend, self.cuda_graphs)
        return staged

    def __call__(self, *args):
        with torch.no_grad():
            return self.program(args)(args)

    def code(self, *args) -> str:
        return self.program(args).module.code


def compile(f, *, backend: str | None = None, cuda_graphs: bool = False, memory_budget: float | None = None):
    """Stage ``f`` (see the module docstring): ``step = zt.compile(f); step(*args)``.

    ``backend="inductor"`` (or any ``torch.compile`` backend) hands the generated program to
    ``torch.compile``; ``cuda_graphs=True`` captures it into a CUDA graph and replays it (static
    shapes; a new signature is captured anew; outputs are overwritten by the next call).
    An ``nn.Module`` gives a module for an unchanged PyTorch loop (see ``runtime/module.py``), whose
    forward keeps at most ``memory_budget`` bytes of residuals for its backward where it can."""
    if isinstance(f, torch.nn.Module):
        from .module import CompiledModule
        return CompiledModule(f, memory_budget)
    return CompiledFunction(f, backend, cuda_graphs)
