"""The main job: a small GPT-style character model trained with zygote_torch.

A decoder-only transformer (token and position embeddings, pre-norm blocks of causal
self-attention and a GELU MLP, a final LayerNorm, the head tied to the token embedding) learns to
write Python, from the source of Python's own standard library (a fixed list of modules, a few
hundred KB, nothing downloaded; ``--data PATH`` for any other text file).

The training step is one staged program: ``zt.compile`` traces forward and backward once, with
the gradients taken Zygote style with respect to ``zt.Params(model)``; a stock ``torch.optim.AdamW``
steps with them (``gs.to_grad()``). The job

- checks the first step's gradients against ``torch.autograd`` (and stops if they differ),
- shows a progress bar (tqdm, when installed) with each step's loss and the rate of the
  zygote_torch steps (the eager comparison steps and the evaluations are not counted in it),
- times the zygote_torch step against the same model trained with eager autograd (the last steps
  of training: both step in turn on the same batches; medians),
- prints the loss before and after, a sample of generated text, and draws the loss curve into a
  PNG with matplotlib (the package's ``demo`` extra; without it the curve is skipped, with a line
  saying so).

Run::

    python examples/train_gpt.py                  # about two minutes on 2 CPU cores (as in the README)
    python examples/train_gpt.py --smoke          # a few seconds: the CI setting
    python examples/train_gpt.py --device cuda --steps 2000 --layers 6 --d-model 384 --block-size 256
    python examples/train_gpt.py --nproc 2        # data parallel on 2 processes (zt.distributed)
    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py

With ``--nproc N`` (or under torchrun) every rank trains on its share of the batch and the
compiled step all-reduces the gradients in buckets inside its backward
(``zt.distributed.allreduce_gradients``); ``--batch-size`` is the global batch.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import statistics
import sys
import time

# OpenMP threads that spin while they wait make a busy machine (a shared CI runner, another job on
# the other core) many times slower: measured on a shared 2-core VM, 60 steps took 6.3 s alone and
# 46-90 s with another job running, against 6.5 s and 14 s with passive waiting. Set before torch
# loads its OpenMP runtime (imported as a module after torch, it changes nothing); an explicit
# OMP_WAIT_POLICY wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import zygote_torch as zt  # noqa: E402
import zygote_torch.distributed as ztd  # noqa: E402

# Standard-library modules whose source is the default training text (present in 3.11 to 3.13).
STDLIB_FILES = ["textwrap.py", "string.py", "functools.py", "contextlib.py", "copy.py", "heapq.py",
                "bisect.py", "abc.py", "shlex.py", "fnmatch.py", "glob.py", "operator.py", "random.py",
                "json/encoder.py", "json/decoder.py", "csv.py", "pprint.py", "dataclasses.py"]

GRAD_TOLERANCE = 1e-4  # max |zt - autograd| over all gradients, relative to the largest gradient


# -- data --------------------------------------------------------------------------------------------
def load_text(path: str | None) -> tuple[str, str]:
    """(text, description): ``path``'s contents, or the standard-library sources."""
    if path:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        return text, f"{path} ({len(text) / 1e3:.0f} K characters)"
    root = os.path.dirname(os.__file__)
    parts = []
    for name in STDLIB_FILES:
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                parts.append(f.read())
        except OSError:
            continue  # a trimmed Python install: train on what there is
    if not parts:
        raise SystemExit(f"no standard-library sources found under {root}; pass --data PATH")
    text = "\n\n".join(parts)
    return text, f"{len(parts)} standard-library modules from {root} ({len(text) / 1e3:.0f} K characters)"


class Batches:
    """Random windows of a token stream: inputs ``x`` and next-token targets ``y``."""

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int, device):
        if data.numel() <= block_size + 1:
            raise SystemExit(f"the text has {data.numel()} characters; --block-size {block_size} needs more")
        self.data, self.block_size, self.batch_size, self.device = data, block_size, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def next(self):
        starts = torch.randint(0, self.data.numel() - self.block_size - 1, (self.batch_size,),
                               generator=self.generator)
        offsets = torch.arange(self.block_size + 1)
        window = self.data[starts[:, None] + offsets]
        return window[:, :-1].to(self.device), window[:, 1:].to(self.device)


