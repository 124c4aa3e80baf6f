"""Testing a rule, as ChainRulesTestUtils' ``test_rrule`` and Mooncake's ``test_rule`` do.

``zt.test_rrule(f, *args)`` checks the ``rrule`` registered for ``f`` at ``args``:

1. the contract: the rule returns ``(y, pullback)``, ``y`` equals ``f(*args)``, the pullback gives
   one cotangent for ``f`` then one per argument, each shaped like its argument (a symbolic zero or
   ``NoTangent()`` for arguments that are not floating-point tensors or numbers);
2. the pullback against central finite differences of ``<dy, f(args)>`` for a random cotangent
   ``dy`` (float64 advised: pass float64 arguments);
3. the pullback against the derivative of ``f``'s own body by torch.autograd (``check_body=False``
   for a body torch.autograd cannot differentiate, e.g. a straight-through estimator);
4. the rule inside zt, dynamically (``zt.pullback`` of a function calling ``f``) and staged (the
   generated program), gives the same cotangents and uses the rule (not the fallback).

A failure is an ``AssertionError`` saying which check, which argument, where and by how much.
"""
from __future__ import annotations

import torch

from .ad.registry import REGISTRY
from .ad.tangents import is_zero, unthunk
from .capture.pytree import structure
from .capture.trace import is_python_float
from .errors import op_name

_TOLERANCES = {torch.float64: (1e-6, 1e-7, 1e-6), torch.float32: (1e-3, 1e-4, 1e-3)}  # rtol, atol, fd step


def test_rrule(f, *args, output_tangent=None, constants=(), rtol=None, atol=None, check_body: bool = True,
               check_staged: bool = True, seed: int = 0, **kwargs):
    """Check the rrule registered for ``f`` at ``args`` (see the module docstring). ``output_tangent``:
    the cotangent ``dy`` to use (default: random, mirroring the output); ``constants``: indices of
    arguments the rule does not differentiate (ChainRulesTestUtils' ``x ⊢ NoTangent()``: their
    cotangent must be a zero); keyword arguments go to ``f`` (not differentiated). Returns the
    rule's cotangents of the arguments."""
    rule = REGISTRY.lookup(f)
    name = getattr(f, "__qualname__", repr(f))
    if rule is None:
        raise AssertionError(f"test_rrule({name}): no rrule is registered for it (zt.rrule({name}) ...)")
    args = tuple(args)
    bound, rest = rule.signature.bind(f, args, kwargs)
    y, pullback = _call_rule(rule, name, bound, rest)
    expected = _body(f)(*args, **kwargs)
    _check_close(y, expected, f"test_rrule({name}): the rule's value differs from {name}(*args)", None, None)
    dy = output_tangent if output_tangent is not None else _random_like(y, seed)
    grads = _check_arity(pullback(dy), bound, name)
    cotangents = grads[1:1 + len(args)]

    for i, (arg, g) in enumerate(zip(args, cotangents)):
        if i in constants:
            if not is_zero(g):
                raise AssertionError(f"test_rrule({name}): argument {i} is a constant, but the pullback gave it "
                                     f"a {type(g).__name__}")
            continue
        _check_shape(arg, g, name, i)
        reference = _finite_differences(f, args, kwargs, i, dy)
        _check_close(g, reference, f"test_rrule({name}): argument {i}: the pullback differs from finite differences",
                     rtol, atol, numeric=True)
    if check_body:
        body = _autograd_cotangents(_body(f), args, kwargs, dy)
        for i, (g, r) in enumerate(zip(cotangents, body)):
            if i in constants:
                continue
            _check_close(g, r, f"test_rrule({name}): argument {i}: the pullback differs from torch.autograd of "
                               f"{name}'s body (check_body=False if torch.autograd cannot differentiate it)",
                         rtol, atol)
    _check_inside_zt(f, args, kwargs, dy, cotangents, name, rtol, atol, check_staged, constants)
    return tuple(cotangents)


test_rrule.__test__ = False  # a tool, not a test: pytest must not collect it where it is imported


