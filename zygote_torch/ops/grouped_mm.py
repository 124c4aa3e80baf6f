"""``torch._grouped_mm``: the grouped matrix product of mixture-of-experts layers, its four layouts,
and a fake kernel as wide as the CPU kernel.

With ``offs`` (int32, increasing: the end of each group along the jagged dimension) and ``G`` groups:

====================  ==================  ======================================================
``mat_a``             ``mat_b``           result
====================  ==================  ======================================================
(T, K), rows grouped  (G, K, N)           (T, N): rows ``offs[g-1]:offs[g]`` times ``mat_b[g]``
(G, M, K)             (G, K, N), no offs  (G, M, N): a batched product
(M, T)                (T, N), T grouped   (G, M, N): group ``g`` contracts ``T``'s slice ``g``
(G, M, K)             (K, T), T grouped   (M, T): columns of group ``g`` from ``mat_a[g]``
====================  ==================  ======================================================

Entries of the jagged dimension past ``offs[-1]`` are not written by the kernel.

torch's meta kernel accepts only bfloat16 (the CUDA kernel's dtype), while the CPU kernel also runs
float32 and float16; :func:`fake_grouped_mm` computes the result's shape and checks the layout as
torch's meta does, for every dtype the device's kernel takes, so that staged capture traces what
eager mode runs.
"""
from __future__ import annotations

import torch

from ..capture.recorder import FAKE_KERNELS

Tensor = torch.Tensor
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def layout(mat_a: Tensor, mat_b: Tensor) -> str:
    """'2d3d', '3d3d', '2d2d' or '3d2d' (see the module docs)."""
    return f"{mat_a.dim()}d{mat_b.dim()}d"


def result_shape(mat_a: Tensor, mat_b: Tensor, offs) -> tuple:
    kind = layout(mat_a, mat_b)
    if kind == "2d3d":
        return (mat_a.shape[0], mat_b.shape[-1])
    if kind == "3d3d":
        return (mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1])
    if kind == "2d2d":
        return (offs.shape[0], mat_a.shape[0], mat_b.shape[1])
    if kind == "3d2d":
        return (mat_a.shape[1], mat_b.shape[1])
    raise RuntimeError(f"torch._grouped_mm: mat_a and mat_b must be 2-d or 3-d, got {mat_a.dim()}-d and {mat_b.dim()}-d")


def jagged_dim(mat_a: Tensor, mat_b: Tensor):
    """``(operand, dim)`` of the dimension ``offs`` delimits, None for '3d3d'."""
    return {"2d3d": ("a", 0), "2d2d": ("a", 1), "3d2d": ("b", 1)}.get(layout(mat_a, mat_b))


def _check_strides(name: str, mat: Tensor) -> None:
    """Row- or column-major in the last two dimensions, the other stride a multiple of 16 bytes."""
    alignment = 16 // mat.element_size()
    rows, cols = mat.stride()[-2:]
    if rows == 1 and cols >= max(1, mat.shape[-2]):
        lead = cols
    elif cols == 1 and rows >= max(1, mat.shape[-1]):
        lead = rows
    else:
        raise RuntimeError(f"torch._grouped_mm: {name} is neither row- nor column-major: strides "
                           f"{tuple(mat.stride())} for sizes {tuple(mat.shape)}")
    if lead % alignment:
        raise RuntimeError(f"torch._grouped_mm: {name}'s strides should be multiples of 16 bytes, got {lead}")


def fake_grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """The result of ``torch._grouped_mm`` on fake tensors, with the checks of its kernels."""
    cuda = mat_a.device.type == "cuda"
    dtypes = (torch.bfloat16,) if cuda else _CPU_DTYPES
    if mat_a.dtype != mat_b.dtype or mat_a.dtype not in dtypes:
        raise RuntimeError(f"torch._grouped_mm: expected inputs of one of {dtypes} on {mat_a.device.type}, got "
                           f"{mat_a.dtype} and {mat_b.dtype}")
    if bias is not None:
        raise RuntimeError("torch._grouped_mm: bias is not supported yet")
    grouped = layout(mat_a, mat_b) != "3d3d"
    if grouped != (offs is not None):
        raise RuntimeError(f"torch._grouped_mm: offs is {'required' if grouped else 'not taken'} for "
                           f"{mat_a.dim()}-d and {mat_b.dim()}-d operands")
    if offs is not None and (offs.dim() != 1 or offs.dtype != torch.int32):
        raise RuntimeError(f"torch._grouped_mm: offs must be a 1-d int32 tensor, got {offs.dtype} of {offs.dim()}-d")
    _check_strides("mat_a", mat_a)
    _check_strides("mat_b", mat_b)
    dtype = mat_a.dtype if out_dtype is None else out_dtype
    return mat_a.new_empty(result_shape(mat_a, mat_b, offs), dtype=dtype)


FAKE_KERNELS[torch._grouped_mm] = fake_grouped_mm
