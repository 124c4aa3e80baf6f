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

What this shares with ``zt.compile(module)`` (``runtime/module.py``): signatures, guarded traces,
generated programs and their cache, is ``runtime/staging.py``.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import ZygoteError
from .guards import leaves_of, walk
from .module import CompiledModule
from .staging import CACHE_LIMIT, Eager, ProgramCache, Staged, TraceWroteState, signature, stage


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
        return CompiledModule(f, memory_budget=memory_budget, backend=backend, cuda_graphs=cuda_graphs,
                              cache_limit=cache_limit)
    if memory_budget is not None:
        raise ZygoteError("zt.compile(f, memory_budget=...): a function's program computes its forward and "
                          "backward in one go, with nothing kept between them to bound; memory_budget applies "
                          "to zt.compile(module), whose backward runs later from kept residuals")
    return CompiledFunction(f, backend, cuda_graphs, cache_limit)
