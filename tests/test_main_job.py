"""The main job, examples/train_gpt.py, in its short CI setting: it finishes, its first-step
gradients agree with torch.autograd, the loss falls, the loss-curve PNG exists (matplotlib); and the
data-parallel path (--nproc 2, gloo) does the same."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_gpt.py")


def _run(out_dir, *flags, timeout=240):
    result = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out_dir), *flags],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, f"train_gpt.py failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    with open(os.path.join(out_dir, "train_gpt.json")) as f:
        return result.stdout, json.load(f)


def _check(stdout, metrics, out_dir):
    assert "first step: max |zt - torch.autograd|" in stdout and ": OK" in stdout
    assert metrics["grad_max_abs_diff"] < 1e-4
    # the loss falls clearly: from about log(vocabulary) to well below it
    assert metrics["last_loss"] < 0.75 * metrics["first_loss"], metrics
    assert metrics["val_last"] < metrics["val_first"] - 0.5, metrics
    assert "zygote_torch / eager =" in stdout and metrics["zt_step_ms"] > 0 and metrics["eager_step_ms"] > 0
    assert metrics["sample"].startswith("def ") and len(metrics["sample"]) > 40
    assert 0 < metrics["zt_train_s"] < metrics["train_s"]  # the progress rate leaves the eager steps out
    png = os.path.join(out_dir, "train_gpt_loss.png")
    if importlib.util.find_spec("matplotlib") is None:  # (the package's `demo` extra; `make` installs it)
        assert "loss curve: not drawn, matplotlib is not installed" in stdout and not os.path.exists(png)
        return
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10000 and metrics["png"] == png


def test_main_job_smoke(tmp_path):
    stdout, metrics = _run(tmp_path)
    assert metrics["world"] == 1 and metrics["steps"] == 60
    _check(stdout, metrics, tmp_path)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_main_job_data_parallel(tmp_path):
    stdout, metrics = _run(tmp_path, "--nproc", "2")
    assert metrics["world"] == 2
    assert "8 on each of 2 processes" in stdout and "all-reduce" in stdout
    _check(stdout, metrics, tmp_path)
