"""Gradient-step benchmarks: zygote_torch (dynamic and staged) against eager autograd, torch.func
and torch.compile, measured in one process, interleaved, medians.

    python benchmarks/bench.py                       # CPU: mlp, gpt, cnn
    python benchmarks/bench.py --device cuda         # GPU sizes (GPT 6x768, T 512, bf16 autocast)
    python benchmarks/bench.py --quick               # a short run (CI smoke)
    python benchmarks/bench.py --workloads hf-gpt2,hf-llama --module   # Hugging Face models (hf_zoo.py)

Every method's gradients are checked against eager autograd before it is timed. A step computes the
loss and the gradient of every parameter (no optimizer update). Columns: median step time and its
ratio to eager; peak memory of a step (CUDA: max_memory_allocated; CPU: peak live bytes allocated
during the step, from the profiler) and its ratio; time to first gradient (a fresh object's first
call: tracing, transformation, code generation or compilation).
"""
from __future__ import annotations

import argparse
import contextlib
import os

# torch.compile's time to first gradient is measured cold: no inductor caches from earlier runs
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import models  # noqa: E402

import zygote_torch as zt  # noqa: E402


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(w, device):
    return torch.autocast(device, dtype=w.autocast) if w.autocast else contextlib.nullcontext()


def methods(w, device, with_torch_compile=True, cuda_graphs=False, with_module=False):
    """name -> factory(); factory() -> step(), step() -> {param name: gradient}."""
    model, (x, y), loss = w.model, w.inputs, w.loss
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]

    def backward_step(module):
        """A step of the usual PyTorch loop through ``module``: loss.backward(), then the .grad's."""
        def step():
            for p in params:
                p.grad = None
            with _autocast(w, device):
                out = loss(w.forward(module, x), y)
            out.backward()
            return {n: p.grad for n, p in zip(names, params)}
        return step

    def eager():
        return backward_step(model)

    def func_grad():
        grad = torch.func.grad(lambda ps: loss(torch.func.functional_call(model, ps, *w.arguments(x)), y))

        def step():
            with _autocast(w, device):
                return grad({n: p.detach() for n, p in zip(names, params)})
        return step

    def compiled(mode=None):
        torch._dynamo.reset()
        return backward_step(torch.compile(model, mode=mode))

    ps = zt.Params(model)

    def zt_dynamic():
        def step():
            with _autocast(w, device):
                gs = zt.gradient(lambda: loss(w.forward(model, x), y), ps)
            return {n: gs[p] for n, p in zip(names, params)}
        return step

    def zt_staged(cuda_graphs=False, backend=None):
        staged = zt.compile(lambda x, y: zt.gradient(lambda: loss(w.forward(model, x), y), ps), cuda_graphs=cuda_graphs,
                            backend=backend)

        def step():
            with _autocast(w, device):
                gs = staged(x, y)
            return {n: gs[p] for n, p in zip(names, params)}
        return step

    def zt_module():
        return backward_step(zt.compile(model))

    out = {"eager": eager, "torch.func.grad": func_grad}
    if with_torch_compile:
        out["torch.compile"] = compiled
        if device == "cuda" and cuda_graphs:
            out["torch.compile reduce-overhead"] = lambda: compiled("reduce-overhead")
    out.update({"zt dynamic": zt_dynamic, "zt staged": zt_staged})
    if with_module:  # opt-in: another method in the rotation changes the cache state the others see
        out["zt.compile(module)"] = zt_module
    if device == "cuda" and cuda_graphs:
        out["zt staged + CUDA graph"] = lambda: zt_staged(cuda_graphs=True)
        if with_torch_compile:
            out["zt staged + inductor + CUDA graph"] = lambda: zt_staged(cuda_graphs=True, backend="inductor")
    return out


def check(step, reference, name, bf16):
    got = step()
    tol = dict(atol=3e-2, rtol=5e-2) if bf16 else dict(atol=1e-4, rtol=1e-3)
    for k, ref in reference.items():
        if ref is None:
            continue
        g = got[k]
        if g is None:
            raise AssertionError(f"{name}: no gradient for {k}")
        torch.testing.assert_close(g.float(), ref.float(), **tol, msg=lambda m: f"{name}, {k}: {m}")


def cpu_peak_bytes(step) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    del result
    events = sorted((e for e in prof.events() if e.cpu_parent is None or e.name == "[memory]"),
                    key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_bytes(step, device) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(step)


def run(workload: str, device: str, repeats: int, with_torch_compile: bool, rows: list, with_module: bool = False):
    w = models.make(workload, device)
    ms = methods(w, device, with_torch_compile, cuda_graphs=workload == "mlp", with_module=with_module)
    steps, first = {}, {}
    for name, factory in ms.items():
        _sync(device)
        t0 = time.perf_counter()
        try:
            step = factory()
            step()
        except Exception as exc:  # e.g. torch.func refuses BatchNorm's in-place buffer updates
            print(f"{workload}: {name} cannot run it: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            rows.append((workload, name, None, None, None, None, None))
            continue
        _sync(device)
        first[name] = time.perf_counter() - t0
        steps[name] = step
    reference = steps["eager"]()
    reference = {k: None if v is None else v.detach().clone() for k, v in reference.items()}
    for name, step in steps.items():
        try:
            check(step, reference, name, w.autocast is not None)
        except AssertionError as exc:
            if name.startswith("zt"):
                raise  # ours must agree with eager autograd
            print(f"{workload}: note: {name}'s gradients differ from eager beyond tolerance: "
                  f"{str(exc).splitlines()[0]} {' '.join(str(exc).splitlines()[3:5])}")
    for step in steps.values():  # warm up
        for _ in range(3):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    mem = {name: peak_bytes(step, device) for name, step in steps.items()}
    base_t, base_m = statistics.median(times["eager"]), mem["eager"]
    for name in steps:
        t = statistics.median(times[name])
        rows.append((workload, name, t * 1e3, t / base_t, mem[name] / 2**20, mem[name] / max(base_m, 1),
                     first[name]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", default="mlp,gpt,cnn")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--module", action="store_true",
                        help="also time zt.compile(module) in an unchanged loss.backward() loop")
    parser.add_argument("--quick", action="store_true", help="few repeats, no torch.compile (CI smoke)")
    parser.add_argument("--out", help="append the markdown table to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.no_torch_compile = 3, True
    rows: list = []
    for workload in args.workloads.split(","):
        run(workload, args.device, args.repeats, not args.no_torch_compile, rows, args.module)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    header = (f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.device} ({device_name}, "
              f"{os.cpu_count()} cores), `python benchmarks/bench.py {' '.join(argv or sys.argv[1:])}`")
    lines = [header, "", "| workload | method | step ms | x eager | peak MB | x eager | first gradient s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {w} | {m} | n/a (cannot run it) | | | | |" if t is None else
              f"| {w} | {m} | {t:.3f} | {r:.2f} | {mb:.1f} | {mr:.2f} | {f:.2f} |" for w, m, t, r, mb, mr, f in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n\n")
    return rows


if __name__ == "__main__":
    main()
