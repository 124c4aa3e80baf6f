"""A training loop with implicit parameters, Zygote style: `zt.Params(model)`, `zt.gradient(() -> loss,
ps)`, and a stock `torch.optim` optimizer stepping with the gradients (`gs.to_grad()`).

Fits a small MLP to y = sin(3x) * x on [-1, 1], and checks the first step's gradients against
torch.autograd. Run: python examples/train_params.py [--steps N]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import zygote_torch as zt


def main(steps: int = 300) -> float:
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 256).unsqueeze(1)
    y = torch.sin(3 * x) * x
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    ps = zt.Params(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = lambda: F.mse_loss(model(x), y)  # noqa: E731  reads the parameters itself

    for step in range(steps):
        loss, gs = zt.withgradient(loss_fn, ps)
        if step == 0:
            model.zero_grad()
            loss_fn().backward()
            err = max((gs[p] - p.grad).abs().max().item() for p in ps)
            print(f"step 0: max |zt - autograd| over all parameter gradients = {err:.2e}")
            assert err < 1e-5
        gs.to_grad()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.5f}")
    return loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
