"""Values cut from the tape: a tensor being differentiated turned into a Python number.

``t.item()``, ``t.tolist()``, ``float(t)``, ``t.numpy()`` and NumPy functions on ``t`` leave the
tape: what is computed from their result in Python is invisible to it. Where the output of ``f``
still depends on such a value, the gradient would silently miss that dependence, so it is refused:

* ``.item()`` and ``.tolist()`` return :class:`CutFloat`\\ s, floats that remember where they were
  cut. Python arithmetic on them keeps the mark; a marked float reaching a torch call while the tape
  records, or returned by ``f``, is a ``ZygoteError`` naming that line. Comparisons give plain
  bools, so control flow on them (``if loss.item() > 1``) and printing are fine.
* ``float(t)`` cannot return a marked value (Python converts it to a plain float), so the tape
  remembers the cut (``Tape.cuts``, :mod:`..ad.tape`); an output that depends on nothing tracked after such a cut
  is refused, naming the cut's line. Where the output is tracked, the cut value is a constant, as
  ``torch.autograd`` treats it.
* ``t.numpy()``, ``np.asarray(t)`` and NumPy functions on ``t`` are refused where they happen,
  naming the line, as torch refuses ``numpy()`` of a tensor that requires grad.

To use a value as a constant on purpose, cut it explicitly: ``t.detach().item()``.

The values live here, in capture, because capture meets them: the recorder counts a marked number
among the arguments of a call as touching a tracked tensor, and :mod:`.pymath` keeps the mark.
"""
from __future__ import annotations

from ..errors import ZygoteError, describe_frame


class CutFloat(float):
    """A float computed from a tensor being differentiated (see the module docs): ``origin`` says
    where it was cut, ``tape`` (a tape's serial number) by whose recording; to any other tape it is
    a constant like any float."""

    __slots__ = ("origin", "tape")

    def __new__(cls, value, origin: str, tape: int):
        self = super().__new__(cls, value)
        self.origin, self.tape = origin, tape
        return self

    def __reduce__(self):  # pickles (and copies) as the plain float it is
        return float, (float(self),)


def _marked(op):
    """``op`` on floats, keeping the mark of a :class:`CutFloat` operand."""
    def method(self, *others):
        result = getattr(float, op)(self, *others)
        if result is NotImplemented or not isinstance(result, float):
            return result
        return CutFloat(result, self.origin, self.tape)
    method.__name__ = op
    return method


for _op in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
            "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__",
            "__neg__", "__pos__", "__abs__"):
    setattr(CutFloat, _op, _marked(_op))


def cut_value(value, origin: str, tape: int):
    """``value`` (a number, or nested lists of numbers) with each float marked as cut at ``origin``
    by tape ``tape``."""
    if isinstance(value, float):
        return CutFloat(value, origin, tape)
    if isinstance(value, list):
        return [cut_value(v, origin, tape) for v in value]
    return value


def first_cut(values, tape: int):
    """The first :class:`CutFloat` of ``tape`` among ``values`` (looking into lists, tuples and
    dicts), or None."""
    for v in values:
        if type(v) is CutFloat:
            if v.tape == tape:
                return v
        elif isinstance(v, (list, tuple)):
            found = first_cut(v, tape)
            if found is not None:
                return found
        elif isinstance(v, dict):
            found = first_cut(v.values(), tape)
            if found is not None:
                return found
    return None


def refuse_cut_operand(cut: CutFloat, op: str, where) -> None:
    raise ZygoteError(f"{op} at {describe_frame(where)} reads a number cut from the tape by {cut.origin}: "
                      "its dependence on the tensors being differentiated would be lost. Keep it a tensor "
                      "(drop the .item()), or make it a constant on purpose with .detach().item()")


def refuse_cut_output(f_description: str, origin: str) -> None:
    raise ZygoteError(f"the output of {f_description} depends on a value cut from the tape by {origin}: "
                      "the gradient would miss that dependence. Keep it a tensor (torch ops instead of "
                      ".item(), float(), .numpy() or math functions imported by name), or cut it on "
                      "purpose with .detach()")


# Conversions of a tensor to Python or NumPy values, by how the tape treats them.
MARKED = frozenset({"item", "tolist"})  # their floats can carry the mark
UNMARKED = frozenset({"__float__", "__complex__"})  # the cut is remembered on the tape
REFUSED = frozenset({"numpy", "__array__"})  # NumPy arrays: refused, as torch refuses them
CONVERSIONS = MARKED | UNMARKED | REFUSED
