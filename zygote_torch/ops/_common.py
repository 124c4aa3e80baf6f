"""What every custom op family of ``zygote_torch.ops`` shares: the accumulation dtype of its kernels
and formulas, whether the compiled kernel may run on given tensors, and the registration of the
compiled ops' fake kernels.

Supported by the compiled kernels: float32 / float64 / bfloat16 / float16, all tensors of one dtype
and device; anything else (other dtypes, mixed dtypes, inputs that require grad while grad mode is
on, so that higher-order AD differentiates the formula, functorch-wrapped tensors, forward-mode AD
dual numbers) takes the pure-torch formula.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _loader

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

try:
    _is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
except AttributeError:  # pragma: no cover
    def _is_wrapped(t):
        return False


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels and formulas compute in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype."""
    return t.to(acc_dtype(t.dtype))


def row_lse(s: torch.Tensor) -> torch.Tensor:
    """lse_i = log sum_j exp(s_ij) over the last dim, in the accumulation dtype."""
    return torch.logsumexp(to_acc(s), -1)


def compiled():
    """The namespace of the compiled ops: ``torch.ops.zygote_torch``."""
    return torch.ops.zygote_torch


def kernel_ok(*tensors: torch.Tensor) -> bool:
    """Whether the compiled op may run on these tensors (the float ones must share a dtype)."""
    t0 = tensors[0]
    dev = t0.device.type
    if not _loader.has_kernels(dev) or t0.dtype not in FLOATS or _forward_ad._current_level >= 0:
        return False  # (under forward-mode AD the formula carries the tangents; the kernels do not)
    grad_on = torch.is_grad_enabled()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device != t0.device:
            return False
        if t.is_floating_point() and t.dtype != t0.dtype:
            return False
        if (grad_on and t.requires_grad) or _is_wrapped(t):
            return False
    return True


def same_shape_kernel_ok(*tensors: torch.Tensor) -> bool:
    """``kernel_ok`` for the elementwise kernels, which also need one shape."""
    return all(t.shape == tensors[0].shape for t in tensors) and kernel_ok(*tensors)


def fake(op: str):
    """Register the decorated function as the fake (meta) kernel of ``zygote_torch::<op>``, so the op
    traces under ``torch.compile`` / FakeTensorMode; nothing without the extension (the op does not
    exist then). A second registration (a module reloaded) is harmless: noted in ``_loader.ERRORS``."""
    def register(kernel):
        if _loader.MODULE is not None:
            try:
                torch.library.register_fake("zygote_torch::" + op)(kernel)
            except Exception as e:  # noqa: BLE001
                _loader.ERRORS["fake"] = f"{type(e).__name__}: {e}"
        return kernel
    return register
