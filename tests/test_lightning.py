"""Lightning trains a model holding ``zt.compile(net)`` exactly as it trains the same model
holding ``net`` (issue 12, item 3): its own loop, optimizer and gradient clipping, two epochs; every
step's loss and the final parameters equal eager's (float64), and each step ran zt's backward
program. Runs where ``lightning`` is installed (the ``test`` extra installs it)."""
import logging
import warnings

import pytest
import torch

L = pytest.importorskip("lightning")

import zygote_torch as zt  # noqa: E402
from helpers import runs_a_zt_program  # noqa: E402


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randn(32, 1, generator=g, dtype=torch.float64)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class Regressor(L.LightningModule):
    def __init__(self, compiled: bool):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                                       torch.nn.Linear(16, 1)).double()
        self.compiled = compiled
        self.run = zt.compile(self.net) if compiled else self.net
        self.losses, self.zt_steps = [], []

    def training_step(self, batch, batch_index):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.run(x), y)
        self.losses.append(loss.detach().clone())
        self.zt_steps.append(runs_a_zt_program(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(compiled: bool) -> Regressor:
    model = Regressor(compiled)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, _data())
    return model


def test_lightning_trains_a_compiled_module_as_the_module_itself():
    eager, ours = _fit(compiled=False), _fit(compiled=True)
    assert ours.zt_steps == [True] * 8 and eager.zt_steps == [False] * 8
    torch.testing.assert_close(torch.stack(ours.losses), torch.stack(eager.losses), atol=1e-12, rtol=1e-10)
    for (n, p), (_, q) in zip(eager.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-12, rtol=1e-10, msg=lambda m: f"parameter {n}: {m}")
