"""The benchmark workloads: a small MLP, a GPT-style transformer, a ResNet-style CNN."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=128, d_out=10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, x):
        return self.net(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads, block, sdpa):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("mask", torch.ones(block, block, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.reshape(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
            att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1)
            y = att @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d, heads, block, sdpa):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, block, sdpa)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=256, d=128, layers=2, heads=4, block=64, sdpa=False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads, block, sdpa) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class ResidualBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.skip(x))


class ResNet(nn.Module):
    def __init__(self, width=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(ResidualBlock(width, width, 1), ResidualBlock(width, 2 * width, 2),
                                    ResidualBlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):
        h = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


@dataclass
class Workload:
    name: str
    model: nn.Module
    inputs: tuple  # (x, y)
    loss: object  # loss(model_output, y)
    autocast: torch.dtype | None = None
    keywords: bool = False  # x is a dict of keyword arguments: model(**x) (Hugging Face models)

    def arguments(self, x) -> tuple:
        """``(args, kwargs)`` of the model's call on ``x``."""
        return ((), x) if self.keywords else ((x,), {})

    def forward(self, module, x):
        args, kwargs = self.arguments(x)
        return module(*args, **kwargs)


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def make(name: str, device: str) -> Workload:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    gpu = device == "cuda"
    if name == "mlp":
        model = MLP()
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        return Workload(name, model.to(device), (x.to(device), y.to(device)), F.cross_entropy)
    if name == "gpt":
        cfg = dict(vocab=32000, d=768, layers=6, heads=12, block=512, sdpa=True) if gpu else \
            dict(vocab=256, d=128, layers=2, heads=4, block=64, sdpa=False)
        batch = 8 if gpu else 16
        model = GPT(**cfg)
        idx = torch.randint(0, cfg["vocab"], (batch, cfg["block"] + 1), generator=g)
        return Workload(name, model.to(device), (idx[:, :-1].to(device), idx[:, 1:].to(device)), lm_loss,
                        torch.bfloat16 if gpu else None)
    if name == "cnn":
        model = ResNet(width=32 if gpu else 16)
        batch = 128 if gpu else 16
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        return Workload(name, model.to(device), (x.to(device), y.to(device)), F.cross_entropy)
    if name.startswith("hf-"):  # a Hugging Face model from a tiny config (hf_zoo.py), float32, dropout off
        import hf_zoo
        model, batch = hf_zoo.make(name[3:], torch.float32)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return Workload(name, model.to(device).eval(), (batch, None), _hf_loss, keywords=True)
    raise ValueError(f"unknown workload {name}")


def _hf_loss(output, _):
    return output.loss
