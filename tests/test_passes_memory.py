"""The passes respect mutation and aliasing: nothing written in place, or aliasing what is, is
folded, merged by CSE or simplified away; a factory written in place is created at each call; a
staged program writes into its caller's tensors only where the Python did. Each test compares
zt.compile against eager PyTorch (float64), the random programs (tests/program_generator.py) too."""
import pytest
import torch

import zygote_torch as zt
from helpers import rand
from program_generator import random_program, run_eager_and_staged, run_gradients


def test_a_factory_written_in_place_is_created_at_each_call():
    def f(x):
        buf = torch.zeros(3, dtype=torch.float64)
        buf.add_(x)
        return buf.sum()

    step, x = zt.compile(f), torch.ones(3, dtype=torch.float64)
    assert [float(step(x)) for _ in range(3)] == [3.0, 3.0, 3.0]  # not 3, 6, 9


def test_a_value_written_in_place_is_not_merged_with_its_duplicate():
    def f(x):
        a = x * 2
        a.add_(1)
        b = x * 2
        return (a * b).sum()

    x = torch.arange(1.0, 4.0, dtype=torch.float64)
    assert float(zt.compile(f)(x)) == float(f(x)) == 68.0


def test_an_identity_on_a_value_written_through_a_view_keeps_the_callers_input():
    def f(x):
        t = x * 1.0
        t[0].mul_(2)
        return t.sum()

    x = torch.ones(3, dtype=torch.float64)
    assert float(zt.compile(f)(x)) == 4.0
    assert torch.equal(x, torch.ones(3, dtype=torch.float64))  # the caller's tensor is untouched


def test_a_view_read_after_its_base_is_written_is_not_folded():
    def f(x):
        c = torch.zeros(3, dtype=torch.float64)
        v = c[0]
        c.add_(1)
        return x * v

    x = rand(3)
    torch.testing.assert_close(zt.compile(f)(x), f(x))


def test_a_returned_constant_is_a_new_tensor_at_each_call():
    step = zt.compile(lambda x: (x * 2, torch.ones(2, dtype=torch.float64) * 3))
    x = rand(2)
    first = step(x)[1]
    first.mul_(100)  # the caller writes what it was given
    torch.testing.assert_close(step(x)[1], torch.full((2,), 3.0, dtype=torch.float64))


def test_two_equal_returned_values_stay_two_tensors():
    step = zt.compile(lambda x: (x.sin(), x.sin()))
    a, b = step(rand(3))
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_inplace_relu_is_seen_as_a_write():
    def f(x):
        a = x * 1.0
        torch.nn.functional.relu(a, inplace=True)
        return a, x * 1.0

    x = rand(5)
    for got, expected in zip(zt.compile(f)(x), f(x)):
        torch.testing.assert_close(got, expected)


def test_recomputation_does_not_read_a_value_written_later():
    def f(x):
        a = x * 3
        h = torch.relu(a)
        s = h.sum()
        for _ in range(10):
            s = s + (x * 2).sum()
        a.mul_(-1)
        return s + h.sum()

    x = rand(4)
    torch.testing.assert_close(zt.compile(f)(x), f(x))


@pytest.mark.parametrize("seed", range(120))
def test_random_programs_with_views_and_inplace_ops_match_eager(seed):
    """Forward values, what was written into the inputs, and the aliasing of outputs and inputs, over
    three calls: each of these programs differed before the passes knew about memory."""
    source = random_program(seed)
    assert run_eager_and_staged(source) is None, source


@pytest.mark.parametrize("seed", range(40))
def test_random_programs_gradients_match_autograd(seed):
    source = random_program(1000 + seed)
    assert run_gradients(source) is None, source