def _call_rule(rule, name, bound, rest):
    with torch.no_grad():
        result = rule.fn(*bound, **rest)
    if not (isinstance(result, tuple) and len(result) == 2 and callable(result[1])):
        raise AssertionError(f"test_rrule({name}): the rule must return (value, pullback); got "
                             f"{type(result).__name__}")
    return result


def _body(f):
    """``f`` as it runs outside zygote_torch (a user function's own code)."""
    from .capture.leaves import original
    return original(f)


def _check_arity(grads, bound, name) -> tuple:
    if not isinstance(grads, tuple) or len(grads) != 1 + len(bound):
        got = f"{len(grads)} cotangents" if isinstance(grads, tuple) else f"a {type(grads).__name__}"
        raise AssertionError(f"test_rrule({name}): the pullback returned {got}; it must return a tuple of "
                             f"{1 + len(bound)}: the function's own cotangent (NoTangent()), then one per "
                             "positional parameter of the rule")
    return tuple(unthunk(g) for g in grads)


def _differentiable(x) -> bool:
    return is_python_float(x) or isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _check_shape(arg, g, name, i) -> None:
    if is_zero(g):
        return
    if not _differentiable(arg) and not isinstance(arg, (tuple, list, dict)):
        raise AssertionError(f"test_rrule({name}): argument {i} ({type(arg).__name__}) is not differentiable, "
                             f"but the pullback gave it a {type(g).__name__}; give it NoTangent()")
    if isinstance(arg, torch.Tensor):
        if not isinstance(g, torch.Tensor):
            raise AssertionError(f"test_rrule({name}): argument {i}: a tensor's cotangent must be a tensor, got "
                                 f"{type(g).__name__}")
        if g.shape != arg.shape:
            raise AssertionError(f"test_rrule({name}): argument {i}: cotangent of shape {tuple(g.shape)} for an "
                                 f"argument of shape {tuple(arg.shape)}")
        if g.dtype != arg.dtype:
            raise AssertionError(f"test_rrule({name}): argument {i}: cotangent of dtype {g.dtype} for an argument "
                                 f"of dtype {arg.dtype}")


def _random_like(y, seed: int):
    generator = torch.Generator().manual_seed(seed)
    leaves, shape = structure(y)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex()):
            out.append(torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype).to(leaf.device))
        elif is_python_float(leaf):
            out.append(float(torch.randn((), generator=generator, dtype=torch.float64)))
        else:
            out.append(None)
    return shape.gradient(out)


def _inner(y, dy) -> float:
    """<dy, y> over the floating-point leaves, in float64."""
    total = 0.0
    for a, b in zip(structure(y)[0], structure(dy)[0]):
        if b is None or is_zero(b):
            continue
        if isinstance(a, torch.Tensor):
            total += float((a.double() * torch.as_tensor(b).double()).sum())
        elif is_python_float(a):
            total += float(a) * float(b)
    return total


def _finite_differences(f, args, kwargs, i, dy):
    """d<dy, f(args)>/d args[i] by central differences (None: not differentiable)."""
    arg = args[i]
    if not _differentiable(arg):
        return None
    body = _body(f)
    dtype = arg.dtype if isinstance(arg, torch.Tensor) else torch.float64
    step = _TOLERANCES.get(dtype, (1e-2, 1e-2, 1e-2))[2]

    def value(x):
        return _inner(body(*args[:i], x, *args[i + 1:], **kwargs), dy)

    if is_python_float(arg):
        return (value(arg + step) - value(arg - step)) / (2 * step)
    grad = torch.zeros(arg.shape, dtype=torch.float64)
    flat = arg.detach().reshape(-1)
    for k in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[k] += step
        minus[k] -= step
        grad.view(-1)[k] = (value(plus.reshape(arg.shape)) - value(minus.reshape(arg.shape))) / (2 * step)
    return grad.to(dtype)


