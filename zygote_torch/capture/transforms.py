"""``torch.func`` transforms inside captured code: torch's answer, or a clear error, never None.

``torch.func.grad``/``grad_and_value`` (their runners ``grad_impl``/``grad_and_value_impl``) and
``torch.func.jvp`` become leaves of capture, as ``vmap`` does (see :mod:`.vmap`): one call each,
with the tensors the transformed function reaches through its closure or the globals it names
passed explicitly, differentiated by the fallback (through torch.autograd, with which torch.func
composes). Transforms whose call cannot be seen as one (``jacrev``, ``jacfwd``, ``hessian``,
``vjp``, ``linearize``: they return functions, or build on them) are refused by name when a tensor
being differentiated enters them: torch.func would wrap it into a tensor of its own, which capture
does not see, and the dependence would be lost. Inside ``f``, use ``zt.jacobian``/``zt.hessian``, or
``torch.func.grad``/``vmap``.
"""
from __future__ import annotations

import torch
from torch._functorch import eager_transforms as _eager

from ..errors import ZygoteError, describe_frame, user_frame
from .leaves import REWRITES, TORCH_LEAVES
from .vmap import _closure_inputs, _with_explicit_inputs

grad_impl = _eager.grad_impl
grad_and_value_impl = _eager.grad_and_value_impl
jvp = _eager.jvp


def _captured(cells, modules) -> list:
    captured = [cell.cell_contents for cell in cells]
    for module, names in modules:
        state = dict(module.named_parameters())
        state.update(module.named_buffers())
        captured += [state[n] for n in names]
    return captured


def _explicit_grad_inputs(args: tuple, kwargs: dict):
    """``grad_impl(func, argnums, has_aux, args, kwargs)`` with ``func``'s closure tensors and its
    keyword arguments passed as extra positional arguments (not differentiated by the transform:
    ``argnums`` still selects among the original ones)."""
    func, argnums, has_aux, call_args, call_kwargs = args
    cells, modules = _closure_inputs(func)
    if not cells and not modules and not call_kwargs:
        return args, kwargs
    extra = _captured(cells, modules) + list(call_kwargs.values())
    lifted = _with_explicit_inputs(func, cells, modules, len(call_args), call_kwargs, "transformed")
    return (lifted, argnums, has_aux, tuple(call_args) + tuple(extra), {}), kwargs


def _explicit_jvp_inputs(args: tuple, kwargs: dict):
    """``jvp(func, primals, tangents, ...)`` with ``func``'s closure tensors as extra primals whose
    tangents are zeros (so the closure is differentiated by the outer tape, not by the jvp)."""
    if not args:
        return args, kwargs
    func, primals, tangents, *rest = args
    cells, modules = _closure_inputs(func)
    if not cells and not modules:
        return args, kwargs
    extra = _captured(cells, modules)
    lifted = _with_explicit_inputs(func, cells, modules, len(primals), (), "transformed")
    zeros = tuple(torch.zeros_like(t) for t in extra)
    return (lifted, tuple(primals) + tuple(extra), tuple(tangents) + zeros, *rest), kwargs


for _runner in (grad_impl, grad_and_value_impl):
    TORCH_LEAVES.add(_runner)
    REWRITES[_runner] = _explicit_grad_inputs
TORCH_LEAVES.add(jvp)
REWRITES[jvp] = _explicit_jvp_inputs


# -- transforms that cannot be one call: refused when a differentiated tensor enters them --------

_wrap_all_tensors = _eager._wrap_all_tensors


def _no_recording_tapes() -> list:
    return []


_recording_tapes = _no_recording_tapes  # () -> the tapes recording now (installed by ad/recording.py)


def install_recording_tapes(source) -> None:
    """Make ``source()`` the list of the tapes recording now (each with ``tracks(t)``), which the
    refusal below asks: ad/recording.py keeps them, and capture does not import ad."""
    global _recording_tapes
    _recording_tapes = source


def _refusing_wrap_all_tensors(tensor_pytree, level):
    """torch.func's wrapping of a transform's inputs, refusing a tensor zt is differentiating."""
    tapes = _recording_tapes()
    if tapes:
        for t in torch.utils._pytree.tree_leaves(tensor_pytree):
            if isinstance(t, torch.Tensor) and any(tape.tracks(t) for tape in tapes):
                raise ZygoteError(
                    f"a torch.func transform (jacrev, jacfwd, hessian, vjp or linearize) at "
                    f"{describe_frame(user_frame())} is applied to a tensor zygote_torch is differentiating: "
                    "its result would not depend on it as far as zt can see. Inside a differentiated "
                    "function use zt.jacobian / zt.hessian / zt.pullback, or torch.func.grad, jvp and vmap "
                    "(which zt differentiates)")
    return _wrap_all_tensors(tensor_pytree, level)


_eager._wrap_all_tensors = _refusing_wrap_all_tensors
