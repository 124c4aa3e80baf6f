"""Recording torch-level calls: the one mechanism under both ways of running.

:class:`Recorder` is a ``TorchFunctionMode``: while it is active, every call of a torch function,
a ``torch.nn.functional`` function, a Tensor method or operator, or a user function with a rule
(see :mod:`.leaves`) reaches ``on_call`` when it touches a tracked tensor. Code under capture sees
ordinary tensors: real ones when running dynamically (so data-dependent Python simply runs), fake
ones (``FakeTensor``, shapes and dtypes without data) when staging a graph.

:class:`GraphBuilder` is the ``on_call`` that writes each call as a node of a ``torch.fx.Graph``,
computing the node's value on fake tensors (``node.meta['val']``) and writing its class (random,
effectful, in place, view, cheap: ``node.meta['op_class']``, :mod:`.op_classes`), which the passes read.
"""
from __future__ import annotations

import builtins
import importlib
import logging
import operator
import threading
import types

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ..errors import TraceError, describe_frame, op_name, user_frame
from . import grad_mode
from .cuts import CutFloat
from .op_classes import INPLACE, METADATA_CALL, call_kind, canonical_key, classify_node, is_data_dependent, is_inplace
from .pytree import _ATOMS, PLAIN_TYPES, structured_leaves, tensors_in

Tensor = torch.Tensor

# torch ops whose meta kernel refuses inputs their CPU kernel runs (torch._grouped_mm's takes only
# bfloat16): function -> what computes its result on fake tensors instead. Filled by zygote_torch.ops.
FAKE_KERNELS: dict = {}


def map_tensors(obj, fn):
    """``obj`` with every tensor ``t`` in it replaced by ``fn(t)``; containers rebuilt."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        return type(obj)(*(map_tensors(x, fn) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


_state = threading.local()

# Conversions that return their input itself when there is nothing to convert (trusted on real
# dtypes only: fake tensors do not always carry the conjugate bit).
_MAYBE_IDENTITY = {"conj", "real", "resolve_conj", "resolve_neg", "contiguous", "to", "float", "double", "half",
                   "bfloat16", "cpu", "cuda", "type", "type_as", "__get__"}


def _staging_slots() -> list:
    try:
        return _state.staging_slots
    except AttributeError:
        _state.staging_slots = []
        return _state.staging_slots


def staging_grad_enabled() -> bool:
    """Whether a call made now is differentiated by the graph being staged (the user grad mode of
    its recorder and of every recording inside it is on, see :mod:`.grad_mode`)."""
    slots = _staging_slots()
    return not slots or grad_mode.enabled_from(slots[-1])


def is_staging() -> bool:
    """True while a graph is being recorded on fake tensors (so nested differentiation emits nodes)."""
    return getattr(_state, "staging", 0) > 0


class Recorder(TorchFunctionMode):
    """Hands torch-level calls to ``on_call(func, args, kwargs)``.

    ``tracked`` is a dict keyed by ``id`` of the tracked tensors; calls touching none of them run as
    they are, except in-place ones (they may overwrite a value some pullback holds). With
    ``tracked=None`` every call is handed over (staging, where factories matter too).
    """

    def __init__(self, on_call, tracked: dict | None = None):
        super().__init__()
        self.on_call = on_call
        self.tracked = tracked
        self.grad_slot = None  # this recording's user grad mode (see .grad_mode), while active

    def __enter__(self):
        self.grad_slot = grad_mode.push()
        if self.tracked is None:
            _state.staging = getattr(_state, "staging", 0) + 1
            _staging_slots().append(self.grad_slot)
        return super().__enter__()

    def __exit__(self, *exc):
        if self.tracked is None:
            _state.staging -= 1
            _staging_slots().pop()
        grad_mode.pop()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = call_kind(func)
        if kind is METADATA_CALL:
            return func(*args, **kwargs)
        tracked = self.tracked
        if tracked is not None and kind is not INPLACE and not touches(args, tracked) \
                and not (kwargs and touches(kwargs.values(), tracked)):
            return func(*args, **kwargs)
        return self.on_call(func, args, kwargs)


def touches(values, tracked: dict) -> bool:
    """Whether any tensor in ``values`` (looking into lists and tuples) is tracked or a view of a
    tracked tensor, or a number cut from a tracked tensor is among them (the tape refuses it)."""
    for v in values:
        if isinstance(v, Tensor):
            if id(v) in tracked:
                return True
            base = v._base
            if base is not None and id(base) in tracked:
                return True
        elif isinstance(v, (list, tuple)):
            if touches(v, tracked):
                return True
        elif type(v) is CutFloat:
            return True
        elif type(v) not in PLAIN_TYPES and not isinstance(v, _ATOMS):  # a dataclass, a dict, a module...
            leaves = structured_leaves(v)
            if leaves is not None and touches(leaves, tracked):
                return True
    return False


def _refuse_structured_arguments(func, args, kwargs) -> None:
    """A graph node passes tensors to a call directly or in tuples, lists and dicts: a call given a
    dataclass, a registered pytree node or an object holding tensors (a user function with a rule
    taking a struct) is refused by name, not run on the values of the trace."""
    for a in (*args, *kwargs.values()):
        if not isinstance(a, (dict, torch.nn.Module)) and structured_leaves(a) is not None:
            raise TraceError(
                f"{op_name(func)} at {describe_frame(user_frame())} is given a {type(a).__name__} holding tensors, "
                "which staged capture cannot pass to one call (it passes tensors directly, or in tuples, lists "
                "and dicts). Use the dynamic API (zt.gradient, zt.pullback), or pass the tensors as arguments.")


# Tensor methods written as Python operators in generated code: name -> (operator, swap operands)
_OPERATORS = {
    "add": (operator.add, False), "__add__": (operator.add, False), "__radd__": (operator.add, True),
    "sub": (operator.sub, False), "__sub__": (operator.sub, False), "__rsub__": (operator.sub, True),
    "mul": (operator.mul, False), "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True),
    "div": (operator.truediv, False), "__truediv__": (operator.truediv, False),
    "__rtruediv__": (operator.truediv, True), "matmul": (operator.matmul, False),
    "__matmul__": (operator.matmul, False), "pow": (operator.pow, False), "__pow__": (operator.pow, False),
    "__rpow__": (operator.pow, True), "__getitem__": (operator.getitem, False),
}


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``: the node for a callable that generated code cannot name."""
    return fn(*args, **kwargs)


