"""PyTorch's own ways of defining a gradient are rules: ``torch.autograd.Function``, tensor hooks.

``F.apply(*args)`` is one call under capture (``Function.apply`` is a leaf, see capture/leaves.py),
and its rule is the Function itself::

    y = F.forward(ctx, *args)          (or y = F.forward(*args); F.setup_context(ctx, args, y))
    dargs = F.backward(ctx, *dy)

``ctx`` behaves as torch's: ``save_for_backward`` / ``saved_tensors``, ``needs_input_grad``,
``mark_non_differentiable``, ``set_materialize_grads``, attributes set in the forward. The forward
runs with torch.autograd off, as under ``torch.autograd``; the backward runs when the cotangent
arrives, so staged its ops are the backward graph's, and an outer differentiation (``zt.hessian``)
records them, except for a backward marked ``@once_differentiable``, which is refused if an outer
differentiation needs it (as ``torch.autograd`` refuses it).

``t.register_hook(hook)`` inside a differentiated function makes every cotangent reaching ``t``'s
value pass through ``hook``: an entry of the tape, put between the entry that made the value and
its readers. Staged, the registration is a node of the trace that the reverse transform replays
onto its tape the same way, so both paths hook the same value; the hook runs on the real
cotangent, at each call of a staged program.

Custom ops with a registered autograd (``torch.library.custom_op`` and ``register_autograd``, C++
ops with an Autograd kernel) and TorchScript (capture/script.py) need no rule here: the fallback
runs them under ``torch.autograd``, which calls their registered backward.
"""
from __future__ import annotations

import inspect

import torch
from torch.autograd.function import FunctionCtx, _is_setup_context_defined, once_differentiable

from ..ad.recording import recording_tapes
from ..ad.registry import non_differentiable, rrule
from ..ad.tape import TAPE_EFFECTS, Entry, Tape, TensorMeta
from ..capture import script as _script  # noqa: F401  (TorchScript calls as single calls: the fallback's)
from ..capture.leaves import DIVERTS, REWRITES, TORCH_LEAVES, announces, original
from ..capture.pytree import tensors_in
from ..capture.recorder import GraphBuilder, Recorder, staging_grad_enabled
from ..errors import RuleError, ZygoteError, describe_frame, user_frame
from ._util import NoTangent, ZeroTangent, is_differentiable, is_zero, unbroadcast, unthunk

Tensor = torch.Tensor
_apply = torch.autograd.Function.apply.__func__
_ONCE_DIFFERENTIABLE = once_differentiable(lambda ctx: None).__code__


def _with_bound_arguments(args: tuple, kwargs: dict):
    """``F.apply``'s arguments bound to ``F.forward``'s signature with defaults filled in, as
    ``Function.apply`` binds them for a setup_context-style Function: every input positional."""
    cls, rest = args[0], args[1:]
    if not _is_setup_context_defined(cls.setup_context):
        return args, kwargs
    bound = inspect.signature(cls.forward).bind(*rest, **kwargs)
    bound.apply_defaults()
    return (cls,) + tuple(bound.args), dict(bound.kwargs)


TORCH_LEAVES.add(_apply)
REWRITES[_apply] = _with_bound_arguments


class FunctionContext(FunctionCtx):
    """The ``ctx`` of a ``torch.autograd.Function`` differentiated by zygote_torch.

    ``needs_input_grad`` says which inputs are differentiable tensors (a superset of torch's,
    which also knows which require grad: a gradient computed for a constant is dropped)."""

    def __init__(self, cls, args: tuple):
        self._forward_cls = cls
        self.needs_input_grad = tuple(is_differentiable(a) for a in args)
        self.materialize_grads = True
        self.to_save = ()
        self.non_differentiable = ()
        self.dirty_tensors = ()

    @property
    def saved_tensors(self) -> tuple:
        return tuple(self.to_save)

    saved_variables = saved_tensors


