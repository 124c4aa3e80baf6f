"""The dynamic path at the speed of a staged one: a repeated trace's backward, generated once.

``zt.gradient(f, ...)`` in a training loop records the same calls at every step. Recording them on a
tape costs Python at every call (a rule binds its arguments, builds a pullback closure, the tape keys
and indexes values), and the pullbacks run one by one. Here, per *site* (the code of ``f``, the API and
what it differentiates), the calls a tape records are also written down as a :class:`Trace`: each
call's function, where each tensor argument comes from (a differentiated input, an earlier call's
output, or a constant with its shape, dtype, device and strides), its other arguments' values, and
what its rule did. When two calls in a row record the same trace, its backward is generated once, as
zt.compile generates one (:func:`build`): the trace's calls are replayed through their rules on fake
tensors, the tape walked back, and the backward half cut out of the joint graph so that it reads only
values the user's own code computed (inputs, call outputs, constants); anything else a rule's
pullback needs it computes again from them.

From then on, a call at that site runs on a :class:`Replay`: ``f`` runs as the user wrote it, every
torch call as itself, and each call the tape would record is checked against the trace: the same
function, the same sources and metadata, the same non-tensor values, the same user grad mode, then
outputs of the shapes and dtypes the trace had. The backward program then runs on the values those
calls made. So the program is used only when this very call records what the trace did, call for
call: nothing stale. At the first difference (a branch taken otherwise, a new shape, a hook, an
in-place op, torch.no_grad(), a conversion to Python) the Replay becomes an ordinary :class:`Tape`:
the calls checked so far are recorded on it through their rules, from the same input values (they
are pure: a trace with random or effectful calls is never replayed), the user's tensors are bound to
their values, and the call goes on as it would have, with the same result and the same errors.

A site whose traces keep differing, or cannot be replayed (random calls, in-place updates of values
being differentiated, custom autograd Functions, user rules), is left to the tape after a few tries.
``ZYGOTE_TORCH_REPLAY=0`` turns the mechanism off; :func:`stats` says what it did.
"""
from __future__ import annotations

import collections
import functools
import os
import sys
import threading
import types
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..ad.mutation import storage_id
from ..ad.recording import WatchingRecorder, note_requiring_grad, recording_tapes
from ..ad import tape as tape_module
from ..ad.tape import TAPE_EFFECTS, Tape
from ..capture import grad_mode, leaves, op_classes
from ..capture.cuts import CutFloat
from ..capture.op_classes import INPLACE, METADATA_CALL, call_kind, op_class
from ..capture.pytree import PLAIN_TYPES, tensors_in
from ..capture.recorder import GraphBuilder, Recorder, is_staging
from ..errors import ZygoteError, describe_frame
from ..passes import optimize
from ..passes.aliasing import writes
from ..passes.partition import backward_only
from .guards import GlobalState

ENABLED = os.environ.get("ZYGOTE_TORCH_REPLAY", "1") != "0"
MAX_MISSES = 4  # traces that differ, or replays that diverge, before a site is left to the tape
MAX_SITES = 256

DIFF, IDENTITY, NONDIFF, INPLACE_CONST = "differentiated", "identity", "not differentiated", "in place on a constant"
_NUMBERS = (int, float, bool)


class _Unreplayable(Exception):
    """A call whose arguments a trace cannot describe (a stale value, a view of a tracked tensor made
    elsewhere, a structure holding tensors, a number cut from the tape)."""


# -- what a call's arguments are ----------------------------------------------------------------

