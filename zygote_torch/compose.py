"""zt's results inside torch.autograd and torch.func, as ``torch.func.grad``'s are.

Every public API call is a raw computation (torch.autograd off, see :mod:`.api`) handed to
:func:`connected`, which makes its result:

- **connected to an outer torch.autograd graph** when grad mode is on and the call read a tensor
  that requires grad (an argument, a parameter reached through a closure or a module, a cotangent
  given to ``back``): the result's tensors are the outputs of one ``torch.autograd.Function`` node
  whose inputs are those tensors. So ``loss(zt.gradient(g, x)).backward()`` is the derivative of
  the gradient, as ``torch.autograd.grad(..., create_graph=True)`` gives it (a gradient penalty,
  MAML, a physics-informed loss);
- **one op under torch.func transforms** when an argument is a ``torch.func`` tensor
  (``torch.func.grad``/``vjp``/``jacrev`` over a function that calls ``zt.gradient``, and
  ``torch.func.vmap`` over it: per-sample gradients, one sample at a time).

The node's backward is the vector-Jacobian product of the whole call, computed by zt itself: the
call runs again on a tape that tracks the node's inputs (nested differentiation, as
``zt.gradient(lambda x: zt.gradient(f, x)[0] ...)`` runs), with the random number generators in the
state the first run saw, and module buffers or other tensors the call mutates (BatchNorm's running
statistics) restored afterwards, so the rerun changes nothing. The rerun's result is compared with
the first run's: a function whose result depends on something else that changed in between (a
Python global, an unseeded generator) is a :class:`ZygoteError`, never a silently wrong derivative.
That backward is itself a connected call, so derivatives of any order compose.

No cost when nothing requires grad (or grad mode is off); otherwise one node per call, and the
recomputation only if torch.autograd asks for the derivative.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .ad.recording import recording, state as _state, watching
from .ad.registry import rrule
from .ad.tangents import is_differentiable
from .ad.tape import Tape
from .capture.pytree import structure
from .capture.recorder import is_staging
from .errors import ZygoteError, describe_frame, user_frame
from .params import Grads, Params

try:
    is_transformed = torch._C._functorch.is_functorch_wrapped_tensor
except AttributeError:  # pragma: no cover
    def is_transformed(t):
        return False

def connected(run, inputs, first=None, theta=(), reached=None, name="zt"):
    """``run()``'s result, connected to torch.autograd or torch.func (see the module docstring).

    ``run(substituted=None)`` computes the result with torch.autograd off; given ``substituted``
    (``inputs``' structure with other tensors) it computes it on those. ``first()``, when given,
    computes the first result instead of ``run()`` (a pullback's ``back`` reusing its tape).
    ``theta``: tensors the result depends on that this run may not read again (those a pullback's
    forward read); ``reached``, a list: receives the tensors requiring grad that the run read;
    ``name``: how errors name the call (anything whose ``str`` does, computed only then).
    """
    first = first or run
    leaves, shape = _input_structure(inputs)
    if any(isinstance(t, torch.Tensor) and is_transformed(t) for t in leaves):
        return _through_torch_func(run, leaves, shape, name)
    if not torch.is_grad_enabled() or is_staging():
        return first()
    watch: dict = {}
    rng = _RngState()
    previous = watching()
    _state.watch = watch
    try:
        result = first()
    finally:
        _state.watch = previous
    for t in theta:
        watch[id(t)] = t
    if reached is not None:
        reached.extend(watch.values())
    explicit, seen = [], set()
    for i, t in enumerate(leaves):
        if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            explicit.append(i)
    implicit = [t for key, t in watch.items() if key not in seen]
    if not explicit and not implicit:
        return result
    outputs = _Outputs(result)
    if not outputs.tensors:
        return result
    node = _Node(run, leaves, shape, explicit, implicit, rng, name, substitute=False)
    node.outputs, node.precomputed = outputs, outputs.tensors
    inputs = node.inputs
    if torch._C._are_functorch_transforms_active() or any(is_transformed(t) for t in inputs):
        return outputs.rebuild(_Precomputed.apply(node, *inputs))
    return outputs.rebuild(_apply_precomputed(node, *inputs))


_SIMPLE_ARGUMENTS = frozenset((torch.Tensor, torch.nn.Parameter, Params))


def _input_structure(inputs):
    """``structure(inputs)``, the structure built only when a rerun needs it, for the call shape of
    nearly every API call: ``(args, {})`` with tensors and ``Params`` as the arguments."""
    if type(inputs) is tuple and len(inputs) == 2 and type(inputs[0]) is tuple and type(inputs[1]) is dict \
            and not inputs[1] and all(type(a) in _SIMPLE_ARGUMENTS for a in inputs[0]):
        return list(inputs[0]), _LazyStructure(inputs)
    return structure(inputs)


class _LazyStructure:
    """A structure computed at its first use."""

    __slots__ = ("inputs", "shape")

    def __init__(self, inputs):
        self.inputs, self.shape = inputs, None

    def argument(self, leaves):
        if self.shape is None:
            self.shape = structure(self.inputs)[1]
            self.inputs = None
        return self.shape.argument(leaves)


def _through_torch_func(run, leaves, shape, name):
    """The call as one op of the torch.func transform its arguments come from."""
    explicit, seen = [], set()
    for i, t in enumerate(leaves):
        if isinstance(t, torch.Tensor) and (is_transformed(t) or t.requires_grad) and id(t) not in seen:
            seen.add(id(t))
            explicit.append(i)
    node = _Node(run, leaves, shape, explicit, [], None, name, substitute=True)
    outs = _Connection.apply(node, *node.inputs)
    return node.outputs.rebuild(outs)


class _Outputs:
    """A result's structure and its distinct tensors (the outputs of the autograd node). It keeps
    no tensor once :meth:`rebuild` has run (a node holding its outputs would be a reference cycle)."""

    def __init__(self, result):
        if type(result) is Grads:  # zt.gradient(f, ps): most calls
            leaves, self.shape = result.values(), _GradsOf(result.params)
        elif type(result) is tuple and len(result) == 2 and type(result[0]) is torch.Tensor \
                and type(result[1]) is Grads:  # (value, gradients) of zt.withgradient(f, ps)
            leaves, self.shape = [result[0], *result[1].values()], _ValueAndGrads(result[1].params)
        else:
            leaves, self.shape = structure(result)
        self.positions: list = []  # per leaf: index among the tensors, or None
        self.tensors: list = []
        index: dict = {}
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if id(leaf) not in index:
                    index[id(leaf)] = len(self.tensors)
                    self.tensors.append(leaf)
                self.positions.append(index[id(leaf)])
            else:
                self.positions.append(None)
        self.constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    def rebuild(self, tensors):
        self.tensors = None
        return self.shape.argument([c if k is None else tensors[k] for c, k in zip(self.constants, self.positions)])

    def same_structure(self, other: "_Outputs") -> bool:
        return self.positions == other.positions and all(
            k is not None or a is b or _equal_constants(a, b)
            for a, b, k in zip(self.constants, other.constants, self.positions))


class _GradsOf:
    """The structure of a ``Grads``: a gradient per parameter."""

    __slots__ = ("params",)

    def __init__(self, params: Params):
        self.params = params

    def argument(self, leaves):
        return Grads.of(self.params, leaves)


class _ValueAndGrads:
    """The structure of ``(value, Grads)``: the leaves are the value, then a gradient per parameter."""

    __slots__ = ("params",)

    def __init__(self, params: Params):
        self.params = params

    def argument(self, leaves):
        return leaves[0], Grads.of(self.params, leaves[1:])


def _equal_constants(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


class _Node:
    """One connected call: how to run it again, on which tensors, and what it gave."""

    def __init__(self, run, leaves, shape, explicit, implicit, rng, name, substitute: bool):
        self.run, self.leaves, self.shape = run, leaves, shape
        self.explicit = explicit  # indices of the input leaves that are inputs of the node
        self.implicit = implicit  # tensors f reached by itself (by identity: closures, modules)
        self.rng, self.name, self.substitute = rng, name, substitute
        self.outputs: _Outputs | None = None
        self.precomputed = None

    @property
    def inputs(self) -> list:
        return [self.leaves[i] for i in self.explicit] + list(self.implicit)

    def result(self, explicit=None):
        """The call's result, run again (on ``explicit`` tensors in place of the node's inputs)."""
        if explicit is None:
            return self.run()
        leaves = list(self.leaves)
        for i, t in zip(self.explicit, explicit):
            leaves[i] = t
        return self.run(self.shape.argument(leaves))

    def forward(self, inputs):
        if self.precomputed is not None:  # connected to torch.autograd: computed already
            out, self.precomputed = self.precomputed, None
        else:
            outputs = _Outputs(self.result(list(inputs)))
            if self.outputs is not None and not self.outputs.same_structure(outputs):
                raise ZygoteError(f"{self.name}: the result's structure differs between calls (which gradients "
                                  "are None, or a number in it); torch.func needs the same structure every time")
            self.outputs, out = outputs, outputs.tensors
        given = {id(t) for t in inputs}  # an input returned as it is: autograd wants a view of it
        return tuple(t.view_as(t) if id(t) in given else t for t in out)

    def backward(self, saved_inputs, saved_outputs, douts):
        if all(d is None for d in douts):
            return (None,) * len(saved_inputs)
        if self.substitute:  # under torch.func: the tensors of this level, run again by substitution
            inputs, check = list(saved_inputs), None
        else:  # the original tensors: the call reads its closures and modules by identity
            inputs, check = self.inputs, saved_outputs

        def vjp(substituted=None):
            if substituted is None:
                return _vjp(self, inputs, list(douts), None, check)
            ins, ds = substituted
            return _vjp(self, ins, ds, ins[:len(self.explicit)], None)

        grads = connected(vjp, (inputs, list(douts)), name=self.name)
        return tuple(grads)

    def sample(self) -> "_Node":
        """A node for one sample of a vmapped call (its own output structure)."""
        node = _Node(self.run, self.leaves, self.shape, self.explicit, [], None, self.name, substitute=True)
        return node

    def vmap(self, info, in_dims, inputs):
        """torch.func.vmap over a zt call: the call once on batched tensors where the tape allows
        it (see :func:`_batched`), else one sample at a time, the results stacked."""
        if _tape_runs_under_vmap() and not any(isinstance(t, torch.Tensor) and is_transformed(t) for t in inputs):
            return self._batched(info, in_dims, inputs)
        per_sample, nodes = [], []
        for b in range(info.batch_size):
            sample = [x if d is None else x.select(d, b) for x, d in zip(inputs, in_dims)]
            node = self.sample()
            per_sample.append(_Connection.apply(node, *sample))
            nodes.append(node)
        template = nodes[0].outputs
        for node in nodes[1:]:
            if not template.same_structure(node.outputs):
                raise ZygoteError(f"{self.name} under torch.func.vmap: the samples' results differ in structure "
                                  "(a gradient None for some samples only, or another number): vmap needs one "
                                  "structure")
        self.outputs, template.tensors = template, None
        stacked = tuple(torch.stack([outs[k] for outs in per_sample]) for k in range(len(per_sample[0])))
        return stacked, (0,) * len(stacked)


    def _batched(self, info, in_dims, inputs):
        """The call run once by ``torch.func.vmap`` (the tape then records on batched tensors)."""
        structures = []

        def per_sample(*sample):
            outputs = _Outputs(self.result(list(sample)))
            structures.append(outputs)
            return tuple(outputs.tensors)

        out = torch.func.vmap(per_sample, in_dims=tuple(in_dims), randomness=info.randomness)(*inputs)
        self.outputs = structures[0]
        self.outputs.tensors = None
        return out, (0,) * len(out)


def _tape_runs_under_vmap() -> bool:
    """Whether the tape records on torch.func.vmap's batched tensors (its check for tensors of a
    torch.func transform then refuses only those of a transform entered after the tape began)."""
    from .ad import tape
    return getattr(tape, "RUNS_UNDER_VMAP", False)


class _Connection(torch.autograd.Function):
    """The autograd node of a connected call: inputs, the tensors it read that require grad (or
    that a torch.func transform wraps); outputs, the tensors of its result."""

    @staticmethod
    def forward(node, *inputs):
        return node.forward(inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.node = inputs[0]
        ctx.n_inputs = len(inputs) - 1
        ctx.save_for_backward(*inputs[1:], *output)
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, _node, *tangents):
        raise ZygoteError(f"{ctx.node.name}: torch.func's forward mode (jvp, jacfwd, hessian) over a zt call is not "
                          "supported; use zt.jvp, zt.hvp or zt.hessian, or torch.func.jacrev over it")

    @staticmethod
    def backward(ctx, *douts):
        saved = ctx.saved_tensors
        inputs, outputs = saved[:ctx.n_inputs], saved[ctx.n_inputs:]
        return (None,) + ctx.node.backward(inputs, outputs, douts)

    @staticmethod
    def vmap(info, in_dims, node, *inputs):
        return node.vmap(info, in_dims[1:], inputs)


class _Precomputed(torch.autograd.Function):
    """:class:`_Connection` for a result computed already (plain tensors: no torch.func
    transform). The ctx-style forward, which torch.autograd applies without binding a signature.

    The node holds its inputs itself (the call reads them by identity when it runs again), so
    only their versions are kept, not saved tensors: one fewer saved tensor per parameter."""

    @staticmethod
    def forward(ctx, node, *inputs):
        outputs = node.forward(inputs)
        ctx.node, node.versions = node, [t._version for t in inputs]
        ctx.save_for_backward(*outputs)
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, *douts):
        node = ctx.node
        inputs = node.inputs
        if any(t._version != v for t, v in zip(inputs, node.versions)):
            raise ZygoteError(f"{node.name}: a tensor this call read (an argument or a parameter) was modified "
                              "in place after the call, before torch.autograd asked for the derivative of its "
                              "result, which is computed by running the call again (as torch.autograd refuses "
                              "a saved tensor modified in place)")
        return (None,) + node.backward(inputs, ctx.saved_tensors, douts)


# torch.autograd.Function.apply without its Python wrapper: that wrapper unwraps dead torch.func
# tensors through a pytree map over the arguments, and there is none here (checked by the caller).
_apply_precomputed = torch._C._FunctionBase.__dict__["apply"].__get__(None, _Precomputed)


def _vjp(node: _Node, inputs: list, douts: list, substituted, check):
    """The cotangents of ``inputs`` for output cotangents ``douts``: the call runs again on a tape
    tracking ``inputs`` (nested differentiation), and its outputs are weighted by ``douts``."""
    tape = Tape()
    for t in inputs:
        tape.track_input(t)
    rng = node.rng.restored() if node.rng is not None else _nothing()
    with rng, _restoring_state():
        with recording(tape):
            outputs = _Outputs(node.result(substituted))
            total = None
            for o, d in zip(outputs.tensors, douts):
                if d is None or not tape.tracks(o) or not is_differentiable(o):
                    continue
                term = _inner(o, d)
                total = term if total is None else total + term
        grads = [None] * len(inputs)
        if total is not None and tape.tracks(total):
            cot = tape.backward([(total, torch.ones_like(total))], keep=False)
            grads = [tape.cotangent(cot, t) for t in inputs]
    if check is not None:
        _verify(node, outputs, check)
    return [None if g is None else g.to(t.dtype) if g.dtype != t.dtype else g for g, t in zip(grads, inputs)]


def _inner(o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """<d, o> as a real number (the real part of conj(d) o for complex values)."""
    if o.is_complex():
        d = d.to(o.dtype)
        return (o.real * d.real + o.imag * d.imag).sum()
    return (o * d.to(o.dtype)).sum()


def _verify(node: _Node, outputs: _Outputs, expected) -> None:
    """The rerun gave the first run's result (up to rounding)."""
    if len(outputs.tensors) == len(expected) and all(
            _close(a, b) for a, b in zip(outputs.tensors, expected)):
        return
    raise ZygoteError(f"{node.name}: torch.autograd asked for the derivative of this call's result, which zt "
                      "computes by running the call again; the second run gave a different result. The "
                      "function must depend only on its arguments, the tensors it reads and the random "
                      "generators' state (a Python global or a torch.Generator that changed in between "
                      "cannot be replayed)")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(a.dtype, 1e-2)
    scale = b.abs().max().item() if b.numel() else 0.0
    return torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, scale), equal_nan=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _RngState:
    """The random generators' state when a call first ran, to run it again the same way."""

    def __init__(self):
        self.cpu = torch.default_generator.get_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restored(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        fork = torch.random.fork_rng(devices=devices)
        state = self

        class _Restored:
            def __enter__(self):
                fork.__enter__()
                torch.set_rng_state(state.cpu)
                if state.cuda is not None:
                    torch.cuda.set_rng_state_all(state.cuda)

            def __exit__(self, *exc):
                return fork.__exit__(*exc)

        return _Restored()


class _restoring_state(TorchDispatchMode):
    """While a call runs again: the tensors that existed before it and that it writes into (module
    buffers: BatchNorm's running statistics, counters) get their old contents back at the end,
    so running it again has no effect outside."""

    def __init__(self):
        super().__init__()
        self.produced: set = set()  # storages the rerun made
        self.saved: dict = {}  # storage key -> (storage, copy of its contents before the rerun)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if schema.is_mutable:
            for argument, value in _schema_values(schema, args, kwargs):
                if argument.alias_info is not None and argument.alias_info.is_write:
                    for t in value if isinstance(value, (list, tuple)) else (value,):
                        self._save(t)
        for i in _UNANNOTATED_WRITES.get(func, ()):
            if i < len(args):
                self._save(args[i])
        out = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            k = _storage_key(t)
            if k is not None and k not in inputs:
                self.produced.add(k)
        return out

    def _save(self, t) -> None:
        k = _storage_key(t)
        if k is None or k in self.produced or k in self.saved:
            return
        storage = t.untyped_storage()
        self.saved[k] = (storage, storage.clone())

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for storage, contents in self.saved.values():
                storage.copy_(contents)
            self.saved.clear()


def _unannotated_writes() -> dict:
    """Kernels that update their running statistics in place although their schemas do not say so."""
    aten, table = torch.ops.aten, {}
    for name in ("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"):
        op = getattr(aten, name, None)
        if op is not None:
            table[op.default] = (3, 4)  # running_mean, running_var
    return table


_UNANNOTATED_WRITES = _unannotated_writes()


def _schema_values(schema, args, kwargs):
    for i, argument in enumerate(schema.arguments):
        if i < len(args) and not argument.kwarg_only:
            yield argument, args[i]
        elif argument.name in kwargs:
            yield argument, kwargs[argument.name]


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x)]
    return []


def _storage_key(t):
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    try:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (t.device, ptr) if ptr else None


# -- torch.autograd's own entry points inside f --------------------------------------------------

@rrule(torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad)
def _autograd_inside_f(*args, **kwargs):
    """torch.autograd's backward called on a tensor zt is differentiating: refused by name."""
    raise ZygoteError(f"torch.autograd (.backward() or torch.autograd.grad) called at {describe_frame(user_frame())} "
                      "on a tensor that zygote_torch is differentiating. zt computes the gradient of the "
                      "function itself: return the loss from the function instead, or call .backward() "
                      "outside zt.gradient")
