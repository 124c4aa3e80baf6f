"""A differential fuzzer: random PyTorch programs (views, in-place ops, indexing, hooks, custom
autograd.Functions, control flow) differentiated by zygote_torch and by torch.autograd in float64.

``generator`` writes the programs (Python source, executed as written), ``oracle`` runs one program on
torch.autograd and on zygote_torch's dynamic and staged paths and classifies the outcome, ``shrink``
reduces a failing program to a minimal one and prints it as a pytest function. The command is
``tests/fuzz.py``. Only zygote_torch's public API is used.
"""