def signature(args, tracked: dict, consts: list) -> tuple:
    """What a trace checks of a call's arguments: per tensor, the key of the value it holds or, for a
    constant (appended to ``consts``), its shape, dtype, device and strides; other values as
    themselves (numbers with their type: ``x * 1`` and ``x * 1.0`` are not the same call)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            slot = tracked.get(id(a))
            if slot is not None:
                if slot.version != a._version:
                    raise _Unreplayable("a tracked tensor changed outside a recorded call")
                out.append(slot.key)
            else:
                base = a._base
                if base is not None and id(base) in tracked:
                    raise _Unreplayable("a view of a tracked tensor made outside a recorded call")
                consts.append(a)
                out.append((a.shape, a.dtype, a.device, a.stride()))
        elif type(a) in _NUMBERS:
            out.append((type(a), a))
        elif type(a) is torch.Size:
            out.append((torch.Size, tuple(a)))
        elif type(a) in PLAIN_TYPES:
            out.append(a)
        elif type(a) in (tuple, list):
            out.append((type(a), signature(a, tracked, consts)))
        else:
            raise _Unreplayable(f"a {type(a).__name__} argument")
    return tuple(out)


def matches(args, sig: tuple, tracked: dict, consts: list) -> bool:
    """Whether ``signature(args, tracked, consts) == sig``, without building it (the replay's check of
    every call); the constants are appended to ``consts`` as by :func:`signature`."""
    if len(args) != len(sig):
        return False
    for a, s in zip(args, sig):
        if isinstance(a, torch.Tensor):
            slot = tracked.get(id(a))
            if slot is not None:
                if slot.key != s or slot.version != a._version:
                    return False
                continue
            base = a._base
            if base is not None and id(base) in tracked or type(s) is not tuple \
                    or s != (a.shape, a.dtype, a.device, a.stride()):
                return False
            consts.append(a)
            continue
        t = type(a)
        if t in _NUMBERS:
            if s != (t, a):
                return False
        elif t is torch.Size:
            if s != (torch.Size, tuple(a)):
                return False
        elif t in PLAIN_TYPES:
            if type(s) is not t or s != a:
                return False
        elif t is tuple or t is list:
            if type(s) is not tuple or len(s) != 2 or s[0] is not t or not matches(a, s[1], tracked, consts):
                return False
        else:
            return False
    return True


def call_signature(args: tuple, kwargs: dict, tracked: dict, consts: list) -> tuple:
    """:func:`signature` of positional and keyword arguments."""
    sig = signature(args, tracked, consts)
    if not kwargs:
        return sig
    return sig, tuple(kwargs), signature(tuple(kwargs.values()), tracked, consts)


class _Key:
    """In an argument template: the value with this key."""

    __slots__ = ("key",)

    def __init__(self, key: int):
        self.key = key


class _Const:
    """In an argument template: the call's ``index``-th constant tensor."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _template(args, tracked: dict, counter: list):
    """``args`` with each tensor replaced by a :class:`_Key` or :class:`_Const` (after
    :func:`signature` accepted them)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            slot = tracked.get(id(a))
            if slot is not None:
                out.append(_Key(slot.key))
            else:
                out.append(_Const(counter[0]))
                counter[0] += 1
        elif type(a) in (tuple, list):
            out.append(type(a)(_template(a, tracked, counter)))
        else:
            out.append(a)
    return out


def _fill(template, values: dict, consts: list):
    """A template's arguments with values put back: ``values`` by key, ``consts`` by index."""
    out = []
    for a in template:
        if type(a) is _Key:
            out.append(values[a.key])
        elif type(a) is _Const:
            out.append(consts[a.index])
        elif type(a) in (tuple, list):
            out.append(type(a)(_fill(a, values, consts)))
        else:
            out.append(a)
    return out


def _meta(t: torch.Tensor) -> tuple:
    return t.shape, t.dtype, t.device, t.stride()


