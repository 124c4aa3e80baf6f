"""Run one generated program on torch.autograd and on zygote_torch, and classify the outcome.

Reference: torch.autograd on fresh leaves (the program's dtypes; inputs are float64 unless the program
says float32). Where torch's backward raises "modified by an inplace operation", the reference is
torch.autograd again with every saved tensor copied as it is saved (``saved_tensors_hooks``): the same
math without the version-counter check. Either that gradient or a ZygoteError is then a right answer.

Paths: ``dynamic`` is ``zt.withgradient(f, *xs)``; ``staged`` is
``zt.compile(lambda *xs: zt.withgradient(f, *xs))`` called on the inputs, then on a second draw of them
(the cached program must be right for new data too).

Categories (per path):
  ok               value and every gradient match (a ``None`` gradient where torch's is all zeros is
                   counted ``ok_none_for_zero``, listed separately)
  wrong_value      the forward value differs
  wrong_grad       a gradient differs (shape or values)
  missing_grad     ``None`` where torch's gradient is nonzero
  crash            an exception other than zt.ZygoteError
  refused          a zt.ZygoteError where torch differentiates the program
  refused_ok       a zt.ZygoteError where torch raises too, or a TraceError on the staged path for a
                   program whose Python branches on tensor data (the documented contract)
  unverified       zt returned gradients, torch raised and there is no functional reference
  timeout          the call ran past the time limit
  invalid          torch itself fails (forward error, non-finite values): the program is not counted
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import linecache
import signal
import warnings

import torch

import zygote_torch as zt

# Outcomes the guarantee rules out: a wrong result, or neither a result nor a ZygoteError.
BUG_CATEGORIES = ("wrong_value", "wrong_grad", "missing_grad", "crash", "timeout")
INPLACE_MESSAGE = "modified by an inplace operation"


@dataclasses.dataclass
class Reference:
    status: str  # "ok", "inplace_error" (functional reference used), "no_reference", "invalid"
    value: torch.Tensor | None = None
    grads: list | None = None
    message: str = ""


@dataclasses.dataclass
class Outcome:
    path: str
    category: str
    detail: str = ""
    torch_status: str = "ok"

    @property
    def is_bug(self) -> bool:
        return self.category in BUG_CATEGORIES


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` inside zt swallows it."""


def _on_alarm(signum, frame):
    raise _Timeout()


def compile_program(program, tag: str = "") -> callable:
    """``f`` of the program's source, with the source registered in linecache (so error messages and
    tracebacks show the line)."""
    source = program.source()
    filename = f"<fuzz-{program.seed}{tag}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict = {"__name__": f"fuzz_{program.seed}"}
    exec(compile(source, filename, "exec"), ns)
    return ns["f"]


def torch_reference(f, inputs) -> Reference:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    try:
        y = f(*leaves)
    except Exception as e:  # noqa: BLE001
        return Reference("invalid", message=f"forward: {type(e).__name__}: {e}")
    if not isinstance(y, torch.Tensor) or y.dim() != 0 or not torch.isfinite(y).all():
        return Reference("invalid", message="non-finite or non-scalar output")
    if not y.requires_grad:
        return Reference("ok", y.detach(), [None] * len(inputs))
    try:
        grads = list(torch.autograd.grad(y, leaves, allow_unused=True))
    except Exception as e:  # noqa: BLE001  (a hook of the program may raise anything)
        if INPLACE_MESSAGE not in str(e):
            return Reference("invalid", message=f"backward: {type(e).__name__}: {e}")
        return _functional_reference(f, inputs, str(e))
    if any(g is not None and not torch.isfinite(g).all() for g in grads):
        return Reference("invalid", message="non-finite gradient")
    return Reference("ok", y.detach(), grads)


def _functional_reference(f, inputs, message: str) -> Reference:
    """torch.autograd with every saved tensor copied when saved: the gradient of the program's math,
    without the version-counter check that refused it."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    try:
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):
            y = f(*leaves)
            grads = list(torch.autograd.grad(y, leaves, allow_unused=True))
    except Exception as e:  # noqa: BLE001
        return Reference("no_reference", message=f"{message.splitlines()[0]} / copies: {type(e).__name__}: {e}")
    return Reference("inplace_error", y.detach(), grads, message.splitlines()[0])


def _tolerances(program) -> tuple[float, float]:
    return (1e-4, 1e-3) if program.uses_float32 else (1e-7, 1e-5)


def _close(ours, ref, atol, rtol) -> bool:
    if not isinstance(ours, torch.Tensor) or ours.shape != ref.shape:
        return False
    return torch.allclose(ours.detach().to(ref.dtype), ref, atol=atol, rtol=rtol, equal_nan=True)


def compare(program, ref: Reference, value, grads) -> tuple[str, str]:
    """(category, detail) of zt's (value, grads) against the reference."""
    atol, rtol = _tolerances(program)
    if not _close(value, ref.value, atol, rtol):
        return "wrong_value", f"value {_short(value)} vs torch {_short(ref.value)}"
    grads = grads if isinstance(grads, (tuple, list)) else (grads,)
    none_for_zero = False
    for i, (ours, theirs) in enumerate(zip(grads, ref.grads)):
        name = program.inputs[i][0]
        if theirs is None or not torch.count_nonzero(theirs):
            if ours is None:
                none_for_zero |= theirs is not None
                continue
            if isinstance(ours, torch.Tensor) and not torch.count_nonzero(ours) and \
                    (theirs is None or ours.shape == theirs.shape):
                continue
            if theirs is None:
                return "wrong_grad", f"d/d{name}: ours nonzero, torch None"
        if ours is None:
            return "missing_grad", f"d/d{name}: ours None, torch nonzero"
        if not _close(ours, theirs, atol, rtol):
            return "wrong_grad", f"d/d{name}: max abs diff {_maxdiff(ours, theirs)}"
    return ("ok_none_for_zero" if none_for_zero else "ok"), ""


