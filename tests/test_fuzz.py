"""The differential fuzzer (tests/fuzz.py) in CI: a fixed range of its programs on both paths, each
compared with torch.autograd in float64, and checks that the fuzzer itself catches what it must."""
import collections

import pytest
import torch

from fuzzing.generator import generate
from fuzzing.oracle import Reference, compare, run_program

CI_PROGRAMS = range(0, 300)  # about 45 s on one core; the longer run is tests/fuzz.py (docs/semantics.md)
EXCLUDE = ()  # statement families left out (Generator.FAMILIES): none


@pytest.mark.parametrize("seed", CI_PROGRAMS)
def test_random_program_matches_autograd(seed):
    program = generate(seed, EXCLUDE)
    _, outcomes = run_program(program)
    bugs = [f"{o.path}: {o.category}: {o.detail}" for o in outcomes if o.is_bug]
    assert not bugs, "\n".join(bugs) + f"\n(tests/fuzz.py --only {seed} --show)\n" + program.source()


def test_the_ci_programs_mix_the_features():
    tags = collections.Counter(t for seed in CI_PROGRAMS for t in generate(seed, EXCLUDE).tags)
    for feature in ["inplace_view", "view_chain", "read_view_after_mutation", "self_alias", "index_assign",
                    "adv_index", "broadcast", "float32", "control_flow", "repeat_expression", "identity_alias",
                    "overlapping_update", "diagonal", "unbind", "split", "expand", "transpose", "reduction",
                    *(["hook"] if "hook" not in EXCLUDE else []),
                    *(["custom_function"] if "custom_function" not in EXCLUDE else [])]:
        assert tags[feature] >= 5, (feature, tags[feature])


def test_generation_is_deterministic_and_every_program_runs_in_torch():
    for seed in range(20):
        program = generate(seed)
        assert program.source() == generate(seed).source()
        ref, outcomes = run_program(program, paths=())
        assert ref.status != "invalid", ref.message
        assert outcomes == []


def _reference(value, *grads):
    return Reference("ok", torch.tensor(value, dtype=torch.float64), list(grads))


def test_the_oracle_tells_wrong_missing_and_zero_gradients_apart():
    program = generate(0)
    program.inputs = [("x0", (2,), torch.float64), ("x1", (2,), torch.float64)]
    g = torch.tensor([1.0, 2.0], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    ref = _reference(3.0, g, zero)
    assert compare(program, ref, torch.tensor(3.0, dtype=torch.float64), (g, zero))[0] == "ok"
    assert compare(program, ref, torch.tensor(3.0, dtype=torch.float64), (g, None))[0] == "ok_none_for_zero"
    assert compare(program, ref, torch.tensor(3.5, dtype=torch.float64), (g, zero))[0] == "wrong_value"
    assert compare(program, ref, torch.tensor(3.0, dtype=torch.float64), (g * 2, zero))[0] == "wrong_grad"
    assert compare(program, ref, torch.tensor(3.0, dtype=torch.float64), (None, zero))[0] == "missing_grad"
    assert compare(program, ref, torch.tensor(3.0, dtype=torch.float64), (g, g))[0] == "wrong_grad"
    assert compare(program, ref, torch.tensor(3.0, dtype=torch.float64), (g[:1], zero))[0] == "wrong_grad"


def test_the_oracle_classifies_errors():
    import zygote_torch as zt
    from fuzzing.oracle import _classify_error
    program = generate(0)
    ok, raised = _reference(0.0), Reference("inplace_error", torch.tensor(0.0), [])
    assert _classify_error(program, "dynamic", zt.ZygoteError("Tensor.mul_ at f.py:3"), ok).category == "refused"
    assert _classify_error(program, "dynamic", zt.ZygoteError("x"), raised).category == "refused_ok"
    assert _classify_error(program, "dynamic", RuntimeError("boom"), ok).category == "crash"