def _replayable_function(func) -> bool:
    """torch's own functions, Tensor methods and zygote_torch's announced ops; not user functions
    with rules, custom autograd Functions, hooks or the calls capture diverts."""
    if func in TAPE_EFFECTS or func in leaves.DIVERTS or leaves.is_python_leaf(func):
        return False
    owner = getattr(func, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        return False
    if getattr(func, "__zygote_torch_announces__", False):
        return True
    module = getattr(func, "__module__", None) or getattr(getattr(func, "__objclass__", None), "__module__", "")
    return (module or "").startswith("torch") or isinstance(func, (
        types.MethodDescriptorType, types.WrapperDescriptorType, types.MethodWrapperType))


# -- traces ----------------------------------------------------------------------------------------

@dataclass(eq=False)
class Step:
    """One call a tape recorded: what is checked (``func``, ``sig``, the outputs' shapes and dtypes,
    which of them the tape tracked), what it was (``kind``), and what building and catching up need
    (the argument template with the constants' places, the keys its outputs got, the user's line)."""

    func: object
    sig: tuple
    kind: str
    template: tuple = ((), (), ())  # (positional, keyword names, keyword values)
    consts: tuple = ()  # the constants' metadata (shape, dtype, device, strides)
    out_meta: tuple = ()
    tracked: tuple = ()  # positions (among the output's tensors) of the outputs the tape tracked
    keys: tuple = ()  # the keys those outputs got
    identity: int = -1  # IDENTITY: the position (among the arguments' tensors) of the one returned
    where: object = None

    def fingerprint(self) -> tuple:
        return self.func, self.sig, self.kind, self.out_meta, self.tracked, self.keys, self.identity


@dataclass(eq=False)
class Trace:
    """The calls one run of ``f`` recorded, the metadata of the tensors it differentiated with respect
    to, the key of the differentiated output, and the global state it ran under."""

    inputs: tuple
    steps: list
    seed_key: int
    state: GlobalState

    def fingerprint(self) -> tuple:
        return self.inputs, tuple(s.fingerprint() for s in self.steps), self.seed_key


class TracingTape(Tape):
    """A tape that also writes down its calls as a :class:`Trace` (None where one cannot be replayed:
    ``broken`` says why)."""

    def __init__(self):
        super().__init__(staged=False)
        self.steps: list = []
        self.input_metas: list = []
        self.broken = None
        self.seed_key = None
        self.state = GlobalState()
        self._next_key = 1
        self._n_differentiated = 0  # the entries the steps made: the tape makes no others

    def track_input(self, t: torch.Tensor) -> None:
        super().track_input(t)
        self.input_metas.append(_meta(t))
        self._expect_keys((self.inputs[id(t)],))

    def track_inputs(self, ts: list) -> None:
        for t in ts:
            self.track_input(t)

    def _expect_keys(self, keys) -> None:
        """Keys are given in order (a replay gives the same ones); anything else is not replayed."""
        for k in keys:
            if k != self._next_key:
                self.broken = self.broken or "the tape numbered values out of order (hooks on inputs?)"
            self._next_key = k + 1

    def record_touching(self, func, args: tuple, kwargs: dict):
        if self.broken is not None:
            return super().record_touching(func, args, kwargs)
        consts: list = []
        try:
            sig = call_signature(args, kwargs, self.tracked, consts)
            counter = [0]
            template = (_template(args, self.tracked, counter), tuple(kwargs),
                        _template(tuple(kwargs.values()), self.tracked, counter))
        except _Unreplayable as exc:
            self.broken = f"{exc} ({getattr(func, '__name__', func)})"
            return super().record_touching(func, args, kwargs)
        differentiating = self.differentiating and (self.grad_slot is None or grad_mode.enabled_from(self.grad_slot))
        n_entries, n_cuts = len(self.entries), len(self.cuts)
        out = super().record_touching(func, args, kwargs)
        if n_entries != self._n_differentiated:
            self.broken = "entries the trace's calls did not make (hooks?)"
        elif not differentiating:
            self.broken = "a call under torch.no_grad()"
        elif len(self.cuts) != n_cuts or type(out) is CutFloat:
            self.broken = "a conversion to Python"
        else:
            step = self._step(func, args, kwargs, out, sig, template, consts, n_entries)
            if step is not None:
                self.steps.append(step)
                self._n_differentiated += step.kind is DIFF
        return out

    def _step(self, func, args, kwargs, out, sig, template, consts, n_entries):
        new = len(self.entries) - n_entries
        arg_tensors = tensors_in((args, kwargs))
        out_tensors = tensors_in(out)
        common = dict(func=func, sig=sig, template=template)
        if call_kind(func) is INPLACE:
            if new == 0 and not _reads_tracked(template) and not any(self.tracks(t) for t in out_tensors):
                return Step(kind=INPLACE_CONST, **common)
            self.broken = f"an in-place {getattr(func, '__name__', func)} on a value being differentiated"
            return None
        if new == 1 and self.entries[-1].func is func and not self.entries[-1].fallback:
            if not _replayable_function(func):
                self.broken = f"{getattr(func, '__qualname__', func)} is not replayed (a user rule, a custom Function)"
                return None
            entry = self.entries[-1]
            positions = tuple(m for m, t in enumerate(out_tensors) if self.tracks(t))
            keys = tuple(self.key_of(out_tensors[m]) for m in positions)
            if any(any(t is a for a in arg_tensors) for t in out_tensors):
                self.broken = "a call returning one of its arguments among new values"
                return None
            self._expect_keys(keys)
            return Step(kind=DIFF, consts=tuple(map(_meta, consts)), out_meta=tuple((t.shape, t.dtype) for t in out_tensors),
                        tracked=positions, keys=keys, where=entry.where, **common)
        if new == 0:
            if isinstance(out, torch.Tensor) and any(out is a for a in arg_tensors):
                return Step(kind=IDENTITY, identity=next(i for i, a in enumerate(arg_tensors) if out is a), **common)
            if not any(self.tracks(t) for t in out_tensors):
                return Step(kind=NONDIFF, **common)
        self.broken = f"{getattr(func, '__name__', func)} is not one call of one rule"
        return None

    def backward(self, seeds, keep: bool = True) -> dict:
        if len(seeds) == 1 and not keep and isinstance(seeds[0][0], torch.Tensor):
            self.seed_key = self.key_of(seeds[0][0])
        else:
            self.broken = self.broken or "not one scalar output"
        return super().backward(seeds, keep)

    def trace(self) -> Trace | None:
        if self.broken is not None or self.seed_key is None:
            return None
        return Trace(tuple(self.input_metas), self.steps, self.seed_key, self.state)


def _outputs_match(out, metas: tuple) -> bool:
    """Whether a call's output tensors have the shapes and dtypes ``metas`` (the trace's)."""
    if type(out) is torch.Tensor:
        if len(metas) != 1:
            return False
        shape, dtype = metas[0]
        return out.dtype is dtype and out.shape == shape
    outs = tensors_in(out)
    if len(outs) != len(metas):
        return False
    for t, (shape, dtype) in zip(outs, metas):
        if t.dtype is not dtype or t.shape != shape:
            return False
    return True


def _reads_tracked(template) -> bool:
    """Whether an argument template holds a tracked value (a :class:`_Key`)."""
    return any(type(a) is _Key or type(a) in (tuple, list) and _reads_tracked(a) for a in template)


# -- the backward program ------------------------------------------------------------------------

class BuildError(Exception):
    """A trace whose backward cannot be generated to read only what the user's code computed."""


@dataclass(eq=False)
class Program:
    """A trace's generated backward: ``run(*residuals, dy)`` -> cotangents of the inputs. Where each
    residual comes from: ``input_slots`` (input index, slot), and per step ``out_slots`` (output
    position, slot) and ``const_slots`` (constant index, slot)."""

    trace: Trace
    module: torch.fx.GraphModule
    n_slots: int
    input_slots: tuple
    out_slots: list
    const_slots: list

    def __post_init__(self):
        self.run = _boxed(self.module)
        self.plan = [_plan(step, self.out_slots[k], self.const_slots[k]) for k, step in enumerate(self.trace.steps)]


def _plan(step: Step, out_slots: tuple, const_slots: tuple) -> tuple:
    """What the replay's per-call check reads of a step, flat (csrc/replay.cpp reads it by position):
    (func, kind, whether it has keyword arguments, the positional signature, the keyword names, their
    signature, the outputs' metadata, the tracked output positions, the output and constant slots,
    the position of the argument an identity returns)."""
    has_keywords = bool(step.template[1])
    positional, names, keyword = step.sig if has_keywords else (step.sig, (), ())
    return (step.func, step.kind, has_keywords, positional, names, keyword, step.out_meta, step.tracked, out_slots,
            const_slots, step.identity)


def _boxed(module: torch.fx.GraphModule):
    """``run(values)`` of ``module``, which empties the list ``values`` once it has read it (the boxed
    convention of torch.fx and AOTAutograd): each residual is freed after its last use in the
    backward, as torch.autograd frees saved tensors, rather than held until the program returns."""
    boxed = getattr(torch.fx.graph, "_BoxedCodeGen", None)
    if boxed is None:  # a torch without it: the values live until the program returns
        def run(values):
            args = tuple(values)
            values.clear()
            return module.forward(*args)
        return run
    module.graph.set_codegen(boxed())
    module.recompile()
    return module.forward


def build(trace: Trace) -> Program:
    """Generate ``trace``'s backward (see the module docstring); :class:`BuildError` where it would
    have to read a value the user's code did not make (a random draw inside a rule), or the trace
    has a random or effectful call."""
    fake_mode = FakeTensorMode()
    builder = GraphBuilder(fake_mode, lift_real_tensors=False)
    tape = Tape(staged=True)
    tape.fuses = False  # f's forward runs as written: a fused backward would recompute it (ad/fusion.py)
    with fake_mode:
        inputs = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                  for shape, dtype, device, stride in trace.inputs]
        consts = [[torch.empty_strided(shape, stride, dtype=dtype, device=device)
                   for shape, dtype, device, stride in step.consts] for step in trace.steps]
    sources: dict = {}  # id(fake value) -> ("input", j) | ("out", step, position) | ("const", step, index)
    values: dict = {}
    for j, fake in enumerate(inputs):
        builder.placeholder(f"input{j}", fake)
        tape.track_input(fake)
        values[j + 1] = fake
        sources[id(fake)] = ("input", j)
    for k, step_consts in enumerate(consts):
        for c, fake in enumerate(step_consts):
            builder.placeholder(f"const{k}_{c}", fake)
            sources[id(fake)] = ("const", k, c)
    with builder.recorder():
        for k, step in enumerate(trace.steps):
            if step.kind is DIFF:
                _build_step(tape, step, values, consts[k], sources, k)
    tape.where = None
    builder.phase = "backward"
    y = values.get(trace.seed_key)
    if y is None:
        raise BuildError("the output is not a value of the trace")
    dy = builder.new_input("d_output0", y)
    with builder.recorder():
        cot = tape.backward([(y, dy)], keep=False)
    builder.output(tuple(tape.cotangent(cot, x) for x in inputs))
    gm = builder.module()
    for node in gm.graph.nodes:
        if node.meta.get("phase") == "forward" and (op_class(node).random or op_class(node).effectful or writes(node)):
            raise BuildError(f"{node.target} is random or writes memory")
    keepable = {builder.env[i] for i in sources if i in builder.env}
    try:
        module, residuals = backward_only(gm, keepable)
    except RuntimeError as exc:  # a value the backward needs that no kept value gives
        raise BuildError(str(exc)) from None
    optimize(module)
    return _program(trace, module, [sources[id(r.meta["val"])] for r in residuals])


