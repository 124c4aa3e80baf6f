"""Guards: what a staged trace read from Python, checked at each call, as ``torch.compile``'s are.

Before ``f`` is traced, the values it can reach are walked from its roots: its closure cells, the
globals its code names (in nested code too), its defaults, the ``self`` of a bound method, a
callable object's attributes, and its non-tensor arguments. The walk goes into user functions
(their closures and globals, likewise), ``nn.Module``s (training flag, parameters, buffers,
submodules, hooks, every other attribute), containers, instances of user classes (their attributes,
and their classes' numbers and flags), ``zt.Params`` and optimizers (learning rates, state). Each value it meets becomes a check at the place it was found (a dict key, an
attribute, an index):

- Python numbers, strings, flags, ``None``, dtypes, tuples of them: equal to what was read;
- modules, functions, containers, other objects: the same object (containers: the same length);
- module hooks: none registered (a module with hooks runs eagerly, so they run at every call);
- tensors: those the trace used become inputs read from that place at each call (a rebound
  ``m.weight = nn.Parameter(...)`` or global is read, with its shape, dtype and device checked);
  those whose metadata it read (``W.shape[0]``) must be the same tensor.

Global state is checked too: the rule registry's version, autocast, the default dtype, the fused
kernels' settings, global module hooks. A failed check is a new trace. What the walk does not reach
(attributes of library objects, class attributes, values computed by calls, iterators, random
generators' state, ``os.environ``) is frozen at trace time: ``docs/semantics.md`` lists it.

The checks are grouped by kind into parallel lists and evaluated with ``map`` over C functions
(``dict.get``, ``getattr``, ``operator.is_``), a few microseconds for a small model.
"""
from __future__ import annotations

import enum
import functools
import operator
import sys
import types

import torch
import torch.nn.modules.module as _torch_module

from ..ad.registry import REGISTRY
from ..capture.pytree import flatten
from ..ops.kernel_choice import kernel_choice_key
from ..params import Params

LIBRARY_PACKAGES = frozenset(sys.stdlib_module_names) | {
    "torch", "zygote_torch", "numpy", "functorch", "triton", "sympy", "_pytest", "pytest", "pluggy",
    "typing_extensions", "builtins"}
MAX_CHECKS = 20000  # values walked from one function's roots; past that, the rest is not guarded
MAX_ITEMS = 1000  # items of one container looked into
_SCALARS = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format,
            torch.layout, enum.Enum, type(Ellipsis), slice, range)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_MODULE_INTERNALS = frozenset({
    "_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set", "_is_full_backward_hook",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    "_compiled_call_impl", *_HOOKS})
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = [getattr(_torch_module, name) for name in _GLOBAL_HOOKS]  # mutated in place, never rebound
_DICT, _ATTR, _INDEX = "dict", "attr", "index"
_getitem = operator.getitem


def is_library(obj) -> bool:
    """Whether ``obj`` (a function, class or module) belongs to torch, zygote_torch, the standard
    library or another package whose state is not the user's program."""
    name = getattr(obj, "__module__", None) if not isinstance(obj, types.ModuleType) else obj.__name__
    if not isinstance(name, str):
        return True
    return name.partition(".")[0] in LIBRARY_PACKAGES


class Reads:
    """Values read from places, one group per way of reading: ``dict.get``, ``getattr``, ``[i]``;
    with, per place, the value expected there (in the order :meth:`values` reads them)."""

    __slots__ = ("holders", "keys", "wanted", "_expected")

    def __init__(self):
        self.holders = {_DICT: [], _ATTR: [], _INDEX: []}
        self.keys = {_DICT: [], _ATTR: [], _INDEX: []}
        self.wanted = {_DICT: [], _ATTR: [], _INDEX: []}
        self._expected = None

    def add(self, place, expected=None) -> None:
        kind, holder, key = place
        self.holders[kind].append(holder)
        self.keys[kind].append(key)
        self.wanted[kind].append(expected)
        self._expected = None

    def order(self) -> list:
        """The places in the order :meth:`values` reads them."""
        return [(kind, h, k) for kind in (_DICT, _ATTR, _INDEX) for h, k in zip(self.holders[kind], self.keys[kind])]

    def expected(self) -> list:
        if self._expected is None:
            self._expected = [*self.wanted[_DICT], *self.wanted[_ATTR], *self.wanted[_INDEX]]
        return self._expected

    def values(self) -> list:
        h, k = self.holders, self.keys
        return [*map(dict.get, h[_DICT], k[_DICT]), *map(getattr, h[_ATTR], k[_ATTR]),
                *map(_getitem, h[_INDEX], k[_INDEX])]

    def __len__(self) -> int:
        return sum(len(v) for v in self.keys.values())