def _short(t) -> str:
    return f"{t.item():.6g}" if isinstance(t, torch.Tensor) and t.numel() == 1 else repr(t)[:60]


def _maxdiff(a, b) -> str:
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return f"(shape {getattr(a, 'shape', type(a).__name__)} vs {tuple(b.shape)})"
    return f"{(a.detach().to(b.dtype) - b).abs().max().item():.3g}"


def _zt_error_detail(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _guarded(call, timeout: float):
    """``call()`` under an alarm; returns (result, exception)."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):  # torch.fx prints the tracebacks it re-raises
            warnings.simplefilter("ignore")
            return call(), None
    except _Timeout as e:
        return None, e
    except Exception as e:  # noqa: BLE001
        return None, e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _classify_error(program, path: str, e: BaseException, ref: Reference) -> Outcome:
    if isinstance(e, _Timeout):
        return Outcome(path, "timeout", "", ref.status)
    if isinstance(e, zt.ZygoteError):
        expected = ref.status in ("inplace_error", "no_reference") or (
            path == "staged" and program.data_dependent and isinstance(e, zt.TraceError))
        return Outcome(path, "refused_ok" if expected else "refused", _zt_error_detail(e), ref.status)
    return Outcome(path, "crash", _zt_error_detail(e), ref.status)


def _check(program, path, ref, result, inputs, snapshot) -> Outcome:
    if any(not torch.equal(x, s) for x, s in zip(inputs, snapshot)):
        return Outcome(path, "wrong_value", "zt mutated an input", ref.status)
    if ref.status == "no_reference":
        return Outcome(path, "unverified", ref.message, ref.status)
    value, grads = result
    category, detail = compare(program, ref, value, grads)
    return Outcome(path, category, detail, ref.status)


def _dynamic_call(program, f, path: str, variant: int, ref: Reference, timeout: float) -> Outcome:
    """One call of ``zt.withgradient(f, ...)`` on the inputs of ``variant``, against ``ref``."""
    inputs = program.make_inputs(variant)
    snapshot = [x.clone() for x in inputs]
    result, err = _guarded(lambda: zt.withgradient(f, *inputs), timeout)
    if err is not None:
        return _classify_error(program, path, err, ref)
    return _check(program, path, ref, result, inputs, snapshot)


def run_dynamic(program, f, ref: Reference, timeout: float = 30.0) -> Outcome:
    return _dynamic_call(program, f, "dynamic", 0, ref, timeout)


def run_replayed(program, f, ref: Reference, ref2: Reference, timeout: float = 30.0) -> Outcome:
    """The dynamic path called again and again, as in a training loop: the second call with the same
    inputs generates the backward program (zygote_torch/runtime/replay.py), the later ones replay it
    or diverge from it; each call is compared with its own reference."""
    for call, (variant, r) in enumerate([(0, ref), (0, ref), (1, ref2), (0, ref), (1, ref2)]):
        out = _dynamic_call(program, f, "replayed", variant, r, timeout)
        if out.category not in ("ok", "ok_none_for_zero") or call == 4:
            out.detail = f"call {call + 1}: " + out.detail
            return out


def run_staged(program, f, ref: Reference, ref2: Reference, timeout: float = 30.0) -> Outcome:
    step = zt.compile(lambda *xs: zt.withgradient(f, *xs))
    for variant, r in ((0, ref), (1, ref2)):
        inputs = program.make_inputs(variant)
        snapshot = [x.clone() for x in inputs]
        result, err = _guarded(lambda: step(*inputs), timeout)
        if err is not None:
            out = _classify_error(program, "staged", err, r)
            if variant:
                out.detail = "second call (new inputs): " + out.detail
            return out
        out = _check(program, "staged", r, result, inputs, snapshot)
        if out.category not in ("ok", "ok_none_for_zero") or variant:
            if variant:
                out.detail = "second call (new inputs): " + out.detail
            return out


def run_program(program, paths=("dynamic", "staged"), timeout: float = 30.0) -> tuple[Reference, list[Outcome]]:
    """The torch reference and one Outcome per path (none if the program is invalid)."""
    f = compile_program(program)
    ref = torch_reference(f, program.make_inputs())
    if ref.status == "invalid":
        return ref, []
    outcomes = []
    if "dynamic" in paths:
        outcomes.append(run_dynamic(program, f, ref, timeout))
    if "staged" in paths or "replayed" in paths:
        ref2 = torch_reference(f, program.make_inputs(1))
        if ref2.status == "invalid":
            ref2 = Reference("no_reference", message="second inputs: " + ref2.message)
    if "staged" in paths:
        outcomes.append(run_staged(program, compile_program(program, "-staged"), ref, ref2, timeout))
    if "replayed" in paths:
        outcomes.append(run_replayed(program, compile_program(program, "-replayed"), ref, ref2, timeout))
    return ref, outcomes
