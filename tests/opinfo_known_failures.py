"""Known failures of the OpInfo sweep (tests/opinfo_sweep.py), per dtype, on CPU.

Each entry maps an OpInfo ``full_name`` to the precise reason zygote_torch disagrees with
torch.autograd (or raises where it does not) on some sample. Nothing else may fail: any other
failing op fails tests/test_opinfo.py. The list is strict: every entry is checked to still fail, so
an op that gets fixed must be removed from here (and the sweep rerun:
``python tests/opinfo_sweep.py --full --write-docs``).
"""

_SPARSE_CSR = ("sparse CSR operand: no rule for the op, and the torch.func.vjp fallback cannot wrap a "
               "sparse CSR tensor (RuntimeError 'Sparse CSR tensors do not have strides')")

KNOWN_FAILURES: dict = {
    "float64": {
        "sparse.sampled_addmm": _SPARSE_CSR,
        "sparse.mm.reduce": _SPARSE_CSR,
    },
    "complex128": {
        "pow": ("rule arithmetic.pow on complex operands: its pullback compares complex tensors "
                "(exponent >= 0: NotImplementedError 'ge_cpu' for ComplexDouble) and leaves p * x^(p-1) "
                "unconjugated"),
        "logaddexp": ("rule elementwise.logaddexp on complex operands: dx = dz / (1 + exp(y - x)) without "
                      "the conjugate"),
        "nn.functional.normalize": ("rule nn.normalize on complex input: its pullback calls torch.sign, "
                                    "which refuses complex tensors (torch.sgn is the complex form)"),
        "nn.functional.l1_loss": ("rule losses.l1_loss on complex input: its pullback calls torch.sign, "
                                  "which refuses complex tensors (torch.sgn is the complex form)"),
        "nn.functional.rms_norm": ("rule nn.rms_norm on complex input: its pullback squares x (x * x) and "
                                   "multiplies g * xhat where torch uses |x|^2 and conjugates"),
    },
}
