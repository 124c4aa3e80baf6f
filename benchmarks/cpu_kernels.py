"""CPU speed of the fused custom ops (csrc/ops_cpu*.cpp) against torch's own eager CPU kernels.

    OMP_NUM_THREADS=1 python benchmarks/cpu_kernels.py                   # 1 and 2 threads, all ops
    OMP_NUM_THREADS=1 python benchmarks/cpu_kernels.py --threads 1 --ops softmax,gelu --out t.md
    OMP_NUM_THREADS=1 python benchmarks/cpu_kernels.py --quick           # small sizes, few repeats

Each row times what a rule would call: ours is the ``zygote_torch.ops`` function (Python wrapper
plus the compiled kernel), torch's is the aten kernel eager autograd runs for the same pullback:

| op | ours | torch |
|---|---|---|
| cross_entropy fwd+bwd | ops.cross_entropy_forward + _backward | log_softmax + nll_loss_forward + nll_loss_backward + _log_softmax_backward_data |
| cross_entropy_fwd | ops.cross_entropy_forward | log_softmax + nll_loss_forward |
| cross_entropy_bwd | ops.cross_entropy_backward | nll_loss_backward + _log_softmax_backward_data |
| layer_norm_bwd | ops.layer_norm_backward | native_layer_norm_backward (dx, dw, db) |
| rms_norm_bwd | ops.rms_norm_backward (saved rstd) | autograd of F.rms_norm (no CPU backward kernel in aten) |
| softmax_bwd / log_softmax_bwd | ops.(log_)softmax_backward | _(log_)softmax_backward_data |
| gelu_bwd[none/tanh] | ops.gelu_backward | gelu_backward |
| silu_bwd | ops.silu_backward | silu_backward |
| swiglu_bwd | ops.swiglu_backward | silu_backward(dy * b, a), dy * silu(a) |
| embedding_bwd | ops.embedding_backward | embedding_dense_backward |

Both results are compared (at the dtype's tolerance) before timing. Timing: the two functions
alternate (ours, torch, torch, ours, ...), each sample is the mean of enough calls to last about
``--min-ms``; the table gives the medians and ratio = ours / torch (< 1: ours is faster).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import zygote_torch.ops as zo  # noqa: E402

aten = torch.ops.aten
TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _close(a, b, dtype, what):
    a, b = a.double(), b.double()
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    if not err <= TOL[dtype] * scale:
        raise AssertionError(f"{what}: ours and torch's disagree, max abs err {err:.3g} (scale {scale:.3g})")


# ---------------------------------------------------------------------------------------------
# the cases: (op, shape string, ours(), torch(), check())

def case_cross_entropy(dtype, n, c, part):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(n, c, generator=g)).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[::17] = -100
    one = torch.ones((), dtype=dtype)

    def ours_fwd():
        return zo.cross_entropy_forward(x, t, -100, 0.0, "mean")

    loss, lse = ours_fwd()

    def ours_bwd():
        return zo.cross_entropy_backward(one, x, t, lse, -100, 0.0, "mean")

    def torch_fwd():
        logp = torch.log_softmax(x, 1)
        return logp, aten.nll_loss_forward(logp, t, None, 1, -100)

    logp, (tloss, tw) = torch_fwd()

    def torch_bwd():
        dlogp = aten.nll_loss_backward(one, logp, t, None, 1, -100, tw)
        return aten._log_softmax_backward_data(dlogp, logp, 1, x.dtype)

    def ours_both():
        loss, lse = zo.cross_entropy_forward(x, t, -100, 0.0, "mean")
        return zo.cross_entropy_backward(one, x, t, lse, -100, 0.0, "mean")

    def torch_both():
        logp = torch.log_softmax(x, 1)
        l, w = aten.nll_loss_forward(logp, t, None, 1, -100)
        dlogp = aten.nll_loss_backward(one, logp, t, None, 1, -100, w)
        return aten._log_softmax_backward_data(dlogp, logp, 1, x.dtype)

    def check():
        _close(loss, tloss, dtype, "cross_entropy loss")
        _close(ours_bwd(), torch_bwd(), dtype, "cross_entropy dlogits")

    return {"fwd+bwd": (ours_both, torch_both), "fwd": (ours_fwd, torch_fwd), "bwd": (ours_bwd, torch_bwd)}[part], check


def _rows(dtype, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, n, generator=g) * 2 + 0.5).to(dtype), torch.randn(m, n, generator=g).to(dtype)


def case_layer_norm(dtype, m, n):
    x, dy = _rows(dtype, m, n)
    w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    _, mean, rstd = aten.native_layer_norm(x, [n], w, b, 1e-5)

    def ours():
        return zo.layer_norm_backward(dy, x, mean, rstd, w, (n,))

    def theirs():
        return aten.native_layer_norm_backward(dy, x, [n], mean, rstd, w, b, [True, True, True])

    def check():  # against torch in float32 (its bfloat16 dw, db are summed in bfloat16)
        f = [t.to(_acc(dtype)) for t in (dy, x, w, b, mean, rstd)]
        want = aten.native_layer_norm_backward(f[0], f[1], [n], f[4], f[5], f[2], f[3], [True, True, True])
        for a, r, what in zip(ours(), want, ("dx", "dw", "db")):
            _close(a, r, dtype, f"layer_norm {what}")

    return (ours, theirs), check


def case_rms_norm(dtype, m, n):
    """torch has no CPU rms_norm backward kernel (F.rms_norm is composite): its eager backward is
    autograd through the decomposition, timed with a retained graph."""
    x, dy = _rows(dtype, m, n)
    w = torch.randn(n).to(dtype)
    eps = 1e-6
    rstd = torch.rsqrt(x.to(_acc(dtype)).pow(2).mean(-1) + eps)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = F.rms_norm(xr, (n,), wr, eps)

    def ours():
        return zo.rms_norm_backward(dy, x, (n,), w, eps, rstd)

    def theirs():
        return torch.autograd.grad(y, (xr, wr), dy, retain_graph=True)

    def check():  # against torch in float32 / float64
        xa, wa = x.to(_acc(dtype), copy=True).requires_grad_(), w.to(_acc(dtype), copy=True).requires_grad_()
        want = torch.autograd.grad(F.rms_norm(xa, (n,), wa, eps), (xa, wa), dy.to(_acc(dtype)))
        for a, r, what in zip(ours(), want, ("dx", "dw")):
            _close(a, r, dtype, f"rms_norm {what}")

    return (ours, theirs), check


def case_softmax(dtype, m, n, log):
    x, dy = _rows(dtype, m, n)
    y = (torch.log_softmax if log else torch.softmax)(x.float(), -1).to(dtype)
    if log:
        ours = lambda: zo.log_softmax_backward(dy, y, -1)  # noqa: E731
        theirs = lambda: aten._log_softmax_backward_data(dy, y, 1, dtype)  # noqa: E731
    else:
        ours = lambda: zo.softmax_backward(dy, y, -1)  # noqa: E731
        theirs = lambda: aten._softmax_backward_data(dy, y, 1, dtype)  # noqa: E731
    return (ours, theirs), lambda: _close(ours(), theirs(), dtype, "softmax_bwd")


def case_gelu(dtype, m, n, approximate):
    x, dy = _rows(dtype, m, n)
    ours = lambda: zo.gelu_backward(dy, x, approximate)  # noqa: E731
    theirs = lambda: aten.gelu_backward(dy, x, approximate=approximate)  # noqa: E731
    return (ours, theirs), lambda: _close(ours(), theirs(), dtype, "gelu_bwd")


def case_silu(dtype, m, n):
    x, dy = _rows(dtype, m, n)
    ours = lambda: zo.silu_backward(dy, x)  # noqa: E731
    theirs = lambda: aten.silu_backward(dy, x)  # noqa: E731
    return (ours, theirs), lambda: _close(ours(), theirs(), dtype, "silu_bwd")


def case_swiglu(dtype, m, n):
    a, dy = _rows(dtype, m, n)
    b = torch.randn(m, n).to(dtype)

    def ours():
        return zo.swiglu_backward(dy, a, b)

    def theirs():  # eager autograd of F.silu(a) * b: mul's backward, then silu's
        return aten.silu_backward(dy * b, a), dy * F.silu(a)

    def check():
        for o, r in zip(ours(), theirs()):
            _close(o, r, dtype, "swiglu_bwd")

    return (ours, theirs), check


def case_embedding(dtype, n, d, num):
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(n, d, generator=g).to(dtype)
    idx = torch.randint(0, num, (n,), generator=g)
    ours = lambda: zo.embedding_backward(dy, idx, num, None)  # noqa: E731
    theirs = lambda: aten.embedding_dense_backward(dy, idx, num, -1, False)  # noqa: E731
    return (ours, theirs), lambda: _close(ours(), theirs(), dtype, "embedding_bwd")


def cases(quick):
    """(op, shape label, factory(dtype)) for the realistic CPU sizes."""
    if quick:
        ce, rows, ew, emb = [(256, 256)], [(512, 128)], [(256, 1024)], [(1024, 128, 256)]
    else:
        ce = [(2048, 256), (1024, 32000)]
        rows = [(4096, 128), (1024, 1024)]
        ew = [(1024, 1024)]
        emb = [(1024, 128, 256), (8192, 512, 32000)]
    out = []
    for part in ("fwd+bwd", "fwd", "bwd"):
        name = "cross_entropy" + ("" if part == "fwd+bwd" else "_" + part)
        if part == "fwd+bwd":
            name = "cross_entropy fwd+bwd"
        for n, c in ce:
            out.append((name, f"{n}x{c}", lambda dt, n=n, c=c, p=part: case_cross_entropy(dt, n, c, p)))
    for m, n in rows:
        out.append(("layer_norm_bwd", f"{m}x{n}", lambda dt, m=m, n=n: case_layer_norm(dt, m, n)))
    for m, n in rows:
        out.append(("rms_norm_bwd", f"{m}x{n}", lambda dt, m=m, n=n: case_rms_norm(dt, m, n)))
    for log in (False, True):
        for m, n in rows:
            out.append(("log_softmax_bwd" if log else "softmax_bwd", f"{m}x{n}",
                        lambda dt, m=m, n=n, lg=log: case_softmax(dt, m, n, lg)))
    for approx in ("none", "tanh"):
        for m, n in ew:
            out.append((f"gelu_bwd[{approx}]", f"{m}x{n}", lambda dt, m=m, n=n, a=approx: case_gelu(dt, m, n, a)))
    for m, n in ew:
        out.append(("silu_bwd", f"{m}x{n}", lambda dt, m=m, n=n: case_silu(dt, m, n)))
        out.append(("swiglu_bwd", f"{m}x{n}", lambda dt, m=m, n=n: case_swiglu(dt, m, n)))
    for n, d, num in emb:
        out.append(("embedding_bwd", f"{n}->{num}x{d}", lambda dt, n=n, d=d, num=num: case_embedding(dt, n, d, num)))
    return out


# ---------------------------------------------------------------------------------------------
# timing

def _sample(f, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        f()
    return (time.perf_counter() - t0) / inner


def time_pair(ours, theirs, repeats, min_s):
    """Medians (s) of interleaved samples of ours and theirs."""
    for f in (ours, theirs):  # warm up (allocator, lazy init)
        f()
        f()
    per = min(_sample(ours, 1), _sample(theirs, 1))
    inner = max(1, int(min_s / max(per, 1e-7)))
    ts = ([], [])
    for r in range(repeats):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            ts[k].append(_sample((ours, theirs)[k], inner))
    return statistics.median(ts[0]), statistics.median(ts[1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (torch.set_num_threads)")
    p.add_argument("--dtypes", default="float32,bfloat16,float64")
    p.add_argument("--ops", default="", help="comma-separated op-name prefixes to run (default: all)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--min-ms", type=float, default=20.0, help="each sample lasts about this long")
    p.add_argument("--float64-all", action="store_true", help="float64 at every size (default: the first size)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", help="also write the markdown report here")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.min_ms = min(a.repeats, 5), min(a.min_ms, 5.0)
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",") if d]
    threads = [int(t) for t in a.threads.split(",") if t]
    wanted = [o for o in a.ops.split(",") if o]

    from zygote_torch.ops import _loader
    if not zo.available()["cpu"]:
        sys.exit(f"the CPU extension is not loaded ({_loader.ERRORS}): nothing to compare")
    mod = sys.modules.get(_loader.MODULE)
    ours_isa = mod.cpu_capability() if hasattr(mod, "cpu_capability") else "(not reported: scalar build)"
    lines = [
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/cpu_kernels.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`  ",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}; torch's CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, ours {ours_isa}.  ",
        f"Medians of {a.repeats} interleaved samples of >= {a.min_ms:g} ms; ratio = ours / torch (< 1: ours faster).",
        "",
        "| op | dtype | shape | threads | ours ms | torch ms | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    for op, shape, make in cases(a.quick):
        if wanted and not any(op.startswith(w) for w in wanted):
            continue
        for dtype in dtypes:
            if dtype == torch.float64 and not a.float64_all and any(r[0] == op and r[1] == torch.float64 for r in rows):
                continue
            (ours, theirs), check = make(dtype)
            check()
            for nt in threads:
                torch.set_num_threads(nt)
                to, tt = time_pair(ours, theirs, a.repeats, a.min_ms / 1e3)
                rows.append((op, dtype, shape, nt, to, tt))
                line = (f"| {op} | {str(dtype).replace('torch.', '')} | {shape} | {nt} | {to * 1e3:.4f} | "
                        f"{tt * 1e3:.4f} | {to / tt:.2f} |")
                lines.append(line)
                print(line, flush=True)
            del ours, theirs, check
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"written to {a.out}")


if __name__ == "__main__":
    main()
