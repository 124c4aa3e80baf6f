"""Making user Python functions that have a rule into leaves of capture.

Which functions those are, capture asks :func:`leaf_functions`, into which the rule registry
installs its answer (:func:`install_leaf_functions`): capture imports nothing from ``ad``.

torch's own functions announce every call through ``__torch_function__``, so the recorder sees
them. A plain Python function does not: capture would run its body. For a user function with a
registered rule (Zygote's ``rrule(::typeof(add), a, b)``), we swap its ``__code__`` for a trampoline
while capture runs, so that every call, through any name, closure, dict or attribute, reaches the
recorder as one call of that function. The original code is restored when capture ends.

zygote_torch's own functions with rules (the fused ops, the out-of-place forms of mutations, the
gradient tools) need no trampoline: :func:`announces` makes them announce their calls themselves,
as torch's Python functions do, which costs nothing when no capture is running.
"""
from __future__ import annotations

import builtins
import functools
import itertools
import threading
import types

import torch
from torch.overrides import handle_torch_function

_DISPATCH_NAME = "__zygote_torch_leaf__"
_lock = threading.RLock()
_keys = itertools.count()
_active: dict = {}  # key -> (public function, original code as a callable)
_trampolines: dict = {}  # function -> (key, its own code, trampoline code), made once per function
_depth: dict = {}  # function -> how many active interceptions
REWRITES: dict = {}  # function -> (args, kwargs) -> (args, kwargs): makes hidden inputs explicit
DIVERTS: dict = {}  # torch function -> what runs in its place while capture runs (also when it has no rule)
# torch Python functions that do not announce themselves through __torch_function__ but are
# single calls under capture (torch.func.vmap's runner: see capture/vmap.py).
TORCH_LEAVES: set = set()
ANNOUNCED_CALLS: dict = {}  # type -> function: while capture runs, obj(*a) for an instance is function(obj, *a)
_call_depth: dict = {}  # type -> (how many active interceptions, its own __call__ or None)


def _leaf_call(key, args, kwargs):
    """Body of every trampoline: hand the call to the active torch-function mode, if any."""
    public, original = _active[key]
    if torch._C._is_torch_function_mode_enabled():
        if public in DIVERTS:
            return DIVERTS[public](*args, **kwargs)
        if public in REWRITES:
            args, kwargs = REWRITES[public](args, kwargs)
        relevant = tuple(a for a in args if isinstance(a, torch.Tensor))
        return handle_torch_function(public, relevant, *args, **kwargs)
    return original(*args, **kwargs)


setattr(builtins, _DISPATCH_NAME, _leaf_call)


def is_python_leaf(func) -> bool:
    """A user Python function: its calls are intercepted during capture, not traced into.
    (torch's own Python functions announce themselves through ``__torch_function__``.)"""
    if not isinstance(func, types.FunctionType) or getattr(func, "__zygote_torch_announces__", False):
        return False
    module = getattr(func, "__module__", "") or ""
    return func in TORCH_LEAVES or not (module == "torch" or module.startswith("torch."))


def _no_leaf_functions() -> list:
    return []


_leaf_functions = _no_leaf_functions  # () -> the functions kept as leaves: the rule registry's


def install_leaf_functions(source) -> None:
    """Make ``source()`` the answer to "which user Python functions stay leaves?": the rule
    registry installs its own (:meth:`..ad.registry.Registry.python_leaves`), since capture knows
    nothing of rules."""
    global _leaf_functions
    _leaf_functions = source


def leaf_functions() -> list:
    """The user Python functions that stay single calls under capture now (those with a rule, or
    non-differentiable): what :class:`intercepting` is given."""
    return _leaf_functions()


def announces(fn):
    """``fn``, made to announce its calls through ``__torch_function__`` while a torch-function
    mode is active (torch's own pattern: ``if has_torch_function(...): return handle_torch_function``),
    so capture records each call as one call of the returned function."""

    @functools.wraps(fn)
    def announcing(*args, **kwargs):
        if torch._C._is_torch_function_mode_enabled():
            relevant = tuple(a for a in args if isinstance(a, torch.Tensor))
            return handle_torch_function(announcing, relevant, *args, **kwargs)
        return fn(*args, **kwargs)

    announcing.__zygote_torch_announces__ = True
    return announcing