def _build_step(tape: Tape, step: Step, values: dict, consts: list, sources: dict, k: int) -> None:
    positional, kw_names, keyword = step.template
    args = tuple(_fill(positional, values, consts))
    kwargs = dict(zip(kw_names, _fill(keyword, values, consts)))
    tape.where = step.where
    out = tape.record(step.func, args, kwargs)
    outs = tensors_in(out)
    if tuple((t.shape, t.dtype) for t in outs) != step.out_meta:
        raise BuildError(f"{step.func} gives other outputs on fake tensors")
    for m, key in zip(step.tracked, step.keys):
        if not tape.tracks(outs[m]):
            raise BuildError(f"{step.func}'s output is not differentiated when staged")
        values[key] = outs[m]
    for m, t in enumerate(outs):
        sources.setdefault(id(t), ("out", k, m))


def _program(trace: Trace, module, slots: list) -> Program:
    input_slots, out_slots, const_slots = [], [[] for _ in trace.steps], [[] for _ in trace.steps]
    for r, source in enumerate(slots):
        if source[0] == "input":
            input_slots.append((source[1], r))
        elif source[0] == "out":
            out_slots[source[1]].append((source[2], r))
        else:
            const_slots[source[1]].append((source[2], r))
    return Program(trace, module, len(slots), tuple(input_slots), [tuple(s) for s in out_slots],
                   [tuple(s) for s in const_slots])


