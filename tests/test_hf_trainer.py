"""The Hugging Face ``Trainer`` trains ``zt.compile(model)`` exactly as it trains the model itself
(issue 12, item 3): it calls the model with keyword arguments, wraps it with accelerate, clips
gradients and steps the optimizer; the losses it logs and the parameters after a few steps are
eager's, and each step ran zt's backward program (not a silent eager fallback). Runs where
``transformers`` and ``accelerate`` are installed (the ``test`` extra installs both)."""
import os
import sys
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import hf_zoo  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import zygote_torch as zt  # noqa: E402
from helpers import runs_a_zt_program  # noqa: E402

STEPS = 3


class _CheckedTrainer(Trainer):
    """Trainer as it is, noting whether each step's loss came from zt's program."""

    zt_steps: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.zt_steps.append(runs_a_zt_program(loss[0] if return_outputs else loss))
        return loss


def _train(name: str, compiled: bool):
    model, batch = hf_zoo.make(name, torch.float64)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(hf_zoo.BATCH)]
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=hf_zoo.BATCH, max_steps=STEPS,
                                 learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
                                 weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=True, remove_unused_columns=False, seed=0, data_seed=0,
                                 disable_tqdm=True)
        trainer = _CheckedTrainer(model=zt.compile(model) if compiled else model, args=args,
                                  train_dataset=rows * STEPS)
        trainer.zt_steps = []
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return model, losses, trainer.zt_steps


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_the_hugging_face_trainer_trains_a_compiled_model_as_the_model_itself(name):
    import transformers
    transformers.logging.set_verbosity_error()
    eager, eager_losses, _ = _train(name, compiled=False)
    ours, our_losses, zt_steps = _train(name, compiled=True)
    assert zt_steps == [True] * STEPS
    assert len(our_losses) == STEPS
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(eager_losses), atol=1e-9, rtol=1e-9)
    for (n, p), (_, q) in zip(eager.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q, p, atol=1e-10, rtol=1e-8, msg=lambda m: f"{name} parameter {n}: {m}")
