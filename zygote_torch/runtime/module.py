"""``zt.compile(module)``: a drop-in module for an unchanged PyTorch training loop, whose forward
runs our staged forward program and whose backward runs our generated backward, through a
``torch.autograd.Function`` bridge.

    cm = zt.compile(model)
    loss = F.cross_entropy(cm(x), y); loss.backward(); opt.step()

The compiled module *is* the model to the rest of PyTorch: its parameters, buffers and
``state_dict`` keys are the model's own (``cm.state_dict()`` loads into the plain model and back),
as are ``named_modules``, ``apply``, ``to``/``half``, ``train()``/``eval()``, attribute, index and
``len`` access (``cm.config``, ``cm[0]``, ``len(cm)``); an optimizer built on either works.
``forward`` takes keyword arguments. Programs are cached per call signature, grad mode and
``requires_grad`` of the inputs, with the guards of ``runtime/guards.py``: a submodule switched to
``eval()``, a replaced parameter or buffer, a changed attribute retraces (a rebound parameter of the
same shape is simply read). Buffers are inputs updated in place by the forward, so BatchNorm running
statistics move as in eager mode.

Eager instead, so that PyTorch's semantics hold exactly: a module tree with hooks (they run at
every call), calls under another transform or tracer (``torch.func``, ``torch.compile``,
``torch.export``, an outer ``zt.compile`` or ``zt.gradient``), tensor subclasses, and calls past
the cache limit. ``create_graph=True`` (double backward) differentiates an eager recomputation of
the forward with the same random state. Under ``torch.autocast`` the backward program runs under
the autocast state it was traced with. ``backend=`` hands the forward and backward programs to
``torch.compile``. ``zt.compile(DistributedDataParallel(m))`` is refused: DDP synchronises through
hooks on its forward, which a program does not run; ``DDP(zt.compile(m))`` synchronises as DDP over
eager does. A module sharded by ``fully_shard`` (FSDP2) runs as written, with each innermost unit's
forward compiled (:class:`_UnitForward`): FSDP's hooks gather, free and reduce-scatter around it.
"""
from __future__ import annotations

import contextlib
import copy
import operator
import warnings

import torch
from torch.utils._device import DeviceContext

from ..ad.tangents import is_differentiable
from ..capture.op_classes import op_class
from ..capture.recorder import is_staging
from ..errors import ZygoteError
from ..passes.mincut import _bytes
from .guards import InputReader, autocast_state
from .staged import Program, build
from .staging import CACHE_LIMIT, Eager, ProgramCache, Staged, TraceWroteState, guarded_trace, signature, writes_inputs

_OWN = ("_zt_module", "_zt_cache", "_zt_options", "_zt_eager_reason", "_zt_call")  # the wrapper's own attributes
_REQUIRES = operator.attrgetter("requires_grad")


def _call(module, args, kwargs):
    return module(*args, **kwargs)


def _call_forward(module, args, kwargs):
    """``module``'s class forward, without its hooks (an FSDP2 unit: its ``__call__`` runs them)."""
    return type(module).forward(module, *args, **kwargs)


class _Bridge(torch.autograd.Function):
    """forward: our forward program; backward: our backward program on the saved residuals (an eager
    recomputation differentiated by torch.autograd under ``create_graph=True``)."""

    @staticmethod
    def forward(ctx, call, *inputs):
        entry = call.entry
        program = entry.program
        rng = _rng_state(inputs) if entry.random else None
        results = program.forward(*inputs)
        n = program.n_outputs
        outputs, residuals = results[:n], results[n:]
        ctx.call, ctx.inputs, ctx.rng = call, inputs, rng
        ctx.save_for_backward(*residuals)
        ctx.mark_non_differentiable(*[o for o in outputs if isinstance(o, torch.Tensor) and not is_differentiable(o)])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *douts):
        entry = ctx.call.entry
        program = entry.program
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            grads = entry.recompute_gradients(ctx.call, ctx.inputs, ctx.rng, douts)
        else:
            dys = [douts[i] for i in program.seeded_outputs]
            with _autocast(entry.autocast):
                grads = program.backward(*ctx.saved_tensors, *dys)
        per_input = [None] * len(ctx.inputs)
        for k, i in enumerate(program.joint.wrt):
            per_input[i] = grads[k]
        return (None, *per_input)


class _Call:
    """One call of a differentiated program: its entry and arguments (for a recomputation)."""

    __slots__ = ("entry", "args", "kwargs")

    def __init__(self, entry, args, kwargs):
        self.entry, self.args, self.kwargs = entry, args, kwargs


