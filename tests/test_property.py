"""Random programs composed from the core ops, differentiated by zygote_torch (dynamic and staged)
and compared with torch.autograd in float64."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from helpers import check_gradient

UNARY = [
    torch.sin, torch.cos, torch.tanh, torch.sigmoid, torch.relu, F.gelu, F.silu,
    lambda x: torch.exp(torch.tanh(x)), lambda x: x.abs(), lambda x: -x, lambda x: x * x,
    lambda x: torch.sqrt(x * x + 1), lambda x: torch.log1p(x * x), lambda x: torch.log(x * x + 0.5),
    lambda x: x.softmax(-1), lambda x: F.log_softmax(x, dim=-1), lambda x: x.clamp(-0.5, 0.5),
    lambda x: x.t().t() if x.dim() == 2 else x, lambda x: x.reshape(-1).reshape(x.shape),
    lambda x: x.sum(-1, keepdim=True), lambda x: x.mean(0, keepdim=True), lambda x: x.expm1() * 0.1,
]
BINARY = [
    torch.add, torch.sub, torch.mul, lambda a, b: a / (b * b + 1), torch.maximum, torch.minimum,
    lambda a, b: torch.where(a > b, a, b * 2), lambda a, b: a - 2.5 * b, lambda a, b: (a + b) ** 2,
]
FINAL = [
    lambda x: x.sum(), lambda x: x.mean(), lambda x: torch.logsumexp(x.reshape(-1), 0),
    lambda x: (x ** 2).mean(), lambda x: x.norm(), lambda x: x.var() if x.numel() > 1 else x.sum(),
    lambda x: x.amax(), lambda x: x.prod() if x.numel() < 6 else x.std(),
]
SHAPES = [(3, 4), (4,), (1, 4), (3, 1), ()]


def run_program(steps, final, inputs):
    pool = list(inputs)
    for kind, i, j in steps:
        a, b = pool[i % len(pool)], pool[j % len(pool)]
        if kind < len(UNARY):
            pool.append(UNARY[kind](a))
        else:
            pool.append(BINARY[(kind - len(UNARY)) % len(BINARY)](a, b))
    return FINAL[final](pool[-1])


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3),
    steps=st.lists(st.tuples(st.integers(0, len(UNARY) + len(BINARY) - 1), st.integers(0, 50), st.integers(0, 50)),
                   min_size=1, max_size=7),
    final=st.integers(0, len(FINAL) - 1),
    seed=st.integers(0, 2**16),
)
def test_random_programs_match_autograd(shapes, steps, final, seed):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
    check_gradient(lambda *xs: run_program(steps, final, xs), *inputs, atol=1e-6, rtol=1e-5)
