"""Data-parallel training on ``torch.distributed``: gradients averaged over ranks, in buckets.

Every rank runs the same program on its own slice of the batch; after the backward, each gradient
is replaced by its mean over the ranks, so every rank takes the same optimizer step::

    import zygote_torch as zt

    rank, world = zt.distributed.init()            # reads torchrun's environment; gloo or NCCL
    zt.distributed.broadcast_parameters(model)     # every rank starts from rank 0's weights
    ps = zt.Params(model)

    @zt.compile
    def step(x, y):                                # one staged program: forward, backward, all-reduce
        loss, gs = zt.withgradient(lambda: F.cross_entropy(model(x), y), ps)
        return loss, zt.distributed.allreduce_gradients(gs)

    loss, gs = step(x_local, y_local)
    gs.to_grad(); opt.step()

The dynamic API works the same way: ``gs = zt.distributed.allreduce_gradients(zt.gradient(f, ps))``.

``allreduce_gradients`` takes ``zt.Grads``, a dict, a tuple or list (any structure ``zt.gradient``
returns) and returns the same structure holding the averages (the input is not modified; ``None``
stays ``None``: every rank must have the same ``None`` entries, as it does when all ranks run the
same code; other non-tensor leaves, such as the float gradient of a Python-number argument, are
left as they are). Gradients are packed into buckets of about ``bucket_cap_mb`` (25 MB, as
PyTorch's DDP), each reduced by one asynchronous collective:

- **Staged** (inside ``zt.compile``): each bucket is two nodes of the generated program,
  ``all_reduce_start(...)`` and ``all_reduce_wait(...)``. Buckets are filled in the order the
  gradients become final in the backward graph, and each start node is moved to just after the
  last gradient of its bucket is computed, so the communication of the first buckets runs while
  the rest of the backward computes; the waits come where ``allreduce_gradients`` was called.
  ``step.code(x, y)`` shows where they landed.
- **Dynamic** (outside ``zt.compile``): the gradients already exist; buckets are filled in reverse
  order of the structure (for ``zt.Params(model)``: last layers first, the order in which a
  backward finishes them), all collectives are launched asynchronously, then awaited.

Backends: gloo on CPU, NCCL on CUDA (``init`` picks by device). Gloo has no average reduction,
so it sums and divides by the world size; NCCL averages natively.

``all_reduce(t)`` (functional) and ``all_reduce_(t)`` (in place) average a single tensor; staged,
each is one node. None of these functions is differentiable (they are applied to gradients).

``zt.compile(module)`` also works inside PyTorch's own ``DistributedDataParallel``: its backward is
an autograd Function whose gradients DDP's hooks reduce as usual.

Launching with torchrun
-----------------------
One machine, two processes (CPU: gloo; with GPUs use one process per GPU)::

    torchrun --standalone --nproc_per_node=2 examples/train_gpt.py

Several machines: the same command on each node, naming the rendezvous host (any node reachable
by all, e.g. node 0) and a free port; ``--nnodes`` nodes with ``--nproc_per_node`` processes each::

    # on every node (node_rank 0 .. nnodes-1)
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK \\
             --master_addr=10.0.0.1 --master_port=29500 train.py
    # or, with elastic rendezvous (no fixed node ranks)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=job42 --rdzv_backend=c10d \\
             --rdzv_endpoint=10.0.0.1:29500 train.py

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init` reads them (and, with CUDA, selects the device ``LOCAL_RANK``). For NCCL across
nodes, ``NCCL_SOCKET_IFNAME`` may be needed to pick the network interface; for gloo,
``GLOO_SOCKET_IFNAME``.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import handle_torch_function, has_torch_function

from .capture.pytree import flatten

__all__ = ["init", "is_initialized", "rank", "world_size", "all_reduce", "all_reduce_",
           "allreduce_gradients", "broadcast_parameters", "all_reduce_start", "all_reduce_wait"]

DEFAULT_BUCKET_CAP_MB = 25.0

# Process groups named by small integers, so generated code can carry them as constants.
_GROUPS: dict[int, Any] = {0: None}


# -- setup -------------------------------------------------------------------------------------------
def init(backend: str | None = None, device: str | torch.device | None = None,
         timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group described by the environment (torchrun's ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) unless already joined; return ``(rank, world_size)``.

    ``backend`` defaults to NCCL when ``device`` is CUDA (or, with no device given, when CUDA is
    available), else gloo. With NCCL the current CUDA device becomes ``LOCAL_RANK``.
    """
    if not dist.is_available():
        raise RuntimeError("zt.distributed: this torch build has no torch.distributed")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group=None) -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size(group) if is_initialized() else 1


def broadcast_parameters(params, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s values of ``params`` (a module, ``zt.Params`` or tensors) to every rank,
    in place; a module's buffers too."""
    if not is_initialized():
        return
    tensors = list(params.parameters()) + list(params.buffers()) if isinstance(params, torch.nn.Module) \
        else list(params)
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src, group=group)


def _group_key(group) -> int:
    """A small integer naming ``group`` in generated code (0: the default group)."""
    if group is None:
        return 0
    for k, g in _GROUPS.items():
        if g is group:
            return k
    k = len(_GROUPS)
    _GROUPS[k] = group
    return k


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor) or t.device.type == "meta"


def _native_average(group) -> bool:
    return dist.get_backend(group) == "nccl"


# -- one tensor --------------------------------------------------------------------------------------
def all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """A new tensor: the mean of ``tensor`` over the ranks of ``group`` (default: all). Staged, one
    node. Without an initialized process group, a copy of ``tensor``."""
    key = group if isinstance(group, int) else _group_key(group)
    if has_torch_function((tensor,)):
        return handle_torch_function(all_reduce, (tensor,), tensor, key)
    return all_reduce_(tensor.clone(), key)