class _Differentiated:
    """A cached program with a backward: the Program, its guards and input reader, and what the
    bridge needs (autocast state, whether it draws random numbers, an eager recomputation)."""

    def __init__(self, program: Program, guards, reader, requires: tuple, compiled: "CompiledModule", backend):
        self.program, self.guards, self.reader, self.requires = program, guards, reader, requires
        self.autocast = autocast_state()
        self.random = any(op_class(n).random for n in program.forward.graph.nodes if n.op != "placeholder")
        self.compiled = compiled
        if backend is not None:
            program.forward = torch.compile(program.forward, backend=backend)
            program.backward = torch.compile(program.backward, backend=backend)

    def recompute_gradients(self, call: _Call, inputs, rng, douts):
        """Gradients that torch.autograd can differentiate again: the forward run eagerly, with the
        random state of the first run, differentiated by torch.autograd (``create_graph=True``).
        Buffers the forward updates are updated in copies, so they stay as the first run left them."""
        from ..passes.aliasing import Aliasing
        program = self.program
        aliasing = Aliasing(program.traced.graph)
        written = [t for t, inp in zip(inputs, program.traced.inputs) if aliasing.written_anywhere(inp.node)]
        if written and _reads_written_input(program):
            raise ZygoteError("create_graph=True through zt.compile(module): the module's forward reads a buffer "
                              "it also updates in place, so it cannot be run again to differentiate its backward; "
                              "call the module itself for double backward")
        module, run = self.compiled._zt_module, self.compiled._zt_call
        buffers = {id(b): name for name, b in module.named_buffers()}
        copies = {buffers[id(t)]: t.detach().clone() for t in written if id(t) in buffers}  # updated instead
        if copies and run is _call_forward:
            raise ZygoteError("create_graph=True through an FSDP2 unit whose forward updates a buffer in place: "
                              "it cannot be run again apart from FSDP's hooks; use the module without zt.compile")
        others = [(t, t.detach().clone()) for t in written if id(t) not in buffers]
        wrt = [inputs[i] for i in program.joint.wrt]
        with torch.enable_grad(), _rng_restored(rng), _autocast(self.autocast):
            outputs = torch.func.functional_call(module, copies, call.args, call.kwargs, strict=False) \
                if copies else run(module, call.args, call.kwargs)
        with torch.no_grad():
            for t, value in others:  # as after the first run (.data: the recomputation's graph may hold t)
                t.data.copy_(value)
        out_leaves = [o for o in _leaves(outputs)]
        pairs = [(o, d) for o, d in zip(out_leaves, douts) if isinstance(o, torch.Tensor) and o.requires_grad
                 and d is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [d for _, d in pairs], create_graph=True,
                                    allow_unused=True) if pairs else [None] * len(wrt)
        return list(grads)


def _leaves(outputs):
    from ..capture.pytree import flatten
    return flatten(outputs)[0]


def _reads_written_input(program: Program) -> bool:
    """Whether an output depends on an input the forward writes (then a recomputation differs)."""
    from ..passes.aliasing import Aliasing, written_nodes
    graph = program.traced.graph
    aliasing = Aliasing(graph)
    written = {n for n in graph.nodes if n.op == "placeholder" and aliasing.written_anywhere(n)}
    output = next(n for n in graph.nodes if n.op == "output")
    stack, needed = list(output.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        targets = written_nodes(n)
        stack.extend(a for a in n.all_input_nodes if a not in targets)
    return bool(needed & written)


def _rng_state(inputs) -> tuple:
    devices = sorted({t.device.index or 0 for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda})
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


@contextlib.contextmanager
def _rng_restored(rng):
    if rng is None:
        yield
        return
    cpu, cuda = rng
    with torch.random.fork_rng(devices=[d for d, _ in cuda]):
        torch.set_rng_state(cpu)
        for d, state in cuda:
            torch.cuda.set_rng_state(state, d)
        yield


def _autocast(state):
    """Enter the autocast state a program was traced under (the backward runs outside the user's
    ``torch.autocast`` block)."""
    if state is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for device, enabled, dtype in state:
        if enabled:
            stack.enter_context(torch.autocast(device, dtype=dtype))
    return stack


def _foreign_tracing(flat: list) -> bool:
    """Whether another transform or tracer is running, or an input is a tensor subclass: the
    module then runs as itself, so that transform sees PyTorch's ops."""
    if is_staging() or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if any(not isinstance(m, DeviceContext) for m in torch.overrides._get_current_function_mode_stack()):
        return True
    return any(isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter) for t in flat)


