"""The OpInfo sweep: zygote_torch's gradients against torch.autograd on PyTorch's own op database.

For every entry of ``torch.testing._internal.common_methods_invocations.op_db`` with
``supports_autograd``, each of its ``sample_inputs('cpu', dtype, requires_grad=True)`` is turned into
a function of the sample's tensors that require grad, exactly as PyTorch's own gradient tests do
(``TestCase._check_helper``: the op's ``gradcheck_wrapper`` around ``op.op``, then the sample's
``output_process_fn_grad``). That function is differentiated twice, with a random cotangent for
each floating output:

- by ``torch.autograd.grad`` (allow_unused), the reference (outputs torch declares
  non-differentiable, such as a batch norm's saved statistics, get no cotangent on either side);
- by ``zygote_torch.pullback``, and ``zygote_torch.fallbacks`` tells whether any call in it went
  through the ``torch.func.vjp`` fallback instead of a rule.

OpInfo ops whose ``op`` is a lambda or a wrapper run through capture like any user function.

Where PyTorch's own OpInfo marks an op's backward gradcheck as an expected failure (torch.autograd
is wrong there, e.g. as_strided_scatter), a disagreement is judged by central finite differences
instead.

Each op gets a status:

- ``rule``: every sample that ran matched, and no call used the fallback;
- ``fallback``: every sample that ran matched, but some call went through the fallback;
- ``failing``: some sample mismatched, or raised in zygote_torch (and the reference did not);
- ``skipped``: no sample ran (each one's reference raised or had no differentiable input);
- ``unsupported``: OpInfo declares no autograd for the dtype on CPU (left out of the counts).

A sample whose reference itself raises is skipped (per sample, counted). Command line::

    OMP_NUM_THREADS=1 python tests/opinfo_sweep.py --quick              # the CI subset
    OMP_NUM_THREADS=1 python tests/opinfo_sweep.py --full --write-docs  # every op; rewrites docs/opinfo.md
    OMP_NUM_THREADS=1 python tests/opinfo_sweep.py --ops sin,nn.functional.conv2d -v
    OMP_NUM_THREADS=1 python tests/opinfo_sweep.py --full --all-rule-modules  # with rule modules in progress
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
import warnings
from itertools import chain

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import zygote_torch as zt  # noqa: E402
from zygote_torch.capture.pytree import flatten  # noqa: E402

DOC_PATH = os.path.join(ROOT, "docs", "opinfo.md")
JSON_PATH = os.path.join(ROOT, "docs", "opinfo_summary.json")

# Both sides compute the same analytic gradient, possibly by different formulas: tight tolerances,
# a little looser than tests/helpers.check_gradient for the roundoff of long reductions and solves.
ATOL = 1e-6
RTOL = 1e-5

STATUSES = ("rule", "fallback", "failing", "skipped")  # "unsupported" ops are left out of the counts

# The CI subset: at least one op of every rule family, run with at most QUICK_MAX_SAMPLES samples each.
QUICK_OPS = (
    # arithmetic
    "add", "sub", "mul", "div.no_rounding_mode", "true_divide", "neg", "rsub", "pow", "float_power",
    # elementwise math
    "exp", "log", "log1p", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "abs", "erf", "atan2",
    "clamp", "where", "maximum", "minimum", "lerp", "addcmul", "xlogy", "special.xlog1py", "sinc",
    # reductions
    "sum", "mean", "prod", "amax", "max.reduction_with_dim", "std", "var", "logsumexp", "norm",
    "cumsum", "cumprod",
    # linear algebra (products)
    "mm", "matmul", "bmm", "addmm", "einsum", "outer", "dot", "linalg.vector_norm",
    # shape
    "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "expand", "flatten", "cat",
    "stack", "split", "chunk", "flip", "roll", "repeat", "tril", "diagonal", "movedim",
    # indexing
    "__getitem__", "gather", "scatter_add", "index_select", "index_add", "index_put", "masked_fill",
    "masked_select", "take_along_dim",
    # nn, activations, softmax
    "nn.functional.relu", "nn.functional.gelu", "nn.functional.silu", "nn.functional.softplus",
    "nn.functional.elu", "nn.functional.leaky_relu", "softmax", "log_softmax", "nn.functional.linear",
    "nn.functional.embedding", "nn.functional.dropout", "nn.functional.layer_norm",
    "nn.functional.rms_norm", "nn.functional.batch_norm", "nn.functional.normalize",
    # losses
    "nn.functional.cross_entropy", "nn.functional.nll_loss", "nn.functional.mse_loss",
    "nn.functional.binary_cross_entropy_with_logits", "nn.functional.kl_div",
    "nn.functional.smooth_l1_loss", "nn.functional.huber_loss",
    # the families the sweep found missing (rules/activations.py, sampling.py, statistics.py, distances.py, ...)
    "nn.functional.glu", "nn.functional.hardswish", "nn.functional.prelu", "nn.functional.dropout2d",
    "nn.functional.alpha_dropout", "kron", "as_strided", "unfold", "meshgrid.variadic_tensors", "block_diag",
    "diagonal_scatter", "repeat_interleave", "quantile", "aminmax", "diff", "trapezoid", "cov", "cdist",
    "nn.functional.cosine_similarity", "nn.functional.bilinear", "scatter_reduce.amax", "index_reduce.prod",
    "nn.functional.embedding_bag", "nn.functional.multi_margin_loss", "nn.functional.triplet_margin_loss",
    "nn.functional.gaussian_nll_loss", "gradient", "native_batch_norm", "native_layer_norm",
    "_segment_reduce.lengths", "normal",
    # families landing in other modules (listed so the subset follows them as they land)
    "nn.functional.conv2d", "nn.functional.max_pool2d", "nn.functional.avg_pool2d",
    "nn.functional.interpolate.bilinear", "nn.functional.pad.constant",
    "nn.functional.scaled_dot_product_attention", "nn.functional.group_norm", "linalg.inv",
    "linalg.det", "linalg.solve", "linalg.cholesky", "fft.fft", "fft.rfft", "sort", "topk",
)
QUICK_MAX_SAMPLES = 4


@dataclasses.dataclass
class OpResult:
    name: str
    status: str
    samples: int = 0  # samples that ran (compared)
    ref_skipped: int = 0  # samples whose reference raised
    no_input: int = 0  # samples with no tensor requiring grad, or no differentiable output
    autograd_wrong: int = 0  # samples where torch.autograd is known wrong and ours matched finite differences
    fallback_ops: list = dataclasses.field(default_factory=list)  # calls that used the fallback
    reason: str = ""  # the first failure (or why skipped)
    seconds: float = 0.0


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds):
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise _Timeout(f"timed out after {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- the op database -------------------------------------------------------------------------------
def autograd_ops() -> list:
    """The OpInfos of op_db with ``supports_autograd``, in op_db's order."""
    from torch.testing._internal.common_methods_invocations import op_db
    return [op for op in op_db if op.supports_autograd]