def read(place):
    kind, holder, key = place
    if kind == _DICT:
        return holder.get(key)
    if kind == _ATTR:
        return getattr(holder, key)
    return holder[key]


def write(place, value) -> None:
    kind, holder, key = place
    if kind == _ATTR:
        setattr(holder, key, value)
    else:
        holder[key] = value


def describe(place) -> str:
    kind, holder, key = place
    if kind == _ATTR:
        return f"{type(holder).__name__}.{key}"
    return f"{type(holder).__name__}[{key!r}]"


class GlobalState:
    """The process-wide settings a trace depends on: the rule registry's version, autocast, the
    default dtype, global module hooks and the fused kernels' settings (``ops.kernel_choice_key()``)."""

    __slots__ = ("version", "kernels", "any_autocast", "autocast", "dtype", "hooks")

    def __init__(self):
        self.version, self.kernels = REGISTRY.version, kernel_choice_key()
        self.any_autocast, self.autocast = torch._C._is_any_autocast_enabled(), autocast_state()
        self.dtype, self.hooks = torch.get_default_dtype(), any(_GLOBAL_HOOK_DICTS)

    def holds(self) -> bool:
        return (REGISTRY.version == self.version and kernel_choice_key() == self.kernels
                and torch._C._is_any_autocast_enabled() is self.any_autocast
                and (not self.any_autocast or autocast_state() == self.autocast)
                and torch.get_default_dtype() is self.dtype and any(_GLOBAL_HOOK_DICTS) is self.hooks)