def _user_backward(cls):
    """The Function's backward (or ``vjp``, its other name)."""
    vjp = cls.vjp
    return vjp if vjp is not torch.autograd.Function.vjp else cls.backward


class _Output:
    """What the backward needs to know of one output: its shape, dtype and device, or None for a
    non-tensor output; ``differentiable`` is False for one marked non-differentiable."""

    __slots__ = ("shape", "dtype", "device", "differentiable")

    def __init__(self, out, non_differentiable: set):
        self.shape, self.dtype, self.device = out.shape, out.dtype, out.device
        self.differentiable = id(out) not in non_differentiable and is_differentiable(out)

    def zeros(self):
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


def _forward(cls, ctx: FunctionContext, args: tuple, kwargs: dict, where):
    """Run the forward as ``Function.apply`` does; the outputs as it returns them (an input
    returned unchanged comes back as a new view of it)."""
    if _is_setup_context_defined(cls.setup_context):
        out = cls.forward(*args, **kwargs)
        cls.setup_context(ctx, args, out)
    else:
        out = cls.forward(ctx, *args, **kwargs)
    dirty = [t for t in ctx.dirty_tensors if is_differentiable(t)]
    if dirty:
        raise ZygoteError(f"{cls.__name__}.apply at {describe_frame(where)}: its forward writes into an input "
                          "(ctx.mark_dirty); zygote_torch does not differentiate an in-place autograd.Function. "
                          "Return a new tensor instead of writing into the input")
    inputs = {id(a) for a in args if isinstance(a, Tensor)}
    if isinstance(out, tuple):
        return tuple(o.view_as(o) if isinstance(o, Tensor) and id(o) in inputs else o for o in out)
    return out.view_as(out) if isinstance(out, Tensor) and id(out) in inputs else out


@rrule(_apply)
def autograd_function(cls, *args, **kwargs):
    """y = F.forward(ctx, *args);  dargs = F.backward(ctx, *dy): the Function's own backward, with
    the cotangents of unused outputs materialised as zeros (None after
    ``ctx.set_materialize_grads(False)``), and those of non-differentiable outputs zeroed."""
    where = user_frame()
    ctx = FunctionContext(cls, args)
    out = _forward(cls, ctx, args, kwargs, where)
    non_differentiable = {id(t) for t in ctx.non_differentiable}
    outputs = [_Output(o, non_differentiable) if isinstance(o, Tensor) else None
               for o in (out if isinstance(out, tuple) else (out,))]
    inputs = [(a.shape, a.dtype) if isinstance(a, Tensor) else None for a in args]
    state = {k: v for k, v in vars(ctx).items() if tensors_in(v)}  # what the backward reads, in a
    versions = {id(t): t._version for t in tensors_in(list(state.values()))}  # container a mutation can update

    def pullback(dy):
        vars(ctx).update(state)
        _check_unmodified(cls, state, versions, where)
        grads = _run_backward(cls, ctx, _grad_outputs(dy, outputs, ctx.materialize_grads, isinstance(out, tuple)),
                              where)
        return (NoTangent(), NoTangent()) + _input_cotangents(cls, grads, inputs, where)

    return out, pullback


def _grad_outputs(dy, outputs: list, materialize: bool, several: bool) -> list:
    """One gradient per output, as torch gives them to a backward."""
    parts = (tuple(dy) if isinstance(dy, (tuple, list)) else (ZeroTangent(),) * len(outputs)) if several else (dy,)
    grads = []
    for d, o in zip(parts, outputs):
        d = unthunk(d)
        if o is None:
            grads.append(None)
        elif is_zero(d) or not o.differentiable:
            grads.append(o.zeros() if materialize else None)
        else:
            grads.append(d)
    return grads


def _check_unmodified(cls, state: dict, versions: dict, where) -> None:
    """As torch.autograd: a tensor the backward reads must not have been written since the forward."""
    for t in tensors_in(list(state.values())):
        if versions.get(id(t), t._version) != t._version:
            raise ZygoteError(f"{cls.__name__}.backward (applied at {describe_frame(where)}) reads a tensor of "
                              f"shape {tuple(t.shape)} that was modified by an inplace operation after the "
                              "forward saved it (torch.autograd raises here too); clone it before modifying it")