_nameable_cache: dict = {}


def _nameable(fn) -> bool:
    """Whether fx's generated code can refer to ``fn``: torch's objects are written by their
    qualified name (which must resolve to ``fn``), others are passed in as globals."""
    try:
        return _nameable_cache[fn]
    except (KeyError, TypeError):
        pass
    module = getattr(fn, "__module__", None) or ""
    ok = True
    if module.startswith("torch") and not isinstance(fn, types.BuiltinFunctionType):
        try:
            path = fx.node._get_qualified_name(fn).split(".")
            obj = importlib.import_module(path[0])
            for part in path[1:]:
                obj = getattr(obj, part)
            ok = obj is fn
        except Exception:
            ok = False
    try:
        _nameable_cache[fn] = ok
    except TypeError:
        pass
    return ok


def setitem(tensor, index, value):
    """``tensor[index] = value``, returning the mutated tensor so later nodes can refer to it."""
    tensor[index] = value
    return tensor


def node_call(func, args: tuple, kwargs: dict):
    """(op, target, args) of the fx node for a torch-level call, so generated code reads like the
    user's: ``x * 5`` rather than ``torch.Tensor.mul(x, 5)``, ``x.sum(1)``, ``getattr(x, 'T')``."""
    key = canonical_key(func)
    if type(key).__name__ == "getset_descriptor":
        return "call_function", builtins.getattr, (args[0], key.__name__)
    if key is Tensor.__setitem__:
        return "call_function", setitem, tuple(args)
    qualname = getattr(func, "__qualname__", "")
    if qualname.startswith(("TensorBase.", "Tensor.")) and not isinstance(func, types.BuiltinFunctionType):
        if func.__name__ in _OPERATORS and not kwargs and len(args) == 2:
            op, swap = _OPERATORS[func.__name__]
            return "call_function", op, (args[1], args[0]) if swap else tuple(args)
        if func.__name__ == "neg" and len(args) == 1:
            return "call_function", operator.neg, tuple(args)
        return "call_method", func.__name__, tuple(args)
    return "call_function", func, tuple(args)


_LITERALS = (int, float, bool, complex, str, type(None), slice, type(Ellipsis), torch.dtype, torch.device,
             torch.memory_format, torch.layout, fx.Node)


