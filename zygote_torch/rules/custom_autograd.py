"""PyTorch's own custom gradients are rules: ``torch.autograd.Function``.

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
"""
from __future__ import annotations

import inspect

import torch
from torch.autograd.function import FunctionCtx, _is_setup_context_defined, once_differentiable

from ..ad.registry import TORCH_LEAVES, rrule
from ..capture.leaves import REWRITES, announces
from ..capture.pytree import tensors_in
from ..capture.recorder import Recorder
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
        grads = _run_backward(cls, ctx, _grad_outputs(dy, outputs, ctx.materialize_grads, isinstance(out, tuple)))
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


def _run_backward(cls, ctx, grads: list):
    backward = _user_backward(cls)
    if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE and _dynamic_tape_records():
        return once_differentiable_backward(backward, ctx, grads, *tensors_in(list(vars(ctx).values())))
    return backward(ctx, *grads)


@announces
def once_differentiable_backward(backward, ctx, grads, *saved):
    """A backward marked ``@once_differentiable``, as one call: ``saved`` are the tensors it reads
    from ``ctx``, explicit so that an outer differentiation sees the dependence."""
    return backward(ctx, *grads)


@rrule(once_differentiable_backward)
def _once_differentiable(backward, ctx, grads, *saved):
    """Refused when differentiated: torch.autograd raises "trying to differentiate twice a function
    that was marked with @once_differentiable"."""
    name = ctx._forward_cls.__name__

    def refuse(dy):
        raise ZygoteError(f"{name}.backward is marked @once_differentiable: it cannot be differentiated "
                          "again (a second derivative, zt.hessian), by torch.autograd or by zygote_torch")

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