def _trampoline_code(fn: types.FunctionType, key: int) -> types.CodeType:
    freevars = fn.__code__.co_freevars
    touch = ", ".join(freevars) if freevars else "pass"  # mentions the free variables: same closure size
    source = (f"def _outer({', '.join(freevars)}):\n"
              f"  def {fn.__name__}(*args, **kwargs):\n"
              f"    {touch}\n"
              f"    return {_DISPATCH_NAME}({key}, args, kwargs)\n"
              f"  return {fn.__name__}\n")
    namespace: dict = {}
    exec(compile(source, f"<zygote_torch leaf {fn.__qualname__}>", "exec"), namespace)
    inner = namespace["_outer"](*([None] * len(freevars)))
    code = inner.__code__
    assert len(code.co_freevars) == len(freevars)
    return code


def _original_callable(fn: types.FunctionType, code: types.CodeType):
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    return copy


def _install(fn) -> None:
    if fn not in _trampolines or _trampolines[fn][1] is not fn.__code__ and _depth.get(fn, 0) == 0:
        key, code = next(_keys), fn.__code__  # first time, or the function's code was replaced since
        _active[key] = (fn, _original_callable(fn, code))
        _trampolines[fn] = (key, code, _trampoline_code(fn, key))
    _depth[fn] = _depth.get(fn, 0) + 1
    fn.__code__ = _trampolines[fn][2]


def _uninstall(fn) -> None:
    _depth[fn] -= 1
    if _depth[fn] == 0:
        fn.__code__ = _trampolines[fn][1]


def _calling(cls, announced):
    """A ``__call__`` for ``cls`` that is ``announced(self, ...)`` while a torch-function mode is
    active, and the type's own call otherwise."""
    def __call__(self, *args, **kwargs):
        if torch._C._is_torch_function_mode_enabled():
            return announced(self, *args, **kwargs)
        return super(cls, self).__call__(*args, **kwargs) if own is None else own(self, *args, **kwargs)

    own = cls.__dict__.get("__call__")
    return __call__


_callings: dict = {}  # (cls, announced) -> the __call__ installed for them, made once


def _install_calls() -> None:
    for cls, announced in ANNOUNCED_CALLS.items():
        depth, own = _call_depth.get(cls, (0, None))
        if depth == 0:
            own = cls.__dict__.get("__call__")
            calling = _callings.get((cls, announced))
            if calling is None or calling._zt_own is not own:
                calling = _callings[(cls, announced)] = _calling(cls, announced)
                calling._zt_own = own
            cls.__call__ = calling
        _call_depth[cls] = (depth + 1, own)


def _uninstall_calls() -> None:
    for cls in ANNOUNCED_CALLS:
        depth, own = _call_depth[cls]
        if depth == 1:
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own
        _call_depth[cls] = (depth - 1, own)


def original(fn):
    """The function with its own code, whether or not a trampoline is installed."""
    entry = _trampolines.get(fn)
    return _active[entry[0]][1] if entry else fn


class intercepting:
    """Context: while active, calls of ``functions`` reach the torch-function mode as single calls,
    calls of the functions in :data:`DIVERTS` run their replacements, and calls of instances of
    the types in :data:`ANNOUNCED_CALLS` are calls of their functions."""

    __slots__ = ("functions",)

    def __init__(self, functions):
        self.functions = list(functions) + list(DIVERTS) if DIVERTS else functions

    def __enter__(self):
        with _lock:
            for fn in self.functions:
                _install(fn)
            if ANNOUNCED_CALLS:
                _install_calls()

    def __exit__(self, *exc):
        with _lock:
            for fn in self.functions:
                _uninstall(fn)
            if ANNOUNCED_CALLS:
                _uninstall_calls()
