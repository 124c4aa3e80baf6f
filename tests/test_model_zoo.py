"""Real models end to end (issue 4): a GPT-style transformer, a ResNet-style CNN and an LSTM
language model. Every parameter's gradient equals eager ``loss.backward()``, dynamic and staged, and
the calls that still go through the torch.func fallback are reported (and pinned here: none)."""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zygote_torch as zt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import models  # noqa: E402


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab=50, d=16, hidden=24, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx):
        h, _ = self.lstm(self.embed(idx))
        return self.head(h)


def _zoo():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    gpt = models.GPT(vocab=64, d=32, layers=2, heads=4, block=16)
    idx = torch.randint(0, 64, (3, 17), generator=g)
    cnn = models.ResNet(width=8)
    img = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    cls = torch.randint(0, 10, (4,), generator=g)
    lstm = LSTMLanguageModel()
    seq = torch.randint(0, 50, (3, 9), generator=g)
    return {
        "gpt": (gpt, lambda m: models.lm_loss(m(idx[:, :-1]), idx[:, 1:]), []),
        "resnet": (cnn, lambda m: F.cross_entropy(m(img), cls), []),
        "lstm": (lstm, lambda m: models.lm_loss(m(seq[:, :-1]), seq[:, 1:]), []),
    }


@pytest.mark.parametrize("name", ["gpt", "resnet", "lstm"])
def test_model_gradients_equal_eager_and_fallbacks_are_reported(name):
    model, loss, expected_fallbacks = _zoo()[name]
    model = model.double()
    eager = copy.deepcopy(model)
    eager.zero_grad()
    loss(eager).backward()
    reference = {n: p.grad for n, p in eager.named_parameters()}

    ours = copy.deepcopy(model)
    (g,) = zt.gradient(loss, ours)
    staged = zt.compile(lambda m: zt.gradient(loss, m)[0])(copy.deepcopy(model))
    for grads, how in ((g, "dynamic"), (staged, "staged")):
        for n, ref in reference.items():
            torch.testing.assert_close(grads[n], ref, atol=1e-8, rtol=1e-6, msg=lambda m: f"{how} {n}: {m}")

    used = sorted({line.split(" at ")[0] for line in zt.fallbacks(loss, model)})
    print(f"{name}: calls through the torch.func fallback: {used or 'none'}")
    assert used == expected_fallbacks