def op_name(op) -> str:
    """``name`` or ``name.variant_test_name``: OpInfo's ``full_name``, unique over op_db."""
    return op.full_name


def ops_by_name(names=None) -> dict:
    ops = {op_name(op): op for op in autograd_ops()}
    if names is None:
        return ops
    missing = [n for n in names if n not in ops]
    if missing:
        raise KeyError(f"not OpInfo entries with supports_autograd: {missing}")
    return {n: ops[n] for n in names}


# -- one sample ------------------------------------------------------------------------------------
def _is_diff(x) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _iterable_of_tensors(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x)


def sample_function(op, sample):
    """(fn, grad_inputs): ``fn(*grad_inputs)`` calls the op on the sample, its tensors that require
    grad replaced by fn's arguments (TestCase._check_helper's recomposition)."""
    if _iterable_of_tensors(sample.input):
        all_args = chain(sample.input, sample.args, sample.kwargs.values())
    else:
        all_args = chain((sample.input,), sample.args, sample.kwargs.values())
    grad_inputs = tuple(x for x in all_args if isinstance(x, torch.Tensor) and x.requires_grad)

    def recompose(inputs, inp, i):
        if _iterable_of_tensors(inp):
            out = []
            for x in inp:
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    out.append(inputs[i])
                    i += 1
                else:
                    out.append(x)
            return out, i
        if isinstance(inp, torch.Tensor) and inp.requires_grad:
            return inputs[i], i + 1
        return inp, i

    def fn(*inputs):
        positional, i = [], 0
        inp, i = recompose(inputs, sample.input, i)
        positional.append(inp)
        for x in sample.args:
            inp, i = recompose(inputs, x, i)
            positional.append(inp)
        kwargs = {}
        for k, v in sample.kwargs.items():
            kwargs[k], i = recompose(inputs, v, i)
        output = op.gradcheck_wrapper(op.op, *positional, **kwargs)
        if sample.output_process_fn_grad is not None:
            return sample.output_process_fn_grad(output)
        return output

    return fn, grad_inputs