# -- replaying -----------------------------------------------------------------------------------

_NATIVE: list = []  # [the compiled extension with the C++ recorder, or None], once looked up


def _native():
    """The compiled extension whose ``replay_handler`` is the recorder's C++ ``__torch_function__``
    (configured with the objects it compares against), or None: no extension, one built before
    it, or ``ZYGOTE_TORCH_NATIVE_REPLAY=0``."""
    if _NATIVE:
        return _NATIVE[0]
    from ..ops import _loader

    module = sys.modules.get(_loader.MODULE) if _loader.MODULE else None
    if getattr(module, "replay_handler", None) is None or os.environ.get("ZYGOTE_TORCH_NATIVE_REPLAY", "1") == "0":
        module = None
    else:
        module.replay_configure(dict(
            kinds=op_classes._kinds, call_kind=call_kind, metadata=METADATA_CALL, inplace=INPLACE, diff=DIFF,
            identity=IDENTITY, nondiff=NONDIFF, plain_types=PLAIN_TYPES, size_type=torch.Size, cut_float=CutFloat,
            slot_type=tape_module.Slot, forget=module.replay_forget, partial=functools.partial))
    _NATIVE.append(module)
    return module


REPLAYING, REPLAYED, RECORDING = "replaying", "replayed", "recording"
_MISS = object()  # what :meth:`Replay.fast_step` gives for a call it leaves to the general path


class ReplayRecorder(WatchingRecorder):
    """The recorder of a :class:`Replay`: a call of the function the trace calls next is checked
    and run by :meth:`Replay.fast_step` in one pass; any other call, or one that does not match,
    takes the recorder's general path (which records it, or makes the replay diverge).

    Where the compiled extension is loaded, the instance's ``__torch_function__`` is its C++ twin
    (csrc/replay.cpp): the usual calls (the trace's next one as it expects it, a call touching no
    tracked tensor) are done there, and anything else is handed to this class's method unchanged."""

    def __init__(self, replay: "Replay", watch: dict | None):
        super().__init__(replay.record_touching, replay.tracked, watch)
        self.replay = replay
        native = _native()
        if native is not None:  # a builtin bound to the recorder, which torch calls as a mode's method
            self.__torch_function__ = native.replay_handler(self)

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.__dict__.pop("__torch_function__", None)  # (the bound handler refers to the recorder)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        replay = self.replay
        if func is replay.next_func:
            out = replay.fast_step(func, args, kwargs, self.watch)
            if out is not _MISS:
                return out
        if self.watch is None:
            return Recorder.__torch_function__(self, func, types, args, kwargs)
        return WatchingRecorder.__torch_function__(self, func, types, args, kwargs)


