"""The main job, examples/train_gpt.py, in its short CI setting: it finishes, its first-step
gradients agree with torch.autograd, the loss falls, the loss-curve PNG exists; and the
data-parallel path (--nproc 2, gloo) does the same."""
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
    png = os.path.join(out_dir, "train_gpt_loss.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 1000


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


def test_builtin_png_writer(tmp_path):
    """The loss curve without matplotlib: a valid PNG written with zlib only."""
    import struct
    import zlib
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import train_gpt
    finally:
        sys.path.pop(0)
    path = str(tmp_path / "curve.png")
    train_gpt._write_png_plot(path, [4.0 - 0.01 * i for i in range(200)], [(0, 4.1), (199, 2.2)],
                              width=320, height=200)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (320, 200)
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    raw = zlib.decompress(data[idat + 4:idat + 4 + length])
    assert len(raw) == height * (1 + 3 * width)
    assert raw.count(b"\x08\x51\x9c") > 100  # the curve was drawn (its colour is there)