def _sharded_units(module: torch.nn.Module) -> list:
    """The modules ``fully_shard`` (FSDP2) made units of inside ``module``, innermost ones only (no
    unit inside them)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    return [u for u in units if not any(isinstance(d, FSDPModule) for d in u.modules() if d is not u)]


class _UnitForward:
    """The forward of one innermost FSDP2 unit, run by our programs. FSDP's hooks run around it in
    the unit's own ``__call__``: they gather the parameters before it (the program reads them, and
    its backward receives them gathered again by FSDP's pre-backward hook on its outputs) and free
    them after; the gradients reach the gathered parameters, which FSDP reduce-scatters."""

    __slots__ = ("compiled",)

    def __init__(self, compiled: "CompiledModule"):
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        return self.compiled.forward(*args, **kwargs)

    def __deepcopy__(self, memo):
        unit = copy.deepcopy(self.compiled._zt_module, memo)
        return _UnitForward(CompiledModule(unit, _unit=True, **self.compiled._zt_options))


def _compile_units(module: torch.nn.Module, options: dict) -> str | None:
    """For a module sharded by ``fully_shard``: each innermost unit's forward becomes one of our
    programs (see :class:`_UnitForward`), and the module itself runs as written around them (its
    outer units' hooks, which gather, free and reduce-scatter, cannot be run by a program). The
    reason the module itself is not staged, or None where it is not sharded."""
    units = _sharded_units(module)
    for unit in units:
        if not isinstance(unit.__dict__.get("forward"), _UnitForward):
            unit.forward = _UnitForward(CompiledModule(unit, _unit=True, **options))
    return "sharded by fully_shard (FSDP2): its innermost units run our programs" if units else None


def _refuse_ddp(module: torch.nn.Module) -> None:
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(module, DistributedDataParallel):
        raise ZygoteError("zt.compile(DistributedDataParallel(model)): DDP synchronises gradients through hooks of "
                          "its forward, which a staged program does not run, so ranks would drift apart. Write "
                          "DistributedDataParallel(zt.compile(model)): DDP then synchronises as over the eager model")


class CompiledModule(torch.nn.Module):
    """``module`` itself to PyTorch (same parameters, buffers, ``state_dict``, submodules,
    attributes), with a staged forward and backward (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, memory_budget: float | None = None, backend: str | None = None,
                 cuda_graphs: bool = False, cache_limit: int = CACHE_LIMIT, _unit: bool = False):
        _refuse_ddp(module)
        if cuda_graphs:
            raise ZygoteError("zt.compile(module, cuda_graphs=True) is not supported: the backward runs in "
                              "torch.autograd's engine; use zt.compile(step_function, cuda_graphs=True)")
        if memory_budget is not None and (not isinstance(memory_budget, (int, float)) or memory_budget < 0):
            raise ZygoteError(f"zt.compile(module, memory_budget={memory_budget!r}): a number of bytes (>= 0)")
        super().__init__()
        d = self.__dict__
        d["_zt_module"] = module
        d["_zt_options"] = {"memory_budget": memory_budget, "backend": backend, "cache_limit": cache_limit}
        d["_zt_cache"] = ProgramCache(f"zt.compile({type(module).__name__})", cache_limit)
        d["_zt_call"] = _call_forward if _unit else _call  # an FSDP2 unit: its forward, its hooks run outside
        d["_zt_eager_reason"] = None if _unit else _compile_units(module, d["_zt_options"])
        # PyTorch's view of the module: the wrapped module's own dictionaries, so names and keys are its
        for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            d[name] = getattr(module, name)
        d["training"] = module.training

    # -- the module itself, to PyTorch ------------------------------------------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_zt_module"], name)

    def __setattr__(self, name, value):
        if name in _OWN:
            self.__dict__[name] = value
        elif name == "training":
            self.__dict__["training"] = value
        else:
            setattr(self._zt_module, name, value)

    def __delattr__(self, name):
        delattr(self._zt_module, name)

    def __getitem__(self, index):
        return self._zt_module[index]

    def __len__(self):
        return len(self._zt_module)

    def __bool__(self):
        return True

    def __iter__(self):
        return iter(self._zt_module)

    def __contains__(self, item):
        return item in self._zt_module

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self._zt_module)))

    def __repr__(self):
        return f"zt.compile({self._zt_module!r})"

    def state_dict(self, *args, **kwargs):
        return self._zt_module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self._zt_module.load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True):
        self._zt_module.train(mode)
        self.__dict__["training"] = mode
        return self

    def apply(self, fn):
        self._zt_module.apply(fn)
        return self

    def _apply(self, fn, recurse=True):
        self._zt_module._apply(fn, recurse)
        return self

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        return self._zt_module.named_modules(memo, prefix, remove_duplicate)

    def extra_repr(self) -> str:
        return ""

    def __deepcopy__(self, memo):
        return CompiledModule(copy.deepcopy(self._zt_module, memo), **self._zt_options)

    def __reduce_ex__(self, protocol):
        return (_rebuild, (self._zt_module, self._zt_options))

    # -- running -----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        module, run = self._zt_module, self._zt_call
        full = (module, args, kwargs)
        if self._zt_eager_reason is not None:
            return run(module, args, kwargs)
        flat = [x for a in (args, kwargs) for x in _leaves(a)]
        if _foreign_tracing(flat):
            return run(module, args, kwargs)
        grad = torch.is_grad_enabled()
        key = (signature(full), grad)
        cache = self._zt_cache
        for entry in cache.lookup(key):
            if entry.guards.check():
                if isinstance(entry, Eager):
                    return run(module, args, kwargs)
                inputs = entry.reader.read(full, None)
                if inputs is not None and _requires(inputs) == entry.requires:
                    return self._run(entry, inputs, args, kwargs)
        if cache.full(key):
            return run(module, args, kwargs)
        try:
            entry = self._trace(full, grad)
        except TraceWroteState as changed:
            self.__dict__["_zt_eager_reason"] = str(changed)
            warnings.warn(f"zt.compile: tracing {type(module).__name__}.forward changed Python state it reads "
                          f"({changed}), which a staged program cannot do again at each call: it runs eagerly "
                          "from now on.", stacklevel=2)
            return run(module, args, kwargs)
        cache.add(key, entry)
        if isinstance(entry, Eager):
            return run(module, args, kwargs)
        return self._run(entry, entry.reader(full), args, kwargs)

    def _trace(self, full: tuple, grad: bool):
        run = self._zt_call
        traced, guards = guarded_trace(run, full, unhooked=(full[0],) if run is _call_forward else ())
        if traced is None:  # hooks: eager while they are registered
            return Eager(guards)
        inputs = traced.input_values(full)
        requires = _requires(inputs)
        if not (grad and any(requires)):
            gm = traced.builder.module()
            from ..passes import optimize
            optimize(gm, recompute=True)
            reader = InputReader(traced, guards, full, writes_inputs(traced.graph))
            staged = Staged(traced, gm, guards, reader, self._zt_options["backend"])
            staged.requires, staged.differentiating = requires, False
            return staged
        budget = self._zt_options["memory_budget"]
        program = build(run, full, seeded=True, differentiate=_requires_grad, memory_budget=budget, traced=traced)
        reader = InputReader(traced, guards, full, writes_inputs(traced.graph))
        if budget is not None:
            _check_budget(program, budget)
        return _Differentiated(program, guards, reader, requires, self, self._zt_options["backend"])

    def _run(self, entry, inputs: list, args, kwargs):
        if not isinstance(entry, _Differentiated):
            with torch.no_grad():
                return entry.run(inputs)
        outputs = _Bridge.apply(_Call(entry, args, kwargs), *inputs)
        return entry.program.traced.output_structure(list(outputs))


def _requires(inputs: list) -> tuple:
    return tuple(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


def _requires_grad(inp, value) -> bool:
    """Differentiate the inputs autograd will ask about: those that require grad."""
    return isinstance(value, torch.Tensor) and value.requires_grad


def _check_budget(program: Program, budget: float) -> None:
    """Warn where the residuals the backward keeps (program inputs aside) exceed ``budget`` bytes."""
    inputs = {n.name for n in program.forward.graph.nodes if n.op == "placeholder"}
    kept = sum(_bytes(n.meta.get("val")) for n in program.backward.graph.nodes
               if n.op == "placeholder" and n.name in program.residuals and n.name not in inputs)
    if kept > budget:
        warnings.warn(f"zt.compile(module, memory_budget={budget:g}): the backward needs {kept:.0f} bytes of "
                      "residuals even recomputing every pure op; the budget cannot be met", stacklevel=4)


def _rebuild(module, options):
    return CompiledModule(module, **options)
