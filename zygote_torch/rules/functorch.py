"""The rule of a ``torch.func.vmap`` call inside a differentiated function (made one call with its
inputs explicit by capture/vmap.py): the torch.func fallback, ``torch.func.vjp`` of the vmapped
call, which is exact because vjp and vmap compose."""
from __future__ import annotations

from torch._functorch.vmap import vmap_impl

from ..ad.fallback import fallback_rule
from ..ad.registry import rrule


@rrule(vmap_impl)
def vmapped_call(func, in_dims, out_dims, randomness, chunk_size, *args, **kwargs):
    """y = vmap(func)(*args);  dargs = torch.func.vjp of the vmapped call (keyword arguments of the
    vmapped function are not differentiated)."""
    y, pullback = fallback_rule(vmap_impl, (func, in_dims, out_dims, randomness, chunk_size) + args, kwargs)
    return y, lambda dy: pullback(dy)[:1 + 5 + len(args)]
