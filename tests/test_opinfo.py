"""The OpInfo sweep as tests (see tests/opinfo_sweep.py and docs/opinfo.md).

By default the quick subset runs: ``opinfo_sweep.QUICK_OPS`` (every rule family), at most
``QUICK_MAX_SAMPLES`` samples each, in float64 and complex128. With ``ZT_OPINFO_FULL=1`` the same
test runs every supports_autograd op of op_db on every sample.

Each op must match torch.autograd (through rules or the fallback) unless it is a known failure,
and every known failure (tests/opinfo_known_failures.py) must still fail: the list is strict.
The recorded sweep (docs/opinfo_summary.json) must agree with docs/opinfo.md, with op_db and with
the list of known failures, so the documented numbers cannot rot.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import opinfo_sweep as sweep
from opinfo_known_failures import KNOWN_FAILURES

FULL = os.environ.get("ZT_OPINFO_FULL") == "1"
_OPS = sweep.ops_by_name(None if FULL else sweep.QUICK_OPS)
_MAX_SAMPLES = None if FULL else sweep.QUICK_MAX_SAMPLES
_CASES = [(d, name) for d in sweep.DTYPES for name in _OPS]


_LIVE: dict = {}  # (dtype, name) -> status, from the full run (read by test_recorded_statuses_are_current)


@pytest.mark.parametrize("dtype,name", _CASES, ids=[f"{d}-{n}" for d, n in _CASES])
def test_op_matches_autograd(dtype, name):
    known = KNOWN_FAILURES.get(dtype, {})
    if name in known:  # checked strictly by test_known_failure_still_fails
        return
    r = sweep.sweep_op(_OPS[name], dtype=sweep.DTYPES[dtype], max_samples=_MAX_SAMPLES)
    if FULL:
        _LIVE[dtype, name] = r.status
    assert r.status != "failing", (
        f"{name} ({dtype}) disagrees with torch.autograd: {r.reason}\n"
        "Fix it, or list it in tests/opinfo_known_failures.py with the precise reason.")


_KNOWN = [(d, name) for d, ops in KNOWN_FAILURES.items() for name in ops]


@pytest.mark.parametrize("dtype,name", _KNOWN, ids=[f"{d}-{n}" for d, n in _KNOWN])
def test_known_failure_still_fails(dtype, name):
    ops = sweep.ops_by_name()
    assert name in ops, f"{name} is not a supports_autograd OpInfo: remove it from the known failures"
    r = sweep.sweep_op(ops[name], dtype=sweep.DTYPES[dtype], stop_at_failure=True)
    assert r.status == "failing", (
        f"known failure {name} ({dtype}) now {r.status}: remove it from tests/opinfo_known_failures.py "
        "and rerun `python tests/opinfo_sweep.py --full --write-docs`")


def test_quick_subset_names_are_opinfos():
    sweep.ops_by_name(sweep.QUICK_OPS)  # raises KeyError naming any that is not


# -- the recorded sweep ------------------------------------------------------------------------------
def _recorded() -> dict:
    with open(sweep.JSON_PATH) as f:
        return json.load(f)


def test_recorded_summary_is_derived_from_its_ops():
    for dtype, rec in _recorded().items():
        assert rec["meta"]["dtype"] == dtype
        assert rec["meta"]["max_samples"] is None, "docs record the full sweep only"
        assert rec["summary"] == sweep.summarize(rec["ops"]), f"{dtype}: summary does not match its op list"


def test_docs_summary_matches_recorded_json():
    text = open(sweep.DOC_PATH).read()
    for dtype, rec in _recorded().items():
        derived = sweep.summarize(rec["ops"])
        assert sweep.read_summary_block(text, dtype) == sweep.summary_lines(dtype, derived), (
            f"docs/opinfo.md's {dtype} summary differs from docs/opinfo_summary.json: "
            "rerun `python tests/opinfo_sweep.py --full --write-docs`")


def test_docs_table_matches_recorded_json():
    text = open(sweep.DOC_PATH).read()
    begin, end = sweep._markers("table")
    table = text.split(begin, 1)[1].split(end, 1)[0].strip("\n").split("\n")
    assert table == sweep.table_lines(_recorded(), KNOWN_FAILURES), \
        "docs/opinfo.md's table is stale: rerun `python tests/opinfo_sweep.py --full --write-docs`"


def test_docs_missing_rules_match_recorded_json():
    text = open(sweep.DOC_PATH).read()
    begin, end = sweep._markers("missing")
    block = text.split(begin, 1)[1].split(end, 1)[0].strip("\n").split("\n")
    assert block == sweep.missing_lines(_recorded()), \
        "docs/opinfo.md's list of missing rules is stale: rerun `python tests/opinfo_sweep.py --full --write-docs`"


def test_numerical_vjp_convention():
    """The finite differences used where torch.autograd is known wrong follow torch's convention,
    complex inputs included."""
    for dtype in (torch.float64, torch.complex128):
        x = torch.randn(3, 2, dtype=dtype)
        f = lambda t: (t.sin() * t.abs(), t.sum())  # noqa: E731
        dys = [torch.randn(3, 2, dtype=dtype), torch.randn((), dtype=dtype)]
        xr = x.clone().requires_grad_()
        ref = torch.autograd.grad(f(xr), xr, dys)[0]
        torch.testing.assert_close(sweep.numerical_vjp(f, [x], dys)[0], ref, atol=1e-6, rtol=1e-5)


def test_recorded_sweep_covers_op_db():
    names = set(sweep.ops_by_name())
    for dtype, rec in _recorded().items():
        assert {r["name"] for r in rec["ops"]} == names, \
            f"{dtype}: op_db changed since the recorded sweep: rerun it"


def test_recorded_failures_are_the_known_failures():
    for dtype, rec in _recorded().items():
        failing = {r["name"] for r in rec["ops"] if r["status"] == "failing"}
        assert failing == set(KNOWN_FAILURES.get(dtype, {})), (
            f"{dtype}: the recorded sweep's failing ops differ from the known failures "
            f"(only recorded: {sorted(failing - set(KNOWN_FAILURES.get(dtype, {})))}, only known: "
            f"{sorted(set(KNOWN_FAILURES.get(dtype, {})) - failing)}): rerun the sweep with --write-docs")


def test_sweep_detects_a_wrong_rule():
    """The sweep is not vacuous: a rule off by 0.01% on sin fails it, and a missing rule is reported
    as the fallback."""
    import zygote_torch as zt
    from zygote_torch.ad.registry import REGISTRY
    from zygote_torch.ad.tangents import NoTangent

    op = sweep.ops_by_name(["sin"])["sin"]
    saved = {k: REGISTRY._rules.get(k) for k in (torch.sin, torch.Tensor.sin)}
    try:
        @zt.rrule(torch.sin, torch.Tensor.sin)
        def wrong_sin(input):
            return torch.sin(input), lambda dy: (NoTangent(), dy * torch.cos(input) * 1.0001)

        assert sweep.sweep_op(op).status == "failing"
        for k in saved:
            REGISTRY._rules.pop(k, None)
        REGISTRY.version += 1
        r = sweep.sweep_op(op)
        assert r.status == "fallback" and r.fallback_ops == ["torch.sin"], r
    finally:
        for k, rule in saved.items():
            if rule is not None:
                REGISTRY._rules[k] = rule
        REGISTRY.version += 1
    assert sweep.sweep_op(op).status == "rule"


def test_recorded_statuses_are_current():
    """The recorded status of every op swept here (the quick subset; every op with ZT_OPINFO_FULL=1)
    is today's: a rule that landed, or one that regressed to the fallback, shows here until the
    sweep is rerun with --write-docs."""
    stale = []
    for dtype, rec in _recorded().items():
        for r in rec["ops"]:
            if r["status"] == "failing" or r["name"] not in _OPS:
                continue  # the known failures are checked by test_known_failure_still_fails
            key = (dtype, r["name"])
            if key not in _LIVE:
                _LIVE[key] = sweep.sweep_op(_OPS[r["name"]], dtype=sweep.DTYPES[dtype]).status
            if _LIVE[key] != r["status"]:
                stale.append(f"{r['name']} ({dtype}): recorded {r['status']}, now {_LIVE[key]}")
    assert not stale, "docs/opinfo_summary.json is stale (rerun `python tests/opinfo_sweep.py --full " \
                      "--write-docs`):\n" + "\n".join(stale)
