"""The per-node fallback: differentiate a call with no rule as ``torch.autograd`` does.

The call runs on stand-ins of the tensors being differentiated (``t.detach().requires_grad_()``,
sharing ``t``'s memory) with ``torch.autograd`` on, and its pullback is ``torch.autograd.grad`` of
its outputs with respect to them. So whatever ``torch.autograd`` differentiates, the fallback does:
PyTorch's own ops, ``torch.autograd.Function``s, custom ops with a registered autograd, C++ ops with
an Autograd kernel, hooks they register.

Every call shape is one case. The output is flattened into its leaves: a leaf that depends on a
stand-in (it requires grad) is a differentiable output, given to the caller detached; a stand-in
returned as it is (an op returning its input) is given back as the caller's own tensor; anything
else (``None``, numbers, empty sequences, tensors the call did not compute from its inputs) is
passed through. A call none of whose outputs depends on its inputs records nothing.

Run once dynamically, the graph autograd built is kept for the pullback. Staged, or nested in
another differentiation (``zt.hessian``), the pullback is one callable, ``vjp_<op>(dy, *inputs)``,
that a recording mode sees as a single call: it becomes one node of the backward graph (recomputing
the op's forward inside it), and an outer tape differentiates it in turn (its inputs then require
grad, and it builds the graph of its own result). Every use is visible: an entry with
``fallback=True`` in the tape, listed by :func:`zygote_torch.fallbacks`.

The pullback returns one cotangent per positional argument, like a rule's, then one per keyword
argument (torch's own Python functions pass tensors such as ``weight=`` by keyword).
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import handle_torch_function, has_torch_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import _infer_device_type, get_device_states, set_device_states

from ..capture.leaves import announces
from ..capture.pytree import tensors_in
from ..errors import op_name
from .registry import non_differentiable
from .tangents import NoTangent, is_differentiable, is_zero, unthunk


def _substitute(obj, it):
    """``obj`` with its tensors replaced, in order, by the items of ``it``."""
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        return type(obj)(*(_substitute(x, it) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_substitute(x, it) for x in obj)
    if isinstance(obj, dict):
        return {k: _substitute(v, it) for k, v in obj.items()}
    return obj


def _structure_cotangents(obj, it):
    """Cotangents mirroring argument ``obj`` (a tensor, or a list/tuple holding tensors)."""
    if isinstance(obj, torch.Tensor):
        return next(it)
    if isinstance(obj, (tuple, list)) and tensors_in(obj):
        return [_structure_cotangents(x, it) for x in obj]
    if isinstance(obj, dict):
        for _ in tensors_in(obj):
            next(it)
    return NoTangent()


def _leaf_cotangents(dy, out) -> list:
    """The cotangent of each tensor leaf of ``out`` (``tensors_in`` order) in ``dy``, which mirrors
    ``out``'s tuples and lists; None where it is a symbolic zero."""
    if isinstance(out, torch.Tensor):
        dy = unthunk(dy)
        return [None if is_zero(dy) else dy]
    leaves = tensors_in(out)
    if not isinstance(out, (tuple, list)) or not isinstance(dy, (tuple, list)):
        return [None] * len(leaves)
    return [d for o, part in zip(out, dy) for d in _leaf_cotangents(part, o)]


def _grad_leaf(t: torch.Tensor) -> torch.Tensor:
    """A tensor to differentiate with respect to, sharing ``t``'s memory: ``t`` itself seen through
    a view when it already requires grad (an outer ``torch.autograd`` graph differentiates this
    call), so that what is computed from it stays connected to that graph."""
    if t.requires_grad and torch.is_grad_enabled():
        return t.view_as(t)
    return t.detach().requires_grad_()


