"""Shared checks: zygote_torch gradients against torch.autograd (float64 reference)."""
from __future__ import annotations

import torch

import zygote_torch as zt
from zygote_torch.capture.pytree import flatten
from zygote_torch.runtime import staged


def _autograd_pullback(f, args, dy_leaves=None):
    """Reference (y, cotangents-per-leaf) by torch.autograd on fresh float64 leaves."""
    leaves_per_arg = []
    call_args = []
    for a in args:
        flat, rebuild_arg = flatten(a, modules_as_dicts=False)
        fresh = [x.detach().clone().requires_grad_(x.is_floating_point() or x.is_complex())
                 if isinstance(x, torch.Tensor) else x for x in flat]
        leaves_per_arg.append(fresh)
        call_args.append(a if isinstance(a, torch.nn.Module) else rebuild_arg(fresh))
    if any(isinstance(a, torch.nn.Module) for a in args):
        raise NotImplementedError("use check_module_gradients for modules")
    y = f(*call_args)
    y_leaves = [t for t in flatten(y)[0] if isinstance(t, torch.Tensor)]
    if dy_leaves is None:
        dy_leaves = [torch.ones_like(t) for t in y_leaves]
    inputs = [x for flat in leaves_per_arg for x in flat if isinstance(x, torch.Tensor) and x.requires_grad]
    pairs = [(t, d) for t, d in zip(y_leaves, dy_leaves) if t.requires_grad]
    grads = torch.autograd.grad([t for t, _ in pairs], inputs, [d for _, d in pairs], allow_unused=True) \
        if pairs and inputs else [None] * len(inputs)
    it = iter(grads)
    out = []
    for flat in leaves_per_arg:
        out.append([next(it) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in flat])
    return y, out