def _dynamic_tape_records() -> bool:
    """Whether the innermost torch-function mode is a dynamic tape's recorder (an enclosing
    zt.gradient differentiates what runs now)."""
    n = torch._C._len_torch_function_stack()
    if n == 0:
        return False
    mode = torch._C._get_function_stack_at(n - 1)
    return isinstance(mode, Recorder) and mode.tracked is not None


def _run_backward(cls, ctx, grads: list, where):
    backward = _user_backward(cls)
    if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE and _dynamic_tape_records():
        applied = f"{cls.__name__}.apply at {describe_frame(where)}"
        return once_differentiable_backward(applied, backward, ctx, grads, *tensors_in(list(vars(ctx).values())))
    return backward(ctx, *grads)


@announces
def once_differentiable_backward(applied: str, backward, ctx, grads, *saved):
    """A backward marked ``@once_differentiable``, as one call: ``saved`` are the tensors it reads
    from ``ctx``, explicit so that an outer differentiation sees the dependence."""
    return backward(ctx, *grads)


@rrule(once_differentiable_backward)
def _once_differentiable(applied, backward, ctx, grads, *saved):
    """Refused when differentiated: torch.autograd raises "trying to differentiate twice a function
    that was marked with @once_differentiable"."""
    def refuse(dy):
        raise ZygoteError(f"{applied}: its backward is marked @once_differentiable, so it cannot be "
                          "differentiated again (a second derivative, zt.hessian), by torch.autograd or by "
                          "zygote_torch")

    return backward(ctx, *grads), refuse


def _input_cotangents(cls, grads, inputs: list, where) -> tuple:
    """The backward's result as one cotangent per input, checked and converted as torch does
    (summed to the input's shape where it broadcasts to it, cast to its dtype)."""
    grads = grads if isinstance(grads, tuple) else (grads,)
    if len(grads) < len(inputs) or any(g is not None for g in grads[len(inputs):]):
        raise RuleError(f"{cls.__name__}.backward (applied at {describe_frame(where)}) returned {len(grads)} "
                        f"gradients; its forward took {len(inputs)} inputs")
    out = []
    for i, (g, spec) in enumerate(zip(grads, inputs)):
        if g is None:
            out.append(ZeroTangent() if spec is not None else NoTangent())
            continue
        if spec is None:
            raise RuleError(f"{cls.__name__}.backward (applied at {describe_frame(where)}) returned a gradient "
                            f"at position {i}, whose input is not a tensor")
        shape, dtype = spec
        if g.shape != shape:
            if not _broadcasts_to(shape, g.shape):
                raise RuleError(f"{cls.__name__}.backward (applied at {describe_frame(where)}) returned a gradient "
                                f"of shape {tuple(g.shape)} at position {i}, for an input of shape {tuple(shape)}")
            g = unbroadcast(g, shape)
        out.append(g.to(dtype) if g.dtype != dtype and (dtype.is_floating_point or dtype.is_complex) else g)
    return tuple(out)


def _broadcasts_to(shape, target) -> bool:
    if len(shape) > len(target):
        return False
    return all(n == 1 or n == m for n, m in zip(reversed(tuple(shape)), reversed(tuple(target))))


# -- Tensor.register_hook ---------------------------------------------------------------------------
class HookHandle:
    """What ``Tensor.register_hook`` returns under capture: ``remove()`` stops the hook."""

    def __init__(self):
        self.removed = False

    def remove(self) -> None:
        self.removed = True


@announces
def call_hook(hook, dy):
    """``hook(dy)``, or ``dy`` where it returns None: one call, run when the cotangent is there
    (staged, a node of the backward program: the hook runs at each call, on real tensors)."""
    if isinstance(dy, torch._subclasses.FakeTensor):  # tracing: the hook runs later, on real values
        return torch.empty_like(dy)
    g = hook(dy)
    return dy if g is None else g