class _Call:
    """A call ``func(*args, **kwargs)`` seen as a function of its tensors, the differentiated
    ones (``diff_mask``) replaced by stand-ins."""

    def __init__(self, func, args: tuple, kwargs: dict, tracked):
        self.func, self.args, self.names = func, tuple(args), list(kwargs)
        self.operands = tuple(args) + tuple(kwargs.values())  # positionals, then keyword values
        self.tensors = tensors_in(self.operands)
        self.diff_mask = [is_differentiable(t) and tracked(t) for t in self.tensors]

    def run(self, tensors, standins):
        """The call with ``tensors`` as its tensors, the differentiated ones replaced by ``standins``."""
        it = iter(standins)
        operands = _substitute(self.operands, iter([next(it) if d else t for t, d in zip(tensors, self.diff_mask)]))
        n = len(self.args)
        return self.func(*operands[:n], **dict(zip(self.names, operands[n:])))

    def primals(self) -> list:
        """The differentiated tensors."""
        return [t for t, d in zip(self.tensors, self.diff_mask) if d]

    def cotangents(self, grads) -> tuple:
        """(NoTangent(), one cotangent per operand) from those of the differentiated tensors."""
        grads = iter(grads)
        it = iter([next(grads) if d else NoTangent() for d in self.diff_mask])
        return (NoTangent(),) + tuple(_structure_cotangents(a, it) for a in self.operands)


class _Differentiated:
    """One run of a call under ``torch.autograd``: its outputs, and the vjp of the ones that
    depend on the differentiated tensors. The call sees each of them through a view of its
    stand-in (it may write into it: a leaf that requires grad cannot be written)."""

    def __init__(self, call: _Call, tensors):
        self.leaves = [_grad_leaf(t) for t, d in zip(tensors, call.diff_mask) if d]
        was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(True)  # called from here, torch's own mode (see capture/grad_mode.py)
        try:
            self.views = [leaf.view_as(leaf) for leaf in self.leaves]
            self.out = call.run(tensors, self.views)
        finally:
            torch._C._set_grad_enabled(was_enabled)
        self.out_leaves = tensors_in(self.out)

    def vjp(self, dy, create_graph: bool = False) -> list:
        """Cotangents of the differentiated tensors (None where there is none) for output
        cotangent ``dy`` (mirroring the output)."""
        pairs = [(o, d) for o, d in zip(self.out_leaves, _leaf_cotangents(dy, self.out))
                 if d is not None and o.requires_grad]
        if not pairs:
            return [None] * len(self.leaves)
        outputs, cots = zip(*pairs)
        return list(torch.autograd.grad(outputs, self.leaves, cots, retain_graph=True, allow_unused=True,
                                        create_graph=create_graph))

    def value(self, differentiated: list):
        """The output as the caller sees it: a stand-in returned as it is becomes the caller's own
        tensor (``differentiated``: the tensors the stand-ins stand for), other leaves that depend
        on the stand-ins are detached."""
        own = {id(v): t for t, v in zip(differentiated, self.views)}
        return _substitute(self.out, iter([own.get(id(o), o.detach() if o.requires_grad else o)
                                           for o in self.out_leaves]))


def make_vjp(call: _Call):
    """``vjp(dy, state, *tensors)``: the cotangents of the differentiated tensors, one per tensor
    (zeros where there is none), computed by running the call again under ``torch.autograd``, with
    the random generators in ``state`` (see :func:`random_state`; None: as they are); one callable
    that a recording mode sees as a single call."""
    def vjp(dy, state, *tensors):
        if has_torch_function(tensors) or has_torch_function(tensors_in((dy, state))):
            return handle_torch_function(vjp, tensors, dy, state, *tensors)
        nested = torch.is_grad_enabled() and any(t.requires_grad for t in tensors_in((dy, tensors)))
        with _random_state_set(state, tensors):
            run = _Differentiated(call, tensors)
        grads = run.vjp(dy, create_graph=nested)
        return tuple(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, run.leaves))

    vjp.__name__ = vjp.__qualname__ = f"vjp_{op_name(call.func).replace('.', '_')}"
    return vjp


_CPU_STATE_BYTES = torch.get_rng_state().numel()
_DEVICE_STATE_BYTES = 16  # a CUDA generator's state: its seed and offset