class Replay(Tape):
    """A tape that replays a :class:`Program` while the calls match its trace, and records as any
    tape from the first call that does not (see the module docstring)."""

    recorder = ReplayRecorder

    def __init__(self, program: Program):
        self.mode = REPLAYING
        super().__init__(staged=False)
        self.program, self.steps, self.plan = program, program.trace.steps, program.plan
        self.i = 0
        self.next_func = self.steps[0].func if self.steps else None  # the trace's next call, while replaying
        self.user_modes = grad_mode.stack()  # this thread's user grad modes (a replay runs on one thread)
        self.slots: list = [None] * (program.n_slots + 1)
        self.versions: list = [None] * program.n_slots
        self.input_tensors: list = []
        self.step_consts: list = []  # per step done: its constants (to record it again when catching up)
        self.out_refs: list = []  # weak references to the tracked outputs, in key order
        self.diverged = None  # why a replay became a tape

    # -- the parts of the Tape interface that need the recorded entries ---------------------------
    @property
    def entries(self):
        if self.mode is REPLAYING:
            self.catch_up("the tape's entries were read")
        return self._entries

    @entries.setter
    def entries(self, value):
        self._entries = value

    def key_of(self, t):
        if self.mode is REPLAYING:
            self.catch_up("a value's key was read")
        return super().key_of(t)

    def apply(self, func, args, kwargs, rule=False, where=None):
        if self.mode is REPLAYING:
            self.catch_up(f"{getattr(func, '__name__', func)} was applied directly")
        return super().apply(func, args, kwargs, rule, where)

    def track_input(self, t: torch.Tensor) -> None:
        super().track_input(t)
        self.input_tensors.append(t)

    def track_inputs(self, ts: list) -> None:
        super().track_inputs(ts)
        self.input_tensors.extend(ts)

    # -- forward -----------------------------------------------------------------------------------
    def record_touching(self, func, args: tuple, kwargs: dict):
        if self.mode is not REPLAYING:
            return super().record_touching(func, args, kwargs)
        out = self.fast_step(func, args, kwargs, None)
        if out is _MISS:
            return self._diverge(self._mismatch(func, args, kwargs), func, args, kwargs)
        return out

    def fast_step(self, func, args: tuple, kwargs, watch):
        """The trace's next call, checked and run in one pass: its output, or :data:`_MISS` where it
        is not that call (another function, inputs, user grad mode or arguments that differ, an
        in-place write to a value the backward reads), with nothing changed: the caller then takes
        the general path. A difference seen only once it has run (other outputs) diverges here.
        ``watch``: where the recorder notes the tensors requiring grad the call reads."""
        if func is not self.next_func:
            return _MISS
        i = self.i
        step = self.steps[i]
        kind = step.kind
        slot = self.grad_slot
        if not self.differentiating or slot is not None and not grad_mode.enabled_from(slot, self.user_modes) \
                or i == 0 and not self._inputs_match():
            return _MISS
        if watch is not None:
            note_requiring_grad(args, watch)
            if kwargs:
                note_requiring_grad(kwargs.values(), watch)
        tracked, consts = self.tracked, []
        if kwargs:
            positional, names, keyword = step.sig if step.template[1] else (None, None, None)
            if names != tuple(kwargs) or not matches(args, positional, tracked, consts) \
                    or not matches(tuple(kwargs.values()), keyword, tracked, consts):
                return _MISS
        elif step.template[1] or not matches(args, step.sig, tracked, consts):
            return _MISS
        else:
            kwargs = {}
        if kind is INPLACE_CONST and self._holds_storage_of(args[0]):
            return _MISS
        out = func(*args, **kwargs) if self.unseen is None else self._call(func, args, kwargs)
        return self._after(func, args, kwargs, out, consts)

    def _after(self, func, args: tuple, kwargs, out, consts: list):
        """The rest of :meth:`fast_step` once the call ran: its outputs checked against the trace's
        (a difference diverges) and noted, and the replay moved on to the next call; ``out``."""
        kwargs = kwargs or {}
        i = self.i
        step = self.steps[i]
        kind, tracked = step.kind, self.tracked
        slots, versions = self.slots, self.versions
        if kind is DIFF:
            if not _outputs_match(out, step.out_meta):
                return self._diverge(f"{getattr(func, '__name__', func)} gave other outputs", func, args, kwargs)
            outs = (out,) if type(out) is torch.Tensor else tensors_in(out)
            for m in step.tracked:
                if id(outs[m]) in tracked:
                    return self._diverge(f"{getattr(func, '__name__', func)} returned a value it was given", func,
                                         args, kwargs)
            refs, track_new = self.out_refs, self.track_new
            for m in step.tracked:
                refs.append(track_new(outs[m]).ref)
            for m, r in self.program.out_slots[i]:
                t = slots[r] = outs[m]
                versions[r] = t._version
            self.step_consts.append(consts)
        else:
            if kind is IDENTITY and tensors_in((args, kwargs))[step.identity] is not out:
                return self._diverge(f"{getattr(func, '__name__', func)} returned another value", func, args, kwargs)
            self.step_consts.append(None)
        for c, r in self.program.const_slots[i]:
            t = slots[r] = consts[c]
            versions[r] = t._version
        self.i = i = i + 1
        self.next_func = self.steps[i].func if i < len(self.steps) else None
        return out

    def _mismatch(self, func, args: tuple, kwargs: dict) -> str:
        """Why a call is not the trace's next one (:meth:`fast_step` gave :data:`_MISS`)."""
        name = getattr(func, "__name__", func)
        if self.i == 0 and not self._inputs_match():
            return "the inputs differ"
        if self.next_func is None:
            return "more calls than the trace"
        if func is not self.next_func:
            return f"{name} instead of the trace's call"
        if not self.differentiating or self.grad_slot is not None and not grad_mode.enabled_from(self.grad_slot):
            return "a call under torch.no_grad()"
        if self.steps[self.i].kind is INPLACE_CONST and args and self._holds_storage_of(args[0]):
            return "an in-place write to a value the backward reads"
        return f"{name} has other arguments"

    def _call(self, func, args, kwargs):
        unseen = self.unseen
        if unseen is None:
            return func(*args, **kwargs)
        with unseen.seeing():  # the call's kernels may read tracked tensors
            return func(*args, **kwargs)

    def _stash(self, r: int, t: torch.Tensor) -> None:
        self.slots[r] = t
        self.versions[r] = t._version

    def _inputs_match(self) -> bool:
        if not self.program.trace.state.holds():
            return False
        metas = self.program.trace.inputs
        if len(metas) != len(self.input_tensors):
            return False
        for t, m in zip(self.input_tensors, metas):
            if t.shape != m[0] or t.dtype is not m[1] or t.device != m[2] or t.stride() != m[3]:
                return False
        for j, r in self.program.input_slots:
            self._stash(r, self.input_tensors[j])
        return True

    def _holds_storage_of(self, target) -> bool:
        """Whether an in-place write to ``target`` would change a value the backward reads, or one
        catching up would record again."""
        sid = storage_id(target) if isinstance(target, torch.Tensor) else None
        if sid is None:
            return True
        held = [t for t in self.slots if isinstance(t, torch.Tensor)] + self.input_tensors + \
            [t for consts in self.step_consts if consts for t in consts]
        return any(storage_id(t) == sid for t in held)

    def _diverge(self, why: str, func, args, kwargs):
        self.catch_up(why)
        return super().record_touching(func, args, kwargs)

    def catch_up(self, why: str) -> None:
        """Become an ordinary tape: record the calls replayed so far through their rules, from the
        same input values, and bind the user's tensors to the values they got."""
        self.mode, self.diverged, self.next_func = RECORDING, why, None
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        unseen = self.unseen
        if unseen is not None:
            unseen.seen += 1
        try:
            self._record_replayed()
        finally:
            if unseen is not None:
                unseen.seen -= 1
            torch._C._set_grad_enabled(grad_was_enabled)
        self.slots = self.versions = self.step_consts = None

    def _record_replayed(self) -> None:
        n_inputs = len(self.input_tensors)
        values = {j + 1: t for j, t in enumerate(self.input_tensors)}
        for step, consts in zip(self.steps[:self.i], self.step_consts):
            if step.kind is not DIFF:
                continue
            positional, kw_names, keyword = step.template
            out = Tape.apply(self, step.func, tuple(_fill(positional, values, consts)),
                             dict(zip(kw_names, _fill(keyword, values, consts))), where=step.where)
            outs = tensors_in(out)
            for m, key in zip(step.tracked, step.keys):
                fresh = outs[m]
                values[key] = fresh
                raw = self.out_refs[key - n_inputs - 1]()
                slot = self.tracked.get(id(raw)) if raw is not None else None
                if slot is not None and slot.key == key and raw is not fresh:
                    self.track(raw, Tape.key_of(self, fresh))

    # -- reverse -----------------------------------------------------------------------------------
    def backward(self, seeds, keep: bool = True) -> dict:
        if self.mode is REPLAYING:
            if self.i == 0 and not self._inputs_match():
                self.catch_up("the inputs differ")
            elif self.i != len(self.steps):
                self.catch_up("fewer calls than the trace")
            elif keep or len(seeds) != 1 or not self._is_seed(*seeds[0]):
                self.catch_up("another output")
            else:
                return self._run_program(seeds[0][1])
        return super().backward(seeds, keep)

    def _is_seed(self, y, dy) -> bool:
        slot = self.tracked.get(id(y)) if isinstance(y, torch.Tensor) else None
        return slot is not None and slot.key == self.program.trace.seed_key and slot.version == y._version \
            and isinstance(dy, torch.Tensor) and dy.shape == y.shape

    def _run_program(self, dy) -> dict:
        slots = self.slots
        for r, version in enumerate(self.versions):
            if slots[r]._version != version:
                raise ZygoteError("a value the gradient needs was modified in place between its use and the "
                                  f"backward pass, outside any call zygote_torch records (replaying "
                                  f"{describe_frame(self.steps[-1].where) if self.steps else 'f'})")
        slots[-1] = dy
        self.mode, self.next_func = REPLAYED, None
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self.slots = self.versions = self.step_consts = None
            grads = self.program.run(slots)  # it empties ``slots``
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        return {j + 1: g for j, g in enumerate(grads) if g is not None}


