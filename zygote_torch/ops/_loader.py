"""Loading the compiled extension of csrc/ and the fake (meta) kernels of its ops.

The build (setup.py) produces ``zygote_torch._C`` (CPU kernels) and, on a CUDA build of torch
with nvcc, ``zygote_torch._C_cuda`` (the same CPU kernels plus the CUDA ones). Exactly one is
loaded: the CUDA one when torch is a CUDA build and it imports, else the CPU one. Importing it runs
the ``TORCH_LIBRARY(zygote_torch, m)`` registrations, after which ``torch.ops.zygote_torch.*``
exist. Nothing here ever raises: a missing or broken extension leaves ``LOADED`` all False and the
pure-torch implementations take over. ``ZYGOTE_TORCH_NO_EXT=1`` skips loading.
"""
from __future__ import annotations

import importlib
import os

import torch

LOADED = {"cpu": False, "cuda": False}
MODULE: str | None = None
ERRORS: dict = {}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes():
    lib = "zygote_torch::"
    reg = torch.library.register_fake

    @reg(lib + "cross_entropy_fwd")
    def _(logits, target, ignore_index, label_smoothing):
        m = logits.shape[0]
        return logits.new_empty((m,), dtype=_acc(logits.dtype)), logits.new_empty((m,), dtype=_acc(logits.dtype))

    @reg(lib + "cross_entropy_bwd")
    def _(grad, logits, target, lse, ignore_index, label_smoothing):
        return logits.new_empty(logits.shape)

    @reg(lib + "layer_norm_bwd")
    def _(dy, x, mean, rstd, weight):
        n = x.shape[1]
        return x.new_empty(x.shape), x.new_empty((n,), dtype=_acc(x.dtype)), x.new_empty((n,), dtype=_acc(x.dtype))

    @reg(lib + "rms_norm_bwd")
    def _(dy, x, rstd, weight, eps):
        return x.new_empty(x.shape), x.new_empty((x.shape[1],), dtype=_acc(x.dtype))

    @reg(lib + "softmax_bwd")
    def _(dy, y):
        return y.new_empty(y.shape)

    @reg(lib + "log_softmax_bwd")
    def _(dy, y):
        return y.new_empty(y.shape)

    @reg(lib + "gelu_bwd")
    def _(dy, x, approximate):
        return x.new_empty(x.shape)

    @reg(lib + "silu_bwd")
    def _(dy, x):
        return x.new_empty(x.shape)

    @reg(lib + "swiglu_fwd")
    def _(a, b):
        return a.new_empty(a.shape)

    @reg(lib + "swiglu_bwd")
    def _(dy, a, b):
        return a.new_empty(a.shape), b.new_empty(b.shape)

    @reg(lib + "embedding_bwd")
    def _(dy, indices, num_weights, padding_idx):
        return dy.new_empty((num_weights, dy.shape[1]))


def load() -> None:
    global MODULE
    if os.environ.get("ZYGOTE_TORCH_NO_EXT") == "1":
        ERRORS["env"] = "ZYGOTE_TORCH_NO_EXT=1"
        return
    names = (["zygote_torch._C_cuda"] if torch.version.cuda else []) + ["zygote_torch._C"]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, OSError (missing libcudart, ABI mismatch)
            ERRORS[name] = f"{type(e).__name__}: {e}"
            continue
        if not hasattr(torch.ops.zygote_torch, "cross_entropy_fwd"):
            ERRORS[name] = "imported, but registered no ops"
            continue
        MODULE = name
        LOADED["cpu"] = True
        LOADED["cuda"] = name.endswith("_cuda")
        break
    if MODULE is not None:
        try:
            _register_fakes()
        except Exception as e:  # a second registration (module reloaded) is harmless
            ERRORS["fake"] = f"{type(e).__name__}: {e}"