# -- model -------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block: x + attention(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, block_size: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)
        causal = torch.ones(block_size, block_size, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.n_heads))
        scores = scores.masked_fill(~self.causal[:T, :T], float("-inf"))
        y = scores.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, block_size: int):
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList([Block(d_model, n_heads, block_size) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied: one tensor, two uses, gradients summed
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual projections scaled by depth
            for proj in (block.proj, block.fc_out):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def loss_fn(model: GPT, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: GPT, batches: list) -> float:
    return statistics.fmean(loss_fn(model, x, y).item() for x, y in batches)


@torch.no_grad()
def generate(model: GPT, prompt: list[int], n: int, temperature: float = 0.8, seed: int = 0,
             device="cpu") -> list[int]:
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt], device=device)
    for _ in range(n):
        logits = model(idx[:, -model.block_size:])[0, -1] / temperature
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        idx = torch.cat([idx, nxt[None]], dim=1)
    return idx[0].tolist()


# -- the loss-curve picture ----------------------------------------------------------------------------
def smooth(values: list[float], k: int) -> list[float]:
    """Centred moving average over ``k`` points (fewer at the ends)."""
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - k // 2), min(len(values), i + k // 2 + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def write_loss_curve(path: str, losses: list[float], val: list[tuple[int, float]], title: str) -> bool:
    """Draw the loss curve into the PNG ``path`` with matplotlib (the package's ``demo`` extra);
    False, with nothing written, where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(losses, color="#9ecae1", linewidth=0.8, label="train (per step)")
    ax.plot(smooth(losses, 21), color="#08519c", linewidth=1.6, label="train (moving average, 21 steps)")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o--", color="#d94801", linewidth=1,
                label="validation (held-out 10%)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# -- progress ------------------------------------------------------------------------------------------
class Progress:
    """Progress of the training loop: each step's loss, and the rate of the zygote_torch steps alone
    (the time of each step is given by the caller, so the eager comparison steps and the
    evaluations are not in it). A tqdm bar where tqdm is installed, else a line every tenth."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.done, self.busy_s = 0, 0.0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.25,
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}")
            except ImportError:
                print("(tqdm is not installed: progress as plain lines)")
        self.every = max(1, total // 10)

    def rate(self) -> float:
        """zygote_torch steps per second so far."""
        return self.done / self.busy_s if self.busy_s > 0 else float("nan")

    def update(self, loss: float, step_s: float) -> None:
        """One more step done, with loss ``loss``, in ``step_s`` seconds."""
        self.done += 1
        self.busy_s += step_s
        if not self.enabled:
            return
        left = (self.total - self.done) / self.rate() if self.done < self.total else 0.0
        status = f"loss {loss:.4f}, {self.rate():.2f} steps/s, {left:.0f} s left"
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(1)
        elif self.done % self.every == 0 or self.done == self.total:
            print(f"step {self.done:5d}/{self.total}  {status}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- training ------------------------------------------------------------------------------------------
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_optimizer(model, lr, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = max(1, min(50, steps // 10))

    def schedule(s):  # linear warm-up, then cosine decay to a tenth
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def check_first_step(model, ps, gs, x, y, distributed: bool) -> tuple[float, float]:
    """(max |zt - autograd| over all gradients of the first step, the largest gradient); SystemExit
    when the difference is above tolerance."""
    model.zero_grad(set_to_none=True)
    loss_fn(model, x, y).backward()
    reference = [p.grad for p in ps]
    if distributed:
        reference = ztd.allreduce_gradients(reference)
    model.zero_grad(set_to_none=True)
    err = max((gs[p] - r).abs().max().item() for p, r in zip(ps, reference))
    scale = max(r.abs().max().item() for r in reference)
    if not err <= GRAD_TOLERANCE * scale:
        raise SystemExit(f"FAILED: the first step's gradients differ from torch.autograd by {err:.3e} "
                         f"(largest gradient {scale:.3e}, tolerance {GRAD_TOLERANCE:g} of it)")
    return err, scale


def train(args, rank: int = 0, world: int = 1) -> dict:
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    text, described = load_text(args.data)
    vocab = sorted(set(text))
    stoi = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of the {world} processes")
    local_batch = args.batch_size // world
    batches = Batches(train_data, args.block_size, local_batch, args.seed * 1000 + rank, device)
    val_source = Batches(val_data if val_data.numel() > args.block_size + 1 else train_data,
                         args.block_size, local_batch, 12345, device)
    val_batches = [val_source.next() for _ in range(args.eval_batches)]

    model = GPT(len(vocab), args.d_model, args.heads, args.layers, args.block_size).to(device)
    ztd.broadcast_parameters(model)  # identical start on every rank (a no-op alone)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"data: {described}, vocabulary {len(vocab)}")
    say(f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, context {args.block_size}, "
        f"{n_params / 1e6:.2f} M parameters; batch {args.batch_size}"
        + (f" ({local_batch} on each of {world} processes)" if world > 1 else "")
        + f"; {args.steps} steps of AdamW, lr {args.lr:g}; device {device}, {torch.get_num_threads()} CPU thread(s)")

    ps = zt.Params(model)
    opt, schedule = make_optimizer(model, args.lr, args.steps)

    @zt.compile
    def step(x, y):
        loss, gs = zt.withgradient(lambda: loss_fn(model, x, y), ps)
        if world > 1:  # the all-reduces are nodes of this program, started as gradients become final
            return ztd.all_reduce(loss), ztd.allreduce_gradients(gs)
        return loss, gs

    x, y = batches.next()
    val_first = evaluate(model, val_batches)
    fallbacks = zt.fallbacks(lambda x: loss_fn(model, x, y), x) if lead else []
    say(f"ops differentiated through the torch.func.vjp fallback: {len(fallbacks) or 'none'}"
        + "".join(f"\n  {f}" for f in fallbacks))
    sync(device)
    t0 = time.perf_counter()
    loss, gs = step(x, y)
    sync(device)
    trace_s = time.perf_counter() - t0
    err, scale = check_first_step(model, ps, gs, x, y, world > 1)
    say(f"first call of the compiled step (trace, differentiate, generate code): {trace_s:.2f} s")
    say(f"first step: max |zt - torch.autograd| over all {len(ps)} gradients = {err:.2e} "
        f"(largest gradient {scale:.2e}; tolerance {GRAD_TOLERANCE:g} of it): OK")

    timed = min(args.time_steps, max(0, args.steps - 2))
    timed_from = args.steps - timed
    shadow = None
    zt_times, eager_times = [], []
    losses: list[float] = []
    val_curve = [(0, val_first)]  # (steps taken, validation loss)
    progress = Progress(args.steps, lead)
    train_start = time.perf_counter()
    for i in range(args.steps):
        if i == timed_from and timed:  # the same model, trained with eager autograd from here on
            shadow = copy.deepcopy(model)
            shadow_opt, shadow_schedule = make_optimizer(shadow, args.lr, args.steps)
            shadow_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            shadow_schedule.load_state_dict(schedule.state_dict())
        t = time.perf_counter()
        if i > 0:
            x, y = batches.next()
        fetch_s = time.perf_counter() - t
        eager_first = shadow is not None and i % 2 == 1  # (the order alternates: neither always goes first)
        if eager_first:
            eager_times.append(eager_step(shadow, shadow_opt, shadow_schedule, x, y, world, device))
        sync(device)
        t = time.perf_counter()
        if i > 0:
            loss, gs = step(x, y)
        gs.to_grad()
        opt.step()
        schedule.step()
        loss_value = loss.item()  # (waits for a GPU, as the sync that follows does anyway)
        sync(device)
        step_s = time.perf_counter() - t
        if shadow is not None:
            zt_times.append(step_s)
            if not eager_first:
                eager_times.append(eager_step(shadow, shadow_opt, shadow_schedule, x, y, world, device))
        losses.append(loss_value)
        progress.update(loss_value, fetch_s + step_s)
        if (i + 1) % max(1, args.steps // 4) == 0 and i + 1 < args.steps:
            val_curve.append((i + 1, evaluate(model, val_batches)))
    progress.close()
    train_s = time.perf_counter() - train_start

    curve = losses
    val_last = evaluate(model, val_batches)
    val_curve.append((args.steps, val_last))
    tail = min(20, len(curve))
    result = {"first_loss": curve[0], "last_loss": statistics.fmean(curve[-tail:]),
              "val_first": val_first, "val_last": val_last, "steps": args.steps, "train_s": train_s,
              "zt_train_s": progress.busy_s,
              "trace_s": trace_s, "grad_max_abs_diff": err, "world": world, "losses": curve,
              "validation": val_curve}
    say(f"trained {args.steps} steps in {train_s:.1f} s, of which the zygote_torch steps took {progress.busy_s:.1f} s "
        f"({progress.rate():.2f} steps/s; the rest: evaluations and the eager comparison steps)")
    say(f"loss: first step {curve[0]:.4f}, mean of last {tail} steps {result['last_loss']:.4f}; "
        f"validation {val_first:.4f} -> {val_last:.4f} (uniform guess: {math.log(len(vocab)):.4f})")
    if zt_times:
        zt_ms, eager_ms = 1e3 * statistics.median(zt_times), 1e3 * statistics.median(eager_times)
        result.update(zt_step_ms=zt_ms, eager_step_ms=eager_ms)
        say(f"step time, median of the last {len(zt_times)} steps (each batch run by both, in turn, "
            f"forward + backward{' + all-reduce' if world > 1 else ''} + AdamW): zygote_torch {zt_ms:.1f} ms, "
            f"eager torch.autograd {eager_ms:.1f} ms (zygote_torch / eager = {zt_ms / eager_ms:.2f})")

    if lead:
        prompt = "def "
        out = generate(model, [stoi[c] for c in prompt if c in stoi], args.sample_chars, seed=args.seed,
                       device=device)
        sample = "".join(vocab[i] for i in out)
        result["sample"] = sample
        print(f"sample ({args.sample_chars} characters after {prompt!r}, temperature 0.8):")
        print("-" * 60 + "\n" + sample + "\n" + "-" * 60)
        os.makedirs(args.out, exist_ok=True)
        png = os.path.join(args.out, "train_gpt_loss.png")
        title = (f"GPT {args.layers}x{args.d_model}, {n_params / 1e6:.2f} M params, "
                 f"trained with zygote_torch ({world} process{'es' if world > 1 else ''})")
        metrics = os.path.join(args.out, "train_gpt.json")
        if write_loss_curve(png, curve, val_curve, title):
            result["png"] = png
            print(f"loss curve: {png}; metrics: {metrics}")
        else:
            print(f"loss curve: not drawn, matplotlib is not installed (pip install matplotlib, or the "
                  f"package's extra: pip install 'zygote_torch[demo]'); metrics: {metrics}")
        with open(metrics, "w") as f:
            json.dump(result, f, indent=1)
        if args.steps >= 20 and not result["last_loss"] < result["first_loss"]:
            raise SystemExit("FAILED: the loss did not fall")
    return result


def eager_step(model, opt, schedule, x, y, world, device) -> float:
    """One step of the same model with eager autograd; its time in seconds."""
    sync(device)
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn(model, x, y).backward()
    if world > 1:
        params = [p for p in model.parameters()]
        for p, g in zip(params, ztd.allreduce_gradients([p.grad for p in params])):
            p.grad = g
    opt.step()
    schedule.step()
    sync(device)
    return time.perf_counter() - t


# -- processes -----------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    _run_distributed(args)


def _run_distributed(args) -> None:
    world = int(os.environ["WORLD_SIZE"])
    if torch.device(args.device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise SystemExit(f"{world} processes need {world} GPUs; {torch.cuda.device_count()} found")
        args.device = f"cuda:{local}"
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    rank, world = ztd.init(device=args.device, timeout_s=120)
    try:
        train(args, rank, world)
    finally:
        import torch.distributed as dist
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps (AdamW)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--d-model", type=int, default=128, help="width of the residual stream")
    p.add_argument("--heads", type=int, default=4, help="attention heads (must divide --d-model)")
    p.add_argument("--block-size", type=int, default=64, help="context length in characters")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split over --nproc)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear warm-up, then cosine decay to a tenth)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--data", default=None, help="a text file to train on (default: %(default)s, the standard library's own sources)")
    p.add_argument("--out", default="out", help="directory for the loss-curve PNG and the metrics JSON")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes (gloo on CPU, NCCL on GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the batches and the sample")
    p.add_argument("--time-steps", type=int, default=20,
                   help="last steps also run with eager autograd, to compare step times")
    p.add_argument("--sample-chars", type=int, default=300, help="characters of generated text printed at the end")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches in each validation loss")
    p.add_argument("--smoke", action="store_true",
                   help="a short run for CI: --steps 60 --layers 2 --d-model 64 --block-size 32 --batch-size 16 "
                        "--time-steps 6 --sample-chars 80 --eval-batches 2 (flags given explicitly still apply)")
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(steps=60, layers=2, d_model=64, heads=4, block_size=32, batch_size=16, time_steps=6,
                       sample_chars=80, eval_batches=2)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: running on the CPU")
        args.device = "cpu"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # launched by torchrun
        _run_distributed(args)
    elif args.nproc > 1:
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(args.nproc, port, args), nprocs=args.nproc)
    else:
        train(args)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, every rank runs this
        print(f"total {time.perf_counter() - start:.1f} s")
