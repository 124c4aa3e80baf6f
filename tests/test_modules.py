"""Gradients of real nn layers, as a module argument and as implicit Params, equal eager
``loss.backward()``; buffers (BatchNorm running statistics) update as in eager mode."""
import copy

import pytest
import torch
import torch.nn as nn

import zygote_torch as zt


def _input_for(name):
    g = torch.Generator().manual_seed(1)
    shapes = {"conv1d": (4, 3, 11), "conv2d": (2, 3, 9, 8), "bn1d": (8, 5), "bn2d": (4, 3, 5, 5),
              "embedding": None, "lstm": (5, 3, 4), "gru": (5, 3, 4), "mha": (5, 3, 8), "transformer": (3, 6, 16),
              "pool": (2, 3, 8, 8), "gn": (4, 6, 5), "ln": (4, 7, 10)}
    if name == "embedding":
        return torch.randint(0, 10, (6, 4), generator=g)
    return torch.randn(shapes.get(name, (6, 5)), generator=g, dtype=torch.float64)


class Pooling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.maxpool, self.avgpool, self.adapt = nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = self.conv(x)
        return self.maxpool(h).sum() + self.avgpool(h * h).sum() + self.adapt(h).sum()


class RNNHead(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 6, num_layers=2, batch_first=False)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        out, weights = self.attn(x, x, x)
        return out.sum() + weights.pow(2).sum()


MODELS = {
    "linear": lambda: nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3)),
    "conv1d": lambda: nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.SiLU(), nn.Conv1d(4, 2, 2, dilation=2)),
    "conv2d": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.ReLU(), nn.Conv2d(4, 4, 2, groups=2)),
    "bn1d": lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)),
    "bn2d": lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)),
    "ln": lambda: nn.Sequential(nn.LayerNorm(10), nn.Linear(10, 3)),
    "gn": lambda: nn.Sequential(nn.Conv1d(6, 6, 1), nn.GroupNorm(3, 6)),
    "embedding": lambda: nn.Sequential(nn.Embedding(10, 5, padding_idx=0), nn.Linear(5, 2)),
    "pool": Pooling,
    "lstm": lambda: RNNHead(nn.LSTM),
    "gru": lambda: RNNHead(nn.GRU),
    "mha": MHA,
    "transformer": lambda: nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True),
}


def _loss(out):
    return (out.double() ** 2).mean() if out.dim() else out


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_gradient_equals_eager(name, mode):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    getattr(model, mode)()
    x = _input_for(name)
    eager = copy.deepcopy(model)
    ours = copy.deepcopy(model)

    (g,) = zt.gradient(lambda m: _loss(m(x)), ours)
    eager.zero_grad()
    _loss(eager(x)).backward()
    for pname, p in eager.named_parameters():
        assert g[pname] is not None or p.grad is None or p.grad.abs().max() == 0, pname
        if g[pname] is not None:
            torch.testing.assert_close(g[pname], p.grad, atol=1e-8, rtol=1e-6, msg=lambda m: f"{pname}: {m}")
    for (bname, b_eager), (_, b_ours) in zip(eager.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(b_ours, b_eager, msg=lambda m: f"buffer {bname}: {m}")

    ps = zt.Params(ours)
    gs = zt.gradient(lambda: _loss(ours(x)), ps)
    eager.zero_grad()
    _loss(eager(x)).backward()
    for p_ours, p_eager in zip(ours.parameters(), eager.parameters()):
        if gs[p_ours] is not None:
            torch.testing.assert_close(gs[p_ours], p_eager.grad, atol=1e-8, rtol=1e-6)


def test_dropout_same_rng_semantics_as_eager():
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1)).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    torch.manual_seed(123)
    (g,) = zt.gradient(lambda m: m(x).pow(2).mean(), model)
    torch.manual_seed(123)
    model.zero_grad()
    model(x).pow(2).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g[name], p.grad, msg=lambda m: f"{name}: {m}")
