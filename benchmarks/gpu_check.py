"""One command for a GPU machine: build, check and time the CUDA ops of zygote_torch.ops.

    python benchmarks/gpu_check.py --out benchmarks/ops_gpu.md

1. Builds the extension in place (``setup.py build_ext --inplace``, CUDA part only, for this GPU's
   architecture) unless a loadable ``zygote_torch/_C_cuda*.so`` is already there (--rebuild forces).
2. Correctness: every CUDA op against the pure-torch formula in float64 and against eager
   torch.autograd in float32 / bfloat16 (our error vs the float64 truth must be no worse than
   twice eager's, plus a small floor), on random inputs with odd sizes, misaligned and
   non-contiguous inputs, after poisoning the allocator's cache with NaN (an element a kernel
   forgets to write shows up as NaN).
3. Speed, at the anchor sizes (cross-entropy 8192x32768; layer_norm, rms_norm, softmax, ... 16384x4096;
   bf16 and fp32): median time over CUDA events, achieved GB/s = bytes that must move / time,
   against a device-to-device copy (``torch.empty_like(x).copy_(x)``) of the op's main tensor
   measured in the same run, and the speedup over eager's backward (torch.autograd of the same op).
   Target: the bandwidth-bound backward ops at >= 85% of copy bandwidth.

Prints the tables and writes them as markdown to --out. Exit status 1 if a correctness check fails.
Runs in about a minute after the build (which takes one or two).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET = 0.85


def _loads_cuda_ext() -> bool:
    code = "import zygote_torch.ops as z, sys; sys.exit(0 if z.available()['cuda'] else 1)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode == 0


def build(force: bool) -> str:
    import torch
    if not force and glob.glob(os.path.join(ROOT, "zygote_torch", "_C_cuda*.so")) and _loads_cuda_ext():
        return "prebuilt extension loaded"
    cap = torch.cuda.get_device_capability()
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{cap[0]}.{cap[1]}")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    env["ZYGOTE_TORCH_CUDA_ONLY"] = "1"
    t0 = time.time()
    print(f"building the CUDA extension (TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}) ...", flush=True)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    log = r.stdout + r.stderr
    ok = r.returncode == 0 and _loads_cuda_ext()
    print(f"build {'ok' if ok else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
    if not ok:
        print(log[-6000:])
    return f"built in {time.time() - t0:.0f} s" if ok else "build FAILED"


# ---------------------------------------------------------------------------------------------
# correctness

def poison():
    """Fill the caching allocator's free blocks with NaN (large pool and small pool)."""
    import torch
    if not torch.cuda.is_available():  # (--dry-run-cpu)
        return
    free, _ = torch.cuda.mem_get_info()
    big = torch.full((min(2 << 30, free // 4) // 4,), float("nan"), device="cuda")
    small = [torch.full((k,), float("nan"), device="cuda") for k in (64, 1024, 8192, 65536, 131072) for _ in range(4)]
    del big, small


class Checker:
    def __init__(self):
        self.rows = []
        self.failed = 0

    def compare(self, name, case, dtype, got, truth, eager=None, tol=None):
        """got/eager vs truth (float64). Pass: finite where truth is, and err(got) <= 2 err(eager) +
        floor (floor = tol * max(1, |truth|_max)); float64: err <= tol * max(1, |truth|_max)."""
        import torch
        got_l = got if isinstance(got, (list, tuple)) else [got]
        tr_l = truth if isinstance(truth, (list, tuple)) else [truth]
        ea_l = (eager if isinstance(eager, (list, tuple)) else [eager]) if eager is not None else [None] * len(got_l)
        ok, e_ours, e_eager = True, 0.0, 0.0
        for g, t, e in zip(got_l, tr_l, ea_l):
            if g is None and t is None:
                continue
            g, t = g.double(), t.double()
            if g.shape != t.shape:
                ok = False
                continue
            fin = torch.isfinite(t)
            if not torch.equal(torch.isfinite(g), fin):
                ok = False
            scale = max(1.0, t[fin].abs().max().item()) if fin.any() else 1.0
            err = (g - t)[fin].abs().max().item() if fin.any() else 0.0
            e_ours = max(e_ours, err / scale)
            if e is not None:
                ee = (e.double() - t)[fin].abs().max().item() if fin.any() else 0.0
                e_eager = max(e_eager, ee / scale)
        if tol is None:
            tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        bound = tol + (2 * e_eager if eager is not None else 0.0)
        ok = ok and e_ours <= bound
        self.failed += not ok
        self.rows.append((name, case, str(dtype).replace("torch.", ""), f"{e_ours:.2e}",
                          f"{e_eager:.2e}" if eager is not None else "-", "ok" if ok else "FAIL"))
        if not ok:
            print(f"  FAIL {name} {case} {dtype}: err {e_ours:.3e} (eager {e_eager:.3e}, bound {bound:.3e})",
                  flush=True)


def misaligned(t):
    """A contiguous copy of t whose data pointer is one element past a 16-byte boundary."""
    import torch
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    return v


def noncontig(t):
    import torch
    buf = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    v = buf[..., ::2]
    v.copy_(t)
    return v


def autograd(f, inputs, dy):
    import torch
    xs = [i.detach().requires_grad_() if i is not None else None for i in inputs]
    y = f(*xs)
    gs = torch.autograd.grad(y, [x for x in xs if x is not None], dy)
    return y.detach(), list(gs)


def check_all(ck: Checker, dev="cuda"):
    import torch
    import torch.nn.functional as F
    import zygote_torch.ops as zo
    from zygote_torch.ops import reference as ref
    f64 = torch.float64
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*shape, dtype=f64, scale=1.0):
        return (torch.randn(*shape, device=dev, dtype=f64, generator=g) * scale).to(dtype)

    layouts = {"contig": lambda t: t, "misaligned": misaligned, "noncontig": noncontig}

    # cross-entropy
    for (n, c) in [(1, 1), (37, 1001), (13, 4096), (8, 32008), (5, 50257)]:
        for layout in ("contig", "misaligned", "noncontig") if n > 1 else ("contig",):
            for red, eps in (("mean", 0.0), ("sum", 0.1), ("none", 0.0)):
                x64 = rn(n, c, scale=3.0)
                t = torch.randint(0, c, (n,), device=dev, generator=g)
                if n > 2:
                    t[1] = -100
                dl = torch.rand(n if red == "none" else (), device=dev, dtype=f64, generator=g) + 0.5
                case = f"{n}x{c} {layout} {red} eps={eps}"
                truth_l, (truth_g,) = autograd(lambda a: F.cross_entropy(a, t, reduction=red, label_smoothing=eps),
                                               [x64], dl)
                for dtype in (f64, torch.float32, torch.bfloat16):
                    x = layouts[layout](x64.to(dtype))
                    poison()
                    loss, lse = zo.cross_entropy_forward(x, t, -100, eps, red)
                    dx = zo.cross_entropy_backward(dl.to(dtype), x, t, lse, -100, eps, red)
                    if dtype == f64:
                        rl, rlse = ref.cross_entropy_forward(x, t, -100, eps, red)
                        rdx = ref.cross_entropy_backward(dl, x, t, rlse, -100, eps, red)
                        ck.compare("cross_entropy", case, dtype, [loss, lse, dx], [rl, rlse, rdx])
                    else:
                        el, (eg,) = autograd(lambda a: F.cross_entropy(a, t, reduction=red, label_smoothing=eps),
                                             [x.clone()], dl.to(dtype))
                        ck.compare("cross_entropy", case, dtype, [loss, dx], [truth_l, truth_g], [el, eg])

    # linear + cross-entropy (chunked)
    for dtype in (f64, torch.float32, torch.bfloat16):
        x, w, b = rn(300, 64, dtype=dtype), rn(1000, 64, dtype=dtype, scale=0.2), rn(1000, dtype=dtype)
        t = torch.randint(0, 1000, (300,), device=dev, generator=g)
        t[7] = -100
        poison()
        ins = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
        loss = zo.linear_cross_entropy(*ins, t, -100, 0.1, "mean", 64)
        got = [loss.detach()] + list(torch.autograd.grad(loss, ins))
        tl, tg = autograd(lambda p, q, r: F.cross_entropy(F.linear(p, q, r), t, label_smoothing=0.1),
                          [x.double(), w.double(), b.double()], torch.tensor(1.0, device=dev, dtype=f64))
        if dtype == f64:
            ck.compare("linear_cross_entropy", "300x64 @ 1000 chunk=64", dtype, got, [tl] + tg)
        else:
            el, eg = autograd(lambda p, q, r: F.cross_entropy(F.linear(p, q, r), t, label_smoothing=0.1),
                              [x, w, b], torch.tensor(1.0, device=dev, dtype=dtype))
            ck.compare("linear_cross_entropy", "300x64 @ 1000 chunk=64", dtype, got, [tl] + tg, [el] + eg,
                       tol=2e-2 if dtype == torch.bfloat16 else 1e-4)

    # layer_norm, rms_norm
    for (m, n) in [(1, 1), (33, 4095), (64, 4096), (1000, 64), (7, 20000), (3, 40000)]:
        for layout in ("contig", "misaligned", "noncontig") if m > 1 else ("contig",):
            x64, dy64, w64, b64 = rn(m, n, scale=2.0) + 0.3, rn(m, n), rn(n), rn(n)
            for affine in (True, False):
                case = f"{m}x{n} {layout} {'affine' if affine else 'plain'}"
                p64 = [w64, b64] if affine else []
                _, tg = autograd(lambda a, *p: F.layer_norm(a, (n,), *p), [x64] + p64, dy64)
                _, tgr = autograd(lambda a, *p: F.rms_norm(a, (n,), *p[:1], eps=1e-6), [x64] + p64[:1], dy64)
                for dtype in (f64, torch.float32, torch.bfloat16):
                    x, dy = layouts[layout](x64.to(dtype)), layouts[layout](dy64.to(dtype))
                    w, b = (w64.to(dtype), b64.to(dtype)) if affine else (None, None)
                    _, mean, rstd = torch.native_layer_norm(x, (n,), w, b, 1e-5)
                    poison()
                    dx, dw, db = zo.layer_norm_backward(dy, x, mean, rstd, w, normalized_shape=(n,))
                    got = [dx] + ([dw, db] if affine else [])
                    poison()
                    rdx, rdw = zo.rms_norm_backward(dy, x, (n,), w, 1e-6)
                    gotr = [rdx] + ([rdw] if affine else [])
                    if dtype == f64:
                        r = ref.layer_norm_backward(dy, x, mean, rstd, w, m, n)
                        ck.compare("layer_norm_bwd", case, dtype, got, [r[0]] + ([r[1], r[2]] if affine else []))
                        rr = ref.rms_norm_backward(dy, x, None, w, 1e-6, m, n)
                        ck.compare("rms_norm_bwd", case, dtype, gotr, [rr[0]] + ([rr[1]] if affine else []))
                    else:
                        p = [w, b] if affine else []
                        _, eg = autograd(lambda a, *q: F.layer_norm(a, (n,), *q), [x] + p, dy)
                        ck.compare("layer_norm_bwd", case, dtype, got, tg, eg)
                        _, egr = autograd(lambda a, *q: F.rms_norm(a, (n,), *q[:1], eps=1e-6), [x] + p[:1], dy)
                        ck.compare("rms_norm_bwd", case, dtype, gotr, tgr, egr)

    # softmax, log_softmax
    for (m, n) in [(1, 1), (33, 4095), (64, 4096), (5, 20000), (3, 70000), (700, 33)]:
        for layout in ("contig", "misaligned", "noncontig") if m > 1 else ("contig",):
            x64, dy64 = rn(m, n, scale=2.0), rn(m, n)
            for log in (False, True):
                f = torch.log_softmax if log else torch.softmax
                op = zo.log_softmax_backward if log else zo.softmax_backward
                rop = ref.log_softmax_backward if log else ref.softmax_backward
                name = "log_softmax_bwd" if log else "softmax_bwd"
                case = f"{m}x{n} {layout}"
                _, tg = autograd(lambda a: f(a, -1), [x64], dy64)
                for dtype in (f64, torch.float32, torch.bfloat16):
                    y = layouts[layout](f(x64.to(dtype), -1))
                    dy = layouts[layout](dy64.to(dtype))
                    poison()
                    dx = op(dy, y, -1)
                    if dtype == f64:
                        ck.compare(name, case, dtype, dx, rop(dy, y, -1))
                    else:
                        _, eg = autograd(lambda a: f(a, -1), [x64.to(dtype)], dy)
                        ck.compare(name, case, dtype, dx, tg, eg)

    # elementwise
    for numel in (1, 1001, 4096 * 64 + 3):
        for layout in ("contig", "misaligned") if numel > 1 else ("contig",):
            a64, b64, dy64 = rn(numel, scale=3.0), rn(numel), rn(numel)
            case = f"{numel} {layout}"
            for dtype in (f64, torch.float32, torch.bfloat16):
                a, b, dy = (layouts[layout](v.to(dtype)) for v in (a64, b64, dy64))
                for appr in ("none", "tanh"):
                    poison()
                    got = zo.gelu_backward(dy, a, appr)
                    _, tg = autograd(lambda v: F.gelu(v, approximate=appr), [a64], dy64)
                    if dtype == f64:
                        ck.compare(f"gelu_bwd[{appr}]", case, dtype, got, ref.gelu_backward(dy, a, appr))
                    else:
                        _, eg = autograd(lambda v: F.gelu(v, approximate=appr), [a], dy)
                        ck.compare(f"gelu_bwd[{appr}]", case, dtype, got, tg, eg)
                poison()
                got = zo.silu_backward(dy, a)
                _, tg = autograd(F.silu, [a64], dy64)
                poison()
                y = zo.swiglu_forward(a, b)
                poison()
                da, db = zo.swiglu_backward(dy, a, b)
                ty, tgs = autograd(lambda p, q: F.silu(p) * q, [a64, b64], dy64)
                if dtype == f64:
                    ck.compare("silu_bwd", case, dtype, got, ref.silu_backward(dy, a))
                    ck.compare("swiglu_fwd", case, dtype, y, ref.swiglu_forward(a, b))
                    ck.compare("swiglu_bwd", case, dtype, [da, db], list(ref.swiglu_backward(dy, a, b)))
                else:
                    _, eg = autograd(F.silu, [a], dy)
                    ck.compare("silu_bwd", case, dtype, got, tg, eg)
                    ey, egs = autograd(lambda p, q: F.silu(p) * q, [a, b], dy)
                    ck.compare("swiglu_fwd", case, dtype, y, ty, ey)
                    ck.compare("swiglu_bwd", case, dtype, [da, db], tgs, egs)

    # embedding
    for (n, v, d, pad) in [(1, 1, 1, None), (1000, 50, 33, 3), (4096, 32000, 256, None), (300, 7, 4096, -1)]:
        idx = torch.randint(0, v, (n,), device=dev, generator=g)
        dy64 = rn(n, d)
        w64 = rn(v, d)
        _, (tg,) = autograd(lambda w: F.embedding(idx, w, padding_idx=pad), [w64], dy64)
        for dtype in (f64, torch.float32, torch.bfloat16):
            dy = dy64.to(dtype)
            poison()
            got = zo.embedding_backward(dy, idx, v, pad)
            again = zo.embedding_backward(dy, idx, v, pad)
            case = f"n={n} V={v} D={d} pad={pad}"
            if not torch.equal(got, again):
                ck.failed += 1
                ck.rows.append(("embedding_bwd", case + " deterministic", str(dtype), "-", "-", "FAIL"))
            if dtype == f64:
                ck.compare("embedding_bwd", case, dtype, got,
                           ref.embedding_backward(dy, idx, v, None if pad is None else pad % v))
            else:
                _, (eg,) = autograd(lambda w: F.embedding(idx, w, padding_idx=pad), [w64.to(dtype)], dy)
                ck.compare("embedding_bwd", case, dtype, got, tg, eg)
    if dev == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# speed

def timed(fn, reps=20, warmup=3):
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    evs = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        evs.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in evs)  # ms


def bench_all(quick=False):
    import torch
    import torch.nn.functional as F
    import zygote_torch.ops as zo
    dev = "cuda"
    rows, tune = [], []
    reps = 10 if quick else 20

    def copy_gbps(x):
        t = timed(lambda: torch.empty_like(x).copy_(x), reps)
        return 2 * x.numel() * x.element_size() / t / 1e6

    def row(name, dtype, shape, bytes_, t_ours, t_eager, copy, bound=True):
        gbps = bytes_ / t_ours / 1e6
        frac = gbps / copy
        rows.append(dict(op=name, dtype=str(dtype).replace("torch.", ""), shape=shape, ours_ms=t_ours,
                         gbps=gbps, copy_gbps=copy, frac=frac, eager_ms=t_eager, speedup=t_eager / t_ours,
                         target=("ok" if frac >= TARGET else "MISS") if bound else "-"))
        print(f"  {name:22s} {rows[-1]['dtype']:8s} {shape:12s} {t_ours:7.3f} ms {gbps:7.0f} GB/s "
              f"{100 * frac:5.1f}% of copy  eager {t_eager:7.3f} ms  x{t_eager / t_ours:4.2f}", flush=True)

    def grad_timer(y, inputs, dy):
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)

    for dtype in (torch.bfloat16, torch.float32):
        es = torch.tensor([], dtype=dtype).element_size()
        # cross-entropy 8192 x 32768
        n, c = 8192, 32768
        x = torch.randn(n, c, device=dev, dtype=dtype) * 3
        t = torch.randint(0, c, (n,), device=dev)
        cp = copy_gbps(x)
        loss, lse = zo.cross_entropy_forward(x, t)
        one = torch.ones((), device=dev, dtype=dtype)
        t_ours = timed(lambda: zo.cross_entropy_backward(one, x, t, lse), reps)
        xr = x.clone().requires_grad_()
        yl = F.cross_entropy(xr, t)
        t_eager = timed(grad_timer(yl, [xr], one), reps)
        row("cross_entropy_bwd", dtype, f"{n}x{c}", 2 * x.numel() * es, t_ours, t_eager, cp)
        t_ours = timed(lambda: zo.cross_entropy_forward(x, t), reps)
        t_eager = timed(lambda: F.cross_entropy(x, t), reps)
        row("cross_entropy_fwd", dtype, f"{n}x{c}", x.numel() * es, t_ours, t_eager, cp, bound=False)
        del x, xr, yl, loss, lse
        torch.cuda.empty_cache()

        # norms, softmax, elementwise: 16384 x 4096
        m, k = 16384, 4096
        shape = f"{m}x{k}"
        x, dy = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(m, k, device=dev, dtype=dtype)
        w, b = torch.randn(k, device=dev, dtype=dtype), torch.randn(k, device=dev, dtype=dtype)
        cp = copy_gbps(x)
        nb3 = 3 * x.numel() * es
        _, mean, rstd = torch.native_layer_norm(x, (k,), w, b, 1e-5)
        t_ours = timed(lambda: zo.layer_norm_backward(dy, x, mean, rstd, w), reps)
        xr, wr, br = (v.clone().requires_grad_() for v in (x, w, b))
        y = F.layer_norm(xr, (k,), wr, br)
        t_eager = timed(grad_timer(y, [xr, wr, br], dy), reps)
        row("layer_norm_bwd", dtype, shape, nb3, t_ours, t_eager, cp)
        for tps in (512, 2048):
            os.environ["ZYGOTE_TORCH_NORM_THREADS_PER_SM"] = str(tps)
            tt = timed(lambda: zo.layer_norm_backward(dy, x, mean, rstd, w), reps)
            tune.append(("layer_norm_bwd", str(dtype).replace("torch.", ""), tps, tt, nb3 / tt / 1e6 / cp))
        os.environ.pop("ZYGOTE_TORCH_NORM_THREADS_PER_SM", None)

        rs = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
        t_ours = timed(lambda: zo.rms_norm_backward(dy, x, (k,), w, 1e-6, rs), reps)
        y = F.rms_norm(xr, (k,), wr, 1e-6)
        t_eager = timed(grad_timer(y, [xr, wr], dy), reps)
        row("rms_norm_bwd", dtype, shape, nb3, t_ours, t_eager, cp)
        t_ours = timed(lambda: zo.rms_norm_backward(dy, x, (k,), w, 1e-6), reps)
        row("rms_norm_bwd (no rstd)", dtype, shape, nb3, t_ours, t_eager, cp)

        for log in (False, True):
            f = torch.log_softmax if log else torch.softmax
            ys = f(x, -1)
            op = zo.log_softmax_backward if log else zo.softmax_backward
            t_ours = timed(lambda: op(dy, ys, -1), reps)
            y = f(xr, -1)
            t_eager = timed(grad_timer(y, [xr], dy), reps)
            row("log_softmax_bwd" if log else "softmax_bwd", dtype, shape, nb3, t_ours, t_eager, cp)

        for appr in ("none", "tanh"):
            t_ours = timed(lambda: zo.gelu_backward(dy, x, appr), reps)
            y = F.gelu(xr, approximate=appr)
            t_eager = timed(grad_timer(y, [xr], dy), reps)
            row(f"gelu_bwd[{appr}]", dtype, shape, nb3, t_ours, t_eager, cp)
        t_ours = timed(lambda: zo.silu_backward(dy, x), reps)
        y = F.silu(xr)
        t_eager = timed(grad_timer(y, [xr], dy), reps)
        row("silu_bwd", dtype, shape, nb3, t_ours, t_eager, cp)
        bb = torch.randn(m, k, device=dev, dtype=dtype)
        t_ours = timed(lambda: zo.swiglu_backward(dy, x, bb), reps)
        bbr = bb.clone().requires_grad_()
        y = F.silu(xr) * bbr
        t_eager = timed(grad_timer(y, [xr, bbr], dy), reps)
        row("swiglu_bwd", dtype, shape, 5 * x.numel() * es, t_ours, t_eager, cp)

        # embedding: 16384 tokens, vocab 32768, dim 1024 (not bandwidth-bound in the same sense)
        nt, v, d = 16384, 32768, 1024
        idx = torch.randint(0, v, (nt,), device=dev)
        dye = torch.randn(nt, d, device=dev, dtype=dtype)
        t_ours = timed(lambda: zo.embedding_backward(dye, idx, v), reps)
        we = torch.randn(v, d, device=dev, dtype=dtype, requires_grad=True)
        y = F.embedding(idx, we)
        t_eager = timed(grad_timer(y, [we], dye), reps)
        row("embedding_bwd", dtype, f"{nt}->{v}x{d}", (nt * d + v * d) * es + nt * 8, t_ours, t_eager, cp,
            bound=False)
        del x, dy, xr, y, bb, bbr, ys, dye, we
        torch.cuda.empty_cache()
    return rows, tune


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the report (markdown) here")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the extension even if one loads")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="run the correctness checks on the CPU kernels (tests this script without a GPU)")
    args = ap.parse_args()
    t_start = time.time()

    import torch
    if args.dry_run_cpu:
        import zygote_torch.ops as zo
        ck = Checker()
        check_all(ck, "cpu")
        print(f"dry run on CPU ({zo.available()}): {len(ck.rows) - ck.failed} passed, {ck.failed} failed "
              f"({time.time() - t_start:.0f} s)")
        sys.exit(1 if ck.failed else 0)
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    build_note = build(args.rebuild)
    import zygote_torch.ops as zo
    from zygote_torch.ops import _loader
    if not zo.available()["cuda"]:
        sys.exit(f"gpu_check: the CUDA extension is not loaded ({build_note}; {_loader.ERRORS})")

    dev_name = torch.cuda.get_device_name()
    head = [f"# zygote_torch custom ops on {dev_name}", "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- device: {dev_name} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
            f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}",
            f"- extension: {_loader.MODULE} ({build_note})",
            f"- command: `python benchmarks/gpu_check.py{' --out ' + args.out if args.out else ''}`", ""]
    print("\n".join(head), flush=True)

    print("correctness ...", flush=True)
    t0 = time.time()
    ck = Checker()
    check_all(ck)
    n_ok = len(ck.rows) - ck.failed
    print(f"correctness: {n_ok} passed, {ck.failed} failed ({time.time() - t0:.0f} s)", flush=True)
    md = head + [f"## Correctness: {n_ok} passed, {ck.failed} failed", "",
                 "Errors: max |ours - truth| / max(1, max |truth|), truth = float64 (the pure-torch formula for "
                 "float64 inputs, torch.autograd in float64 otherwise); eager = torch.autograd in the same dtype.",
                 "Outputs poisoned with NaN beforehand.", "",
                 "| op | case | dtype | err ours | err eager | |", "|---|---|---|---|---|---|"]
    fails = [r for r in ck.rows if r[-1] != "ok"]
    md += [f"| {' | '.join(r)} |" for r in fails]
    # one summary line per (op, dtype): the worst case
    worst = {}
    for r in ck.rows:
        key = (r[0], r[2])
        if r[3] != "-" and (key not in worst or float(r[3]) > float(worst[key][3])):
            worst[key] = r
    md += [f"| {r[0]} | worst: {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} |" for r in worst.values()]
    md.append("")

    if not args.skip_bench:
        print("speed ...", flush=True)
        rows, tune = bench_all(args.quick)
        md += ["## Speed", "",
               f"Median of CUDA-event timings. GB/s = bytes that must move / time; copy = "
               f"`torch.empty_like(x).copy_(x)` of the op's main tensor in the same run; target {TARGET:.0%} of copy "
               "for the bandwidth-bound backward ops; speedup over eager's backward (torch.autograd of the same op).",
               "", "| op | dtype | shape | ours ms | GB/s | copy GB/s | % of copy | eager ms | speedup | target |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['op']} | {r['dtype']} | {r['shape']} | {r['ours_ms']:.3f} | {r['gbps']:.0f} | "
                      f"{r['copy_gbps']:.0f} | {100 * r['frac']:.1f}% | {r['eager_ms']:.3f} | "
                      f"{r['speedup']:.2f}x | {r['target']} |")
        md += ["", "layer_norm_bwd with other ZYGOTE_TORCH_NORM_THREADS_PER_SM (default 1024):", "",
               "| op | dtype | threads/SM | ms | % of copy |", "|---|---|---|---|---|"]
        md += [f"| {a} | {b} | {c} | {d:.3f} | {100 * e:.1f}% |" for a, b, c, d, e in tune]
        miss = [r for r in rows if r["target"] == "MISS"]
        md += ["", f"Bandwidth target: {len(miss)} of {sum(r['target'] != '-' for r in rows)} rows below "
                   f"{TARGET:.0%}" + (": " + ", ".join(f"{r['op']} {r['dtype']}" for r in miss) if miss else "."), ""]
        print("\n".join(md[-3:]))
    md.append(f"Total time of this check: {time.time() - t_start:.0f} s.")
    text = "\n".join(md) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    sys.exit(1 if ck.failed else 0)


if __name__ == "__main__":
    main()
