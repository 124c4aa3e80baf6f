"""The differential fuzzer (tests/fuzz.py) in CI: a fixed range of its programs on both paths, each
compared with torch.autograd in float64, and checks that the fuzzer itself catches what it must."""
import collections

import pytest
import torch

from fuzzing.generator import generate
from fuzzing.oracle import Reference, compare, run_program

CI_PROGRAMS = range(200, 500)  # about 45 s on one core; the longer run is tests/fuzz.py (docs/semantics.md)
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


# ----- regression tests: the minimal programs of bugs the fuzzer found (fixed since)

def assert_matches_autograd(f, *xs):
    """zt's value and gradients of ``f`` equal torch.autograd's, on the dynamic and the staged path."""
    import zygote_torch as zt
    leaves = [x.clone().requires_grad_() for x in xs]
    expected = f(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True)
    for run in (lambda *a: zt.withgradient(f, *a), zt.compile(lambda *a: zt.withgradient(f, *a))):
        value, grads = run(*xs)
        torch.testing.assert_close(value, expected.detach())
        for ours, theirs in zip(grads, expected_grads):
            if theirs is None or not theirs.any():
                assert ours is None or not ours.any()
            else:
                assert ours is not None, "missing gradient"
                torch.testing.assert_close(ours, theirs)


def _x(*shape):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(x, scale):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


def test_fuzz_found_register_hook_inside_f_changes_the_gradient():
    def f(x):
        t = x * 1.0
        t.register_hook(lambda g: g + 1.0)
        return t.sum()
    assert_matches_autograd(f, _x(3, 4))


def test_fuzz_found_straight_through_estimator_and_scaled_identity():
    assert_matches_autograd(lambda x: RoundSTE.apply(x * 1.0).pow(2).mean(), _x(4, 4))
    assert_matches_autograd(lambda x: ScaleGrad.apply(x * 1.0, -0.3).sum(), _x(4))


def test_fuzz_found_custom_function_on_an_untracked_tensor():
    assert_matches_autograd(lambda x: x.sum() + Cube.apply(x.detach()).sum(), _x(3, 4))


def test_fuzz_found_no_grad_write_is_not_differentiated():
    def f(x):
        t = x * 1.0
        with torch.no_grad():
            t.zero_()
        return t.sum()
    assert_matches_autograd(f, _x(4, 4))


def test_fuzz_found_no_grad_write_between_writes_through_views():
    def f(x):
        t = x * 1.0
        v = t[:, 2]
        v[-1].add_(t.mean())
        with torch.no_grad():
            t.mul_(3.0)
        v.mul_(2)
        return t.sum()
    assert_matches_autograd(f, _x(3, 4))


def test_fuzz_found_no_grad_write_through_a_view_after_the_base_was_mutated():
    def f(x):
        t = x * 1.0
        v = t.flatten()
        t.mul_(2.0)
        with torch.no_grad():
            v[8].zero_()
        return v.sum()
    assert_matches_autograd(f, _x(4, 4))


def test_fuzz_found_copy_from_a_python_number():
    def f(x):
        t = x * 1.0
        t[1].copy_(-1.0)
        return t.sum()
    assert_matches_autograd(f, _x(4, 4))


def test_fuzz_found_view_of_an_untracked_tensor_taken_before_a_tracked_write():
    def f(x):
        b = torch.full((4, 4), 0.5, dtype=torch.float64)
        v = b.expand_as(b)
        b.add_(x)
        return v.sum()

    def g(x):
        d = (x * 1.0).detach()
        row = d[2]
        d.sub_(x.mean(), alpha=0.5)
        return row.pow(2).mean()
    assert_matches_autograd(f, _x(4, 4))
    assert_matches_autograd(g, _x(3, 4))
