"""CUDA-graph capture and replay of a staged program.

The generated program is run a few times on a side stream, then captured once into a
``torch.cuda.CUDAGraph``. Each call copies the argument tensors into the graph's static input
buffers and replays it. Tensors the program captured by itself (parameters, buffers, globals) are
read in place at their fixed addresses, so in-place optimizer updates are seen. A new input
signature is a new program, so it gets its own capture.

The outputs are the graph's static output buffers: the next replay overwrites them. Copy what must
outlive the next call (``.clone()``), as with ``torch.compile(mode="reduce-overhead")``. A captured
tensor rebound since the capture (``m.weight = nn.Parameter(...)``) lives at another address: the
graph cannot read it, so ``__call__`` returns None and the caller captures anew.
"""
from __future__ import annotations

import torch


class CudaGraphRunner:
    def __init__(self, fn, inputs: list, static: list[bool], warmup: int = 3):
        """``fn(*inputs) -> outputs``; ``static[i]``: input ``i`` keeps its address across calls."""
        self.fn, self.static = fn, static
        self.buffers = [x if s or not isinstance(x, torch.Tensor) else x.clone() for x, s in zip(inputs, static)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.buffers)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.buffers)

    def __call__(self, inputs: list):
        """The outputs for ``inputs``, or None when a static input is not the captured tensor."""
        for buffer, x, s in zip(self.buffers, inputs, self.static):
            if s and x is not buffer:
                return None
        for buffer, x, s in zip(self.buffers, inputs, self.static):
            if not s and isinstance(x, torch.Tensor) and x is not buffer:
                buffer.copy_(x)
        self.graph.replay()
        return self.outputs
