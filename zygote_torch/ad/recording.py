"""Running a function on a tape: the recording core of the dynamic path.

:class:`recording` is the context under which every torch call touching a tape's tensors is
recorded on it (and torch.autograd builds no graph); :class:`TrackedArguments` puts a call's
arguments on a tape (the one argument path of :mod:`..capture.arguments`, with the dynamic path's
stand-ins); :func:`run_on_tape` runs ``f`` on them and :func:`seeds` pairs its output with a
cotangent, so that ``tape.backward(seeds(f, out, dy))`` is its pullback. The API
(:mod:`zygote_torch.api`), the rules differentiating a reference formula (:mod:`.via_ad`) and the
torch.autograd bridge (:mod:`zygote_torch.compose`) all run functions this way.
"""
from __future__ import annotations

import threading

import torch

from ..capture import leaves, pymath, transforms
from ..capture.arguments import Arguments, frozen, is_float_array, is_python_float
from ..capture.pytree import flatten
from ..capture.recorder import Recorder
from ..errors import ZygoteError
from . import safety
from .registry import REGISTRY
from .tangents import is_differentiable, is_zero, unthunk
from .tape import Tape

# The thread's recording state: .tapes, the tapes recording now (outermost first); .watch, the dict
# into which the current recording notes the tensors requiring grad it reads (set by
# zygote_torch.compose.connected during a first run).
state = threading.local()


def recording_tapes() -> list:
    """The tapes recording now, outermost first."""
    tapes = getattr(state, "tapes", None)
    if tapes is None:
        tapes = state.tapes = []
    return tapes


def watching():
    """The dict the current recording notes the tensors requiring grad it reads into, or None."""
    return getattr(state, "watch", None)


# -- recording ---------------------------------------------------------------------------------

class WatchingRecorder(Recorder):
    """A :class:`Recorder` that also notes every tensor requiring grad that a call reads (the
    tensors through which the result may depend on an outer torch.autograd graph)."""

    def __init__(self, on_call, tracked, watch: dict):
        super().__init__(on_call, tracked)
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        note_requiring_grad(args, self.watch)
        if kwargs:
            note_requiring_grad(kwargs.values(), self.watch)
        return super().__torch_function__(func, types, args, kwargs)


def note_requiring_grad(values, watch: dict) -> None:
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                watch[id(v)] = v
        elif isinstance(v, (list, tuple)):
            note_requiring_grad(v, watch)


class recording:
    """Context: every torch call touching the tape's tensors is recorded on it (torch.autograd
    builds no graph meanwhile). A class rather than nested context managers: it is entered at
    every dynamic call, and this is its cheapest form."""

    __slots__ = ("leaves", "recorder", "grad_was_enabled", "tape", "inference", "unseen", "math")

    def __init__(self, tape: Tape, math: bool = False):
        self.tape = tape
        self.math = pymath.intercepting_math() if math else None  # math.sin(x) of a differentiated number
        self.leaves = leaves.intercepting(REGISTRY.python_leaves())
        watch = watching()
        if tape.recorder is not None:  # a tape with a recorder of its own (a replay's)
            self.recorder = tape.recorder(tape, watch)
        elif watch is None:
            self.recorder = Recorder(tape.record_touching, tape.tracked)
        else:
            self.recorder = WatchingRecorder(tape.record_touching, tape.tracked, watch)
        self.unseen = safety.UnseenReads(tape.tracked) if safety.enabled() and not tape.staged else None

    def __enter__(self):
        self.grad_was_enabled = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        if self.inference:  # inference tensors have no version counter, which the tape keys on
            self.inference = torch.inference_mode(False)
            self.inference.__enter__()
        torch._C._set_grad_enabled(False)
        self.leaves.__enter__()
        if self.math is not None:
            self.math.__enter__()
        self.recorder.__enter__()
        self.tape.grad_slot = self.recorder.grad_slot  # torch.no_grad() inside f is honoured
        if self.unseen is not None:
            self.tape.unseen = self.unseen
            self.unseen.__enter__()
        recording_tapes().append(self.tape)

    def __exit__(self, *exc):
        try:
            recording_tapes().pop()
            if self.unseen is not None:
                self.unseen.__exit__(*exc)
                self.tape.unseen = None
            self.recorder.__exit__(*exc)
            if self.math is not None:
                self.math.__exit__(*exc)
            self.leaves.__exit__(*exc)
        finally:
            torch._C._set_grad_enabled(self.grad_was_enabled)
            if self.inference:
                self.inference.__exit__(*exc)
        if self.unseen is not None:
            self.unseen.reraise(exc[1])


# -- arguments on a tape -------------------------------------------------------------------------

