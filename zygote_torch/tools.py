"""Rule-side tools: stopping, hooking and checkpointing gradients.

Each is a function with its own rule (or declared non-differentiable), so it behaves the same in the
dynamic and the staged path.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import _infer_device_type, get_device_states, set_device_states

from .ad.registry import non_differentiable, rrule
from .ad.tangents import NoTangent
from .ad.via_ad import rrule_via_ad
from .capture.leaves import DIVERTS, announces
from .capture.pytree import flatten, tensors_in
from .capture.recorder import Recorder, is_staging
from .errors import ZygoteError
from .rules.custom_autograd import innermost_recording


@announces
def ignore_derivatives(x):
    """``x`` with no derivative flowing through it (Zygote's ``ignore_derivatives``/``dropgrad``):
    the value is used, its cotangent is dropped. Works on tensors and structures of them."""
    leaves, rebuild = flatten(x, modules_as_dicts=False)
    return rebuild([leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])


dropgrad = ignore_derivatives
non_differentiable(ignore_derivatives)


@announces
def hook(fn, x):
    """``x`` unchanged in the forward; in the backward its cotangent ``dx`` becomes ``fn(dx)``
    (Zygote's ``hook``), e.g. ``zt.hook(lambda g: g.clamp(-1, 1), h)`` clips a gradient."""
    return x.view_as(x)


@rrule(hook)
def _hook(fn, x):
    """y = x;  dx = fn(dy)."""
    return x.view_as(x), lambda dy: (NoTangent(), NoTangent(), fn(dy))


def checkpointed(f, *xs):
    """``f(*xs)``, whose intermediates are not kept: the backward recomputes them (Zygote's
    ``checkpointed``), trading compute for memory. Tensors the block reaches by itself (closures,
    a module's parameters, implicit ``Params``) are differentiated like ``xs``. Staged, the block
    is traced in place (what a staged program keeps is the partitioner's choice)."""
    recorder = _dynamic_recorder()
    if recorder is None or is_staging():
        return f(*xs)
    block = _Block(f, xs, recorder.tracked)
    return _checkpoint(block, *xs, *block.free)


def _dynamic_recorder():
    """The innermost torch-function mode if it is a dynamic tape's recorder, else None."""
    n = torch._C._len_torch_function_stack()
    mode = torch._C._get_function_stack_at(n - 1) if n else None
    return mode if isinstance(mode, Recorder) and mode.tracked is not None else None


@contextlib.contextmanager
def _unrecorded():
    """Run with the innermost recorder set aside, as part of a call it records next (so the safety
    net under it, see ad/safety.py, lets its kernels read tracked tensors)."""
    tape = innermost_recording()
    unseen = getattr(tape, "unseen", None)
    if unseen is not None:
        unseen.seen += 1
    try:
        with torch.overrides._pop_mode_temporarily():
            yield
    finally:
        if unseen is not None:
            unseen.seen -= 1


class _Reads(TorchFunctionMode):
    """Notes the tensors the calls made under it read that no earlier call made."""

    def __init__(self, known):
        super().__init__()
        self.made = {id(t) for t in known}
        self.read: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tensors_in((args, kwargs)):
            if id(t) not in self.made:
                self.read.setdefault(id(t), t)
        out = func(*args, **kwargs)
        self.made.update(id(t) for t in tensors_in(out))
        return out


class _RandomState:
    """The CPU generator's state and those of the devices of ``tensors``: a recomputation draws
    the same random numbers as the forward did (as ``torch.utils.checkpoint`` preserves them)."""

    def __init__(self, tensors):
        self.cpu = torch.get_rng_state()
        self.device_type = _infer_device_type(*tensors)
        self.devices, self.states = get_device_states(*tensors)

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
            torch.set_rng_state(self.cpu)
            set_device_states(self.devices, self.states, device_type=self.device_type)
            yield


class _Block:
    """A checkpointed block, run once with the tape's recorder set aside: its output, and ``free``,
    the tracked tensors it read besides its arguments (found by running it, however it reached
    them)."""

    def __init__(self, f, xs: tuple, tracked: dict):
        self.f, self.n = f, len(xs)
        self.rng = _RandomState(xs)
        reads = _Reads(tensors_in(xs))
        with _unrecorded(), reads:
            self.output = f(*xs)
        self.free = tuple(t for i, t in reads.read.items() if i in tracked)
        self.inputs = xs + self.free
        self.versions = [t._version if isinstance(t, torch.Tensor) else None for t in self.inputs]

    def __call__(self, *inputs):
        """The block's value: the first time, the output of the run that found ``free``."""
        out, self.output = self.output, None
        return self.f(*inputs[:self.n]) if out is None else out

    def recompute(self, *inputs):
        return self.f(*inputs[:self.n])

    def check_unmodified(self) -> None:
        for t, v in zip(self.inputs, self.versions):
            if v is not None and t._version != v:
                raise ZygoteError(f"zt.checkpointed: a tensor of shape {tuple(t.shape)} the block read was modified "
                                  "by an inplace operation before the backward recomputed the block")


@announces
def _checkpoint(block, *inputs):
    """``block(*inputs)``: the block's arguments then the tensors it reads by itself."""
    return block(*inputs)


@rrule(_checkpoint)
def _checkpoint_rule(block, *inputs):
    """y = f(xs);  d(xs, free) = the pullback of f at (xs, free), recomputed from them (with the
    forward's random state) when the cotangent arrives."""
    y = block(*inputs)

    def back(dy):
        block.check_unmodified()
        with block.rng.restored():
            _, f_back = rrule_via_ad(block.recompute, *block.inputs)  # f differentiated afresh
            grads = f_back(dy)[1:]
        return (NoTangent(), NoTangent()) + grads

    return y, back


def _torch_checkpoint(function, *args, use_reentrant=None, context_fn=None, determinism_check="default",
                      debug=False, early_stop=True, preserve_rng_state=True, **kwargs):
    """``torch.utils.checkpoint.checkpoint`` while capture runs: :func:`checkpointed` (the block's
    random state is always preserved). With ``use_reentrant`` true (torch's default) and no tensor
    argument being differentiated, torch.autograd gives the block no gradient at all (it warns
    "None of the inputs have requires_grad=True"): so does the dynamic path; a staged trace cannot
    tell and differentiates the block."""
    block = functools.partial(function, **kwargs) if kwargs else function
    recorder = _dynamic_recorder()
    if use_reentrant is not False and recorder is not None \
            and not any(id(t) in recorder.tracked for t in tensors_in(args)):
        warnings.warn("None of the inputs have requires_grad=True. Gradients will be None", stacklevel=2)
        with _unrecorded():
            return block(*args)
    return checkpointed(block, *args)


DIVERTS[torch.utils.checkpoint.checkpoint] = _torch_checkpoint
