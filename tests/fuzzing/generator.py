"""Seeded generator of random differentiable PyTorch programs, written as Python source.

A program is ``def f(x0, x1, ...)`` returning a scalar. Its body mixes views (slicing, select,
transpose, diagonal, unbind, split, view/reshape, expand, narrow), in-place ops on intermediates and
through (chains of) views, views taken before their base is mutated and read afterwards, ``t.mul_(t)``,
basic / advanced / boolean indexing, broadcasting, float32 and float64, integer index tensors, Python
control flow on tensor values, ``Tensor.register_hook`` and custom ``torch.autograd.Function``s.

The generator runs each statement as it writes it, on the real inputs (leaves that require grad, as
torch.autograd's reference will see them): a statement torch refuses in the forward (a shape error, an
in-place op on a leaf or an expanded tensor, a hook on a tensor that does not require grad) or that makes
a value non-finite is dropped and another drawn. Shapes, dtypes and aliasing are read from the live
tensors, so every kept program runs in torch's forward; its backward may still be refused by torch
("modified by an inplace operation"), which the oracle handles.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import random
import re
import warnings

import torch
import torch.nn.functional as F

# Custom autograd.Functions a program may call: name -> source. Old style (ctx in forward) and new style
# (setup_context); straight-through and scaled-identity backwards that are not the forward's derivative.
HELPERS = {
    "RoundSTE": '''
class RoundSTE(torch.autograd.Function):
    """Straight-through estimator: rounds to quarters, passes the gradient unchanged."""
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g
''',
    "SignSTE": '''
class SignSTE(torch.autograd.Function):
    """Binarizing straight-through estimator: sign forward, gradient masked to |x| <= 1."""
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)
''',
    "ScaleGrad": '''
class ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient scaled by a Python number (new style, non-tensor argument)."""
    @staticmethod
    def forward(x, scale):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None
''',
    "Cube": '''
class Cube(torch.autograd.Function):
    """x ** 3 with its true derivative, through save_for_backward (old style)."""
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g
''',
    "MulPair": '''
class MulPair(torch.autograd.Function):
    """a * b of equal shapes, gradients only where needs_input_grad asks (old style)."""
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return (g * b if ctx.needs_input_grad[0] else None,
                g * a if ctx.needs_input_grad[1] else None)
''',
    "SinCos": '''
class SinCos(torch.autograd.Function):
    """Two outputs (sin x, cos x), new style."""
    @staticmethod
    def forward(x):
        return x.sin(), x.cos()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, gs, gc):
        (x,) = ctx.saved_tensors
        return gs * x.cos() - gc * x.sin()
''',
    "SinCosLazy": '''
class SinCosLazy(torch.autograd.Function):
    """(sin x, cos x) with set_materialize_grads(False): an unused output's gradient is None."""
    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return x.sin(), x.cos()

    @staticmethod
    def backward(ctx, gs, gc):
        (x,) = ctx.saved_tensors
        out = torch.zeros_like(x)
        if gs is not None:
            out = out + gs * x.cos()
        if gc is not None:
            out = out - gc * x.sin()
        return out
''',
    "ClipWithMask": '''
class ClipWithMask(torch.autograd.Function):
    """clamp(x, -1, 1) and the mask where it passes, marked non-differentiable."""
    @staticmethod
    def forward(ctx, x):
        mask = x.abs() <= 1
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)
        return x.clamp(-1, 1), mask

    @staticmethod
    def backward(ctx, g, g_mask):
        (mask,) = ctx.saved_tensors
        return g * mask
