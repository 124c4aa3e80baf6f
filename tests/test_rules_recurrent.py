"""torch.lstm / torch.gru (nn.LSTM, nn.GRU) against torch.autograd: layers, directions, batch_first,
no biases, unbatched input, given initial states; gradients of the input, the states and every
weight, dynamic and staged, no fallback."""
import pytest
import torch
import torch.nn as nn

import zygote_torch as zt
from helpers import check_gradient, fd_check, rand


def _module(cell, **kw):
    torch.manual_seed(0)
    return cell(3, 4, **kw).double()


CONFIGS = [dict(), dict(num_layers=2), dict(bidirectional=True), dict(batch_first=True, num_layers=2),
           dict(bias=False), dict(num_layers=2, bidirectional=True, batch_first=True)]


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_recurrent_modules(cell, kw):
    m = _module(cell, **kw)
    x = rand(2, 5, 3) if kw.get("batch_first") else rand(5, 2, 3)
    weights = [p for p in m.parameters()]
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)

    def f(x, h0, *ws):
        fn = torch.lstm if cell is nn.LSTM else torch.gru
        hx = [h0, h0 * 0.5] if cell is nn.LSTM else h0
        out = fn(x, hx, list(ws), kw.get("bias", True), kw.get("num_layers", 1), 0.0, True,
                 kw.get("bidirectional", False), kw.get("batch_first", False))
        return out[0].pow(2).sum() + out[1].sum()

    check_gradient(f, x, rand(layers, 2, 4, seed=5), *[w.detach() for w in weights])
    assert zt.fallbacks(lambda m: m(x)[0].sum(), m) == []


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_unbatched_and_module_gradients_equal_eager(cell):
    m = _module(cell, num_layers=2)
    x = rand(6, 3)
    (g,) = zt.gradient(lambda m: m(x)[0].pow(2).mean(), m)
    m.zero_grad()
    m(x)[0].pow(2).mean().backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(g[name], p.grad)


def test_finite_differences():
    m = _module(nn.GRU)
    fd_check(lambda x, w: torch.gru(x, rand(1, 2, 4, seed=2), [w] + [p.detach() for p in list(m.parameters())[1:]],
                                    True, 1, 0.0, True, False, False)[0].sum(), rand(4, 2, 3), m.weight_ih_l0.detach())