def _assert_leaf_close(ours, ref, what, atol, rtol):
    """None on either side stands for an exact zero (no dependence, or a symbolic zero)."""
    if ours is None or ref is None:
        other = ref if ours is None else ours
        assert other is None or torch.count_nonzero(torch.as_tensor(other)) == 0, \
            f"{what}: ours {ours}, reference {ref}"
        return
    torch.testing.assert_close(torch.as_tensor(ours, dtype=ref.dtype), ref, atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _compare(ours_per_arg, ref_per_arg, args, atol, rtol, label):
    for i, (a, ours, ref) in enumerate(zip(args, ours_per_arg, ref_per_arg)):
        flat_ours = flatten(ours)[0] if ours is not None else [None] * len(ref)
        for j, (o, r) in enumerate(zip(flat_ours, ref)):
            _assert_leaf_close(o, r, f"{label}: argument {i} leaf {j}", atol, rtol)


def check_gradient(f, *args, atol=1e-7, rtol=1e-6, allow_fallback=False, reference=None, staged_too=True):
    """zt.gradient and zt.pullback (dynamic and staged) equal torch.autograd.

    ``f`` may return a tensor of any shape: a random cotangent is used (summed to a scalar for
    zt.gradient). Fails if any call used the torch.func fallback, unless ``allow_fallback``.
    ``reference``: the function torch.autograd differentiates instead of ``f`` (the same math
    written out of place, where ``f`` does what autograd refuses). ``staged_too=False`` for
    data-dependent programs, which only the dynamic path follows.
    """
    reference = reference or f
    y_ref, _ = _autograd_pullback(reference, args)
    y_leaves = [t for t in flatten(y_ref)[0] if isinstance(t, torch.Tensor)]
    gen = torch.Generator().manual_seed(0)
    dys = [torch.randn(t.shape, dtype=t.dtype, generator=gen) if t.is_floating_point() or t.is_complex()
           else torch.zeros_like(t)
           for t in y_leaves]
    _, ref = _autograd_pullback(reference, args, dys)

    y, back = zt.pullback(f, *args)
    for a, b in zip([t for t in flatten(y)[0] if isinstance(t, torch.Tensor)], y_leaves):
        torch.testing.assert_close(a, b.detach(), atol=atol, rtol=rtol, equal_nan=True)
    dy_struct = flatten(y)[1](dys) if isinstance(y, (tuple, list)) else dys[0]
    _compare(back(dy_struct), ref, args, atol, rtol, "pullback")

    if len(y_leaves) == 1:
        dy = dys[0]
        if dy.is_complex():  # torch's convention: the vjp with dy is the gradient of Re <dy, y>
            g = zt.gradient(lambda *a: (f(*a) * dy.conj()).real.sum(), *args)
        else:
            g = zt.gradient(lambda *a: (f(*a) * dy).sum(), *args)
        _compare(g, ref, args, atol, rtol, "gradient")

    if not allow_fallback:
        used = zt.fallbacks(f, *args)
        assert not used, f"used the torch.func fallback for: {used}"

    if not staged_too:
        return
    ys, sback = staged.pullback(f, *args)
    for a, b in zip([t for t in flatten(ys)[0] if isinstance(t, torch.Tensor)], y_leaves):
        torch.testing.assert_close(a, b.detach(), atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m: f"staged output: {m}")
    _compare(sback(dy_struct), ref, args, atol, rtol, "staged pullback")


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout."""
    if t.dim() == 0:
        return t
    big = torch.empty(t.shape + (2,), dtype=t.dtype)
    big[..., 0] = t
    out = big[..., 0]
    assert not out.is_contiguous() or t.numel() <= 1
    return out


def rand(*shape, dtype=torch.float64, positive=False, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    t = torch.randn(shape, dtype=dtype, generator=g)
    return t.abs() + 0.5 if positive else t


class _ThroughZt(torch.autograd.Function):
    """A torch.autograd.Function whose backward is zt.pullback's, so that torch.autograd.gradcheck
    compares our cotangents with central finite differences."""

    @staticmethod
    def forward(ctx, f, *xs):
        y, back = zt.pullback(f, *xs)
        ctx.back = back
        return y

    @staticmethod
    def backward(ctx, *dys):
        return (None, *ctx.back(dys if len(dys) > 1 else dys[0]))  # None: a zero gradient to autograd too


def fd_check(f, *xs, seed=None, eps=1e-6, atol=1e-5, rtol=1e-3):
    """Our pullback of ``f`` against finite differences (torch.autograd.gradcheck). With ``seed``,
    every evaluation of ``f`` draws from the same RNG state (random ops: the pullback must reuse the
    forward's draw). Non-tensor and integer arguments are held fixed."""
    if seed is not None:
        g = f

        def f(*a):
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return g(*a)

    xs = [x.detach().clone().requires_grad_(x.is_floating_point() or x.is_complex())
          if isinstance(x, torch.Tensor) else x for x in xs]
    assert torch.autograd.gradcheck(lambda *a: _ThroughZt.apply(f, *a), tuple(xs), eps=eps, atol=atol, rtol=rtol)


def gradcheck(f, *args, seed=None):
    """:func:`fd_check` with the tighter relative tolerance the nn-family rule tests use."""
    fd_check(f, *args, seed=seed, rtol=1e-4)


def check_hvp(f, *args):
    """For each argument i: the gradient of <grad_i f, v> with respect to every argument equals
    torch.autograd's double backward, and no call (first or second order) used the fallback."""
    for i in range(len(args)):
        v = rand(*args[i].shape, seed=99)

        def inner(*a, i=i, v=v):
            return (zt.gradient(f, *a)[i] * v).sum()

        ours = zt.gradient(inner, *args)
        assert not zt.fallbacks(inner, *args)
        leaves = [a.detach().clone().requires_grad_() for a in args]
        g = torch.autograd.grad(f(*leaves), leaves[i], create_graph=True)[0]
        ref = torch.autograd.grad((g * v).sum(), leaves, allow_unused=True)
        for o, r in zip(ours, ref):
            if r is None:
                assert o is None or torch.count_nonzero(o) == 0
            else:
                torch.testing.assert_close(o, r)


def check_second_derivatives(f, x, atol=1e-6, rtol=1e-5):
    """zt.hessian of scalar ``f`` at ``x`` equals torch.autograd's, and ``f``'s gradient reaches no
    fallback (its rules carry the second derivative)."""
    H = zt.hessian(f, x)
    ref = torch.autograd.functional.hessian(f, x)
    torch.testing.assert_close(H.reshape(ref.shape), ref, atol=atol, rtol=rtol)
    assert not zt.fallbacks(lambda x: zt.gradient(f, x)[0], x)


def runs_a_zt_program(loss) -> bool:
    """Whether ``loss``'s autograd graph goes through a ``zt.compile(module)`` backward program
    (its ``_Bridge`` node), rather than only through torch.autograd's own nodes."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "_Bridge" in type(fn).__name__:
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False
