"""Shrink a failing program (greedy deletion of statements and returned terms, then simpler terms)
and print it as a self-contained pytest function comparing zygote_torch with torch.autograd."""
from __future__ import annotations

import dataclasses
import re

from .oracle import compile_program, run_dynamic, run_staged, torch_reference


def failure_key(outcome) -> tuple:
    """What must stay the same while shrinking: category, torch's status, and for an exception its type
    and the op it names (the message up to " at ")."""
    head = ""
    if outcome.category in ("crash", "refused", "refused_ok"):
        head = re.sub(r"\d+", "N", outcome.detail.replace("second call (new inputs): ", "").split(" at ")[0])[:80]
    return outcome.category, outcome.torch_status == "ok", head


def evaluate(program, path: str):
    """The outcome of ``program`` on ``path`` (None if torch itself fails on it)."""
    try:
        f = compile_program(program)
    except SyntaxError:
        return None
    ref = torch_reference(f, program.make_inputs())
    if ref.status == "invalid":
        return None
    if path == "dynamic":
        return run_dynamic(program, f, ref, timeout=20.0)
    ref2 = torch_reference(f, program.make_inputs(1))
    if ref2.status == "invalid":
        return None
    return run_staged(program, f, ref, ref2, timeout=20.0)


def shrink(program, outcome, budget: int = 400):
    """The smallest program found (by greedy deletion) that fails the same way on the same path."""
    key = failure_key(outcome)
    calls = 0

    def fails(candidate) -> bool:
        nonlocal calls
        calls += 1
        out = evaluate(candidate, outcome.path)
        return out is not None and failure_key(out) == key

    changed = True
    while changed and calls < budget:
        changed = False
        for i in reversed(range(len(program.body))):
            if i >= len(program.body):
                continue
            candidate = program.without(body_index=i)
            if calls < budget and fails(candidate):
                program, changed = candidate, True
                continue
            for simpler in _bypasses(program.body[i]):
                candidate = program.with_statement(i, simpler)
                if calls < budget and fails(candidate):
                    program, changed = candidate, True
                    break
        for j in reversed(range(len(program.terms))):
            if len(program.terms) > 1 and calls < budget:
                candidate = program.without(term_index=j)
                if fails(candidate):
                    program, changed = candidate, True
    for j, term in enumerate(program.terms):  # plain sums read more easily than weighted ones
        m = re.match(r"\((\w+) \* torch\.linspace", term)
        if m and calls < budget:
            candidate = dataclasses.replace(program, terms=[*program.terms[:j], f"{m.group(1)}.sum()",
                                                            *program.terms[j + 1:]])
            if fails(candidate):
                program = candidate
    return program


def _bypasses(stmt) -> list[str]:
    """Simpler replacements of an assignment: its target set to a copy of one value it reads."""
    import ast
    try:
        tree = ast.parse(stmt.source)
    except SyntaxError:
        return []
    stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    targets = [t for t in stored if re.fullmatch(r"[tvb]\d+", t)]
    if len(targets) != 1 or ("\n" not in stmt.source and stmt.source.startswith(f"{targets[0]} = ") and
                             re.fullmatch(r"\w+ \* 1\.0", stmt.source.split(" = ", 1)[1])):
        return []
    read = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                   and re.fullmatch(r"[tvbx]\d+", n.id) and n.id != targets[0]})
    return [f"{targets[0]} = {name} * 1.0" for name in read]


def pytest_repro(program, outcome, name: str) -> str:
    """A pytest function (imports torch, torch.nn.functional as F and zygote_torch as zt) that fails
    while the bug is there: the program, its inputs, torch.autograd's gradients, zygote_torch's."""
    ind = "    "
    args = ", ".join(n for n, _, _ in program.inputs)
    lines = [f"def {name}():", f'{ind}"""tests/fuzz.py program {program.seed}, {outcome.path} path: '
             f'{outcome.category}."""']
    helpers = program.helper_source(ind).rstrip("\n")
    if helpers:
        lines += [helpers, ""]
    lines += [program.function_source(indent=ind), ""]
    second = outcome.path == "staged" and outcome.detail.startswith("second call")
    lines += [ind + line for line in program.inputs_source(1 if second else 0)]
    lines.append(f"{ind}leaves = [x.clone().requires_grad_() for x in ({args},)]")
    if outcome.torch_status == "inplace_error":
        lines += [f"{ind}# torch.autograd refuses f ('modified by an inplace operation'): saved tensors copied",
                  f"{ind}with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):",
                  f"{ind}    expected = f(*leaves)",
                  f"{ind}    expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True)"]
    else:
        lines += [f"{ind}expected = f(*leaves)",
                  f"{ind}expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True)"]
    if outcome.path == "dynamic":
        lines.append(f"{ind}value, grads = zt.withgradient(f, {args})")
    else:
        lines.append(f"{ind}step = zt.compile(lambda *xs: zt.withgradient(f, *xs))")
        if second:
            first = [line.replace("g = ", "g0 = ").replace("generator=g", "generator=g0") for line in
                     program.inputs_source(0)]
            lines += [ind + line.replace(" = torch", "_first = torch", 1) if line.startswith("x") else ind + line
                      for line in first]
            lines.append(f"{ind}step({', '.join(n + '_first' for n, _, _ in program.inputs)})")
        lines.append(f"{ind}value, grads = step({args})")
    tol = ", atol=1e-4, rtol=1e-3" if program.uses_float32 else ""
    lines += [f"{ind}torch.testing.assert_close(value, expected.detach(){tol})",
              f"{ind}for ours, theirs in zip(grads, expected_grads):",
              f"{ind}    if theirs is None or not theirs.any():",
              f"{ind}        assert ours is None or not ours.any()",
              f"{ind}    else:",
              f"{ind}        assert ours is not None, 'missing gradient'",
              f"{ind}        torch.testing.assert_close(ours, theirs{tol})"]
    return "\n".join(lines)
