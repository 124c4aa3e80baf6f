"""A new user's first minutes: the main job's --help and progress line, and a quiet stderr when
compiled code catches an exception."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_gpt.py")


@pytest.fixture(scope="module")
def train_gpt():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import train_gpt
    finally:
        sys.path.pop(0)
    return train_gpt


def test_help_gives_every_option_a_text_and_its_default():
    run = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # one entry per option: "  --name VALUE   text ... (default: ...)", wrapped over lines
    entries = re.split(r"\n  (?=--)", run.stdout.split("options:", 1)[1])[1:]
    names = [entry.split()[0] for entry in entries]
    assert {"--steps", "--layers", "--d-model", "--lr", "--device", "--nproc", "--smoke", "--seed"} <= set(names)
    for entry in entries:
        text = " ".join(entry.split())
        assert "(default:" in text, f"no default shown: {text}"
        words = text.split("(default:")[0].split()[1:]
        assert len([w for w in words if w.islower() and len(w) > 2]) >= 2, f"no help text: {text}"


def test_progress_shows_each_steps_loss_and_the_rate_of_the_timed_steps(train_gpt, monkeypatch, capsys):
    """The rate counts only the time given for each step (the zygote_torch steps), so that the
    eager comparison steps and the evaluations run between them do not slow it."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain-lines display, whose output is easy to read
    progress = train_gpt.Progress(total=4, enabled=True)
    for loss, step_s in [(4.0, 0.5), (3.5, 0.5), (3.0, 0.25), (2.75, 0.75)]:
        progress.update(loss, step_s)
    progress.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert lines[-1] == "step     4/4  loss 2.7500, 2.00 steps/s, 0 s left"
    assert [line.split("loss ")[1].split(",")[0] for line in lines] == ["4.0000", "3.5000", "3.0000", "2.7500"]
    assert progress.rate() == 4 / 2.0


def test_progress_bar_shows_the_loss_of_every_step(train_gpt, capsys):
    pytest.importorskip("tqdm")
    progress = train_gpt.Progress(total=3, enabled=True)
    shown = []
    for loss in (4.25, 3.5, 3.125):
        progress.update(loss, 0.1)
        shown.append(progress.bar.postfix)
    progress.close()
    assert [s.split(",")[0] for s in shown] == ["loss 4.2500", "loss 3.5000", "loss 3.1250"]
    assert all("10.00 steps/s" in s for s in shown)


CATCHING = """
import torch, zygote_torch as zt

def f(x):
    try:
        y = torch.mm(x, x)      # a 1-d x: the shape check fails, under capture on fake tensors
    except RuntimeError:
        y = 3 * x
    return y.sum()

x = torch.randn(3, dtype=torch.float64)
(g,) = zt.compile(lambda x: zt.gradient(f, x))(x)
assert torch.equal(g, torch.full_like(x, 3.0)), g
print("caught, gradient", g.tolist())
"""


def test_compiled_try_except_prints_no_fake_tensor_traceback():
    """torch logs the traceback of a failing meta kernel at ERROR level before raising: a
    try/except in a compiled function printed some 20 lines of torch internals to stderr."""
    run = subprocess.run([sys.executable, "-c", CATCHING], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "caught, gradient [3.0, 3.0, 3.0]" in run.stdout
    assert "Traceback" not in run.stderr and "fake_tensor" not in run.stderr, run.stderr