# -- sites -------------------------------------------------------------------------------------

class Site:
    """One place ``zt.gradient`` is called from: its last trace, its program, how often it missed."""

    __slots__ = ("candidate", "program", "misses", "busy", "replays")

    def __init__(self):
        self.candidate = self.program = None
        self.misses = self.replays = 0
        self.busy = False

    def tape(self) -> Tape:
        """What the next call records on."""
        if self.misses >= MAX_MISSES:
            return Tape()
        if self.program is not None:
            return Replay(self.program)
        return TracingTape()

    def done(self, tape: Tape) -> None:
        """After a call that completed: learn from what it recorded."""
        if isinstance(tape, Replay):
            if tape.mode is REPLAYED:
                self.replays += 1
                _stats["replayed"] += 1
            else:
                _stats["diverged"] += 1
                self.miss()
                self.program = None
        elif isinstance(tape, TracingTape):
            trace = tape.trace()
            if trace is None:
                _stats["not replayable"] += 1
                self.miss()
                self.candidate = None
            elif self.candidate is not None and self.candidate.fingerprint() == trace.fingerprint():
                try:
                    self.program = build(trace)
                    _stats["built"] += 1
                except Exception:  # BuildError, or a call fake tensors cannot run: the tape keeps the site
                    _stats["not built"] += 1
                    self.misses = MAX_MISSES
                self.candidate = None
            else:
                if self.candidate is not None:
                    self.miss()
                self.candidate = trace

    def miss(self) -> None:
        self.misses += 1
        if self.misses >= MAX_MISSES:
            self.candidate = self.program = None


_sites: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()
_stats: collections.Counter = collections.Counter()


def site(api: str, f, key: tuple):
    """The site of a dynamic call of ``api`` on ``f`` (``key``: what else tells sites apart), or None
    where replay does not apply: off, nested in another recording or a staged capture, under a
    torch.func transform, or the site is in use (recursion, another thread)."""
    if not ENABLED or recording_tapes() or is_staging() or torch._C._functorch.maybe_current_level() is not None:
        return None
    code = getattr(f, "__code__", None) or getattr(getattr(f, "__func__", None), "__code__", None) or type(f)
    full_key = (api, code) + key
    with _lock:
        s = _sites.get(full_key)
        if s is None:
            s = _sites[full_key] = Site()
            if len(_sites) > MAX_SITES:
                _sites.popitem(last=False)
        else:
            _sites.move_to_end(full_key)
        if s.busy:
            return None
        s.busy = True
    return s


def release(s: Site) -> None:
    s.busy = False


def stats() -> dict:
    """How many calls were replayed, how many replays diverged, programs built, traces not replayable."""
    return dict(_stats)


def reset() -> None:
    """Forget every site and program (tests; a changed environment)."""
    with _lock:
        _sites.clear()
        _stats.clear()
