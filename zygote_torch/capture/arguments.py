"""The arguments of a call: from what the user passes to the inputs a recording or a trace
differentiates, and from those inputs' gradients back to the arguments' structure.

One path for both ways of running. An argument is flattened into leaves (:mod:`.pytree`: tensors,
Python floats, NumPy arrays, the parameters of modules, containers of them); each way of running
puts a stand-in in the place of the leaves it differentiates (the dynamic path: the tracked tensor
itself, a fresh alias for a tensor passed twice, a 0-d float64 tensor for a float; staging: the
placeholder's fake tensor) by overriding :meth:`Arguments.standins`, and ``f`` is called on
:attr:`Arguments.call_args`. The gradients of the leaves are rebuilt as each argument's gradient
structure (a module as a dict of its parameters) by :meth:`Arguments.gradients_of`, and
:func:`as_numbers` gives the gradients of Python floats back as floats and of NumPy arrays as
arrays.

``argnums`` (``wrt``: the indices of the differentiated arguments) leaves the other arguments as
they are; implicit ``zt.Params`` (``f()`` reads them itself) are recognised by
:func:`implicit_params` and staged as named inputs by :func:`implicit_call`.
"""
from __future__ import annotations

import numbers

import torch

from ..params import Params
from .pytree import structure

_PYTHON_TYPE = "_zt_python_type"  # attribute of a traced tensor standing for a Python number


# -- leaves ------------------------------------------------------------------------------------------

def is_python_float(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, numbers.Integral))


def is_float_array(x) -> bool:
    """A floating-point (or complex) NumPy array: differentiated as a tensor sharing its memory."""
    return type(x).__module__ == "numpy" and type(x).__name__ == "ndarray" and x.dtype.kind in "fc"


def stands_for_float(t) -> bool:
    """Whether traced tensor ``t`` stands for a Python float (an argument, or computed from them)."""
    return getattr(t, _PYTHON_TYPE, None) is float


def mark_python_number(t: torch.Tensor, kind=float) -> torch.Tensor:
    """Mark traced tensor ``t`` as standing for a Python number of type ``kind``; returns ``t``."""
    setattr(t, _PYTHON_TYPE, kind)
    return t


def python_type(t):
    """The Python number type traced tensor ``t`` stands for (None: none)."""
    return getattr(t, _PYTHON_TYPE, None)


def frozen(leaf, arg) -> bool:
    """A parameter the user froze, reached inside ``arg`` (a module, a container); passing the
    parameter itself asks for its gradient."""
    return isinstance(leaf, torch.nn.Parameter) and not leaf.requires_grad and leaf is not arg


# -- the arguments of one call -------------------------------------------------------------------

class Arguments:
    """The arguments of one call, flattened: per differentiated argument its leaves and their
    structure, the stand-ins of those leaves, and the arguments ``f`` is called with.

    Arguments outside ``wrt`` (a set of indices; None: all) are passed as they are. An argument
    whose stand-ins are its own leaves is passed as itself (so ``f`` sees the very object the caller
    gave), any other rebuilt around its stand-ins (a module is always itself: its parameters are
    read in place). Subclasses choose the stand-ins (:meth:`standins`).
    """

    def __init__(self, args: tuple, wrt=None):
        self.args = args
        self.structures = []  # per argument: (leaves, Structure), None when not differentiated
        self.standins_per_argument = []  # per argument: stand-in leaves (None when not differentiated)
        call_args = []
        for i, arg in enumerate(args):
            if wrt is not None and i not in wrt:
                self.structures.append(None)
                self.standins_per_argument.append(None)
                call_args.append(arg)
                continue
            flat, shape = structure(arg)
            standins = self.standins(i, arg, flat)
            self.structures.append((flat, shape))
            self.standins_per_argument.append(standins)
            unchanged = all(s is x for s, x in zip(standins, flat))
            call_args.append(arg if unchanged else shape.argument(standins))
        self.call_args = tuple(call_args)

    def standins(self, index: int, arg, flat: list) -> list:
        """The values ``f`` sees in place of the leaves ``flat`` of argument ``index`` (here: the
        leaves themselves)."""
        return flat

    @property
    def numbers(self) -> bool:
        """Whether a differentiated leaf is a Python float."""
        return any(is_python_float(x) for s in self.structures if s is not None for x in s[0])

    def gradients_of(self, leaf_gradients) -> tuple:
        """One gradient per argument mirroring its structure (a module as a dict of its parameters),
        from ``leaf_gradients``: per argument, the gradients of its leaves (None for none); None for
        an argument not differentiated or without any gradient in it."""
        out = []
        for s, grads in zip(self.structures, leaf_gradients):
            if s is None or grads is None or all(g is None for g in grads):
                out.append(None)
                continue
            out.append(s[1].gradient(grads))
        return tuple(out)


def implicit_params(args: tuple):
    """The ``zt.Params`` of a call ``f()`` reading them itself (``args == (ps,)``), else None."""
    return args[0] if len(args) == 1 and isinstance(args[0], Params) else None


def implicit_call(f, ps) -> tuple:
    """``(g, args)`` staging ``f()`` with the tensors of ``ps`` as its inputs ``param_0``, ...:
    ``g(*args)`` calls ``f()``, which reads the parameters itself (the trace finds them by identity)."""
    args = tuple(ps)
    names = ", ".join(f"param_{i}" for i in range(len(args)))
    namespace = {"f": f}
    exec(f"def implicit({names}):\n    return f()\n", namespace)  # named graph inputs
    return namespace["implicit"], args


# -- gradients back as numbers ---------------------------------------------------------------------

def as_numbers(grads, args, live) -> tuple:
    """``grads`` (one per argument) with the gradients of Python floats as floats and of NumPy
    arrays as arrays, unless still being differentiated (``live(g)``: then tensors)."""
    out = []
    for g, arg in zip(grads, args):
        if g is None or not _has_numbers(arg):
            out.append(g)
            continue
        flat_arg, _ = structure(arg)
        flat_g, shape = structure(g)
        if len(flat_g) != len(flat_arg):  # a module's gradient is a dict of parameters: no numbers in it
            out.append(g)
            continue
        out.append(shape.gradient([_as_number(d, x, live) for d, x in zip(flat_g, flat_arg)]))
    return tuple(out)


def _has_numbers(arg) -> bool:
    return any(is_python_float(x) or stands_for_float(x) or is_float_array(x) for x in structure(arg)[0])


def _as_number(g, original, live):
    if not isinstance(g, torch.Tensor) or live(g):
        return mark_python_number(g) if stands_for_float(original) and isinstance(g, torch.Tensor) else g
    if is_python_float(original):
        return float(g)
    if is_float_array(original):
        return g.detach().cpu().numpy()
    return g
