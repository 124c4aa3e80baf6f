"""Seeded random programs with in-place ops, views and factories, as Python source.

``random_program(seed)`` writes a function ``f(x, y)`` over two (3, 4) float64 tensors: pure ops,
views (``t()``, ``[0]``, ``reshape``), factories (``torch.zeros``), repeated expressions (which
common-subexpression elimination would merge), identities (``a * 1.0``, ``a + 0``, which
simplification would remove) and in-place ops on values, views and the inputs themselves. It
returns a tuple of some of its values. Each value's shape is tracked so every op is valid.
``run_eager_and_staged`` compares a program's outputs, the aliasing between its outputs and inputs,
and what it wrote into its inputs, eagerly and under ``zt.compile``, over several calls.
"""
from __future__ import annotations

import random

import torch

SHAPES = [(3, 4), (4, 3), (4,), (3,), (12,)]

_PURE = ["{a} * 2", "{a} + {b}", "{a} * {b}", "{a} - 1.5", "torch.sin({a})", "{a}.exp()", "{a} * 1.0",
         "{a} + 0", "{a}.clone()", "-(-{a})", "{a}.abs()", "{a} / 1"]
_INPLACE = ["{a}.add_({b})", "{a}.mul_(2)", "{a}.sub_(0.5)", "{a}.copy_({b})", "{a}.zero_()",
            "{a}.clamp_(min=0.1)", "torch.nn.functional.relu({a}, inplace=True)", "{a}[0] = 7.0",
            "{a}.fill_(3.0)", "{a} += {b}", "{a} *= 3"]


class _Program:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.lines: list[str] = []
        self.shapes: dict[str, tuple] = {"x": (3, 4), "y": (3, 4)}
        self.expressions: list[tuple[str, tuple]] = []  # earlier pure expressions, to repeat

    def pick(self, shape=None):
        names = [n for n, s in self.shapes.items() if shape is None or s == shape]
        return self.rng.choice(names) if names else None

    def new(self, expr: str, shape: tuple) -> str:
        name = f"v{len(self.lines)}"
        self.lines.append(f"{name} = {expr}")
        self.shapes[name] = shape
        return name

    def pure(self):
        a = self.pick()
        shape = self.shapes[a]
        b = self.pick(shape) or a
        template = self.rng.choice(_PURE)
        expr = template.format(a=a, b=b)
        self.expressions.append((expr, shape))
        self.new(expr, shape)

    def repeat(self):
        if self.expressions:
            self.new(*self.rng.choice(self.expressions))

    def view(self):
        a = self.pick()
        shape = self.shapes[a]
        options = []
        if len(shape) == 2:
            options += [(f"{a}.t()", shape[::-1]), (f"{a}[0]", shape[1:]), (f"{a}[:, 1]", shape[:1]),
                        (f"{a}.reshape({shape[0] * shape[1]})", (shape[0] * shape[1],)),
                        (f"{a}.view({shape[0]}, {shape[1]})", shape), (f"{a}.transpose(0, 1)", shape[::-1])]
        if shape == (12,):
            options += [(f"{a}.view(3, 4)", (3, 4)), (f"{a}[2:6]", (4,))]
        if len(shape) == 1:
            options += [(f"{a}.unsqueeze(0)[0]", shape), (f"{a}[1:]", (shape[0] - 1,))]
        expr, new_shape = self.rng.choice(options)
        if new_shape in SHAPES:
            self.new(expr, new_shape)

    def factory(self):
        shape = self.rng.choice(SHAPES)
        kind = self.rng.choice(["torch.zeros({s}, dtype=torch.float64)", "torch.ones({s}, dtype=torch.float64)",
                                "torch.full({s}, 2.0, dtype=torch.float64)"])
        self.new(kind.format(s=shape), shape)

    def inplace(self):
        a = self.pick()
        if a in ("x", "y") and self.rng.random() < 0.6:
            return  # inputs are written now and then, not most of the time
        shape = self.shapes[a]
        b = self.pick(shape) or a
        template = self.rng.choice(_INPLACE)
        if "[0] =" in template and len(shape) < 1:
            return
        self.lines.append(template.format(a=a, b=b))

    def source(self, n_outputs: int) -> str:
        names = [n for n in self.shapes if n not in ("x", "y")]
        outs = self.rng.sample(names, min(n_outputs, len(names))) if names else ["x"]
        body = "\n".join(f"    {line}" for line in self.lines)
        return f"def f(x, y):\n{body}\n    return ({', '.join(outs)},)\n"


def random_program(seed: int, n_statements: int = 10) -> str:
    rng = random.Random(seed)
    program = _Program(rng)
    steps = [program.pure] * 3 + [program.view] * 3 + [program.inplace] * 3 + [program.factory, program.repeat] * 1
    for _ in range(n_statements):
        rng.choice(steps)()
    return program.source(rng.randint(1, 3))


def load(source: str):
    namespace = {"torch": torch}
    exec(compile(source, "<random program>", "exec"), namespace)
    return namespace["f"]


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, dtype=torch.float64, generator=g), torch.randn(3, 4, dtype=torch.float64, generator=g)


def _alias_pattern(tensors) -> list:
    ptrs = [t.untyped_storage().data_ptr() for t in tensors]
    return [[i for i, q in enumerate(ptrs) if q == p] for p in ptrs]


def run_eager_and_staged(source: str, calls: int = 3):
    """None when eager and ``zt.compile`` agree on every call, else a description of the difference."""
    import zygote_torch as zt
    f = load(source)
    staged = zt.compile(f)
    for call in range(calls):
        x, y = _inputs(call)
        xs, ys = x.clone(), y.clone()
        try:
            expected = f(x, y)
        except RuntimeError:
            return None  # eager refuses it (an in-place op on an expanded view...): nothing to compare
        got = staged(xs, ys)
        for i, (e, g) in enumerate(zip(expected, got)):
            if not torch.equal(e, g):
                return f"call {call}: output {i} differs:\n{e}\n{g}"
        if not (torch.equal(x, xs) and torch.equal(y, ys)):
            return f"call {call}: the inputs were written differently"
        if _alias_pattern([x, y, *expected]) != _alias_pattern([xs, ys, *got]):
            return f"call {call}: outputs alias the inputs or each other differently"
    return None


def _loss_of(f):
    def loss(x, y):
        outs = f(x.clone(), y.clone())
        return sum((o * (k + 1)).sin().sum() for k, o in enumerate(outs))
    return loss


def run_gradients(source: str):
    """None when the gradient of a loss over the program's outputs agrees between torch.autograd,
    and ``zt.withgradient`` under ``zt.compile``; else a description of the difference."""
    import zygote_torch as zt
    loss = _loss_of(load(source))
    staged = zt.compile(lambda x, y: zt.withgradient(loss, x, y))
    x, y = _inputs(0)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    try:
        value = loss(xr, yr)
        expected = torch.autograd.grad(value, (xr, yr), allow_unused=True)
    except RuntimeError:
        return None  # autograd refuses it (a leaf's view written in place...): nothing to compare
    got_value, got = staged(x, y)
    if not torch.allclose(torch.as_tensor(got_value), value.detach()):
        return f"loss differs: {value} {got_value}"
    for i, (e, g) in enumerate(zip(expected, got)):
        e = torch.zeros_like(x) if e is None else e
        g = torch.zeros_like(x) if g is None else g
        if not torch.allclose(e, g):
            return f"gradient {i} differs:\n{e}\n{g}"
    return None