def autocast_state() -> tuple | None:
    """Autocast changes the ops' dtypes, so a program traced under it is another program."""
    if not torch._C._is_any_autocast_enabled():
        return None
    return tuple((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                 for device in ("cpu", "cuda"))


class Guards:
    """The checks of one trace (see the module docstring); ``check()`` is True when all hold."""

    def __init__(self):
        self.same, self.equal = Reads(), Reads()
        self.sized, self.sizes = [], []
        self.empty: list = []  # hook dicts that must stay empty
        self.tensor_places: dict[int, list] = {}  # id(tensor) -> places where the walk found it
        self.tensors: dict[int, torch.Tensor] = {}
        self.hooked: list[str] = []  # modules with hooks, by name: they run eagerly
        self.truncated = False
        self.count = 0
        self.state = GlobalState()

    # -- checking --------------------------------------------------------------------------------
    def check(self) -> bool:
        """Whether every check holds (the generated function, made at the first call)."""
        self.check = _generated_check(self)
        return self.check()

    def _changed(self) -> None:
        self.__dict__.pop("check", None)  # built again with the new checks

    def failing(self) -> list[str]:
        """Descriptions of the checks that fail now (for warnings)."""
        out = []
        for reads, test in ((self.same, operator.is_), (self.equal, _equal)):
            for place, want in zip(reads.order(), reads.expected()):
                try:
                    ok = test(read(place), want)
                except Exception:
                    ok = False
                if not ok:
                    out.append(describe(place))
        return out

    def restore(self) -> None:
        """Write back what was read before the trace, where the trace changed it."""
        for reads, test in ((self.same, operator.is_), (self.equal, _equal)):
            for place, want in zip(reads.order(), reads.expected()):
                try:
                    if not test(read(place), want):
                        write(place, want)
                except Exception:
                    pass
        for container, n in zip(self.sized, self.sizes):
            if isinstance(container, list) and len(container) > n:
                del container[n:]

    # -- building --------------------------------------------------------------------------------
    def _room(self) -> bool:
        self.count += 1
        if self.count > MAX_CHECKS:
            self.truncated = True
            return False
        return True

    def expect_same(self, place, value) -> None:
        self.same.add(place, value)
        self._changed()

    def expect_equal(self, place, value) -> None:
        self.equal.add(place, value)
        self._changed()

    def keep_tensor(self, tensor: torch.Tensor, place) -> None:
        self.tensor_places.setdefault(id(tensor), []).append(place)
        self.tensors[id(tensor)] = tensor
        if tensor._backward_hooks:  # applied to its gradient by the dynamic path, as by torch.autograd
            self.hooked.append("a tensor's hook")


class _Source:
    """Python source of generated checks, with the objects it names."""

    def __init__(self):
        self.namespace: dict = {}
        self._names: dict[int, str] = {}

    def ref(self, obj) -> str:
        name = self._names.get(id(obj))
        if name is None:
            name = self._names[id(obj)] = f"_{len(self.namespace)}"
            self.namespace[name] = obj
        return name

    def literal(self, key) -> str:
        return repr(key) if type(key) in (str, int) else self.ref(key)

    def read(self, place) -> str:
        """An expression reading ``place``."""
        kind, holder, key = place
        if kind == _DICT:
            return f"{self.ref(holder)}.get({self.literal(key)})"
        if kind == _ATTR:
            return f"{self.ref(holder)}.{key}" if key.isidentifier() and not key.startswith("__") \
                else f"getattr({self.ref(holder)}, {key!r})"
        return f"{self.ref(holder)}[{self.literal(key)}]"

    def function(self, name: str, params: str, body: list[str]):
        source = f"def {name}({params}):\n" + "".join(f"    {line}\n" for line in body)
        exec(compile(source, f"<zt.compile {name}>", "exec"), self.namespace)
        return self.namespace[name]


def _all_of(terms: list[str], width: int = 100) -> list[str]:
    """Statements returning False unless every term holds (in chunks: no giant expression)."""
    return [f"if not ({' and '.join(terms[i:i + width])}): return False" for i in range(0, len(terms), width)]


def _generated_check(guards: "Guards"):
    """``guards``' checks as one generated function of straight-line comparisons."""
    src = _Source()
    terms = [f"not {src.ref(d)}" for d in guards.empty]
    terms += [f"len({src.ref(c)}) == {n}" for c, n in zip(guards.sized, guards.sizes)]
    terms += [f"{src.read(p)} is {src.ref(v)}" for p, v in zip(guards.same.order(), guards.same.expected())]
    terms += [f"(_v := {src.read(p)}).__class__ is {src.ref(type(v))} and _v == {src.ref(v)}"
              for p, v in zip(guards.equal.order(), guards.equal.expected())]
    terms.append(f"{src.ref(guards.state)}.holds()")
    body = ["try:", *[f"    {line}" for line in _all_of(terms)], "    return True",
            "except Exception:  # a place that no longer exists (an attribute deleted, a list shortened)",
            "    return False"]
    return src.function("check", "", body)


def _equal(a, b) -> bool:
    return type(a) is type(b) and (a is b or a == b)


def _is_scalar_tuple(v) -> bool:
    return type(v) in (tuple, torch.Size, frozenset) and len(v) <= MAX_ITEMS and all(
        isinstance(x, _SCALARS) and not isinstance(x, (list, dict)) for x in v)


class Walk:
    """Builds :class:`Guards` by walking from a function's roots (see the module docstring)."""

    def __init__(self, unhooked=()):
        self.guards = Guards()
        self.seen: set[int] = set()
        self.unhooked = {id(m) for m in unhooked}  # modules whose hooks their own __call__ runs

    def root_function(self, f) -> None:
        self.callable(f)

    def root_value(self, value) -> None:
        """An argument. Its containers, tensors and numbers are the call signature's; the objects and
        modules in it (keyed by identity there) are walked."""
        if isinstance(value, (list, tuple)):
            for item in value:
                self.root_value(item)
        elif isinstance(value, dict):
            for item in value.values():
                self.root_value(item)
        elif not isinstance(value, (torch.Tensor, *_SCALARS)):
            self.contents(value)

    # -- one value at one place ------------------------------------------------------------------
    def value(self, v, place, code_names=frozenset()) -> None:
        g = self.guards
        if not g._room():
            return
        if isinstance(v, torch.Tensor):
            g.keep_tensor(v, place)
            return
        if isinstance(v, _SCALARS) or _is_scalar_tuple(v):
            g.expect_equal(place, v)
            return
        if isinstance(v, types.ModuleType):
            if not is_library(v):
                g.expect_same(place, v)
                self.python_module(v, code_names)
            return
        g.expect_same(place, v)
        self.contents(v)

    def contents(self, v) -> None:
        """Walk into ``v`` (once per object)."""
        if id(v) in self.seen:
            return
        self.seen.add(id(v))
        if isinstance(v, torch.nn.Module):
            self.module(v)
        elif isinstance(v, (list, tuple)):
            self.sequence(v)
        elif isinstance(v, dict):
            self.mapping(v)
        elif isinstance(v, (set, frozenset)):
            self.guards.sized.append(v)
            self.guards.sizes.append(len(v))
        elif isinstance(v, (types.FunctionType, types.MethodType, functools.partial)):
            self.callable(v)
        elif isinstance(v, Params):
            self.value(v._order, (_ATTR, v, "_order"))
        elif isinstance(v, torch.optim.Optimizer):  # its learning rates (a scheduler changes them), its state
            for name in ("param_groups", "state", "defaults"):
                if name in vars(v):
                    self.value(vars(v)[name], (_DICT, vars(v), name))
        elif hasattr(v, "__dict__") and not isinstance(v, type) and not is_library(type(v)):
            self.instance(v)

    def sequence(self, v) -> None:
        self.guards.sized.append(v)
        self.guards.sizes.append(len(v))
        if len(v) <= MAX_ITEMS:
            for i, item in enumerate(v):
                self.value(item, (_INDEX, v, i))

    def mapping(self, v) -> None:
        self.guards.sized.append(v)
        self.guards.sizes.append(len(v))
        if len(v) <= MAX_ITEMS and type(v).get is dict.get:
            for key, item in list(v.items()):
                self.value(item, (_DICT, v, key))

    def instance(self, v) -> None:
        """An instance of a user's class: its attributes, and the globals its methods name."""
        attrs = vars(v)
        for key, item in list(attrs.items()):
            self.value(item, (_DICT, attrs, key))
        self.methods(type(v))

    def methods(self, cls: type) -> None:
        """A user's class: the globals its methods name, and its own numbers and flags (read as
        ``self.scale`` where the instance has none)."""
        for klass in cls.__mro__:
            if is_library(klass) or id(klass) in self.seen:
                break
            self.seen.add(id(klass))
            for name, item in list(vars(klass).items()):
                if isinstance(item, types.FunctionType):
                    self.function_globals(item)
                elif not name.startswith("__") and (isinstance(item, _SCALARS) or _is_scalar_tuple(item)):
                    self.value(item, (_ATTR, klass, name))

    def module(self, m: torch.nn.Module) -> None:
        g, attrs = self.guards, m.__dict__
        g.expect_equal((_DICT, attrs, "training"), m.training)
        for name in _HOOKS if id(m) not in self.unhooked else ():
            hooks = attrs.get(name)
            if hooks is not None:
                g.empty.append(hooks)
                if hooks:
                    g.hooked.append(type(m).__name__)
        for name, p in m._parameters.items():
            self.value(p, (_DICT, m._parameters, name))
        for name, b in m._buffers.items():
            self.value(b, (_DICT, m._buffers, name))
        for name, sub in m._modules.items():
            self.value(sub, (_DICT, m._modules, name))
        for d in (m._parameters, m._buffers, m._modules):  # none added (a ModuleList grown...)
            g.sized.append(d)
            g.sizes.append(len(d))
        for key, item in list(attrs.items()):
            if key not in _MODULE_INTERNALS:
                self.value(item, (_DICT, attrs, key))
        self.methods(type(m))

    # -- code ------------------------------------------------------------------------------------
    def callable(self, f) -> None:
        if f is None:
            return
        if isinstance(f, functools.partial):
            self.value(f.func, (_ATTR, f, "func"))
            self.value(f.args, (_ATTR, f, "args"))
            self.value(f.keywords, (_ATTR, f, "keywords"))
        elif isinstance(f, types.MethodType):
            self.value(f.__self__, (_ATTR, f, "__self__"))
            self.callable(f.__func__)
        elif isinstance(f, types.FunctionType):
            if id(f.__code__) in self.seen or is_library(f):
                return
            self.seen.add(id(f.__code__))
            self.function(f)
        elif isinstance(f, torch.nn.Module):
            self.contents(f)
        elif hasattr(f, "__dict__") and not isinstance(f, type) and not is_library(type(f)):
            self.instance(f)

    def function(self, f: types.FunctionType) -> None:
        code = f.__code__
        for cell in f.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # a cell not yet assigned
                continue
            self.value(contents, (_ATTR, cell, "cell_contents"), _names(code))
        if f.__defaults__:
            self.value(f.__defaults__, (_ATTR, f, "__defaults__"))
        if f.__kwdefaults__:
            self.value(f.__kwdefaults__, (_ATTR, f, "__kwdefaults__"))
        self.function_globals(f)

    def function_globals(self, f: types.FunctionType) -> None:
        if id(f) in self.seen or is_library(f):
            return
        self.seen.add(id(f))
        names = _names(f.__code__)
        module_globals = f.__globals__
        for name in sorted(names):
            if name in module_globals:
                self.value(module_globals[name], (_DICT, module_globals, name), names)

    def python_module(self, module: types.ModuleType, code_names: frozenset) -> None:
        """A user's Python module named by some code: its attributes that code names."""
        for name in sorted(code_names):
            if name in vars(module):
                self.value(vars(module)[name], (_DICT, vars(module), name), code_names)


@functools.lru_cache(maxsize=4096)
def _names(code: types.CodeType) -> frozenset:
    """The global and attribute names ``code`` and the code nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return frozenset(names)


def walk(f, args: tuple, unhooked=()) -> Guards:
    """The guards of a call ``f(*args)`` before it is traced (tensor checks are settled after);
    ``unhooked``: modules whose forward ``f`` runs without their hooks (their ``__call__`` runs them)."""
    w = Walk(unhooked)
    w.root_function(f)
    for a in args:
        w.root_value(a)
        if any(isinstance(t, torch.Tensor) and t._backward_hooks for t in leaves_of(a)):
            w.guards.hooked.append("an argument's tensor hook")
    return w.guards


_META = operator.attrgetter("shape", "dtype", "device")


class InputReader:
    """Reads a staged program's inputs for one call, checking what the trace assumed of them.

    Argument leaves come from the arguments (their shapes and dtypes are the call signature's).
    Captured tensors (parameters, buffers, globals) are read from the places the walk found them,
    so a rebound one is read, provided its shape, dtype and device are the traced ones; one the walk
    did not find is the traced tensor itself. No input may have tensor hooks (``t.register_hook``:
    a call with them runs eagerly, where they apply). A tensor found at several places (a parameter held by
    a module and by ``zt.Params``) must still be one tensor. A program that writes into its inputs
    was traced with their aliasing (which share memory): the call's inputs must alias alike.
    ``__call__`` returns the inputs, or None where a check fails (a new trace)."""

    def __init__(self, traced, guards: Guards, args: tuple, writes_inputs: bool):
        self.traced = traced
        self.n = len(traced.inputs)
        self.arg_slots = [(k, inp.arg_index, inp.leaf_index, inp.python_float)
                          for k, inp in enumerate(traced.inputs) if inp.arg_index is not None]
        self.reads, self.fixed = Reads(), []
        by_id = {id(traced.value_at_trace(inp)): k for k, inp in enumerate(traced.inputs)
                 if isinstance(traced.value_at_trace(inp), torch.Tensor)}
        primary: dict[int, object] = {}
        for k, inp in enumerate(traced.inputs):
            if inp.arg_index is not None:
                continue
            places = guards.tensor_places.get(id(inp.tensor))
            if places:
                primary[k] = places[0]
                self.reads.add(places[0], (k, _META(inp.tensor)))
                inp.source = functools.partial(read, places[0])
            else:
                self.fixed.append((k, inp.tensor))
        self.also = Reads()  # further places of a tensor: the same object as the input read
        argument_parameters = _argument_parameter_dicts(args)
        for tensor_id, places in guards.tensor_places.items():
            k = by_id.get(tensor_id)
            if k is None:
                continue
            for place in places:
                if place is not primary.get(k) and id(place[1]) not in argument_parameters:
                    self.also.add(place, k)
        self.alias_pattern = _alias_pattern(traced.input_values(args)) if writes_inputs else None
        self.uses_args = bool(self.arg_slots)
        self.read = _generated_reader(self)  # read(args, flat): the generated function itself

    def __call__(self, args, flat=None):
        """The inputs for a call with ``args`` (``flat``: their leaves, when computed already), or None."""
        return self.read(args, flat)


def _generated_reader(reader: InputReader):
    """``reader``'s reading and checks as one generated function (see :class:`InputReader`)."""
    src = _Source()
    expressions: list = [None] * reader.n
    body = []
    if reader.uses_args:
        body.append(f"if flat is None: flat = [{src.ref(leaves_of)}(a) for a in args]")
        hooks = []
        for k, i, j, python_float in reader.arg_slots:
            leaf = f"flat[{i}][{j}]"
            expressions[k] = f"{src.ref(torch.tensor)}(float({leaf}), dtype={src.ref(torch.float64)})" \
                if python_float else leaf
            if not python_float:
                hooks.append(f"not {leaf}._backward_hooks")
        body += [line.replace("return False", "return None") for line in _all_of(hooks)]
    reads, meta = [], []
    for n, (place, (k, (shape, dtype, device))) in enumerate(zip(reader.reads.order(), reader.reads.expected())):
        reads.append(f"c{n} = {src.read(place)}")
        expressions[k] = f"c{n}"
        meta.append(f"c{n}.shape == {src.ref(shape)} and c{n}.dtype is {src.ref(dtype)} "
                    f"and c{n}.device == {src.ref(device)} and not c{n}._backward_hooks")
    same = [f"{src.read(place)} is {expressions[k]}" for place, k in zip(reader.also.order(), reader.also.expected())]
    checks = [line.replace("return False", "return None") for line in _all_of(meta + same)] if meta or same else []
    if reads or checks:
        body += ["try:", *[f"    {line}" for line in reads + checks],
                 "except Exception:  # a place gone, or not a tensor", "    return None"]
    for k, t in reader.fixed:
        expressions[k] = src.ref(t)
    body.append(f"values = [{', '.join(expressions)}]")
    if reader.alias_pattern is not None:
        body.append(f"if {src.ref(_alias_pattern)}(values) != {src.ref(reader.alias_pattern)}: return None")
    body.append("return values")
    return src.function("read", "args, flat", body)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def leaves_of(arg) -> list:
    """``flatten(arg)``'s leaves (a tensor is its own leaf: the common case, without the walk)."""
    return [arg] if type(arg) in _PLAIN_TENSORS else flatten(arg)[0]


def _argument_parameter_dicts(args) -> set:
    """ids of the parameter dicts of modules passed as arguments (their parameters are argument leaves)."""
    out = set()
    stack = list(args)
    while stack:
        a = stack.pop()
        if isinstance(a, torch.nn.Module):
            out.update(id(m._parameters) for m in a.modules())
        elif isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, dict):
            stack.extend(a.values())
    return out


def _alias_pattern(values) -> list:
    """For each tensor, the index of the first tensor sharing its memory (-1 for non-tensors)."""
    first: dict = {}
    out = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            out.append(first.setdefault(_storage_key(v), i))
        else:
            out.append(-1)
    return out


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


def metadata_guards(guards: Guards, traced) -> None:
    """Tensors the trace read the metadata of, and did not take as inputs: the same tensor."""
    inputs = {id(traced.value_at_trace(inp)) for inp in traced.inputs}
    for tensor_id, tensor in traced.metadata_read.items():
        places = guards.tensor_places.get(tensor_id)
        if tensor_id not in inputs and places:
            guards.expect_same(places[0], tensor)