class TrackedArguments(Arguments):
    """The arguments of one call with their differentiated leaves tracked on ``tape``.

    A Python float becomes a 0-d float64 tensor and a floating-point NumPy array a tensor sharing its
    memory (their gradients are given back as a float and an array, see
    :func:`..capture.arguments.as_numbers`); a tensor is tracked as itself (so closures and modules
    that hold it are seen too), except a tensor passed twice, whose second occurrence is a fresh
    alias so each argument gets its own cotangent, and an inference tensor, tracked as a copy.
    Arguments outside ``wrt`` (a set of indices; None: all) are constants, and so is a frozen
    parameter (``requires_grad=False``) inside an argument, as for ``loss.backward()``: the backbone
    of a fine-tuned model gets no gradient, and none is computed for it. ``on_input(tape, standin,
    original)`` is called for each tracked leaf (the API applies the hooks registered on it).
    """

    def __init__(self, args: tuple, tape: Tape, wrt=None, on_input=None):
        self.tape, self.on_input, self.seen = tape, on_input, set()
        super().__init__(args, wrt)

    def standins(self, index: int, arg, flat: list) -> list:
        return [x if frozen(x, arg) else self._standin(x) for x in flat]

    def _standin(self, x):
        if is_python_float(x):
            t = torch.tensor(float(x), dtype=torch.float64)
        elif is_float_array(x):  # a NumPy array: f sees a tensor sharing its memory
            t = torch.from_numpy(x)
        elif is_differentiable(x):
            if x.is_inference():  # no version counter, which the tape keys on: a normal copy
                with torch.inference_mode(False):
                    t = x.clone()
            else:
                t = x.view_as(x) if id(x) in self.seen else x
            self.seen.add(id(x))
        else:
            return x
        self.tape.track_input(t)
        if self.on_input is not None:
            self.on_input(self.tape, t, x)
        return t

    def gradients(self, tape: Tape, cot: dict) -> tuple:
        """Cotangents mirroring each argument; None for an argument with no dependence."""
        return self.gradients_of([
            None if s is None else [_leaf_gradient(x, t, tape, cot) for x, t in zip(s[0], standins)]
            for s, standins in zip(self.structures, self.standins_per_argument)])


def _leaf_gradient(original, standin, tape: Tape, cot: dict):
    if standin is original and not isinstance(original, torch.Tensor):
        return None
    return tape.cotangent(cot, standin)


def track_params(tape: Tape, params, api: str, where, on_input=None) -> None:
    """Track implicit ``zt.Params`` on ``tape`` as themselves (a frozen one is a constant, as for the
    module argument and ``loss.backward()``); ``where()`` names the user's line for the error of a
    parameter without a gradient."""
    tracked = [p for p in params if not frozen(p, None)]
    for p in tracked:
        if not is_differentiable(p):
            raise ZygoteError(f"zt.{api}: Params holds a {p.dtype} tensor, which has no gradient "
                              f"(at {where()})")
    tape.track_inputs(tracked)
    if on_input is not None:
        for p in tracked:
            on_input(tape, p, p)


def run_on_tape(f, args: tuple, kwargs=None, wrt=None, on_input=None, tape: Tape | None = None):
    """``(tape, arguments, out)``: ``f(*args, **kwargs)`` run once on a fresh tape (``tape``, when
    given), the arguments in ``wrt`` (None: all) differentiated; its pullback for an output
    cotangent ``dy`` is ``arguments.gradients(tape, tape.backward(seeds(f, out, dy)))``."""
    tape = Tape() if tape is None else tape
    arguments = TrackedArguments(args, tape, wrt, on_input)
    with recording(tape, math=arguments.numbers):
        out = f(*arguments.call_args, **kwargs) if kwargs else f(*arguments.call_args)
    return tape, arguments, out


# -- output cotangents ---------------------------------------------------------------------------

def describe(f) -> str:
    """How errors name function ``f``: its qualified name and where it is defined."""
    code = getattr(f, "__code__", None)
    name = getattr(f, "__qualname__", None) or getattr(type(f), "__qualname__", repr(f))
    return f"{name} ({code.co_filename}:{code.co_firstlineno})" if code else name


def seeds(f, out, dy) -> list:
    """(output tensor, its cotangent) pairs, ``dy`` mirroring the output's structure."""
    out_leaves, dy_leaves = flatten(out)[0], flatten(dy)[0]
    if len(dy_leaves) != len(out_leaves):
        if not isinstance(out, torch.Tensor) and dy is not None and len(out_leaves) == 1 and len(dy_leaves) > 1:
            dy_leaves = [dy]
        else:
            raise ZygoteError(f"zt.pullback: the cotangent has {len(dy_leaves)} leaves but the output "
                              f"of {describe(f)} has {len(out_leaves)}")
    pairs = []
    for y, d in zip(out_leaves, dy_leaves):
        d = unthunk(d)
        if is_zero(d) or not isinstance(y, torch.Tensor):
            continue  # None, ZeroTangent(), NoTangent(): nothing to seed
        d = torch.as_tensor(d, dtype=y.dtype, device=y.device)
        if d.shape != y.shape:
            raise ZygoteError(f"zt.pullback: cotangent of shape {tuple(d.shape)} for an output of "
                              f"shape {tuple(y.shape)} of {describe(f)}")
        pairs.append((y, d))
    return pairs


transforms.install_recording_tapes(recording_tapes)  # capture's torch.func refusal asks which tapes record
