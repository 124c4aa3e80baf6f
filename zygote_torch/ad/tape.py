"""The tape: rules applied call by call, then walked in reverse.

One tape serves both ways of running. Dynamically, the recorder hands it each call on real
tensors and the pullbacks compute cotangents. When staging, the reverse transform replays a
forward graph into it on fake tensors under a recording mode, so the very same pullbacks write
backward nodes instead.

Values, not tensor objects, carry cotangents. Each tracked tensor has a :class:`Slot`: the key
(a serial number) of the value it holds now and the version counter it had then. An in-place op
gives its target a new key (see :mod:`.mutation`); so does a view whose base was mutated through
another alias: views share their base's version counter, so a changed version tells a tensor's
value has changed, and the view's new value is replayed from its base the next time it is read
(a ``view_gather`` entry). The tape holds tracked tensors weakly: a tensor lives as long as the
user's code or some pullback needs it, as under ``torch.autograd``.
"""
from __future__ import annotations

import functools
import itertools
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import RuleError, ZygoteError, describe_frame, op_name, user_frame
from ..capture.pytree import PLAIN_TYPES, cotangent_leaves, structure, structured_leaves, tensors_in
from ..capture import grad_mode
from ..capture import cuts
from ..capture.op_classes import INPLACE, call_kind
from ..capture.recorder import is_staging, touches
from . import fusion, mutation
from .mutation import storage_id
from .fallback import fallback_rule
from .registry import REGISTRY
from .tangents import ZeroTangent, add_tangents, is_differentiable, is_zero, unthunk


try:
    _is_transformed = torch._C._functorch.is_functorch_wrapped_tensor
    _current_level = torch._C._functorch.maybe_current_level
    _level_of = torch._C._functorch.maybe_get_level
except AttributeError:  # pragma: no cover
    def _is_transformed(t):
        return False
    _current_level = lambda: None  # noqa: E731
    _level_of = lambda t: -1  # noqa: E731

# A tape may record on torch.func.vmap's batched tensors (vmap over zt.gradient): only tensors of a
# transform entered after the tape began are refused (see Tape.apply). Read by zygote_torch.compose.
RUNS_UNDER_VMAP = True


class Slot:
    """What the tape knows of one tracked tensor: the key of the value it holds, the version
    counter it had when it took that value, and a reference to it (weak when running
    dynamically, so the tape does not keep values alive)."""

    __slots__ = ("key", "version", "ref")

    def __init__(self, key: int, version: int, ref):
        self.key, self.version, self.ref = key, version, ref