def _fresh(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def _cotangent(t: torch.Tensor, gen: torch.Generator):
    if not _is_diff(t):
        return None
    if t.is_complex():
        return torch.complex(torch.randn(t.shape, dtype=t.real.dtype, generator=gen),
                             torch.randn(t.shape, dtype=t.real.dtype, generator=gen)).to(t.dtype)
    return torch.randn(t.shape, dtype=t.dtype, generator=gen)


class SampleSkip(Exception):
    """The sample cannot be compared (its reference raised, or there is nothing to differentiate)."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind = kind


class SampleFailure(Exception):
    """zygote_torch disagreed with torch.autograd on the sample, or raised where it did not."""


def _short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _assert_message(e: AssertionError) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    keep = [l for l in lines if l.startswith(("Mismatched", "Greatest"))]
    return " ".join(keep or lines[:2])


def _close(ours, ref, what: str, atol=None, rtol=None):
    """None on either side stands for an exact zero (no dependence)."""
    if ours is None or ref is None:
        other = ref if ours is None else ours
        if other is not None and torch.count_nonzero(torch.as_tensor(other)) != 0:
            raise SampleFailure(f"{what}: one side is None (no dependence), the other is nonzero")
        return
    if not isinstance(ours, torch.Tensor):
        raise SampleFailure(f"{what}: got a {type(ours).__name__}, expected a tensor")
    if ours.shape != ref.shape:
        raise SampleFailure(f"{what}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}")
    if ours.dtype != ref.dtype:
        raise SampleFailure(f"{what}: dtype {ours.dtype}, expected {ref.dtype}")
    try:
        torch.testing.assert_close(ours, ref, atol=atol or ATOL, rtol=rtol or RTOL, equal_nan=True)
    except AssertionError as e:
        raise SampleFailure(f"{what} mismatch: {_assert_message(e)}") from None


def run_sample(op, sample, seed: int = 0) -> list:
    """Compare zygote_torch with torch.autograd on one sample. Returns the calls that used the
    fallback (empty when rules covered everything); raises SampleSkip or SampleFailure."""
    fn, grad_inputs = sample_function(op, sample)
    if not any(_is_diff(t) for t in grad_inputs):
        raise SampleSkip("no_input", "no floating tensor requires grad")

    # reference
    ref_inputs = [_fresh(t, True) for t in grad_inputs]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y_ref = fn(*ref_inputs)
            y_leaves = flatten(y_ref)[0]
            gen = torch.Generator().manual_seed(seed)
            dys = [_cotangent(t, gen) if isinstance(t, torch.Tensor) else None for t in y_leaves]
            # outputs torch declares non-differentiable (a batch norm's saved statistics, say) get no
            # cotangent on either side
            dys = [d if isinstance(t, torch.Tensor) and t.requires_grad else None for t, d in zip(y_leaves, dys)]
            pairs = [(t, d) for t, d in zip(y_leaves, dys) if d is not None]
            if not pairs:
                raise SampleSkip("no_input", "no output depends differentiably on the inputs")
            ref = torch.autograd.grad([t for t, _ in pairs], ref_inputs, [d for _, d in pairs],
                                      allow_unused=True)
    except SampleSkip:
        raise
    except Exception as e:  # noqa: BLE001  (the reference itself refuses this sample)
        raise SampleSkip("ref_error", _short(e)) from None

    # zygote_torch
    ours_inputs = [_fresh(t, False) for t in grad_inputs]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y, back = zt.pullback(fn, *ours_inputs)
            ours_leaves = flatten(y)[0]
            if len(ours_leaves) != len(y_leaves):
                raise SampleFailure(f"output has {len(ours_leaves)} leaves, expected {len(y_leaves)}")
            for i, (a, b) in enumerate(zip(ours_leaves, y_leaves)):
                if isinstance(b, torch.Tensor):
                    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
                        raise SampleFailure(f"output {i}: {type(a).__name__} "
                                            f"{tuple(getattr(a, 'shape', ()))}, expected {tuple(b.shape)}")
                    if _is_diff(b):
                        try:
                            torch.testing.assert_close(a, b.detach(), atol=ATOL, rtol=RTOL, equal_nan=True)
                        except AssertionError as e:
                            raise SampleFailure(f"output {i} (forward) mismatch: {_assert_message(e)}") from None
            dy_struct = flatten(y)[1](dys)
            grads = back(dy_struct)
            used = zt.fallbacks(fn, *ours_inputs)
    except SampleFailure:
        raise
    except Exception as e:  # noqa: BLE001
        raise SampleFailure(f"zygote_torch raised {_short(e)}") from None
    try:
        for i, (o, r) in enumerate(zip(grads, ref)):
            _close(o, r, f"input {i}")
    except SampleFailure as e:
        if not autograd_known_wrong(op):
            raise
        # PyTorch's own test marks this op's torch.autograd gradient as wrong: judge by finite differences
        numeric = numerical_vjp(fn, ours_inputs, dys)
        for i, (o, r) in enumerate(zip(grads, numeric)):
            try:
                _close(o, r, f"input {i}", atol=1e-5, rtol=1e-4)
            except SampleFailure as e2:
                raise SampleFailure(f"{e}; and against finite differences: {e2}") from None
        raise AutogradWrong(f"torch.autograd disagrees ({e}); ours matches finite differences",
                            [u.split(" at ", 1)[0] for u in used]) from None
    return [u.split(" at ", 1)[0] for u in used]


class AutogradWrong(Exception):
    """zygote_torch matched finite differences on a sample where torch.autograd's gradient is known
    wrong (OpInfo marks the op's TestBwdGradients.test_fn_grad as an expected failure)."""

    def __init__(self, why: str, used: list):
        super().__init__(why)
        self.used = used


def autograd_known_wrong(op) -> bool:
    """Whether PyTorch's own OpInfo tests expect torch.autograd's gradient of ``op`` to fail gradcheck
    (an ``expectedFailure`` of TestBwdGradients.test_fn_grad on CPU in float64 or complex128)."""
    import unittest
    for d in op.decorators:
        if getattr(d, "cls_name", None) != "TestBwdGradients" or getattr(d, "test_name", None) != "test_fn_grad":
            continue
        if d.device_type not in (None, "cpu") or not d.active_if:
            continue
        if any(dec is unittest.expectedFailure for dec in d.decorators):
            return True
    return False


def numerical_vjp(fn, inputs, dys, eps=1e-6) -> list:
    """J^T dy by central differences of L(x) = sum Re(conj(dy) * fn(x)): for a complex input the
    cotangent is dL/dRe(x) + i dL/dIm(x), torch's convention."""
    def loss(xs):
        with torch.no_grad():
            leaves = flatten(fn(*xs))[0]
        total = 0.0
        for t, d in zip(leaves, dys):
            if d is not None and isinstance(t, torch.Tensor):
                total += float((d.conj() * t).real.sum()) if t.is_complex() else float((d * t).sum())
        return total

    out = []
    for k, x in enumerate(inputs):
        if not _is_diff(x):
            out.append(None)
            continue
        g = torch.zeros_like(x)
        flat = g.view(-1)
        for j in range(x.numel()):
            parts = [1.0, 1j] if x.is_complex() else [1.0]
            for unit in parts:
                def at(sign):
                    xp = x.detach().clone()
                    xp.view(-1)[j] += sign * eps * unit
                    return loss([xp if i == k else t for i, t in enumerate(inputs)])
                flat[j] += unit * (at(1) - at(-1)) / (2 * eps)
        out.append(g)
    return out


# -- one op ----------------------------------------------------------------------------------------
def sweep_op(op, dtype=torch.float64, max_samples=None, timeout=None, stop_at_failure=False,
             verbose=False) -> OpResult:
    """Run every sample (or the first ``max_samples`` that run) of ``op`` in ``dtype``."""
    name = op_name(op)
    result = OpResult(name, "skipped")
    if dtype not in op.supported_backward_dtypes("cpu") or not op.supports_dtype(dtype, "cpu"):
        result.status = "unsupported"
        result.reason = f"OpInfo declares no {str(dtype).replace('torch.', '')} autograd on CPU"
        return result
    start = time.perf_counter()
    fallback_ops, failures, skip_reasons, notes = [], [], [], []
    try:
        with _time_limit(timeout):
            torch.manual_seed(0)
            samples = op.sample_inputs("cpu", dtype, requires_grad=True)
            for k, sample in enumerate(samples):
                if max_samples is not None and result.samples >= max_samples:
                    break
                try:
                    used = run_sample(op, sample, seed=k)
                except SampleSkip as s:
                    if s.kind == "ref_error":
                        result.ref_skipped += 1
                    else:
                        result.no_input += 1
                    skip_reasons.append(str(s))
                    continue
                except AutogradWrong as w:
                    result.samples += 1
                    result.autograd_wrong += 1
                    notes.append(f"sample {k}: {w}")
                    used = w.used
                    for u in used:
                        if u not in fallback_ops:
                            fallback_ops.append(u)
                    continue
                except SampleFailure as f:
                    result.samples += 1
                    failures.append(f"sample {k}: {f}")
                    if verbose:
                        print(f"  {name} sample {k}: FAIL {f}", flush=True)
                    if stop_at_failure:
                        break
                    continue
                result.samples += 1
                for u in used:
                    if u not in fallback_ops:
                        fallback_ops.append(u)
    except _Timeout as e:
        failures.append(f"{e} (after {result.samples} samples)")
    except Exception as e:  # noqa: BLE001  (sample generation itself failed)
        if not failures and result.samples == 0:
            result.reason = f"sample generation raised {_short(e)}"
            result.seconds = time.perf_counter() - start
            return result
        failures.append(f"sample generation raised {_short(e)}")
    result.seconds = time.perf_counter() - start
    result.fallback_ops = fallback_ops
    if failures:
        result.status = "failing"
        result.reason = failures[0] + (f" (+{len(failures) - 1} more failing samples)" if len(failures) > 1 else "")
    elif result.samples == 0:
        result.status = "skipped"
        result.reason = "no sample ran: " + (skip_reasons[0] if skip_reasons else "no samples")
    elif fallback_ops:
        result.status = "fallback"
        result.reason = "fallback for " + ", ".join(fallback_ops)
    else:
        result.status = "rule"
    if notes and result.status in ("rule", "fallback"):
        note = (f"torch.autograd's gradient is wrong on {len(notes)} samples (OpInfo expects its gradcheck "
                "to fail); ours matched finite differences there")
        result.reason = f"{result.reason}; {note}" if result.reason else note
    return result


# -- the summary -----------------------------------------------------------------------------------
DTYPES = {"float64": torch.float64, "complex128": torch.complex128}


def summarize(results: list) -> dict:
    """Counts and percentages: of every op swept, and of the ops that ran at least one sample.
    ``results``: OpResults, or their dicts as recorded in docs/opinfo_summary.json."""
    results = [OpResult(**r) if isinstance(r, dict) else r for r in results]
    unsupported = sum(1 for r in results if r.status == "unsupported")
    results = [r for r in results if r.status != "unsupported"]
    counts = {s: sum(1 for r in results if r.status == s) for s in STATUSES}
    total = len(results)
    ran = total - counts["skipped"]
    pct = lambda n, d: round(100.0 * n / d, 1) if d else 0.0  # noqa: E731
    return {
        "ops": total,
        "unsupported": unsupported,
        "ran": ran,
        "counts": counts,
        "percent_of_ops": {s: pct(counts[s], total) for s in STATUSES},
        "percent_of_ran": {s: pct(counts[s], ran) for s in ("rule", "fallback", "failing")},
        "samples": sum(r.samples for r in results),
        "ref_skipped_samples": sum(r.ref_skipped for r in results),
        "no_input_samples": sum(r.no_input for r in results),
    }


def summary_lines(dtype: str, summary: dict) -> list:
    """The summary as the lines of docs/opinfo.md (tests/test_opinfo.py re-derives them from the JSON)."""
    c, p, q = summary["counts"], summary["percent_of_ops"], summary["percent_of_ran"]
    return [
        f"**{dtype}**: {summary['ops']} supports_autograd ops support {dtype} autograd on CPU and were swept; "
        f"{summary['ran']} ran at least one sample ({summary['unsupported']} more declare no {dtype} autograd).",
        "",
        "| status | ops | % of all | % of those that ran |",
        "| --- | ---: | ---: | ---: |",
        f"| rule (native rules only) | {c['rule']} | {p['rule']} | {q['rule']} |",
        f"| fallback (matched, some call through torch.func.vjp) | {c['fallback']} | {p['fallback']} | "
        f"{q['fallback']} |",
        f"| failing (each a known failure with its reason) | {c['failing']} | {p['failing']} | {q['failing']} |",
        f"| skipped (no sample ran) | {c['skipped']} | {p['skipped']} | |",
        "",
        f"Samples compared: {summary['samples']}; samples skipped because the reference itself raised: "
        f"{summary['ref_skipped_samples']}; samples with nothing to differentiate: {summary['no_input_samples']}.",
    ]


def _markers(kind: str, dtype: str = "") -> tuple:
    tag = f"{kind} {dtype}".strip()
    return (f"<!-- begin {tag}: generated by tests/opinfo_sweep.py --full --write-docs -->",
            f"<!-- end {tag} -->")


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def table_lines(records: dict, known: dict) -> list:
    """One row per op: its status and sample count in each dtype, and the reasons."""
    dtypes = [d for d in DTYPES if d in records]
    by_name = {d: {r["name"]: r for r in records[d]["ops"]} for d in dtypes}
    names = sorted(set().union(*[set(b) for b in by_name.values()]))
    head = "| op | " + " | ".join(f"{d} | n" for d in dtypes) + " | notes |"
    lines = [head, "| --- | " + " | ".join("--- | ---:" for _ in dtypes) + " | --- |"]
    for name in names:
        cells, notes = [], []
        for d in dtypes:
            r = by_name[d].get(name)
            if r is None:
                cells.append("- | -")
                continue
            cells.append(f"{r['status']} | {r['samples']}")
            reason = known.get(d, {}).get(name, r["reason"]) if r["status"] == "failing" else r["reason"]
            if r["status"] == "unsupported":
                reason = ""  # the status says it
            if reason and not any(reason == n.split(": ", 1)[-1] for n in notes):
                notes.append(f"{d}: {reason}" if len(dtypes) > 1 else reason)
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {_md_escape('; '.join(notes))} |")
    return lines


_PREFIXES = {"torch._C._linalg.linalg_": "torch.linalg.", "torch._C._fft.fft_": "torch.fft.",
             "torch._C._special.special_": "torch.special."}


def _short_op(name: str) -> str:
    """A fallback call's name without the noise of torch's binding paths."""
    if name.startswith("torch._ops.aten."):  # an OpOverload: its repr carries build-specific noise
        return "aten." + (name.rsplit("::", 1)[-1] if "::" in name else name.rsplit(".", 1)[-1])
    for noise, prefix in _PREFIXES.items():
        if name.startswith(noise):
            return prefix + name[len(noise):]
    return name


def missing_lines(records: dict) -> list:
    """The calls that still went through the fallback, each with the ops (and dtypes) that needed it."""
    needed: dict = {}
    for dtype in [d for d in DTYPES if d in records]:
        for r in records[dtype]["ops"]:
            if r["status"] != "fallback":
                continue
            for call in r["fallback_ops"]:
                needed.setdefault(_short_op(call), {}).setdefault(r["name"], []).append(dtype)
    lines = ["| call with no rule | OpInfo ops that reached it |", "| --- | --- |"]
    for call in sorted(needed):
        ops = ", ".join(f"`{n}`" + ("" if len(d) == len(records) else f" ({'/'.join(d)})")
                        for n, d in sorted(needed[call].items()))
        lines.append(f"| `{_md_escape(call)}` | {ops} |")
    return lines


def _replace_block(text: str, begin: str, end: str, body: list) -> str:
    block = "\n".join([begin, *body, end])
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    return text.rstrip("\n") + "\n\n" + block + "\n"


def read_summary_block(text: str, dtype: str) -> list:
    """The generated summary lines of ``dtype`` in docs/opinfo.md's text."""
    begin, end = _markers("summary", dtype)
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n").split("\n")


def record(results: list, meta: dict) -> dict:
    return {"meta": meta, "summary": summarize(results), "ops": [dataclasses.asdict(r) for r in results]}


def write_docs(records: dict, known: dict) -> None:
    """Rewrite docs/opinfo_summary.json and the generated blocks of docs/opinfo.md."""
    with open(JSON_PATH, "w") as f:
        json.dump(records, f, indent=1, sort_keys=True)
        f.write("\n")
    text = open(DOC_PATH).read() if os.path.exists(DOC_PATH) else "# The OpInfo sweep\n"
    for dtype, rec in records.items():
        text = _replace_block(text, *_markers("summary", dtype), summary_lines(dtype, rec["summary"]))
    text = _replace_block(text, *_markers("missing"), missing_lines(records))
    text = _replace_block(text, *_markers("table"), table_lines(records, known))
    with open(DOC_PATH, "w") as f:
        f.write(text)


def unexpected(results: list, known: dict) -> tuple:
    """(failing ops not in ``known``, ops in ``known`` that no longer fail)."""
    failing = [r.name for r in results if r.status == "failing" and r.name not in known]
    fixed = [r.name for r in results if r.status != "failing" and r.name in known]
    return failing, fixed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--full", action="store_true", help="every supports_autograd op, every sample")
    which.add_argument("--quick", action="store_true", help="the CI subset (QUICK_OPS, few samples)")
    which.add_argument("--ops", help="comma-separated OpInfo names (full_name)")
    parser.add_argument("--dtype", choices=[*DTYPES, "all"], default="all")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per op (0: none)")
    parser.add_argument("--write-docs", action="store_true",
                        help="rewrite docs/opinfo.md and docs/opinfo_summary.json (needs --full)")
    parser.add_argument("--json", help="also write the per-op results to this file")
    parser.add_argument("--all-rule-modules", action="store_true",
                        help="also import every module of zygote_torch/rules, even those the package does not "
                             "import yet (to measure rules in progress; never with --write-docs)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.all_rule_modules:
        if args.write_docs:
            parser.error("--write-docs records what the package registers: no --all-rule-modules")
        import importlib
        import pkgutil
        import zygote_torch.rules as rules_pkg
        for m in pkgutil.iter_modules(rules_pkg.__path__):
            if not m.name.startswith("_"):
                importlib.import_module(f"zygote_torch.rules.{m.name}")
    if args.write_docs and not (args.full and args.dtype == "all" and args.max_samples is None):
        parser.error("--write-docs records the whole sweep: use it with --full and no --dtype/--max-samples")

    from opinfo_known_failures import KNOWN_FAILURES

    if args.ops:
        ops = ops_by_name([n.strip() for n in args.ops.split(",") if n.strip()])
    elif args.quick:
        ops = ops_by_name(QUICK_OPS)
    else:
        ops = ops_by_name()
    max_samples = args.max_samples if args.max_samples is not None else (QUICK_MAX_SAMPLES if args.quick else None)
    dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]

    records, bad, start = {}, [], time.perf_counter()
    for dtype in dtypes:
        known = KNOWN_FAILURES.get(dtype, {})
        results = []
        for i, (name, op) in enumerate(ops.items()):
            r = sweep_op(op, dtype=DTYPES[dtype], max_samples=max_samples, timeout=args.timeout or None,
                         verbose=args.verbose)
            results.append(r)
            mark = ""
            if r.status == "failing" and name not in known:
                mark = "  <-- NOT a known failure"
            elif r.status != "failing" and name in known:
                mark = "  <-- known failure no longer fails"
            if args.verbose or r.status != "unsupported":
                print(f"[{dtype} {i + 1}/{len(ops)}] {name}: {r.status} ({r.samples} samples, {r.seconds:.2f}s)"
                      f"{' ' + r.reason if r.reason else ''}{mark}", flush=True)
        meta = {"torch": torch.__version__.split("+")[0], "dtype": dtype, "max_samples": max_samples,
                "atol": ATOL, "rtol": RTOL}
        records[dtype] = record(results, meta)
        failing, fixed = unexpected(results, known)
        if max_samples is not None:
            fixed = []  # a known failure may only show in a later sample
        if failing:
            bad.append(f"{dtype}: UNEXPECTED failures (not in tests/opinfo_known_failures.py): {failing}")
        if fixed:
            bad.append(f"{dtype}: known failures that no longer fail (remove them from "
                       f"tests/opinfo_known_failures.py): {fixed}")
    for dtype, rec in records.items():
        print("\n".join(summary_lines(dtype, rec["summary"])))
    print(f"total {time.perf_counter() - start:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.write_docs:
        write_docs(records, KNOWN_FAILURES)
    for line in bad:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
