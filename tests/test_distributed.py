"""zt.distributed: 2 CPU processes with gloo; all-reduced gradients equal single-process gradients
on the concatenated batch (1e-6 relative), dynamic and staged; zt.compile(module) inside PyTorch's
DistributedDataParallel. Each test spawns its processes with a deadline so CI cannot hang."""
import copy
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import zygote_torch as zt
import zygote_torch.distributed as ztd

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
DEADLINE_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(worker, *args):
    """Run ``worker(rank, *args)`` on WORLD processes joined by gloo; re-raise a worker's failure;
    kill everything after DEADLINE_S."""
    port = _free_port()
    ctx = mp.spawn(_entry, args=(port, worker) + args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {DEADLINE_S} s")


def _entry(rank, port, worker, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ztd.init("gloo", timeout_s=60)
    try:
        worker(rank)
    finally:
        dist.destroy_process_group()
    # Every check has passed. Skip interpreter finalization: a pytest-spawned gloo process that has
    # traced with zt.compile (FakeTensorMode) sometimes aborts there ("terminate called without an
    # active exception", ~1 exit in 10, with or without zt.distributed); a torch teardown issue.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(),
                         nn.Linear(16, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * WORLD, 3, 5, generator=g, dtype=torch.float64), \
        torch.randint(0, 3, (2 * WORLD, 3), generator=g)


def _shard(t, rank):
    n = t.shape[0] // WORLD
    return t[rank * n:(rank + 1) * n]


def _loss(model, x, y):
    return F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1))


def _assert_close(got, want, what):
    assert got is not None, what
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-6, f"{what}: relative error {err:.2e}"


def _dynamic_and_staged_worker(rank):
    model = _model()
    ps = zt.Params(model)
    X, Y = _batch()
    x, y = _shard(X, rank), _shard(Y, rank)
    reference = zt.gradient(lambda: _loss(model, X, Y), ps)  # one process, concatenated batch
    eager = {n: g for n, g in zip([n for n, _ in model.named_parameters()],
                                  torch.autograd.grad(_loss(model, X, Y), list(model.parameters())))}

    # dynamic: Grads, and the structural (dict) gradient of a module; default and tiny buckets
    for cap in (ztd.DEFAULT_BUCKET_CAP_MB, 0.0):
        gs = ztd.allreduce_gradients(zt.gradient(lambda: _loss(model, x, y), ps), bucket_cap_mb=cap)
        for name, p in model.named_parameters():
            _assert_close(gs[p], reference[p], f"dynamic Grads, bucket {cap} MB, {name}")
            _assert_close(gs[p], eager[name], f"dynamic Grads vs autograd, {name}")
    (g,) = zt.gradient(lambda m: _loss(m, x, y), model)
    g = ztd.allreduce_gradients(g)
    assert isinstance(g, dict) and list(g) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        _assert_close(g[name], reference[p], f"dynamic dict, {name}")

    # staged: the whole step (loss, backward, all-reduce) is one compiled program
    for cap in (ztd.DEFAULT_BUCKET_CAP_MB, 0.0):
        @zt.compile
        def step(x, y):
            loss, gs = zt.withgradient(lambda: _loss(model, x, y), ps)
            return ztd.all_reduce(loss), ztd.allreduce_gradients(gs, bucket_cap_mb=cap)

        for _ in range(2):  # the traced call, then the cached program
            loss, gs = step(x, y)
            torch.testing.assert_close(loss, _loss(model, X, Y), rtol=1e-12, atol=1e-12)
            for name, p in model.named_parameters():
                _assert_close(gs[p], reference[p], f"staged, bucket {cap} MB, {name}")
        code = step.code(x, y)
        n_buckets = code.count("all_reduce_start(")
        assert n_buckets == (1 if cap == ztd.DEFAULT_BUCKET_CAP_MB else len(ps)), code
        # each bucket's all-reduce starts as soon as its gradients are final: before the backward ends
        lines = code.splitlines()
        first_start = next(i for i, l in enumerate(lines) if "all_reduce_start(" in l)
        last_matmul = max(i for i, l in enumerate(lines) if "matmul" in l)
        if cap != ztd.DEFAULT_BUCKET_CAP_MB:
            assert first_start < last_matmul, code

    # single tensors: functional and in place, dynamic and staged
    t = torch.full((3,), float(rank + 1), dtype=torch.float64)
    torch.testing.assert_close(ztd.all_reduce(t), torch.full_like(t, 1.5))
    assert t[0].item() == rank + 1  # all_reduce leaves its argument alone
    assert ztd.all_reduce_(t) is t and torch.equal(t, torch.full_like(t, 1.5))
    staged = zt.compile(lambda a: ztd.all_reduce_(a * 2) + ztd.all_reduce(a))
    for _ in range(2):
        a = torch.full((2,), float(rank + 1), dtype=torch.float64)
        torch.testing.assert_close(staged(a), torch.full_like(a, 3.0 + 1.5))
    assert "all_reduce_(" in staged.code(a)

    # a training step with the optimizer: both ranks stay identical
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = zt.compile(lambda x, y: ztd.allreduce_gradients(zt.gradient(lambda: _loss(model, x, y), ps)))
    for _ in range(3):
        step(x, y).to_grad()
        opt.step()
    flat = ps.to_vector()
    others = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(others, flat)
    assert all(torch.equal(o, flat) for o in others)


def test_allreduced_gradients_equal_single_process_dynamic_and_staged():
    _run(_dynamic_and_staged_worker)


def _ddp_worker(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _model()
    reference_model = copy.deepcopy(model)
    X, Y = _batch()
    x, y = _shard(X, rank), _shard(Y, rank)
    _loss(reference_model, X, Y).backward()  # one process, concatenated batch, eager autograd

    ddp = DDP(zt.compile(model))
    _loss(ddp, x, y).backward()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        _assert_close(p.grad, q.grad, f"DDP(zt.compile(model)), {name}")

    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    for _ in range(2):
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
        _loss(ddp, x, y).backward()
        _loss(reference_model, X, Y).backward()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        _assert_close(p.grad, q.grad, f"DDP(zt.compile(model)) after 2 steps, {name}")
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_compiled_module_inside_distributed_data_parallel():
    _run(_ddp_worker)


def test_single_process_is_a_no_op():
    model = _model()
    ps = zt.Params(model)
    X, Y = _batch()
    gs = zt.gradient(lambda: _loss(model, X, Y), ps)
    assert ztd.allreduce_gradients(gs) is gs
    assert ztd.world_size() == 1 and ztd.rank() == 0


def test_buckets_group_by_dtype_and_cap():
    items = [(0, torch.zeros(10)), (1, torch.zeros(10, dtype=torch.float64)), (2, torch.zeros(300)),
             (3, torch.zeros(5)), (4, torch.zeros(5, dtype=torch.float64))]
    buckets = ztd._buckets(items, cap_bytes=1000)
    assert [[i for i, _ in b] for b in buckets] == [[0, 2], [1, 4], [3]]