class TensorMeta:
    """Shape and dtype of a tensor argument: what the reverse pass checks cotangents against,
    kept instead of the tensor itself on the dynamic path."""

    __slots__ = ("shape", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype = t.shape, t.dtype


class Structured:
    """A structured argument of a rule (a dataclass, a dict, a registered pytree node, a module,
    an object with tensor attributes): the argument itself, against which the rule's structured
    cotangent is read (the same type, or a dict keyed by field name: ChainRules' ``Tangent``), and
    the :class:`TensorMeta` of each of its leaves (None for a leaf that is not a tensor)."""

    __slots__ = ("value", "leaves")

    def __init__(self, value, leaves: list):
        self.value = value
        self.leaves = tuple(TensorMeta(x) if isinstance(x, torch.Tensor) else None for x in leaves)


def _forget(tracked: dict, i: int, ref) -> None:
    """Weak-reference callback: a tracked tensor died, its id may be reused."""
    slot = tracked.get(i)
    if slot is not None and slot.ref is ref:
        del tracked[i]


@dataclass(slots=True)
class Entry:
    """One differentiated call: bound positional arguments (their shapes and dtypes on the dynamic
    path), outputs (staged only), pullback, and the keys of the argument and output values at the
    time of the call. ``call`` keeps a fallback's real arguments, to redo it if one is mutated."""

    func: Any
    args: tuple
    out: Any
    pullback: Callable
    where: Any
    rule_name: str
    fallback: bool
    in_keys: list
    out_keys: Any
    call: Any = None

    @property
    def op(self) -> str:
        return op_name(self.func)

    def context(self) -> str:
        return f"{self.op} (rule {self.rule_name}) called at {describe_frame(self.where)}"


class Tape:
    # A tape may bring its own recorder: ``recorder(tape, watch)`` (see :class:`..ad.recording.recording`)
    recorder = None
    # Whether a staged tape fuses chains of entries (:mod:`.fusion`): not where the forward is the
    # user's own code run as written (a replayed trace), which has computed what the fused kernel skips
    fuses = True

    def __init__(self, staged: bool | None = None):
        # staged: values are fake tensors being recorded into a graph (by default: whenever a
        # graph is being recorded, e.g. zt.gradient called inside a function zt.compile stages)
        self.staged = is_staging() if staged is None else staged
        self.entries: list[Entry] = []
        self.tracked: dict[int, Slot] = {}  # id(tensor) -> its slot
        self.inputs: dict[int, int] = {}  # id -> key of each tensor differentiated with respect to
        self.holders: dict = {}  # storage id -> entries whose arguments or outputs live in it
        self.cuts: list[str] = []  # tracked tensors turned into unmarked Python/NumPy values (see capture/cuts.py)
        self.unseen = None  # the safety net's dispatch mode while a dynamic call records (see .safety)
        self.grad_slot = None  # the user grad mode of the recording feeding this tape (capture.grad_mode)
        self.differentiating = True  # False while a replay runs a call the user made under no_grad
        self.frozen: dict = {}  # id -> views of tracked tensors made under no_grad (constants)
        self.where = None  # set by a replay to the user's line of the call being replayed
        self._serials = itertools.count(1)
        self.serial = next(_tapes)  # tells this tape's cut numbers from other tapes' (see capture/cuts.py)
        self.level = _current_level()  # the torch.func transform level the tape started under, or None

    # -- values ----------------------------------------------------------------------------------
    def track(self, t: torch.Tensor, key: int | None = None) -> int:
        """Make ``t`` tracked, holding the value ``key`` (default: a new value); return the key."""
        if key is None:
            key = next(self._serials)
        slot = self.tracked.get(id(t))
        if slot is not None:
            slot.key, slot.version = key, t._version
            return key
        self._remember(self.tracked, t, key)
        return key

    def _remember(self, store: dict, t: torch.Tensor, key) -> Slot:
        """``store[id(t)] = Slot(key, ...)``, dropped when ``t`` dies (staged: fake tensors, which
        the graph builder keeps alive anyway, are held)."""
        ref = t if self.staged else weakref.ref(t, functools.partial(_forget, store, id(t)))
        slot = store[id(t)] = Slot(key, t._version, ref)
        return slot

    def track_new(self, t: torch.Tensor) -> Slot:
        """:meth:`track` of a tensor not tracked yet: its new slot."""
        return self._remember(self.tracked, t, next(self._serials))

    def track_inputs(self, ts: list) -> None:
        """:meth:`track_input` of each of the distinct tensors ``ts``, in order."""
        inputs, tracked = self.inputs, self.tracked
        for t in ts:
            inputs[id(t)] = self.track(t) if id(t) in tracked else self.track_new(t).key

    def track_input(self, t: torch.Tensor) -> None:
        """Track ``t`` as a tensor to differentiate with respect to (an argument, a parameter)."""
        self.inputs[id(t)] = self.track(t)

    def tracks(self, t) -> bool:
        return id(t) in self.tracked

    def key_of(self, t: torch.Tensor):
        """The key of ``t``'s current value, None for an untracked tensor. A view whose base was
        mutated through another alias since it was last read gets its new value first."""
        slot = self.tracked.get(id(t))
        if slot is None:
            return self._untracked_view(t)
        if slot.version != t._version:
            self._refresh(t, slot)
        return slot.key

    def _untracked_view(self, t: torch.Tensor):
        """The key of ``t``, an untracked tensor: a view made of its base before the base became
        tracked (an in-place op wrote a tracked value into it) reads its value from the base; other
        tensors, and views made under ``torch.no_grad()`` (inside f, or outside it of a tensor that
        requires grad, as torch.autograd sees them), are constants (None)."""
        base = t._base
        if base is None or id(base) not in self.tracked or id(t) in self.frozen:
            return None
        if base.requires_grad and t.grad_fn is None:  # torch's view made under no_grad: no path to the base
            return None
        mutation.replay_view(self, t, base)
        return self.tracked[id(t)].key

    def _refresh(self, t: torch.Tensor, slot: Slot) -> None:
        """``t``'s version changed since the tape last gave it a value. A view of a tracked base is
        read again from the base's current value (as torch.autograd regenerates a view's grad_fn
        after its base changed); any other change was not differentiated (made under no_grad or
        through a ``.detach()``ed alias, as torch.autograd sees it): the value keeps its key."""
        base = t._base
        if base is not None and id(base) in self.tracked:
            mutation.replay_view(self, t, base)
        else:
            slot.version = t._version

    def cotangent(self, cot: dict, t: torch.Tensor):
        """The cotangent of input ``t`` in the result of :meth:`backward`."""
        k = self.inputs.get(id(t))
        return cot.get(k if k is not None else self.key_of(t))

    def _keys(self, obj):
        """Keys of the tracked tensors in ``obj``, mirroring its structure (None elsewhere)."""
        if isinstance(obj, torch.Tensor):
            return self.key_of(obj)
        if isinstance(obj, (tuple, list)):
            return [self._keys(x) for x in obj]
        leaves = structured_leaves(obj)
        return None if leaves is None else [self._keys(x) for x in leaves]

    # -- forward ---------------------------------------------------------------------------------
    def record(self, func, args: tuple, kwargs: dict):
        """Apply ``func``'s rule (or the fallback) and remember its pullback; return the value."""
        if call_kind(func) is not INPLACE and not (touches(args, self.tracked)
                                                   or kwargs and touches(kwargs.values(), self.tracked)):
            return func(*args, **kwargs)
        return self.record_touching(func, args, kwargs)

    def record_touching(self, func, args: tuple, kwargs: dict):
        """:meth:`record` for a call known to touch a tracked tensor or to be in place (the
        recorder's ``on_call``: it has checked)."""
        unseen = self.unseen
        if unseen is None:
            return self._record_touching(func, args, kwargs)
        with unseen.seeing():  # this call's kernels may read tracked tensors
            return self._record_touching(func, args, kwargs)

    def _record_touching(self, func, args: tuple, kwargs: dict):
        if not self.differentiating or self.grad_slot is not None and not grad_mode.enabled_from(self.grad_slot):
            return self._undifferentiated(func, args, kwargs)
        cut = cuts.first_cut(args, self.serial)
        if cut is None and kwargs:
            cut = cuts.first_cut(kwargs.values(), self.serial)
        if cut is not None:
            cuts.refuse_cut_operand(cut, op_name(func), self.where or user_frame())
        kind, non_differentiable, rule = _plan(func)
        if kind is INPLACE:
            return mutation.record_inplace(self, func, args, kwargs)
        if non_differentiable:
            out = func(*args, **kwargs)
            name = getattr(func, "__name__", None)
            if name in cuts.CONVERSIONS and args and is_differentiable(args[0]) \
                    and self.tracks(args[0]):
                return self._cut(name, out)
            return out
        if rule is not None and rule.inplace_index is not None:
            inplace = self._inplace_flag(rule, func, args, kwargs)
            if inplace is not None:  # F.relu(x, inplace=True) and the like: a mutation of x
                return mutation.record_inplace(self, func, *inplace, functional=func)
        # frame 4 up is the code that called the torch function (through the recorder, or record)
        where = self.where or user_frame(4)
        if kwargs and kwargs.get("out") is not None:
            raise ZygoteError(f"{op_name(func)}(..., out=...) at {describe_frame(where)}: "
                              "writing into out= is not differentiable; assign the result instead")
        return self.apply(func, args, kwargs, rule=rule, where=where)

    def _undifferentiated(self, func, args: tuple, kwargs: dict):
        """A call made under ``torch.no_grad()``: its outputs are constants, and an in-place op
        changes its target's value without being differentiated (as under torch.autograd)."""
        if call_kind(func) is INPLACE and args and isinstance(args[0], torch.Tensor):
            self.protect(args[0])
        out = func(*args, **kwargs)
        for t in tensors_in(out):  # a view made here of a tracked tensor stays a constant
            if t._base is not None and id(t._base) in self.tracked:
                self._remember(self.frozen, t, None)
        return out

    def _cut(self, name: str, value):
        """The value of a conversion of a tracked tensor to Python (see :mod:`.cuts`)."""
        where = self.where or user_frame()
        if name in cuts.MARKED:
            return cuts.cut_value(value, f"Tensor.{name}() at {describe_frame(where)}", self.serial)
        if name in cuts.REFUSED:  # as torch refuses numpy() of a tensor that requires grad
            raise ZygoteError(f"Tensor.{name} at {describe_frame(where)} turns a tensor being differentiated into a "
                              "NumPy array, whose computations the tape cannot see (torch.autograd refuses it too). "
                              "Use torch ops, or .detach() it to use it as a constant")
        self.cuts.append(f"Tensor.{name} at {describe_frame(where)}")
        return value

    def check_output(self, out, f_description: str) -> None:
        """Refuse an output that depends on a value cut from the tape (see :mod:`.cuts`)."""
        cut = cuts.first_cut((out,), self.serial)
        if cut is not None:
            cuts.refuse_cut_output(f_description, cut.origin)
        if self.cuts and not any(self.tracks(t) for t in tensors_in(out)):
            cuts.refuse_cut_output(f_description, self.cuts[0])

    @staticmethod
    def _inplace_flag(rule, func, args, kwargs):
        """For a call with a true ``inplace`` flag: its bound arguments with the flag false."""
        i = rule.inplace_index
        if len(args) <= i and not kwargs.get("inplace"):
            return None
        bound, rest = rule.signature.bind(func, args, kwargs)
        if bound[i] is not True:
            return None
        return bound[:i] + (False,) + bound[i + 1:], rest

    def apply(self, func, args: tuple, kwargs: dict, rule=False, where=None):
        """Apply the rule of ``func`` and push its entry; ``where``, the user's line of the call, is
        found here unless given."""
        if rule is False:
            rule = REGISTRY.lookup(func)
        where = where or self.where or user_frame()
        call = None
        if rule is None:  # keyword tensors are differentiated too: they follow the positionals
            call = (func, args, kwargs)
            args = tuple(args) + tuple(kwargs.values())
            in_keys = self._arg_keys(args)  # before the call: a stale view gets its value first
            out, pullback = fallback_rule(func, call[1], kwargs, self.staged, self.tracks)
            name, is_fallback = "torch.func.vjp fallback", True
        else:
            args, kwargs = rule.signature.bind(func, args, kwargs)
            in_keys = self._arg_keys(args)
            out, pullback = _checked_call(rule, func, args, kwargs, where)
            name, is_fallback = rule.name, False
        if isinstance(out, torch.Tensor) and any(out is a for a in args):
            return out  # its input itself (t.double() of a float64 t, t.contiguous()): the same value, no entry
        outputs = _differentiable_outputs(out)
        if not outputs and structured_leaves(out) is not None:  # a dataclass, a dict...: its leaves are the outputs
            outputs, pullback = _with_structured_cotangent(out, pullback)
        if outputs and _is_transformed(outputs[0]) and _level_of(outputs[0]) > (self.level or 0):
            raise ZygoteError(f"{op_name(func)} at {describe_frame(where)} mixes a tensor being differentiated with "
                              "one inside a torch.func transform (grad, jvp, ...): zygote_torch differentiates "
                              "torch.func.vmap calls, not other transforms inside f; write the computation with "
                              "ordinary torch ops instead")
        if outputs:
            for t in outputs:
                self.track(t)
            entry = Entry(func, tuple(args) if self.staged else _metas(args), out if self.staged else None,
                          pullback, where, name, is_fallback, in_keys, self._keys(out), call)
            self.entries.append(entry)
            self._hold(entry, args, out)
        return out

    def _arg_keys(self, args) -> list:
        """:meth:`_keys` of each argument (the common flat case without recursion)."""
        tracked = self.tracked
        keys = []
        for a in args:
            if isinstance(a, torch.Tensor):
                slot = tracked.get(id(a))
                keys.append(slot.key if slot is not None and slot.version == a._version else self.key_of(a))
            elif type(a) not in PLAIN_TYPES:  # a sequence, or a structure holding tensors
                keys.append(self._keys(a))
            else:
                keys.append(None)
        return keys

    def _hold(self, entry: Entry, args, out) -> None:
        """Index ``entry`` under the storages of its tensors: its pullback may hold them, and an
        in-place op on that storage must first give it a snapshot (:meth:`protect`)."""
        holders = self.holders
        for t in itertools.chain(tensors_in(args), tensors_in(out)):
            sid = storage_id(t)
            if sid is not None:
                held = holders.get(sid)
                if held is None:
                    holders[sid] = [entry]
                elif held[-1] is not entry:
                    held.append(entry)

    def protect(self, target: torch.Tensor) -> None:
        """Before ``target``'s storage is overwritten: every recorded pullback that may hold a
        tensor living in it gets a copy of that tensor's current value instead."""
        sid = storage_id(target)
        entries = self.holders.pop(sid, None)
        if entries:
            mutation.snapshot(self, entries, sid)

    def bind(self, target: torch.Tensor, source: torch.Tensor) -> None:
        """``target`` now holds ``source``'s value (the write-back of an in-place op)."""
        key = self.key_of(source)
        if key is None:  # an untracked value: target no longer depends on anything tracked
            self.tracked.pop(id(target), None)
        else:
            self.track(target, key)

    # -- reverse ---------------------------------------------------------------------------------
    def backward(self, seeds, keep: bool = True) -> dict:
        """Cotangents of every tracked value reached from ``seeds`` (pairs of tensor, cotangent),
        keyed by :func:`key`; read an input's with :meth:`cotangent`.

        With ``keep=False`` entries are dropped as they are used, freeing residuals early. The
        pullbacks run with torch.autograd off (as the forward does): no graph is built for them.
        """
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return self._backward(seeds, keep)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)

    def _backward(self, seeds, keep: bool) -> dict:
        if self.staged and self.fuses and not keep:  # one pass, every seed known: chains no other cotangent reaches may fuse
            fusion.fuse(self, seeds)
        if not keep:  # the entries go as they are used: nothing else may hold them
            self.holders = {}
        cot: dict = {}
        for t, dy in seeds:
            k = self.key_of(t)
            if k is not None:
                cot[k] = add_tangents(cot.get(k), dy)
        entries = self.entries
        for i in range(len(entries) - 1, -1, -1):
            entry = entries[i]
            if entry is None:  # replaced by a fused entry
                continue
            if not keep:
                entries[i] = None
            dy = _gather(entry.out_keys, cot)
            if dy is None:
                continue
            grads = entry.pullback(dy)
            _check_arity(entry, grads)
            for arg, k, g in zip(entry.args, entry.in_keys, grads[1:]):
                _accumulate(entry, arg, k, g, cot)
        if not keep:
            self.entries = []
        return cot


