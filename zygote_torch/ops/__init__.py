"""Fused pullbacks (custom ops) for the rules: cross-entropy, linear + cross-entropy, layer_norm,
rms_norm, softmax, log_softmax, GELU, SiLU, SwiGLU, embedding.

Each function below runs ``torch.ops.zygote_torch.<op>`` (C++ kernels on CPU, CUDA kernels on a
GPU; csrc/) when the compiled extension is loaded and the inputs are supported, and otherwise the
pure-torch formula (same math, same results up to rounding; ``reference`` names them all).
Supported by the kernels: float32 / float64 / bfloat16 / float16, all tensors of one dtype and
device; anything else takes the formula (see ``_common.kernel_ok``).
Non-contiguous inputs are made contiguous. Results are computed in float32 for bfloat16/float16
(float64 for float64) and returned in the input dtype; per-row statistics (lse) stay float32.

One module per op family holds the op whole: its fake kernel, wrapper, formula and the row of the
kernel-choice tables it measured (``cross_entropy``, ``norms``, ``softmax``, ``activations``,
``embedding``; ``attention`` and ``grouped_mm`` for torch's kernels). ``kernel_choice`` says when
the rules call our kernels instead of torch's (``use_kernels``, ``USE_KERNELS_ON_CPU``), and
``kernel_choice_key()`` is that choice as one hashable value, which staged programs are guarded on.

``available()`` says which compiled extension is loaded: ``{"cpu": bool, "cuda": bool}``.
``ZYGOTE_TORCH_NO_EXT=1`` in the environment (read at import) forces the pure-torch path.

The ops also have fake (meta) kernels, so they trace under ``torch.compile`` / FakeTensorMode.
"""
from __future__ import annotations

import sys
import types

from . import _loader

_loader.load()  # before the families: their fake kernels register on the loaded ops

from . import activations, cross_entropy, embedding, grouped_mm, norms, softmax  # noqa: E402
from ._common import acc_dtype  # noqa: E402
from .activations import gelu_backward, silu_backward, swiglu_backward, swiglu_forward  # noqa: E402
from .cross_entropy import (cross_entropy_backward, cross_entropy_forward, linear_cross_entropy,  # noqa: E402
                            linear_cross_entropy_backward, linear_cross_entropy_forward, loss_grad_scale, reduce_loss)
from .embedding import embedding_backward  # noqa: E402
from .kernel_choice import kernel_choice_key, use_kernels  # noqa: E402
from .norms import layer_norm_backward, rms_norm_backward  # noqa: E402
from .softmax import log_softmax_backward, softmax_backward  # noqa: E402

__all__ = [
    "available", "cross_entropy_forward", "cross_entropy_backward",
    "linear_cross_entropy_forward", "linear_cross_entropy_backward", "linear_cross_entropy",
    "layer_norm_backward", "rms_norm_backward", "softmax_backward", "log_softmax_backward",
    "gelu_backward", "silu_backward", "swiglu_forward", "swiglu_backward", "embedding_backward",
    "reference", "use_kernels", "kernel_choice_key",
]


def available() -> dict:
    """``{"cpu": bool, "cuda": bool}``: whether the compiled CPU / CUDA kernels are loaded."""
    return dict(_loader.LOADED)


def _namespace(name: str, doc: str, **functions) -> types.ModuleType:
    """A module object ``zygote_torch.ops.<name>`` holding ``functions`` (importable by that path)."""
    module = types.ModuleType(f"{__name__}.{name}", doc)
    module.__dict__.update(functions)
    sys.modules[module.__name__] = module
    return module


reference = _namespace(
    "reference",
    """The pure-torch formula of each op, by the op's name: the fallback where no kernel applies, and the
    reference the kernels are tested against. Same signatures and results as the functions of
    ``zygote_torch.ops``, except that the norms take [m, n] sizes (``layer_norm_backward(dy, x, mean,
    rstd, weight, m, n)``, ``rms_norm_backward(dy, x, rstd, weight, eps, m, n)``) and return the
    parameter cotangents in the accumulation dtype. Each formula lives in its op family's module.""",
    acc_dtype=acc_dtype, reduce_loss=reduce_loss, loss_grad_scale=loss_grad_scale,
    cross_entropy_forward=cross_entropy.cross_entropy_forward_reference,
    cross_entropy_backward=cross_entropy.cross_entropy_backward_reference,
    layer_norm_backward=norms.layer_norm_backward_reference, rms_norm_backward=norms.rms_norm_backward_reference,
    softmax_backward=softmax.softmax_backward_reference, log_softmax_backward=softmax.log_softmax_backward_reference,
    gelu_backward=activations.gelu_backward_reference, silu_backward=activations.silu_backward_reference,
    swiglu_forward=activations.swiglu_forward_reference, swiglu_backward=activations.swiglu_backward_reference,
    embedding_backward=embedding.embedding_backward_reference,
)


def _named_by_their_home(names) -> None:
    """The public functions say they are ``zygote_torch.ops.<name>``, where they were before the split
    into families: generated code calls them ``zygote_torch_ops_<name>``, pickles find them here."""
    for name in names:
        function = globals()[name]
        if isinstance(function, types.FunctionType):
            function.__module__ = __name__


_named_by_their_home(__all__)