''',
}

INPUT_SHAPES = [((3, 4), 4), ((4, 4), 3), ((2, 3, 4), 2), ((5,), 1)]  # (shape, weight)
CONSTANTS = ["0.5", "-0.3", "1.5", "2.0", "0.25", "-1.0", "0.75"]

UNARY = [
    "torch.sin({})", "{}.tanh()", "torch.sigmoid({})", "{}.relu()", "{}.abs()", "{} * {}", "{}.clamp(-0.5, 0.8)",
    "{}.pow(2)", "-{}", "F.softplus({})", "{}.tanh().exp()", "({}.abs() + 0.1).sqrt()", "({}.abs() + 0.5).log()",
    "{} * 1.5", "{} + 0.5", "torch.flip({}, [0])", "{}.roll(1, 0)", "{}.cumsum(0)", "F.gelu({})", "{}.clone()",
    "{}.softmax(-1)", "torch.where({} > 0, {}, {} * 0.1)", "{}.sign() * {}", "{}.round() + {}",
]
BINARY = [
    "{a} + {b}", "{a} - {b}", "{a} * {b}", "{a} / ({b} * {b} + 1)", "torch.maximum({a}, {b})",
    "torch.where({a} > {b}, {a}, {b} * 2)", "{a} - 2.5 * {b}", "torch.lerp({a}, {b}, 0.3)", "{a}.mul({b}).add({a})",
]
INPLACE_UNARY = [
    "{t}.add_({c})", "{t}.mul_({c})", "{t}.div_(2.0)", "{t}.zero_()", "{t}.fill_({c})", "{t}.clamp_(-0.5, 0.6)",
    "{t}.clamp_(min=-0.2)", "{t}.relu_()", "{t}.sigmoid_()", "{t}.tanh_()", "{t}.sin_()", "{t}.neg_()",
    "{t}.abs_()", "{t}.pow_(2)", "{t}.exp_()", "{t}.masked_fill_({t} > 0.3, {c})", "{t}.sqrt_()",
    "torch.relu_({t})", "F.relu({t}, inplace=True)", "F.leaky_relu({t}, 0.1, inplace=True)", "F.hardtanh_({t})",
    "torch.clamp_({t}, min={c})", "F.silu({t}, inplace=True)", "F.elu({t}, inplace=True)",
]
INPLACE_BINARY = [
    "{t}.add_({o})", "{t}.sub_({o}, alpha=0.5)", "{t}.mul_({o})", "{t}.copy_({o})", "{t}.lerp_({o}, 0.3)",
    "{t}.addcmul_({o}, {o2}, value=0.5)", "{t}.div_({o} * {o} + 1)", "{t}.clamp_(max={o})", "{t}.fill_({s})",
]
AUGMENTED = ["{t} += {o}", "{t} *= {o}", "{t} -= {o}", "{t} /= 2.0", "{t} *= {c}"]
SELF_ALIASING = [
    "{t}.mul_({t})", "{t}.add_({t})", "{t}.sub_({t} * 0.5)", "{t}.copy_({t} * 2)", "{t}.addcmul_({t}, {t})",
    "{t} *= {t}", "{t}.copy_(torch.flip({t}, [0]))",
]
REDUCTIONS = [
    "{v}.sum({d})", "{v}.sum({d}, keepdim=True)", "{v}.mean({d})", "{v}.amax({d})", "{v}.logsumexp({d})",
    "{v}.norm(dim={d})", "{v}.var({d})", "{v}.prod({d})", "{v}.cumsum({d})", "{v}.softmax({d})",
    "F.log_softmax({v}, {d})", "{v}.max({d}).values", "{v}.min({d})[0]", "{v}.sum()", "{v}.mean()", "{v}.std()",
    "{v}.sort({d}).values", "{v}.topk(1, {d}).values",
]
HOOKS = [
    "lambda g: g * {c}", "lambda g: g.clamp(-0.5, 0.5)", "lambda g: g + 1.0", "lambda g: None",
    "lambda g: torch.flip(g, [0])", "lambda g: g * g.abs()",
]


@dataclasses.dataclass
class Stmt:
    """One statement of the body (possibly a compound one over several lines), with feature tags."""
    source: str
    tags: frozenset

    def lines(self) -> list[str]:
        return self.source.split("\n")


@dataclasses.dataclass
class Program:
    """A generated program: inputs (name, shape, dtype), helpers used, body and the returned terms."""
    seed: int
    inputs: list
    helpers: list
    body: list
    terms: list

    @property
    def tags(self) -> frozenset:
        return frozenset(t for s in self.body for t in s.tags)

    @property
    def data_dependent(self) -> bool:
        """Whether its Python depends on tensor data (staged capture must refuse it)."""
        return "data_dependent" in self.tags

    @property
    def uses_float32(self) -> bool:
        return "float32" in self.tags or any(dt == torch.float32 for _, _, dt in self.inputs)

    def function_source(self, name: str = "f", indent: str = "") -> str:
        args = ", ".join(n for n, _, _ in self.inputs)
        body = [indent + "    " + line for s in self.body for line in s.lines()]
        ret = " + ".join(self.terms) if self.terms else "0.0 * x0.sum()"
        return "\n".join([f"{indent}def {name}({args}):", *body, f"{indent}    return {ret}"])

    def helper_source(self, indent: str = "") -> str:
        return "".join("\n".join(indent + line if line else line for line in HELPERS[h].strip("\n").split("\n"))
                       + "\n\n" for h in self.helpers)

    def source(self) -> str:
        """A module defining ``f`` (and its helpers): ready to exec or paste."""
        return ("import torch\nimport torch.nn.functional as F\n\n\n" + self.helper_source()
                + self.function_source() + "\n")

    def make_inputs(self, variant: int = 0) -> list:
        """The inputs, drawn from the program's seed (``variant`` 1 gives a second draw)."""
        g = torch.Generator().manual_seed(self.seed * 2 + variant)
        return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _, shape, dtype in self.inputs]

    def inputs_source(self, variant: int = 0) -> list[str]:
        """Python lines building the same inputs as ``make_inputs``."""
        lines = [f"g = torch.Generator().manual_seed({self.seed * 2 + variant})"]
        for name, shape, dtype in self.inputs:
            cast = "" if dtype == torch.float64 else f".to({dtype})"
            lines.append(f"{name} = torch.randn({tuple(shape)}, generator=g, dtype=torch.float64){cast}")
        return lines

    def without(self, body_index: int | None = None, term_index: int | None = None) -> "Program":
        """The program less one statement or one returned term (helpers and inputs it no longer uses
        dropped; at least one input kept)."""
        body = [s for i, s in enumerate(self.body) if i != body_index]
        terms = [t for i, t in enumerate(self.terms) if i != term_index]
        text = "\n".join([*(s.source for s in body), *terms])
        helpers = [h for h in self.helpers if h in text]
        inputs = [inp for inp in self.inputs if _mentions(text, inp[0])] or self.inputs[:1]
        return Program(self.seed, inputs, helpers, body, terms)

    def with_statement(self, index: int, source: str) -> "Program":
        """The program with statement ``index`` replaced by ``source``."""
        body = list(self.body)
        body[index] = Stmt(source, frozenset())
        return dataclasses.replace(self, body=body).without()


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{name}\b", text) is not None


class _Rejected(Exception):
    pass


class Generator:
    """Builds one program from ``random.Random(seed)``; see the module docstring."""

    # The share of statements kept only if torch.autograd still differentiates the program: the rest
    # may make torch raise "modified by an inplace operation" (where zt must be right or raise too).
    BACKWARD_PROBE = 0.8  # about 91% of programs: torch differentiates them; 9%: torch raises

    def __init__(self, seed: int, exclude=(), max_statements: int | None = None):
        self.seed = seed
        self.exclude = frozenset(exclude)
        self.rng = random.Random(seed)
        self.max_statements = max_statements or self.rng.randint(5, 18)
        self.dynamic = self.rng.random() < 0.2  # may use data-dependent Python (branches on tensor values)
        self.body: list[Stmt] = []
        self.helpers: list[str] = []
        self.counter = 0
        shape = self.rng.choices([s for s, _ in INPUT_SHAPES], [w for _, w in INPUT_SHAPES])[0]
        self.inputs = [("x0", shape, torch.float64)]
        for i in range(1, self.rng.choice([1, 2, 2, 3])):
            s = self._broadcast_variant(shape) if self.rng.random() < 0.3 else shape
            dtype = torch.float32 if self.rng.random() < 0.12 else torch.float64
            self.inputs.append((f"x{i}", s, dtype))
        self._reset_namespace()

    # ----- the live namespace the program runs in while it is written

    def _reset_namespace(self):
        program = Program(self.seed, self.inputs, [], [], [])
        leaves = [x.requires_grad_() for x in program.make_inputs()]
        self.ns = {"torch": torch, "F": F, **_helper_classes()}
        self.ns.update({name: x for (name, _, _), x in zip(self.inputs, leaves)})
        self.input_storages = {x.untyped_storage().data_ptr() for x in leaves}
        self.names = [name for name, _, _ in self.inputs]

    def _replay(self):
        """Run the kept statements again on fresh inputs. One that now fails is dropped with all after it:
        torch's forward can differ between two runs of the same code (a view of a base that gained a
        grad_fn is a leaf to an in-place op until something reads the view's grad_fn)."""
        self._reset_namespace()
        for i, stmt in enumerate(self.body):
            try:
                self._exec(stmt.source)
            except Exception:  # noqa: BLE001
                del self.body[i:]
                return self._replay()
            for name in _assigned_names(stmt.source):
                if name not in self.names:
                    self.names.append(name)

    def _exec(self, source: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(_compiled(source), self.ns)

    def _fresh(self, prefix: str = "t") -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _try(self, stmts: list[Stmt]) -> bool:
        """Run ``stmts``; keep them if torch accepts them and every value stays finite."""
        try:
            for s in stmts:
                self._exec(s.source)
                for name in _assigned_names(s.source):
                    if name not in self.names:
                        self.names.append(name)
                self._check_finite()
            if self.rng.random() < self.BACKWARD_PROBE:
                self._check_backward()
        except Exception:  # noqa: BLE001  (any refusal by torch: drop the statement)
            self._replay()
            return False
        self.body.extend(stmts)
        for s in stmts:
            self.helpers.extend(h for h in HELPERS if h in s.source and h not in self.helpers)
        return True

    def _check_backward(self):
        """torch.autograd differentiates every live value (raises "modified by an inplace operation"
        otherwise)."""
        live = [self.ns[n] for n in self.float_vars(lambda t: t.requires_grad)]
        leaves = [self.ns[n] for n, _, _ in self.inputs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.autograd.grad(sum(t.sum().double() for t in live), leaves, retain_graph=True, allow_unused=True)

    def _check_finite(self):
        for name in self.names:
            v = self.ns.get(name)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                d = v.detach()
                if d.numel() and not d.abs().max() <= 1e4:  # also false for NaN
                    raise _Rejected(name)

    # ----- queries on the live values

    def tensor(self, name: str) -> torch.Tensor:
        return self.ns[name]

    def float_vars(self, pred=lambda t: True) -> list[str]:
        return [n for n in self.names if isinstance(self.ns.get(n), torch.Tensor)
                and self.ns[n].is_floating_point() and pred(self.ns[n])]

    def writable(self, t: torch.Tensor) -> bool:
        """Not an input nor an alias of one, and no two elements at one address (expand, unfold: torch's
        result of writing there is unspecified)."""
        if t.untyped_storage().data_ptr() in self.input_storages:
            return False
        offsets = {sum(i * s for i, s in zip(index, t.stride())) for index in itertools.product(*map(range, t.shape))}
        return len(offsets) == t.numel()

    def pick(self, names: list[str]) -> str | None:
        """A name, biased towards the most recent ones (so chains of ops form)."""
        if not names:
            return None
        if self.rng.random() < 0.6:
            return self.rng.choice(names[-3:])
        return self.rng.choice(names)

    def const(self) -> str:
        return self.rng.choice(CONSTANTS)

    def operand(self, shape: torch.Size, exact: bool = False, apart_from: str | None = None) -> str:
        """An expression whose value broadcasts to ``shape`` (has exactly ``shape`` if ``exact``), not
        sharing memory with ``apart_from`` if given: the operand of an in-place op on ``apart_from``, whose
        result torch leaves unspecified when the two partly overlap (the safe overlaps, ``t.mul_(t)`` and
        disjoint parts, are the families ``self_aliasing`` and ``overlapping_update``)."""
        storage = eval(apart_from, self.ns).untyped_storage().data_ptr() if apart_from else None
        fits = self.float_vars(lambda t: _broadcasts_to(t.shape, shape) and t.untyped_storage().data_ptr() != storage)
        r = self.rng.random()
        if fits and r < 0.8:
            name = self.pick(fits)
            expr = self.rng.choice(["{}", "{}", "{}.sin()", "{} * 0.5", "{}.tanh()", "{}.detach()"]).format(name)
            if exact and tuple(self.tensor(name).shape) != tuple(shape):
                expr = f"{expr}.expand({tuple(shape)})"
            return expr
        if exact:
            src = self.pick(self.float_vars()) or "x0"
            return f"({src}.mean() * torch.ones({tuple(shape)}, dtype=torch.float64))"
        if r < 0.9 and self.float_vars():
            return f"{self.pick(self.float_vars())}.mean()"
        return self.const()

    # ----- statement families

    def stmt(self, source: str, *tags: str) -> Stmt:
        return Stmt(source, frozenset(tags))

    def fresh_from_input(self):
        x = self.rng.choice([n for n, _, _ in self.inputs])
        op = self.rng.choice(["{} * 1.5", "{}.clone()", "{} + 0.25", "torch.sin({})", "{}.tanh() * 2", "{} * {}"])
        return [self.stmt(f"{self._fresh()} = {op.format(*[x] * op.count('{}'))}", "fresh")]

    def unary(self):
        v = self.pick(self.float_vars())
        op = self.rng.choice(UNARY)
        return [self.stmt(f"{self._fresh()} = {op.format(*[v] * op.count('{}'))}", "unary")]

    def binary(self):
        a = self.pick(self.float_vars())
        shape = self.tensor(a).shape
        partners = self.float_vars(lambda t: _broadcastable(t.shape, shape) and t.dim() <= 3)
        b = self.rng.choice(partners)
        tags = ["binary"]
        if tuple(self.tensor(b).shape) != tuple(shape):
            tags.append("broadcast")
        if self.tensor(a).dtype != self.tensor(b).dtype:
            tags.append("mixed_dtype")
        op = self.rng.choice(BINARY)
        return [self.stmt(f"{self._fresh()} = {op.format(a=a, b=b)}", *tags)]

    def matmul(self):
        mats = self.float_vars(lambda t: t.dim() == 2)
        if not mats:
            return None
        a = self.pick(mats)
        m, k = self.tensor(a).shape
        for b in self.rng.sample(mats, len(mats)):
            n1, n2 = self.tensor(b).shape
            if n1 == k:
                return [self.stmt(f"{self._fresh()} = {a} @ {b}", "matmul")]
            if n2 == k:
                return [self.stmt(f"{self._fresh()} = {a} @ {b}.t()", "matmul")]
        return [self.stmt(f"{self._fresh()} = torch.einsum('ij,kj->ik', {a}, {a})", "matmul")]

    def view_template(self, v: str) -> tuple[str, str] | None:
        """A view of ``v`` (a name or an expression) as a template over "@", and its tag."""
        t = self.tensor(v) if v in self.ns else eval(v, self.ns)
        if t.dim() == 0:
            return None
        shape, r = t.shape, self.rng
        d0 = shape[0]
        a = r.randrange(d0)
        b = r.randrange(a, d0) + 1
        choices = [
            (f"@[{a}]", "select"), (f"@[{a}:{b}]", "slice"), ("@[::2]", "slice"), (f"@[-{a + 1}]", "select"),
            (f"@.narrow(0, {a}, {b - a})", "narrow"), ("@.unsqueeze(0)", "unsqueeze"), ("@[None]", "unsqueeze"),
            ("@.view(-1)", "view"), ("@.reshape(-1)", "reshape"), ("@.flatten()", "reshape"),
            ("@.unsqueeze(0).expand(2, *@.shape)", "expand"), ("@.view_as(@)", "view"), ("@[:]", "slice"),
            ("@[...]", "slice"), ("@.contiguous()", "maybe_alias"), ("@.double()", "maybe_alias"),
            ("@.to(torch.float64)", "maybe_alias"), ("@.type_as(@)", "maybe_alias"), ("@.squeeze()", "view"),
            ("@.expand_as(@)", "view"), ("@.unfold(-1, 2, 1)", "expand"),
            ("@.detach()", "detach"), ("@.chunk(2)[0]", "chunk"), (f"@.split(1)[{a}]", "split"),
            (f"@.unbind(0)[{a}]", "unbind"),
        ]
        if t.dim() >= 2:
            j = r.randrange(shape[1])
            c = r.randrange(j, shape[1]) + 1
            choices += [
                (f"@[:, {j}]", "select"), (f"@[:, {j}:{c}]", "slice"), (f"@.select(1, {j})", "select"),
                (f"@.narrow(1, {j}, {c - j})", "narrow"), ("@.transpose(0, 1)", "transpose"),
                ("@.diagonal()", "diagonal"), ("@.diagonal(1)", "diagonal"), (f"@[..., {j}]", "select"),
                (f"@[{a}, {j}:{c}]", "slice"), ("@[:, ::2]", "slice"), (f"@[{a}:{b}, {j}:{c}]", "slice"),
                (f"@.unflatten(0, ({d0}, 1))", "view"), (f"@[:1].expand({tuple(shape)})", "expand"),
                ("@.movedim(0, -1)", "transpose"),
            ]
        if t.dim() == 2:
            choices += [("@.t()", "transpose"), ("@.T", "transpose"), (f"@.view({shape[0] * shape[1]})", "view")]
        if t.dim() == 3:
            choices += [("@.permute(2, 0, 1)", "transpose"), ("@.flatten(0, 1)", "reshape"),
                        ("@.diagonal(0, 1, 2)", "diagonal"), ("@.mT", "transpose")]
        return r.choice(choices)

    def view_expr(self, v: str) -> tuple[str, str] | None:
        """A view of ``v`` (a name or an expression) and its tag."""
        vt = self.view_template(v)
        return None if vt is None else (vt[0].replace("@", v), vt[1])

    def view(self):
        v = self.pick(self.float_vars())
        ve = self.view_expr(v)
        if ve is None:
            return None
        expr, tag = ve
        if self.rng.random() < 0.25:  # a view of a view
            inner = self.view_expr(expr)
            if inner is not None:
                expr, tag = inner[0], tag + "+" + inner[1]
        return [self.stmt(f"{self._fresh('v')} = {expr}", "view", *tag.split("+"))]

    def multi_view(self):
        v = self.pick(self.float_vars(lambda t: t.dim() >= 1 and 2 <= t.shape[0] <= 4))
        if v is None:
            return None
        t = self.tensor(v)
        n = t.shape[0]
        kind = self.rng.choice(["unbind", "split", "chunk"])
        if kind == "unbind":
            names = [self._fresh("v") for _ in range(n)]
            return [self.stmt(f"{', '.join(names)} = {v}.unbind(0)", "view", "unbind")]
        names = [self._fresh("v") for _ in range(2)]
        if kind == "split":
            k = self.rng.randrange(1, n)
            dim = 0
            if t.dim() >= 2 and self.rng.random() < 0.5 and t.shape[1] >= 2:
                dim, k = 1, self.rng.randrange(1, t.shape[1])
            return [self.stmt(f"{', '.join(names)} = {v}.split([{k}, {t.shape[dim] - k}], dim={dim})", "view", "split")]
        if n < 2:
            return None
        chunks = (n + 1) // 2
        if n - chunks == 0:
            return None
        return [self.stmt(f"{', '.join(names)} = {v}.chunk(2)", "view", "chunk")] if n in (2, 4) else None

    def _target(self) -> tuple[str, list[str]] | None:
        """Something to mutate: a writable variable, or a (chain of) view(s) of one, written inline."""
        names = self.float_vars(self.writable)
        if not names:
            return None
        v = self.pick(names)
        tags = []
        if self.tensor(v)._base is not None:
            tags.append("inplace_view")
        if self.rng.random() < 0.35:
            ve = self.view_expr(v)
            if ve is not None and ve[1] not in ("expand", "detach", "reshape"):
                v, tags = ve[0], ["inplace_view", ve[1]]
                if self.rng.random() < 0.3:
                    inner = self.view_expr(v)
                    if inner is not None and inner[1] not in ("expand", "detach", "reshape"):
                        v, tags = inner[0], ["inplace_view", "view_chain", ve[1], inner[1]]
        return v, tags

    def inplace(self):
        target = self._target()
        if target is None:
            return None
        t, tags = target
        shape = eval(t, self.ns).shape
        r = self.rng.random()
        if r < 0.4:
            src = self.rng.choice(INPLACE_UNARY).format(t=t, c=self.const())
        elif r < 0.85:
            scalars = self.float_vars(lambda x: x.dim() == 0) or [f"{self.pick(self.float_vars())}.sum()"]
            src = self.rng.choice(INPLACE_BINARY).format(t=t, o=self.operand(shape, apart_from=t),
                                                         o2=self.operand(shape, apart_from=t),
                                                         s=self.rng.choice(scalars))
        else:
            if not (t.isidentifier() or t.endswith("]")):
                return None
            src = self.rng.choice(AUGMENTED).format(t=t, o=self.operand(shape, apart_from=t), c=self.const())
        return [self.stmt(src, "inplace", *tags)]

    def self_aliasing(self):
        target = self._target()
        if target is None:
            return None
        t, tags = target
        forms = SELF_ALIASING if t.isidentifier() or t.endswith("]") else \
            [f for f in SELF_ALIASING if not f.startswith("{t} *=")]
        return [self.stmt(self.rng.choice(forms).format(t=t), "inplace", "self_alias", *tags)]

    def index_assign(self):
        names = self.float_vars(lambda x: self.writable(x) and x.dim() >= 1)
        if not names:
            return None
        t = self.pick(names)
        shape = self.tensor(t).shape
        d0, r = shape[0], self.rng
        i = r.randrange(d0)
        rows = sorted(r.sample(range(d0), min(d0, r.randint(1, 3))))
        dup = [r.randrange(d0) for _ in range(r.randint(2, 4))]
        choices = [
            (f"{t}[{i}] = {self.operand(shape[1:], apart_from=t)}", "setitem"),
            (f"{t}[{i}:] = {self.const()}", "setitem"),
            (f"{t}[{t} > {self.const()}] = {self.const()}", "setitem_mask"),
            (f"{t}[torch.tensor({rows})] = {self.operand(torch.Size([len(rows), *shape[1:]]), apart_from=t)}",
             "setitem_index"),
            (f"{t}[torch.tensor({rows})] += {self.const()}", "setitem_index"),
            (f"{t}.index_add_(0, torch.tensor({dup}), "
             f"{self.operand(torch.Size([len(dup), *shape[1:]]), exact=True, apart_from=t)})", "index_add"),
            (f"{t}.index_fill_(0, torch.tensor({rows}), {self.const()})", "index_fill"),
            (f"{t}[..., 0] = {self.operand(shape[:-1], apart_from=t)}", "setitem"),
        ]
        if len(shape) >= 2:
            j = r.randrange(shape[1])
            choices += [
                (f"{t}[:, {j}] = {self.operand(torch.Size([shape[0], *shape[2:]]), apart_from=t)}", "setitem"),
                (f"{t}[{i}, {j}] = {self.operand(torch.Size(shape[2:]), apart_from=t)}", "setitem"),
                (f"{t}[{i}][{j}] = {self.const()}", "setitem"),
            ]
        src, tag = r.choice(choices)
        return [self.stmt(src, "inplace", "index_assign", tag)]

    def view_then_mutate_base(self):
        """A view taken, then its base mutated, then the view read."""
        base = self.pick(self.float_vars(lambda x: self.writable(x) and x.dim() >= 1))
        if base is None:
            return None
        ve = self.view_expr(base)
        if ve is None or ve[1] in ("detach",):
            return None
        v = self._fresh("v")
        shape = self.tensor(base).shape
        mut = self.rng.choice(INPLACE_UNARY[:9] + ["{t}.add_({o})", "{t}.mul_({o})", "{t}.copy_({o})", "{t}[0] = {c}"])
        mutate = mut.format(t=base, c=self.const(), o=self.operand(shape, apart_from=base))
        reader = self.rng.choice(["{} * 2.0", "{}.sin()", "{} + {}", "{}.exp()"])
        u = self._fresh()
        return [self.stmt(f"{v} = {ve[0]}", "view", ve[1]),
                self.stmt(mutate, "inplace", "mutate_base_of_view"),
                self.stmt(f"{u} = {reader.format(*[v] * reader.count('{}'))}", "read_view_after_mutation")]

    def mutate_view_chain(self):
        """A chain of named views of an intermediate, mutated at its end; the base read later."""
        base = self.pick(self.float_vars(lambda x: self.writable(x) and x.dim() >= 1))
        if base is None:
            return None
        stmts, name, inline = [], base, base
        for _ in range(self.rng.randint(1, 3)):
            vt = self.view_template(inline)
            if vt is None or vt[1] in ("detach", "expand", "reshape"):
                break
            new = self._fresh("v")
            stmts.append(self.stmt(f"{new} = {vt[0].replace('@', name)}", "view", vt[1]))
            name, inline = new, f"({vt[0].replace('@', inline)})"
        if not stmts:
            return None
        shape = eval(inline, self.ns).shape
        src = self.rng.choice(INPLACE_UNARY[:12] + ["{t}.add_({o})", "{t}.mul_({o})", "{t}.copy_({o})"]).format(
            t=name, c=self.const(), o=self.operand(shape, apart_from=base))
        stmts.append(self.stmt(src, "inplace", "inplace_view", *(["view_chain"] if len(stmts) > 1 else [])))
        return stmts

    def index_read(self):
        v = self.pick(self.float_vars(lambda x: x.dim() >= 1))
        if v is None:
            return None
        t, r = self.tensor(v), self.rng
        shape = t.shape
        d0 = shape[0]
        idx = [r.randrange(d0) for _ in range(r.randint(1, 4))]
        choices = [
            (f"{v}[torch.tensor({idx})]", "adv_index"), (f"{v}[{idx}]", "adv_index"),
            (f"{v}.index_select(0, torch.tensor({idx}))", "adv_index"),
            (f"torch.where({v} > {self.const()}, {v}, {self.operand(shape)})", "where"),
            (f"{v}.flatten()[{v}.argmax()]", "int_from_data"),
            (f"{v}.masked_fill({v} < 0, 0.0)", "mask"),
            (f"{v} * ({v} > 0)", "mask"),
        ]
        if t.dim() >= 2:
            j = [r.randrange(shape[1]) for _ in range(len(idx))]
            gidx = [[r.randrange(shape[-1]) for _ in range(2)] for _ in range(d0)] if t.dim() == 2 else None
            choices += [
                (f"{v}[:, torch.tensor({j})]", "adv_index"),
                (f"{v}[torch.tensor({idx}), torch.tensor({j})]", "adv_index"),
                (f"{v}.gather(-1, {v}.argmax(-1, keepdim=True))", "int_from_data"),
                (f"{v}.take_along_dim({v}.argsort(-1), -1)", "int_from_data"),
            ]
            if gidx is not None:
                choices.append((f"{v}.gather(1, torch.tensor({gidx}))", "adv_index"))
        if self.dynamic:
            choices += [(f"{v}[{v} > {self.const()}].sum()", "bool_mask"),
                        (f"{v}.masked_select({v} < 0.5).sum()", "bool_mask")]
        src, tag = r.choice(choices)
        tags = ["index", tag] + (["data_dependent"] if tag == "bool_mask" else [])
        return [self.stmt(f"{self._fresh()} = {src}", *tags)]

    def reduce(self):
        v = self.pick(self.float_vars(lambda x: x.dim() >= 1))
        if v is None:
            return None
        d = self.rng.randrange(-1, self.tensor(v).dim() - 1) if self.tensor(v).dim() > 1 else 0
        return [self.stmt(f"{self._fresh()} = {self.rng.choice(REDUCTIONS).format(v=v, d=d)}", "reduction")]

    def control_flow(self):
        """Python control flow on tensor values (dynamic-path programs only)."""
        if not self.dynamic:
            return None
        v = self.pick(self.float_vars())
        shape = self.tensor(v).shape
        u = self._fresh()
        w = self.operand(shape, exact=True)
        c = self.const()
        forms = [
            f"if {v}.sum() > {c}:\n    {u} = {v} * 2.0\nelse:\n    {u} = ({w}).sin()",
            f"{u} = {v} * 1.0\nfor _ in range(3):\n    if {u}.abs().max() > 1.0:\n        {u} = {u} * 0.5",
            f"{u} = {v} * 1.0\nn = 0\nwhile {u}.abs().sum() > {c} and n < 4:\n    {u}.mul_(0.5)\n    n += 1",
            f"if {v}.max().item() > {c}:\n    {u} = {v}.tanh()\nelse:\n    {u} = {v} - 1.0",
            f"{u} = {v} if bool(({v} > 0).any()) else -{v}",
            f"{u} = {v} * float({v}.detach().mean() > 0)",
        ]
        targets = self.float_vars(self.writable)
        if targets:
            t = self.pick(targets)
            forms.append(f"if {v}.mean() < {c}:\n    {t}.mul_(2.0)\n{u} = {t} + 0.0")
        return [self.stmt(self.rng.choice(forms), "control_flow", "data_dependent")]

    def static_loop(self):
        v = self.pick(self.float_vars())
        shape = self.tensor(v).shape
        u = self._fresh()
        o = self.operand(shape)
        forms = [
            f"{u} = {v} * 1.0\nfor k in range(3):\n    {u} = {u}.tanh() * 0.9 + {o}",
            f"{u} = {v} * 1.0\nfor k in range(2):\n    {u}.mul_(0.5).add_({o})",
            f"{u} = {v} * 2.0 if {v}.dim() > 1 else {v} - 1.0",
        ]
        return [self.stmt(self.rng.choice(forms), "loop")]

    def hook(self):
        # not on views: torch 2.13 segfaults registering a hook on a view whose base was mutated
        v = self.pick(self.float_vars(lambda x: x.requires_grad and not x.is_leaf and x._base is None))
        if v is None:
            return None
        h = self.rng.choice(HOOKS).format(c=self.const())
        return [self.stmt(f"{v}.register_hook({h})", "hook")]

    def custom_function(self):
        v = self.pick(self.float_vars())
        t = self.tensor(v)
        u = self._fresh()
        fn = self.rng.choice(["RoundSTE", "SignSTE", "ScaleGrad", "Cube", "MulPair", "SinCos", "SinCosLazy",
                              "ClipWithMask"])
        if fn == "ScaleGrad":
            src = f"{u} = ScaleGrad.apply({v}, {self.const()})"
        elif fn == "MulPair":
            src = f"{u} = MulPair.apply({v}, {self.operand(t.shape, exact=True)})"
        elif fn in ("SinCos", "SinCosLazy"):
            src = f"{u}, {self._fresh()} = {fn}.apply({v})"
        elif fn == "ClipWithMask":
            src = f"{u}, {self._fresh('m')} = ClipWithMask.apply({v})"
        else:
            src = f"{u} = {fn}.apply({v})"
        return [self.stmt(src, "custom_function", fn)]

    def dtype(self):
        v = self.pick(self.float_vars())
        forms = ["{}.float()", "{}.to(torch.float32).sin().double()", "{}.double() * 2", "({}.float() * 2).double()",
                 "{} + {}.detach()", "{}.float() * 1.5"]
        f = self.rng.choice(forms)
        src = f.format(*[v] * f.count("{}"))
        return [self.stmt(f"{self._fresh()} = {src}", "dtype", *(["float32"] if "float" in src else []))]

    def buffer(self):
        v = self.pick(self.float_vars(lambda x: x.dim() >= 1))
        if v is None:
            return None
        t = self.tensor(v)
        b = self._fresh("b")
        make = self.rng.choice([f"torch.zeros({tuple(t.shape)}, dtype=torch.float64)", f"torch.zeros_like({v})",
                                f"{v}.new_zeros({tuple(t.shape)})", f"torch.ones_like({v})"])
        fill = self.rng.choice([f"{b}.copy_({v})", f"{b}[0] = {v}[-1]", f"{b}[:, 0] = {v}[:, 1]" if t.dim() > 1
                                else f"{b}[1:] = {v}[:-1]", f"{b}.add_({v} * 2)"])
        if "empty_like" in make and not fill.startswith(f"{b}.copy_"):
            fill = f"{b}.copy_({v})"
        stmts = [self.stmt(f"{b} = {make}", "buffer")]
        if self.rng.random() < 0.4:  # a view of the (untracked) buffer taken before it is filled, read after
            view = self.rng.choice(["@[0]", "@.t()" if t.dim() == 2 else "@[None]", "@.expand_as(@)", "@.view(-1)",
                                    "@[..., :1]", "@.detach()"]).replace("@", b)
            w = self._fresh("v")
            stmts += [self.stmt(f"{w} = {view}", "view", "view_of_untracked"),
                      self.stmt(fill, "inplace", "buffer_fill"),
                      self.stmt(f"{self._fresh()} = {w} * 2.0", "read_view_after_mutation")]
            return stmts
        return stmts + [self.stmt(fill, "inplace", "buffer_fill")]

    def concat(self):
        v = self.pick(self.float_vars(lambda x: x.dim() >= 1))
        if v is None:
            return None
        shape = self.tensor(v).shape
        w = self.operand(shape, exact=True)
        src = self.rng.choice([f"torch.cat([{v}, {w}], 0)", f"torch.stack([{v}, {w}])", f"torch.cat([{v}, {v}], -1)"])
        return [self.stmt(f"{self._fresh()} = {src}", "concat")]

    def no_grad_mutation(self):
        target = self._target()
        if target is None:
            return None
        t, tags = target
        src = self.rng.choice(INPLACE_UNARY[:9]).format(t=t, c=self.const())
        return [self.stmt(f"with torch.no_grad():\n    {src}", "inplace", "no_grad", *tags)]

    def repeat_expression(self):
        """An earlier pure assignment written again under a new name (common-subexpression elimination
        must not merge the two when one is mutated later), then possibly one of the two mutated."""
        pure = [s for s in self.body if "\n" not in s.source and re.fullmatch(r"[tvb]\d+ = [^=]+", s.source)
                and "_(" not in s.source and not ({"view", "custom_function", "index"} & s.tags)]
        if not pure:
            return None
        first = self.rng.choice(pure)
        name, expr = first.source.split(" = ", 1)
        twin = self._fresh()
        stmts = [self.stmt(f"{twin} = {expr}", "repeat_expression")]
        if self.rng.random() < 0.7:
            target = self.rng.choice([name, twin])
            stmts.append(self.stmt(self.rng.choice(INPLACE_UNARY[:12]).format(t=target, c=self.const()),
                                   "inplace", "mutate_repeated"))
        return stmts

    def factory_pair(self):
        """Two equal constants (constant folding / CSE must keep them apart), one filled from a value."""
        v = self.pick(self.float_vars(lambda x: x.dim() >= 1))
        if v is None:
            return None
        shape = tuple(self.tensor(v).shape)
        make = self.rng.choice([f"torch.zeros({shape}, dtype=torch.float64)",
                                f"torch.ones({shape}, dtype=torch.float64)",
                                f"torch.full({shape}, 0.5, dtype=torch.float64)"])
        a, b = self._fresh("b"), self._fresh("b")
        fill = self.rng.choice([f"{a}[0] = {v}[0]", f"{a}.add_({v})", f"{a}.copy_({v})", f"{a}.mul_({v})"])
        return [self.stmt(f"{a} = {make}", "buffer", "factory_pair"), self.stmt(f"{b} = {make}", "buffer"),
                self.stmt(fill, "inplace", "buffer_fill"), self.stmt(f"{self._fresh()} = {a} + {b}", "binary")]

    def identity_alias(self):
        """A value through an identity (``* 1.0``, ``+ 0``, ``.clone()``, or an op that returns its input
        when nothing is to be done: ``.contiguous()``, ``.double()``, ``.to(dtype)``), then one of the
        two mutated and the other read."""
        v = self.pick(self.float_vars(self.writable))
        if v is None:
            return None
        u = self._fresh()
        ident = self.rng.choice(["{} * 1.0", "{} + 0", "{} - 0.0", "{} / 1", "{}.clone()", "{}.contiguous()",
                                 "{}.double()", "{}.to(torch.float64)", "{}.reshape({}.shape)", "{}.view_as({})"])
        mutated, other = self.rng.choice([(u, v), (v, u)])
        mutate = self.rng.choice(INPLACE_UNARY[:12]).format(t=mutated, c=self.const())
        return [self.stmt(f"{u} = {ident.format(*[v] * ident.count('{}'))}", "identity_alias"),
                self.stmt(mutate, "inplace", "mutate_identity"),
                self.stmt(f"{self._fresh()} = {other} * 2.0", "read_other_alias")]

    def overlapping_update(self):
        """An in-place op whose operand is another part of the same storage."""
        t = self.pick(self.float_vars(lambda x: self.writable(x) and x.dim() >= 1 and x.shape[0] >= 2))
        if t is None:
            return None
        forms = [f"{t}[0].add_({t}[1])", f"{t}[-1].copy_({t}[0] * 2)", f"{t}[1:].mul_({t}[:1])",
                 f"{t}.add_(torch.flip({t}, [0]))", f"{t}[0] = {t}[1] + {t}[0]", f"{t}[1:] = {t}[:-1].clone()"]
        if self.tensor(t).dim() >= 2 and self.tensor(t).shape[1] >= 2:
            forms += [f"{t}[:, 0].copy_({t}[:, 1])", f"{t}[:, 1:] += {t}[:, :1]"]
        if self.tensor(t).dim() == 2 and self.tensor(t).shape[0] == self.tensor(t).shape[1]:
            forms += [f"{t}.add_({t}.t().clone())", f"{t}.diagonal().copy_({t}[0])"]
        return [self.stmt(self.rng.choice(forms), "inplace", "overlapping_update", "inplace_view")]

    def index_mutation(self):
        """Index-based in-place ops with integer index tensors (duplicates accumulate)."""
        t = self.pick(self.float_vars(lambda x: self.writable(x) and x.dim() >= 1))
        if t is None:
            return None
        shape = self.tensor(t).shape
        d0, r = shape[0], self.rng
        rows = r.sample(range(d0), min(d0, r.randint(1, 3)))
        dup = [r.randrange(d0) for _ in range(r.randint(2, 4))]
        rows_shape, dup_shape = torch.Size([len(rows), *shape[1:]]), torch.Size([len(dup), *shape[1:]])
        forms = [
            f"{t}.index_copy_(0, torch.tensor({rows}), {self.operand(rows_shape, exact=True, apart_from=t)})",
            f"{t}.index_put_((torch.tensor({dup}),), {self.operand(dup_shape, apart_from=t)}, accumulate=True)",
            f"{t}.scatter_add_(0, torch.tensor({dup}).reshape({[len(dup)] + [1] * (len(shape) - 1)}).expand("
            f"{len(dup)}, *{t}.shape[1:]), {self.operand(dup_shape, exact=True, apart_from=t)})",
            f"{t}.masked_scatter_({t} > 0, {self.operand(shape, exact=True, apart_from=t)})",
        ]
        return [self.stmt(r.choice(forms), "inplace", "index_assign", "index_mutation")]

    FAMILIES = {
        "fresh_from_input": 3, "unary": 8, "binary": 8, "matmul": 2, "view": 12, "multi_view": 3, "inplace": 14,
        "self_aliasing": 3, "index_assign": 7, "view_then_mutate_base": 6, "mutate_view_chain": 5, "index_read": 6,
        "reduce": 4, "control_flow": 6, "static_loop": 2, "hook": 3, "custom_function": 5, "dtype": 3,
        "buffer": 3, "concat": 2, "no_grad_mutation": 1, "repeat_expression": 4, "factory_pair": 2,
        "identity_alias": 4, "overlapping_update": 3, "index_mutation": 3,
    }

    def generate(self) -> Program:
        families = {k: w for k, w in self.FAMILIES.items() if k not in self.exclude}
        names, weights = list(families), list(families.values())
        self._try(self.fresh_from_input())
        attempts = 0
        while len(self.body) < self.max_statements and attempts < 200:
            attempts += 1
            family = self.rng.choices(names, weights)[0]
            try:
                stmts = getattr(self, family)()
            except (IndexError, ValueError, RuntimeError, TypeError, KeyError):  # does not fit the live values
                stmts = None
            if stmts:
                self._try(stmts)
        return Program(self.seed, self.inputs, list(self.helpers), list(self.body), self._terms())

    def _terms(self) -> list[str]:
        """The summands of the returned scalar: the latest values and a few others, weighted."""
        grads = self.float_vars(lambda t: t.requires_grad)
        chosen = list(dict.fromkeys(grads[-2:] + self.rng.sample(grads, min(len(grads), 2))))
        terms = []
        for v in chosen:
            form = self.rng.choice(["w", "w", "w", "sum", "square"])
            if form == "w":
                weights = f"torch.linspace(-1.0, 1.0, {v}.numel(), dtype={v}.dtype).reshape({v}.shape)"
                terms.append(f"({v} * {weights}).sum()")
            elif form == "sum":
                terms.append(f"{v}.sum()")
            else:
                terms.append(f"{v}.pow(2).mean()")
        return terms

    def _broadcast_variant(self, shape):
        forms = [shape[1:], (1,) + tuple(shape[1:]), tuple(shape[:-1]) + (1,)] if len(shape) > 1 else [(1,), ()]
        return tuple(self.rng.choice(forms))


@functools.lru_cache(maxsize=None)
def _helper_classes() -> dict:
    ns = {"torch": torch}
    for source in HELPERS.values():
        exec(source, ns)
    return {name: ns[name] for name in HELPERS}


@functools.lru_cache(maxsize=4096)
def _compiled(source: str):
    return compile(source, "<generated>", "exec")


@functools.lru_cache(maxsize=4096)
def _assigned_names(source: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.append(node.id)
    return out


def _broadcast(a, b) -> tuple | None:
    """The broadcast shape of ``a`` and ``b``, or None (torch.broadcast_shapes, without its cost)."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y) if 0 not in (x, y) else 0)
    return tuple(reversed(out))


def _broadcasts_to(src, dst) -> bool:
    return _broadcast(tuple(src), tuple(dst)) == tuple(dst)


def _broadcastable(a, b) -> bool:
    return _broadcast(tuple(a), tuple(b)) is not None


def generate(seed: int, exclude=()) -> Program:
    """The program of ``seed`` (deterministic), without the statement families named in ``exclude``
    (names of ``Generator.FAMILIES``: "hook", "custom_function", ...)."""
    return Generator(seed, exclude).generate()