_tapes = itertools.count(1)
# func -> effect(tape, *args): a call of a staged trace that acts on the reverse transform's tape
# itself instead of being differentiated (a hook registered on a value: rules/custom_autograd.py)
TAPE_EFFECTS: dict = {}

_plans: dict = {}  # func -> (registry version, call kind, non-differentiable, rule)


def _plan(func) -> tuple:
    """(call kind, non-differentiable, rule) of ``func``, cached until the registry changes."""
    try:
        plan = _plans[func]
        if plan[0] == REGISTRY.version:
            return plan[1:]
    except (KeyError, TypeError):
        pass
    plan = (REGISTRY.version, call_kind(func), REGISTRY.is_non_differentiable(func), REGISTRY.lookup(func))
    if not isinstance(func, types.MethodType):  # a bound method would keep its object alive
        try:
            _plans[func] = plan
        except TypeError:  # an unhashable callable
            pass
    return plan[1:]


def _differentiable_outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    return [t for t in tensors_in(out) if is_differentiable(t)]


def _metas(args) -> tuple:
    """``args`` with each tensor (also inside lists and tuples) replaced by its :class:`TensorMeta`
    and each structured argument holding tensors by its :class:`Structured`."""
    return tuple(TensorMeta(a) if isinstance(a, torch.Tensor)
                 else _metas(a) if isinstance(a, (tuple, list)) and tensors_in(a)
                 else None if type(a) in PLAIN_TYPES else _structured_or_none(a) for a in args)