def _as_literals(obj, constant):
    """``obj`` as generated code can write it: NumPy scalars become Python numbers, and objects
    that have no literal form (a ``torch.Generator``, an array) become ``constant(obj)``, a node
    reading them from the program's module."""
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if isinstance(obj, (tuple, list)) and not hasattr(type(obj), "_fields"):
        return type(obj)(_as_literals(x, constant) for x in obj)
    if isinstance(obj, dict):
        return {k: _as_literals(v, constant) for k, v in obj.items()}
    if isinstance(obj, _LITERALS) or isinstance(obj, type) and obj.__module__ == "builtins":
        return obj
    return constant(obj)


_FAKE_TENSOR_LOG = logging.getLogger("torch._subclasses.fake_tensor")


class _fake_kernel_log_off:
    """torch logs a failing meta kernel's traceback to stderr before raising the error; under
    capture that error reaches the user's code, which may catch it (as on real tensors), so the
    log is switched off while a call runs on fake tensors."""

    def __enter__(self):
        self.was_disabled, _FAKE_TENSOR_LOG.disabled = _FAKE_TENSOR_LOG.disabled, True

    def __exit__(self, *exc):
        _FAKE_TENSOR_LOG.disabled = self.was_disabled


def _as_given(out, given: list, mapped):
    """``out`` as the caller sees it: a result that is the fake stand-in of a real tensor the caller
    passed (``out=``, an in-place op returning its target) is that tensor itself, as on real tensors
    (``self.buf = F.normalize(..., out=self.buf)`` must not put a fake tensor into a module)."""
    fakes = tensors_in(mapped)
    back = {id(f): g for g, f in zip(given, fakes) if f is not g}
    return map_tensors(out, lambda t: back.get(id(t), t)) if back else out


