"""The rule of a ``torch.func.vmap`` call inside a differentiated function (made one call with its
inputs explicit by capture/vmap.py): the torch.func fallback, ``torch.func.vjp`` of the vmapped
call, which is exact because vjp and vmap compose."""
from __future__ import annotations

from torch._functorch.eager_transforms import grad_and_value_impl, grad_impl, jvp
from torch._functorch.vmap import vmap_impl

from ..ad.fallback import fallback_rule
from ..ad.registry import rrule


@rrule(vmap_impl)
def vmapped_call(func, in_dims, out_dims, randomness, chunk_size, *args, **kwargs):
    """y = vmap(func)(*args);  dargs = torch.func.vjp of the vmapped call (keyword arguments of the
    vmapped function are not differentiated)."""
    y, pullback = fallback_rule(vmap_impl, (func, in_dims, out_dims, randomness, chunk_size) + args, kwargs)
    return y, lambda dy: pullback(dy)[:1 + 5 + len(args)]


def _transformed(runner):
    def rule(func, argnums, has_aux, args, kwargs):
        return fallback_rule(runner, (func, argnums, has_aux, args, kwargs), {})
    rule.__doc__ = (f"y = {runner.__name__}(func, ...): torch.func.grad inside a differentiated function, one call "
                    "with its closure explicit (capture/transforms.py); dargs by the fallback, through "
                    "torch.autograd, with which torch.func composes.")
    rule.__name__ = rule.__qualname__ = f"{runner.__name__}_call"
    return rule


rrule(grad_impl)(_transformed(grad_impl))
rrule(grad_and_value_impl)(_transformed(grad_and_value_impl))


@rrule(jvp)
def jvp_call(func, primals, tangents, *, strict=False, has_aux=False):
    """(y, dy) = torch.func.jvp(func, primals, tangents), one call (capture/transforms.py);
    cotangents of primals and tangents by the fallback, through torch.autograd."""
    y, pullback = fallback_rule(jvp, (func, primals, tangents), {"strict": strict, "has_aux": has_aux})
    return y, lambda dy: pullback(dy)[:4]