def _structured_or_none(a):
    leaves = structured_leaves(a)
    return None if leaves is None else Structured(a, leaves)


def _with_structured_cotangent(out, pullback):
    """(differentiable leaves of ``out``, a structured output, and ``pullback`` taking the tuple of
    their cotangents, as the tape gathers them, rebuilt into ``out``'s structure: the rule sees
    the cotangent of a dataclass as that dataclass, of a dict as a dict, ZeroTangent where none
    arrived)."""
    leaves, shape = structure(out)
    outputs = [t for t in leaves if is_differentiable(t)]

    def structured_pullback(dy):  # dy: one part per leaf (its keys are the leaves' keys)
        return pullback(shape.gradient([d if isinstance(t, torch.Tensor) else ZeroTangent()
                                        for t, d in zip(leaves, dy)]))

    return outputs, structured_pullback


def _accumulate(entry: Entry, arg, k, g, cot: dict) -> None:
    if k is None or is_zero(g):
        return
    g = unthunk(g)
    if is_zero(g):
        return
    if isinstance(arg, (torch.Tensor, TensorMeta)):
        _check_cotangent(entry, arg, g)
        if g.dtype != arg.dtype:
            g = g.to(arg.dtype)
        cot[k] = add_tangents(cot.get(k), g)
    elif isinstance(arg, (tuple, list)):
        if not isinstance(g, (tuple, list)) or len(g) != len(arg):
            raise RuleError(f"pullback of {entry.context()}: the cotangent of a sequence argument "
                            f"must be a sequence of {len(arg)} cotangents, got {type(g).__name__}")
        for a, ki, gi in zip(arg, k, g):
            _accumulate(entry, a, ki, gi, cot)
    else:  # a structured argument: its cotangent is read leaf by leaf
        value, metas = (arg.value, arg.leaves) if isinstance(arg, Structured) else (arg, structure(arg)[0])
        try:
            leaf_cotangents = cotangent_leaves(value, g)
        except ValueError as exc:
            raise RuleError(f"pullback of {entry.context()}: {exc}") from None
        for a, ki, gi in zip(metas, k, leaf_cotangents):
            _accumulate(entry, a, ki, gi, cot)


