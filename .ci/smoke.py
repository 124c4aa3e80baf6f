"""Smoke test of an installed zygote_torch (CI runs it in fresh virtual environments, from a
folder outside the source tree, so that the import finds the installed package).

    python smoke.py --kernels      # the compiled CPU kernels must be there
    python smoke.py --no-kernels   # a pure-Python install: no kernels, one warning saying so
    ZYGOTE_TORCH_BUILD=1 python smoke.py --kernels   # a pure-Python install, kernels built at import

Checks, each against torch.autograd in float64 or torch's own ops:
1. the package imported is the installed one, at the version its metadata names;
2. zt.gradient of an MLP (with respect to the module) equals torch.autograd's;
3. a zt.compile'd training step (Params, cross-entropy, layer norm) equals torch.autograd's;
4. a kernel op (cross-entropy forward and backward, GELU backward) equals torch's, through the
   compiled kernels (--kernels) or through the pure-torch implementations (--no-kernels);
5. --no-kernels: a fresh interpreter that imports the package and runs kernel ops prints the
   "kernels not built" warning exactly once; --kernels: it prints none.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import zygote_torch as zt

torch.manual_seed(0)


def close(a, b, what, tol=1e-9):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"{what}: differs from torch by {err:.3e}"
    print(f"  {what}: max |zt - torch| = {err:.1e}")


def check_install():
    where = os.path.dirname(zt.__file__)
    version = importlib.metadata.version("zygote_torch")
    assert zt.__version__ == version, (zt.__version__, version)
    assert "site-packages" in where, f"imported from {where}, not from an installed package"
    direct_url = json.loads(importlib.metadata.distribution("zygote_torch").read_text("direct_url.json") or "{}")
    assert not direct_url.get("dir_info", {}).get("editable"), "an editable install"
    print(f"zygote_torch {zt.__version__} from {where}; torch {torch.__version__}, Python {sys.version.split()[0]}; "
          f"kernels: {zt.ops.available()}")


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def check_gradient():
    model, x = mlp(), torch.randn(7, 5, dtype=torch.float64)
    (grads,) = zt.gradient(lambda m: m(x).pow(2).mean(), model)
    model(x).pow(2).mean().backward()
    close(torch.stack([(grads[n] - p.grad).abs().max() for n, p in model.named_parameters()]),
          torch.zeros(()), f"zt.gradient(MLP), {len(grads)} gradients vs torch.autograd")


def check_compiled_step():
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                torch.nn.Linear(32, 4)).double()
    ps = zt.Params(model)
    step = zt.compile(lambda x, y: zt.withgradient(lambda: F.cross_entropy(model(x), y), ps))
    for call in ("staged", "cached"):  # the first call stages the program, the second reuses it
        x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 4, (9,))
        loss, gs = step(x, y)
        model.zero_grad()
        reference = F.cross_entropy(model(x), y)
        reference.backward()
        errors = [(loss - reference).abs()] + [(gs[p] - p.grad).abs().max() for p in ps]
        close(torch.stack(errors), torch.zeros(()), f"zt.compile step ({call}): loss and {len(ps)} gradients")


def check_kernel_ops(expect_kernels: bool):
    loaded = zt.ops.available()["cpu"]
    assert loaded == expect_kernels, f"compiled CPU kernels loaded: {loaded}, expected {expect_kernels}"
    how = "compiled kernel" if loaded else "pure torch"
    logits = torch.randn(64, 1000, requires_grad=True)
    target = torch.randint(0, 1000, (64,))
    with torch.no_grad():
        loss, lse = zt.ops.cross_entropy_forward(logits, target)
        dlogits = zt.ops.cross_entropy_backward(torch.tensor(1.0), logits, target, lse)
    reference = F.cross_entropy(logits, target)
    (dreference,) = torch.autograd.grad(reference, logits)
    close(loss, reference.detach(), f"cross_entropy forward ({how})", tol=1e-5)
    close(dlogits, dreference, f"cross_entropy backward ({how})", tol=1e-5)
    x = torch.randn(128, 256, requires_grad=True)
    dy = torch.randn(128, 256)
    (dref,) = torch.autograd.grad(F.gelu(x), x, dy)
    with torch.no_grad():
        close(zt.ops.gelu_backward(dy, x), dref, f"gelu backward ({how})", tol=1e-5)
    if loaded:
        direct = torch.ops.zygote_torch.gelu_bwd(dy, x.detach(), "none")
        close(direct, dref, "torch.ops.zygote_torch.gelu_bwd", tol=1e-5)


FRESH = """
import torch, zygote_torch as zt
x = torch.randn(64, 1000); t = torch.randint(0, 1000, (64,))
for _ in range(3):
    zt.ops.cross_entropy_forward(x, t)
    zt.gradient(lambda x: torch.nn.functional.cross_entropy(x, t), x)
"""


def check_warning(expect_kernels: bool):
    env = {k: v for k, v in os.environ.items() if k not in ("ZYGOTE_TORCH_NO_EXT", "PYTHONWARNINGS")}
    run = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    said = run.stderr.count("KernelsNotBuiltWarning")
    expected = 0 if expect_kernels else 1
    assert said == expected, f"'kernels not built' said {said} times, expected {expected}:\n{run.stderr}"
    if not expect_kernels:
        assert "pip install --no-build-isolation" in run.stderr and "ZYGOTE_TORCH_BUILD=1" in run.stderr
        print("  a fresh import says once: " + next(l for l in run.stderr.splitlines() if "KernelsNotBuilt" in l)[:160] + " ...")
    else:
        print("  a fresh import warns of nothing")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--kernels", action="store_true", help="the compiled CPU kernels must be loaded")
    kind.add_argument("--no-kernels", action="store_true", help="a pure-Python install: no kernels, one warning")
    args = p.parse_args()
    check_install()
    check_gradient()
    check_compiled_step()
    check_kernel_ops(args.kernels)
    check_warning(args.kernels)
    print("smoke test: OK")


if __name__ == "__main__":
    main()