def all_reduce_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Replace ``tensor`` by its mean over the ranks of ``group`` (default: all), in place; return
    it. Staged, one node (recorded as a mutation of ``tensor``)."""
    key = group if isinstance(group, int) else _group_key(group)
    if has_torch_function((tensor,)):
        return handle_torch_function(all_reduce_, (tensor,), tensor, key)
    if _is_fake(tensor) or not is_initialized():
        return tensor
    group = _GROUPS[key]
    if _native_average(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=group)
    else:
        dist.all_reduce(tensor, group=group)
        tensor.div_(dist.get_world_size(group))
    return tensor


# -- buckets -----------------------------------------------------------------------------------------
def all_reduce_start(group_key: int, *tensors: torch.Tensor) -> torch.Tensor:
    """Pack ``tensors`` into one flat buffer and launch its asynchronous all-reduce; return the
    buffer (carrying the work handle) for :func:`all_reduce_wait`. Staged, one node."""
    if has_torch_function(tensors):
        return handle_torch_function(all_reduce_start, tensors, group_key, *tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if not _is_fake(flat) and is_initialized():
        group = _GROUPS[group_key]
        op = dist.ReduceOp.AVG if _native_average(group) else dist.ReduceOp.SUM
        flat._zt_work = dist.all_reduce(flat, op=op, group=group, async_op=True)
    return flat


def all_reduce_wait(group_key: int, flat: torch.Tensor, shapes: tuple) -> tuple:
    """Wait for the all-reduce of ``flat`` started by :func:`all_reduce_start`; return its
    average, unpacked into tensors of ``shapes``. Staged, one node."""
    if has_torch_function((flat,)):
        return handle_torch_function(all_reduce_wait, (flat,), group_key, flat, shapes)
    work = getattr(flat, "_zt_work", None)
    if work is not None:
        work.wait()
        del flat._zt_work
        group = _GROUPS[group_key]
        if not _native_average(group):
            flat.div_(dist.get_world_size(group))
    sizes = [_numel(s) for s in shapes]
    return tuple(part.view(s) for part, s in zip(torch.split(flat, sizes), shapes))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _staging_builder():
    """The GraphBuilder recording the graph being staged (innermost), or None."""
    from .capture.recorder import GraphBuilder, Recorder
    try:
        stack = torch.overrides._get_current_function_mode_stack()
    except Exception:  # noqa: BLE001  (a private torch API: no scheduling without it)
        return None
    for mode in reversed(stack):
        if isinstance(mode, Recorder):
            owner = getattr(mode.on_call, "__self__", None)
            return owner if isinstance(owner, GraphBuilder) else None
    return None


def _readiness(builder, tensors: list) -> list[int]:
    """The position in the graph being recorded of the node computing each tensor (-1: unknown)."""
    if builder is None:
        return [-1] * len(tensors)
    position = {node: i for i, node in enumerate(builder.graph.nodes)}
    return [position.get(builder.env.get(id(t)), -1) for t in tensors]


def _hoist(builder, value: torch.Tensor) -> None:
    """Move the node computing ``value`` to just after the last node it reads: a bucket's
    all-reduce starts as soon as its last gradient is final."""
    node = builder.env.get(id(value))
    if node is None or not node.all_input_nodes:
        return
    position = {n: i for i, n in enumerate(builder.graph.nodes)}
    last = max(node.all_input_nodes, key=lambda n: position[n])
    if last.next is not node:
        last.append(node)


def _buckets(items: list, cap_bytes: float) -> list[list]:
    """``items`` (index, tensor) in order, cut into buckets of one dtype and device, each closed
    once it holds ``cap_bytes`` or more."""
    buckets: list[list] = []
    open_by_kind: dict = {}  # (dtype, device) -> [bucket, its size in bytes]
    for i, t in items:
        kind = (t.dtype, t.device)
        if kind not in open_by_kind:
            open_by_kind[kind] = [[], 0]
            buckets.append(open_by_kind[kind][0])
        entry = open_by_kind[kind]
        entry[0].append((i, t))
        entry[1] += t.numel() * t.element_size()
        if entry[1] >= cap_bytes:
            del open_by_kind[kind]
    return buckets


def allreduce_gradients(grads, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB, group=None):
    """``grads`` (``zt.Grads``, dict, tuple, list...) with every tensor replaced by its mean over the
    ranks, in buckets of about ``bucket_cap_mb`` MB (see the module docstring). Without an
    initialized process group (a single process), ``grads`` is returned as it is."""
    leaves, rebuild = flatten(grads)
    if not is_initialized() or dist.get_world_size(group) == 1:
        return grads
    key = _group_key(group)
    index = [i for i, g in enumerate(leaves) if isinstance(g, torch.Tensor)]
    builder = _staging_builder()
    if builder is not None:  # staged: in the order the backward graph finishes them
        ready = _readiness(builder, [leaves[i] for i in index])
        index = [i for _, i in sorted(zip(ready, index), key=lambda p: p[0])]
    else:  # dynamic: last first, as a backward finishes a model's parameters
        index = index[::-1]
    out = list(leaves)
    pending = []
    for bucket in _buckets([(i, leaves[i]) for i in index], bucket_cap_mb * 2 ** 20):
        flat = all_reduce_start(key, *[t for _, t in bucket])
        if builder is not None:
            _hoist(builder, flat)
        pending.append((bucket, flat))
    for bucket, flat in pending:
        shapes = tuple(tuple(t.shape) for _, t in bucket)
        for (i, _), r in zip(bucket, all_reduce_wait(key, flat, shapes)):
            out[i] = r
    return rebuild(out)