@announces
def random_state(*tensors) -> tuple:
    """The state of the CPU random generator and of those of the devices of ``tensors``, one tensor
    each: read just before a call that the backward runs again, so that it draws the same random
    numbers then (staged, a node of the forward program: its name says "random" to the passes)."""
    if any(isinstance(t, FakeTensor) for t in tensors):  # tracing: the shapes of the states
        n_devices = sum(t.device.type not in ("cpu", "meta") for t in tensors)
        return (torch.empty(_CPU_STATE_BYTES, dtype=torch.uint8),) + tuple(
            torch.empty(_DEVICE_STATE_BYTES, dtype=torch.uint8) for _ in range(n_devices))
    return (torch.get_rng_state(),) + tuple(get_device_states(*tensors)[1])


non_differentiable(random_state)


@contextlib.contextmanager
def _random_state_set(state, tensors):
    """Run with the random generators set to ``state`` (from :func:`random_state` for the same
    devices), restored afterwards; None (or fake values, while tracing): as they are."""
    if state is None or isinstance(state[0], FakeTensor):
        yield
        return
    device_type = _infer_device_type(*tensors)
    devices = get_device_states(*tensors)[0]
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.set_rng_state(state[0])
        set_device_states(devices, list(state[1:]), device_type=device_type)
        yield


class _SeededOps(TorchDispatchMode):
    """Notes whether any aten op that draws random numbers runs under it."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen = self.seen or torch.Tag.nondeterministic_seeded in func.tags
        return func(*args, **(kwargs or {}))


def _draws_random_numbers(call: _Call) -> bool:
    """Whether the call runs an op that draws random numbers. On fake tensors (staged) it is run
    once more, out of sight of any recording, to see; on real ones it is assumed to."""
    fakes = [t for t in call.tensors if isinstance(t, FakeTensor)]
    if not fakes:
        return True
    seeded = _SeededOps()
    with torch._C.DisableTorchFunction(), fakes[0].fake_mode:
        fresh = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in call.tensors]
        with seeded:  # on fresh fake tensors: a write the call makes changes nothing being traced
            call.run(fresh, [t for t, d in zip(fresh, call.diff_mask) if d])
    return seeded.seen


def _materialized(dy, out):
    """``dy`` mirroring ``out`` with the cotangent of every tensor leaf materialised (zeros where
    it is a symbolic zero, or where the leaf has no gradient), as a recorded call's argument."""
    if isinstance(out, torch.Tensor):
        dy = unthunk(dy)
        zero = is_zero(dy) or not is_differentiable(out)  # (zeros of its shape: out itself is not kept)
        return torch.zeros(out.shape, dtype=out.dtype, device=out.device) if zero else dy
    if not isinstance(out, (tuple, list)):
        return None if isinstance(out, dict) or not tensors_in(out) else out
    parts = [_materialized(d, o) for d, o in zip(dy, out)] if isinstance(dy, (tuple, list)) \
        else [_materialized(None, o) for o in out]
    return type(out)(*parts) if hasattr(type(out), "_fields") else type(out)(parts)


def fallback_rule(func, args: tuple, kwargs: dict, staged: bool | None = None, tracked=None):
    """(y, pullback) for a call with no rule (see the module docstring); only the tensors for which
    ``tracked(t)`` holds are differentiated (a BatchNorm's running statistics are not; default: every
    floating-point tensor). ``staged`` defaults to whether a graph is being recorded."""
    if staged is None:
        from ..capture.recorder import is_staging
        staged = is_staging()
    call = _Call(func, args, kwargs, tracked or (lambda t: True))
    if not any(call.diff_mask):
        return func(*args, **kwargs), lambda dy: call.cotangents([])
    if staged or torch._C._is_torch_function_mode_enabled():
        # the forward is a recorded call itself (a node, or an entry of an outer tape), and so is
        # the pullback: it recomputes the call when the cotangent arrives
        state = random_state(*call.tensors) if _draws_random_numbers(call) else None
        y = func(*args, **kwargs)
        vjp = make_vjp(call)
        return y, lambda dy: call.cotangents(vjp(_materialized(dy, y), state, *call.tensors))
    run = _Differentiated(call, call.tensors)
    return run.value(call.primals()), lambda dy: call.cotangents(run.vjp(dy))
