"""Rules for the fused recurrent kernels ``torch.lstm`` and ``torch.gru`` (what ``nn.LSTM`` and
``nn.GRU`` call).

The value is torch's fused kernel's. The pullback differentiates the same recurrence written step by
step in ops that have rules (recomputed when the cotangent arrives, so nothing extra is kept)::

    LSTM: i, f, g, o = split(x W_ih^T + h W_hh^T + b);  c' = s(f) c + s(i) tanh(g);  h' = s(o) tanh(c')
    GRU:  r = s(x_r + h_r),  z = s(x_z + h_z),  n = tanh(x_n + r h_n);  h' = (1 - z) n + z h

(``s`` the sigmoid; ``x_* = x W_i*^T + b_i*``, ``h_* = h W_h*^T + b_h*``), layer after layer, the
reverse direction reading the sequence backwards. Packed sequences, dropout between layers in
training, and projections (``proj_size``) go through the torch.func fallback instead.
"""
from __future__ import annotations

import torch

from ..ad.fallback import fallback_rule
from ..ad.registry import rrule
from ._util import NoTangent, materialize, nondiff, reference_pullback


def _lstm_cell(x, h, c, w_ih, w_hh, b):
    gates = x @ w_ih.T + h @ w_hh.T
    if b is not None:
        gates = gates + b
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    gi, gh = x @ w_ih.T, h @ w_hh.T
    if b_ih is not None:
        gi, gh = gi + b_ih, gh + b_hh
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _recurrence(kind, input, states, params, has_biases, num_layers, bidirectional, batch_first):
    """The outputs of torch.lstm / torch.gru, step by step: (output, h_n[, c_n])."""
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if batch_first else input)
    states = [s.unsqueeze(1) for s in states] if unbatched else list(states)
    directions = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    finals = [[] for _ in states]
    for layer in range(num_layers):
        outputs = []
        for d in range(directions):
            k = layer * directions + d
            w = params[k * per:(k + 1) * per]
            state = [s[k] for s in states]
            steps = range(x.shape[0]) if d == 0 else reversed(range(x.shape[0]))
            out = [None] * x.shape[0]
            for t in steps:
                if kind == "lstm":
                    state = list(_lstm_cell(x[t], state[0], state[1], w[0], w[1],
                                            w[2] + w[3] if has_biases else None))
                else:
                    state = [_gru_cell(x[t], state[0], w[0], w[1], *(w[2:4] if has_biases else (None, None)))]
                out[t] = state[0]
            outputs.append(torch.stack(out))
            for final, s in zip(finals, state):
                final.append(s)
        x = torch.cat(outputs, -1) if directions == 2 else outputs[0]
    output = x.squeeze(1) if unbatched else (x.transpose(0, 1) if batch_first else x)
    finals = [torch.stack(f).squeeze(1) if unbatched else torch.stack(f) for f in finals]
    return (output, *finals)


def _rule(kind, func, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    args = (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    n_weights = (4 if has_biases else 2) * num_layers * (2 if bidirectional else 1)
    packed = isinstance(hx, torch.Tensor) and hx.dim() == 1 or kind == "lstm" and not isinstance(hx, (list, tuple))
    if packed or (dropout > 0 and train) or len(params) != n_weights:
        return fallback_rule(func, args, {})  # see the module docstring
    out = func(*args)
    states = list(hx) if kind == "lstm" else [hx]

    def pullback(dout):
        dout = tuple(materialize(d, like=o) for d, o in zip(dout, out))
        back = reference_pullback(
            lambda x, states, ps: _recurrence(kind, x, states, ps, has_biases, num_layers, bidirectional, batch_first),
            (input, states, list(params)))
        dx, dstates, dparams = back(dout)
        dhx = dstates if kind == "lstm" else dstates[0]
        return (NoTangent(), dx, dhx, dparams) + nondiff(6)

    return out, pullback


@rrule(torch.lstm)
def lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """(output, h_n, c_n) of an LSTM stack; see the module docstring."""
    return _rule("lstm", torch.lstm, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                 batch_first)


@rrule(torch.gru)
def gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """(output, h_n) of a GRU stack; see the module docstring."""
    return _rule("gru", torch.gru, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                 batch_first)