def _autograd_cotangents(body, args, kwargs, dy) -> list:
    fresh = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and _differentiable(a) else a
             for a in args]
    with torch.enable_grad():
        y = body(*fresh, **kwargs)
        pairs = [(a, torch.as_tensor(b, dtype=a.dtype)) for a, b in zip(structure(y)[0], structure(dy)[0])
                 if isinstance(a, torch.Tensor) and a.requires_grad and b is not None and not is_zero(b)]
        inputs = [a for a in fresh if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad([p for p, _ in pairs], inputs, [d for _, d in pairs], allow_unused=True) \
            if pairs and inputs else [None] * len(inputs)
    it = iter(grads)
    return [next(it) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in fresh]


def _check_inside_zt(f, args, kwargs, dy, cotangents, name, rtol, atol, check_staged: bool, constants) -> None:
    from . import api
    from .runtime import staged
    wrt = tuple(i for i, a in enumerate(args) if _differentiable(a) and i not in constants)

    def call(*xs):
        full = list(args)
        for i, x in zip(wrt, xs):
            full[i] = x
        return f(*full, **kwargs)

    xs = tuple(args[i] for i in wrt)
    prefix = op_name(f) + " at "
    used = [entry for entry in api.fallbacks(call, *xs) if entry.startswith(prefix)]
    if used:
        raise AssertionError(f"test_rrule({name}): zt did not use the rule, the call went through the fallback: {used}")
    _, back = api.pullback(call, *xs)
    for i, g in zip(wrt, back(dy)):
        _check_close(g, cotangents[i], f"test_rrule({name}): argument {i}: zt.pullback (dynamic) differs from the "
                                       "rule's own pullback", rtol, atol)
    if not check_staged:
        return
    _, back = staged.pullback(call, *xs)
    for i, g in zip(wrt, back(dy)):
        _check_close(g, cotangents[i], f"test_rrule({name}): argument {i}: the staged program (zt.compile) differs "
                                       "from the rule's own pullback (check_staged=False for a rule with "
                                       "data-dependent Python)", rtol, atol)


def _check_close(ours, reference, what, rtol, atol, numeric: bool = False) -> None:
    ours = None if is_zero(ours) else ours
    reference = None if is_zero(reference) else reference
    for a, b in zip(*_aligned(ours, reference)):
        if a is None and b is None:
            continue
        if a is None or b is None:
            other = b if a is None else a
            if isinstance(other, torch.Tensor) and not other.is_floating_point() and not other.is_complex():
                continue
            if torch.count_nonzero(torch.as_tensor(other)) == 0:
                continue
            raise AssertionError(f"{what}: one side is a zero (None), the other {other}")
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and not is_python_float(a):
            if a != b:
                raise AssertionError(f"{what}: {a!r} against {b!r}")
            continue
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if not a.is_floating_point() and not a.is_complex():
            if not torch.equal(a, b):
                raise AssertionError(f"{what}: {a} against {b}")
            continue
        r, t, _ = _TOLERANCES.get(b.dtype if b.is_floating_point() else torch.float64, (1e-2, 1e-2, 0))
        if numeric:  # finite differences carry their own error
            r, t = max(r, 1e-5), max(t, 1e-6)
        b = b.to(a.dtype)
        if a.shape != b.shape:
            raise AssertionError(f"{what}: shape {tuple(a.shape)} against {tuple(b.shape)}")
        close = torch.isclose(a, b, rtol=rtol if rtol is not None else r, atol=atol if atol is not None else t,
                              equal_nan=True)
        if not close.all():
            k = int((~close).reshape(-1).nonzero()[0])
            index = tuple(int(v) for v in torch.unravel_index(torch.tensor(k), a.shape)) if a.dim() else ()
            raise AssertionError(f"{what}: at index {index}, {a.reshape(-1)[k].item()!r} against "
                                 f"{b.reshape(-1)[k].item()!r} ({int((~close).sum())} of {a.numel()} elements "
                                 "differ)")


def _aligned(a, b):
    """The leaves of two structures that should mirror each other (None for a whole zero)."""
    if a is None and b is None:
        return [None], [None]
    like = a if a is not None else b
    n = len(structure(like)[0])
    a_leaves = structure(a)[0] if a is not None else [None] * n
    b_leaves = structure(b)[0] if b is not None else [None] * n
    if len(a_leaves) != len(b_leaves):
        raise AssertionError(f"a cotangent with {len(a_leaves)} leaves against one with {len(b_leaves)}")
    return a_leaves, b_leaves