class GraphBuilder:
    """Writes torch-level calls on fake tensors into a ``torch.fx.Graph``.

    ``lift(t)`` decides what a real tensor met during capture (a parameter, a global, a closure's
    tensor) becomes: by default a new placeholder, so the graph reads it afresh at each run.
    """

    def __init__(self, fake_mode: FakeTensorMode | None = None, lift_real_tensors: bool = True):
        self.graph = fx.Graph()
        self.fake_mode = fake_mode or FakeTensorMode(allow_non_fake_inputs=False)
        self.lift_real_tensors = lift_real_tensors
        self.env: dict[int, fx.Node] = {}  # id(fake tensor) -> node
        self.keep: list = []  # keeps every bound tensor alive so ids stay unique
        self.fake_of: dict[int, Tensor] = {}  # id(real tensor) -> its fake
        self.lifted: list[tuple[Tensor, fx.Node]] = []  # (real tensor, placeholder)
        self.constants: dict[str, object] = {}  # what get_attr nodes read: tensors, other objects
        self.phase = "forward"

    # -- values and nodes ------------------------------------------------------------------------
    def bind(self, value: Tensor, node: fx.Node) -> None:
        self.env[id(value)] = node
        self.keep.append(value)
        node.meta["val"] = value

    def placeholder(self, name: str, value: Tensor | None) -> fx.Node:
        node = self.graph.placeholder(name)
        if value is not None:
            self.bind(value, node)
        self._move_placeholders_first(node)
        return node

    def _move_placeholders_first(self, node: fx.Node) -> None:
        for other in self.graph.nodes:
            if other.op != "placeholder":
                other.prepend(node)
                return
            if other is node:
                return

    def new_input(self, name: str, like: Tensor) -> Tensor:
        """A new placeholder holding a tensor shaped like ``like``; returns its fake value."""
        with self.fake_mode:
            value = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        self.placeholder(name, value)
        return value

    def fake(self, real: Tensor) -> Tensor:
        """The fake stand-in of a real tensor met during capture, lifted once."""
        if isinstance(real, FakeTensor) or id(real) in self.env:
            return real
        fake = self.fake_of.get(id(real))
        if fake is not None:
            return fake
        if self.lift_real_tensors:
            if real._base is not None and real.grad_fn is not None:
                raise TraceError(
                    f"f reads, at {describe_frame(user_frame())}, a tensor it captured that is a view (shape "
                    f"{tuple(real.shape)}) of a tensor that requires grad, made outside f: torch differentiates "
                    "through it to its base, which staged capture does not follow. Take the view inside f, or use "
                    "the dynamic API (zt.gradient)")
            return self.lift(real, f"captured_{len(self.lifted)}")
        fake = self._fake_of(real)
        name = f"_const_{len(self.constants)}"
        self.constants[name] = real
        self.bind(fake, self.graph.get_attr(name))
        return fake

    def lift(self, real: Tensor, name: str) -> Tensor:
        """Make real tensor ``real`` an input of the graph; return its fake stand-in."""
        fake = self._fake_of(real)
        self.lifted.append((real, self.placeholder(name, fake)))
        return fake

    def _fake_of(self, real: Tensor) -> Tensor:
        fake = self.fake_mode.from_tensor(real)
        self.fake_of[id(real)] = fake
        self.keep.append(real)
        return fake

    def node_arg(self, obj):
        """The fx argument for a value: tensors become their nodes, other values literals."""
        return _as_literals(map_tensors(obj, self._node_of), self._object_constant)

    def _node_of(self, t: Tensor) -> fx.Node:
        node = self.env.get(id(t))
        return node if node is not None else self.env[id(self.fake(t))]

    def _object_constant(self, obj) -> fx.Node:
        name = f"_object_{len(self.constants)}"
        self.constants[name] = obj
        return self.graph.get_attr(name)

    # -- recording -------------------------------------------------------------------------------
    def record(self, func, args, kwargs):
        """Run ``func`` on fake values and write it as a node; return its (fake) result."""
        _refuse_structured_arguments(func, args, kwargs)
        given = tensors_in((args, kwargs))
        args = map_tensors(args, self.fake)
        kwargs = map_tensors(kwargs, self.fake)
        if is_data_dependent(func):
            raise TraceError(
                f"{op_name(func)} needs tensor data, which staged capture does not have (its Python "
                f"would be frozen into the graph), at {describe_frame(user_frame())}. Use the dynamic "
                "API (zt.gradient, zt.pullback), or torch.where instead of a Python branch.")
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # fake values need no autograd graph (a replay runs with it on)
        try:
            with self.fake_mode, _fake_kernel_log_off():
                out = FAKE_KERNELS.get(func, func)(*args, **kwargs)
        except Exception as exc:
            if type(exc).__name__ in ("DataDependentOutputException", "DynamicOutputShapeException"):
                raise TraceError(
                    f"{op_name(func)} has a data-dependent result, which staged capture cannot "
                    f"follow, at {describe_frame(user_frame())}. Use the dynamic API.") from exc
            raise
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        mutates = is_inplace(func)
        if mutates and out is None:  # __setitem__: the value is the mutated tensor
            out = args[0]
        if not tensors_in(out):
            return out
        if getattr(func, "__name__", "") in _MAYBE_IDENTITY and isinstance(out, Tensor) and not out.is_complex() \
                and any(out is a for a in tensors_in(args)):
            return _as_given(out, given, (args, kwargs))  # it returned its input (x.float() of a float): no node
        node_args, node_kwargs = self.node_arg(tuple(args)), self.node_arg(kwargs)
        op, target, call_args = node_call(func, node_args, node_kwargs)
        if op == "call_function" and not _nameable(target):  # e.g. torch.autograd.Function.apply
            target, call_args = call, (self._object_constant(target),) + tuple(call_args)
        node = self.graph.create_node(op, target, call_args, node_kwargs)
        node.meta["func"] = func  # the call as made (args before operator rewriting), for replay
        node.meta["func_args"] = node_args
        node.meta["func_kwargs"] = node_kwargs
        node.meta["phase"] = self.phase
        classify_node(node)  # random, effectful (``mutates``), in place, view, cheap: what the passes read
        node.meta["where"] = user_frame()
        node.meta["user_grad"] = staging_grad_enabled()  # made under torch.no_grad(): not differentiated
        self._bind_outputs(out, node)
        return _as_given(out, given, (args, kwargs))

    def _bind_outputs(self, out, node: fx.Node) -> None:
        if isinstance(out, Tensor):
            self.bind(out, node)
            return
        node.meta["val"] = out
        for i, item in enumerate(out):
            if isinstance(item, (Tensor, tuple, list)):
                getitem = self.graph.call_function(operator.getitem, (node, i))
                getitem.meta["phase"] = self.phase
                classify_node(getitem)
                self._bind_outputs(item, getitem)

    def recorder(self) -> Recorder:
        return Recorder(self.record, tracked=None)

    def output(self, value) -> fx.Node:
        return self.graph.output(self.node_arg(value))

    def module(self) -> fx.GraphModule:
        """The graph as a ``GraphModule`` holding the constants its ``get_attr`` nodes read."""
        root = torch.nn.Module()
        for name, value in self.constants.items():
            if isinstance(value, Tensor):
                root.register_buffer(name, value)
            else:
                setattr(root, name, value)
        return fx.GraphModule(root, self.graph)