def _register_hook(t, hook):
    """``t.register_hook(hook)`` while capture runs: the innermost recording is told that every
    cotangent reaching ``t``'s current value (from uses before this call too, as torch sums them
    all before calling the hook) passes through ``hook``."""
    owner = innermost_recording()
    if isinstance(owner, GraphBuilder):
        return _hook_in_graph(owner, t, hook)
    if owner is not None and owner.tracks(t):
        return _hook_on_tape(owner, t, hook)
    if owner is not None and isinstance(t, Tensor) and not t.requires_grad \
            and not any(tape.tracks(t) for tape in recording_tapes()):  # tracked by an outer tape: torch refuses it below
        raise ZygoteError(f"Tensor.register_hook at {describe_frame(owner.where or user_frame())}: the tensor is not "
                          "differentiated (it does not depend on what is differentiated, or was detached), so no "
                          "gradient reaches it; torch.autograd refuses it too (cannot register a hook on a tensor "
                          "that doesn't require gradient)")
    return original(Tensor.register_hook)(t, hook)


def innermost_recording():
    """The tape or graph builder the innermost torch-function mode records into, if it is a
    recorder: the owner of its ``on_call`` (a bound method, or a function wrapping one)."""
    n = torch._C._len_torch_function_stack()
    mode = torch._C._get_function_stack_at(n - 1) if n else None
    if not isinstance(mode, Recorder):
        return None
    on_call = mode.on_call
    for _ in range(4):  # wrappers of a wrapper
        owner = getattr(on_call, "__self__", None)
        if isinstance(owner, (Tape, GraphBuilder)):
            return owner
        cells = [c.cell_contents for c in getattr(on_call, "__closure__", None) or () if _filled(c)]
        on_call = next((v for v in cells if callable(v)), None)
    return None


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _hook_on_tape(tape, t, hook, handle: HookHandle | None = None) -> HookHandle:
    """Give the entry that made ``t``'s value (past any hooks already there) a new output key
    and put a hook entry between it and the value's readers; for an input, between the gradient
    and the readers. Hooks run in the order they were registered, as under torch.autograd."""
    key, at = tape.key_of(t), len(tape.entries)
    producer = None
    while producer is None:
        at = next((i for i in range(at - 1, -1, -1) if _makes(tape.entries[i], key)), -1)
        if at < 0 or tape.entries[at].rule_name != "Tensor.register_hook":
            producer = tape.entries[at] if at >= 0 else False
        else:
            key = tape.entries[at].in_keys[0]
    fresh = next(tape._serials)
    if producer:
        producer.out_keys = _replaced_key(producer.out_keys, key, fresh)
    elif tape.inputs.get(id(t)) == key:
        tape.inputs[id(t)] = fresh
    else:
        raise ZygoteError(f"Tensor.register_hook at {describe_frame(tape.where or user_frame())}: no recorded call made this "
                          "tensor's value, so there is nothing to hook")
    handle = handle or HookHandle()
    pullback = lambda dy: (NoTangent(), unthunk(dy) if handle.removed else call_hook(hook, unthunk(dy)))  # noqa: E731
    entry = Entry(func=Tensor.register_hook, args=(t,) if tape.staged else (TensorMeta(t),), out=None,
                  pullback=pullback, where=tape.where or user_frame(), rule_name="Tensor.register_hook", fallback=False,
                  in_keys=[fresh], out_keys=key)
    tape.entries.insert(at + 1, entry)
    return handle


def _makes(entry, key) -> bool:
    """Whether ``entry`` (an entry of the tape, or None where one was dropped) outputs value ``key``."""
    return entry is not None and _holds_key(entry.out_keys, key)


def _holds_key(keys, key) -> bool:
    """Whether output keys (a key, or nested lists of them) include ``key``."""
    return keys == key if not isinstance(keys, list) else any(_holds_key(k, key) for k in keys)


