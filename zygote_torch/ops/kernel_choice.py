"""When the rules call our compiled kernels (``zygote_torch.ops``) instead of torch's own.

The rules of cross-entropy, softmax, log_softmax, GELU, SiLU, layer norm, RMS norm and embedding
call the custom ops (csrc/) where ``use_kernels(t, op)`` says so, and torch's own kernels (or the
formula) otherwise; SwiGLU is not a torch op, so its kernels serve code that calls
``zygote_torch.ops`` directly:

- CUDA tensors: always (when the CUDA extension is loaded): the kernels move the fewest bytes.
- CPU tensors: per op and dtype, from ``CPU_KERNELS``: where ``benchmarks/cpu_kernels.py`` measured
  our vectorised CPU kernel (the op's Python wrapper included) at least as fast as the eager aten
  kernel of the same pullback: ratio ours / torch <= 1.0 at every size it runs (cross-entropy
  2048x256 and 1024x32000 logits, forward + backward, as the rule switches both; norms and softmax
  4096x128 and 1024x1024; elementwise 1M elements; embedding 1024 -> 256x128, 8192 -> 32000x512), in
  float32 and bfloat16, 1 thread (2 threads agree). Measured on a 2-core AMD EPYC with AVX512, torch
  2.13.0, with torch and our kernels both on AVX512 and both on AVX2 (ATEN_CPU_CAPABILITY=avx2);
  the tables are keyed by the instruction set our kernels run (``cpu_capability()``, which follows
  torch's). Result: cross_entropy, layer_norm, rms_norm, log_softmax, gelu, silu and embedding take
  our kernels; softmax keeps aten's, a memory-bound tie; float64 and float16 keep aten's (not what
  the table was measured for), as does the baseline instruction set (``"default"``: our
  generic-vector build is slower there). Small problems keep torch's kernels too
  (``CPU_MIN_NUMEL``: the wrappers' Python decides there). Each op family's module declares its
  row of the tables (:func:`measured`), with the crossover it measured.

``USE_KERNELS_ON_CPU``: None (default) follows ``CPU_KERNELS``; True runs every kernel on the CPU
(the tests set it to check the wiring); False none. A staged program depends on all of this, so
:func:`kernel_choice_key` is part of what it is guarded on (``runtime/guards.py``).
"""
from __future__ import annotations

import sys

import torch

from . import _loader

USE_KERNELS_ON_CPU: bool | None = None

FAST = frozenset({torch.float32, torch.bfloat16})
_MEASURED: dict[str, frozenset] = {}  # op -> the dtypes where our kernel was at least as fast as torch's
CPU_KERNELS: dict[str, dict[str, frozenset]] = {"avx512": _MEASURED, "avx2": _MEASURED, "default": {}}
# Below these sizes (elements of the op's main tensor) the Python of our ops' wrappers costs more
# than the kernel saves: torch's kernel is faster (crossovers measured on the same machine, float32,
# 1 thread; the numbers stand with each op's ``measured``).
CPU_MIN_NUMEL: dict[str, int] = {}

_cpu_isa: str | None = None


def measured(op: str, dtypes: frozenset, min_numel: int = 0) -> None:
    """Declare ``op``'s row of the CPU tables: the dtypes where our kernel was at least as fast as
    torch's on AVX2 and AVX512, and the size (elements) below which torch's stays faster."""
    _MEASURED[op] = dtypes
    if min_numel:
        CPU_MIN_NUMEL[op] = min_numel


def cpu_capability() -> str | None:
    """The instruction set of the loaded CPU kernels ("avx512", "avx2", "default"), None without them."""
    global _cpu_isa
    if _cpu_isa is None and _loader.MODULE is not None:
        get = getattr(sys.modules.get(_loader.MODULE), "cpu_capability", None)
        _cpu_isa = get() if get is not None else "default"
    return _cpu_isa


def use_kernels(t: torch.Tensor, op: str) -> bool:
    """Whether a rule should call the custom op ``op`` (a key of ``CPU_KERNELS[...]``) for tensors
    like ``t`` (see the module docs)."""
    device = t.device.type
    if not _loader.has_kernels(device):
        return False
    if device != "cpu":
        return device == "cuda"
    if USE_KERNELS_ON_CPU is not None:
        return bool(USE_KERNELS_ON_CPU)
    return t.dtype in CPU_KERNELS.get(cpu_capability(), {}).get(op, ()) and t.numel() >= CPU_MIN_NUMEL.get(op, 0)


def kernel_choice_key() -> tuple:
    """Every setting :func:`use_kernels` reads besides its tensor (``USE_KERNELS_ON_CPU``,
    ``CPU_KERNELS``, ``CPU_MIN_NUMEL``), as one hashable value: a program staged under one key is
    another program under another. Built again only when a setting changed: comparing them with
    the last ones costs less than building the key, and this runs at every call of a staged program."""
    global _last
    use, kernels, min_numel, key = _last
    if use is USE_KERNELS_ON_CPU and kernels == CPU_KERNELS and min_numel == CPU_MIN_NUMEL:
        return key
    kernels = {isa: dict(table) for isa, table in CPU_KERNELS.items()}
    key = (USE_KERNELS_ON_CPU, tuple((isa, tuple(table.items())) for isa, table in kernels.items()),
           tuple(CPU_MIN_NUMEL.items()))
    _last = (USE_KERNELS_ON_CPU, kernels, dict(CPU_MIN_NUMEL), key)
    return key


_last: tuple = (object(), None, None, None)  # (the settings kernel_choice_key last saw, copied; its key)