def _gather(keys, cot: dict):
    """The cotangent of an output structure (given by its keys), or None when all of it is zero."""
    if isinstance(keys, int):
        return cot.pop(keys, None)
    if isinstance(keys, list):
        parts = [_gather(k, cot) for k in keys]
        if all(p is None for p in parts):
            return None
        return tuple(ZeroTangent() if p is None else p for p in parts)
    return None


def _checked_call(rule, func, args, kwargs, where):
    try:
        result = rule.fn(*args, **kwargs)
    except RuleError:
        raise
    except Exception as exc:
        exc.add_note(f"in rule {rule.name} for {op_name(func)}, called at {describe_frame(where)}")
        raise
    if not (isinstance(result, tuple) and len(result) == 2 and callable(result[1])):
        raise RuleError(f"rule {rule.name} for {op_name(func)} must return (value, pullback); "
                        f"got {type(result).__name__}. Called at {describe_frame(where)}")
    return result


def _check_arity(entry: Entry, grads) -> None:
    expected = 1 + len(entry.args)
    if not isinstance(grads, tuple) or len(grads) != expected:
        got = f"{len(grads)} cotangents" if isinstance(grads, tuple) else f"a {type(grads).__name__}"
        raise RuleError(f"pullback of {entry.context()} returned {got}; expected a tuple of {expected} "
                        f"(the function's own cotangent, then one per positional argument)")


def _check_cotangent(entry: Entry, arg, g) -> None:
    if not isinstance(g, torch.Tensor):
        raise RuleError(f"pullback of {entry.context()} returned a {type(g).__name__} as the "
                        f"cotangent of a tensor argument of shape {tuple(arg.shape)}")
    if g.shape != arg.shape:
        raise RuleError(f"pullback of {entry.context()} returned a cotangent of shape "
                        f"{tuple(g.shape)} for an argument of shape {tuple(arg.shape)}")