def _replaced_key(keys, old, new):
    if isinstance(keys, list):
        return [_replaced_key(k, old, new) for k in keys]
    return new if keys == old else keys


def _hook_in_graph(builder, t, hook) -> HookHandle:
    """Staged capture: a ``registered_hook`` node where the call was made. The reverse transform
    replays it onto its tape as the dynamic path does (:func:`_hook_on_tape`), so the hook is on
    ``t``'s value at this point: the uses before it are included, a value written since (also
    through a view of ``t``) is the one hooked, and reads through older views of a base written
    after ``t`` was made reach it too."""
    handle = HookHandle()
    args = (builder.node_arg(hook), builder.node_arg(handle), builder.node_arg(t))
    node = builder.graph.call_function(registered_hook, args)
    node.meta.update(func=registered_hook, func_args=args, func_kwargs={}, phase=builder.phase,
                     where=user_frame(), user_grad=staging_grad_enabled(), val=None)
    return handle


def registered_hook(hook, handle, t) -> None:
    """``t.register_hook(hook)`` as a node of a staged trace: nothing to compute when run; on the
    reverse transform's tape it hooks ``t``'s value there (``TAPE_EFFECTS``)."""


def _replay_registered_hook(tape, hook, handle, t) -> None:
    if tape.tracks(t):
        _hook_on_tape(tape, t, hook, handle)


TAPE_EFFECTS[registered_hook] = _replay_registered_hook


DIVERTS[Tensor.register_hook] = _register_hook


# -- attribute reads --------------------------------------------------------------------------------
# Attributes of a tensor object rather than functions of its value: read on the tensor itself (a
# view's ``_base`` is its base, tracked or not), never differentiated (``.data`` and ``.grad`` are
# constants to torch.autograd too).
non_differentiable(*(getattr(Tensor, name) for name in (
    "_base", "data", "grad", "_grad", "grad_fn", "_grad_fn", "retains_grad", "output_nr", "is_nested", "names",
    "itemsize", "nbytes", "is_quantized", "is_mkldnn", "is_cpu", "is_mps", "is_xpu", "is_sparse_csr",
    "_backward_hooks", "_post_accumulate_grad_hooks") if hasattr(Tensor, name)))


# -- module backward hooks --------------------------------------------------------------------------
def _refuse_backward_hooks(bw_hook, args):
    """``BackwardHook.setup_input_hook`` (a module with a full backward hook or backward pre-hook is
    called while capture runs): refused by name where the module's inputs are differentiated, since
    the hook, which may replace their gradients, would not run. (Hooked outputs alone are let
    through: such a hook changes no gradient of what the module computes from its parameters.)"""
    owner = innermost_recording()
    if isinstance(owner, GraphBuilder) or owner is not None and any(owner.tracks(t) for t in tensors_in(args)):
        raise ZygoteError(f"{type(bw_hook.module).__name__} called at {describe_frame(user_frame())} has a full "
                          "backward hook or backward pre-hook (register_full_backward_hook, "
                          "register_full_backward_pre_hook), which zygote_torch does not run; register hooks on "
                          "its input and output tensors (Tensor.register_hook) instead")
    return args


def _output_hooks_not_run(bw_hook, args):
    """``BackwardHook.setup_output_hook`` while capture runs: the outputs as they are."""
    return args


DIVERTS[torch.utils.hooks.BackwardHook.setup_input_hook] = _refuse_backward_hooks
DIVERTS[torch.utils.hooks.BackwardHook.setup_output_hook] = _output_hooks_not_run


def apply_registered_hooks(tape, standin, original) -> None:
    """The hooks registered on ``original`` before the call (``w.register_hook`` outside ``f``) apply
    to the gradient of ``standin``, the tensor the tape differentiates with respect to in its place,
    in the order they were registered, as torch.autograd applies them to the gradient it returns."""
    for hook in (getattr(original, "_backward_hooks", None) or {}).values():
        _hook_on_tape(tape, standin, hook)
