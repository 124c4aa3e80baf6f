"""The package as a registry would hold it: what the sdist and the wheel contain, the metadata, the
version; the search for a CUDA toolkit; and a package without its compiled kernels (it warns
once and computes what torch computes). Building with the compiled kernels, and installing into
fresh environments, is .ci/packaging's job (minutes); these take seconds."""
import email
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import zygote_torch as zt
from zygote_torch.ops import _build

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What a build reads; copied to a temporary folder, so that the build's outputs (build/,
# *.egg-info) stay out of the checkout.
BUILD_INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "Makefile",
                "zygote_torch", "csrc", "tests", "examples", "docs", "benchmarks"]


def _source_packages() -> set[str]:
    """Every folder of zygote_torch/ with Python files, as a dotted package name."""
    found = set()
    for path in (ROOT / "zygote_torch").rglob("*.py"):
        if "__pycache__" not in path.parts:
            found.add(".".join(path.parent.relative_to(ROOT).parts))
    return found


def test_every_subpackage_is_listed():
    """pyproject lists the packages (ad/ and capture/ have no __init__.py, which a plain
    find_packages misses: the first wheels failed `import zygote_torch` for that)."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == _source_packages() | {"zygote_torch._csrc"}


def test_every_source_file_is_known_to_the_build():
    """Every file of csrc/ is a source or a header that _build.py names (and so in the sdist, the
    wheel's _csrc and the build at first use)."""
    on_disk = {p.name for p in (ROOT / "csrc").iterdir() if p.is_file()}
    assert on_disk == set(_build.CPU_SOURCES + _build.CUDA_SOURCES + _build.HEADERS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An sdist and a pure-Python wheel (ZYGOTE_TORCH_NO_EXT=1: no compile) through setuptools'
    PEP 517 backend, as pip or `python -m build` would call it."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, ZYGOTE_TORCH_NO_EXT="1")
    names, logs = [], []
    for hook in ("build_sdist", "build_wheel"):  # (each in its own process, as a frontend calls them)
        code = f"import sys; from setuptools import build_meta; print('BUILT', build_meta.{hook}(sys.argv[1]))"
        run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        names.append(run.stdout.split("BUILT ")[-1].strip())
        logs.append(run.stderr)
    sdist_name, wheel_name = names
    return out / sdist_name, out / wheel_name, "".join(logs)


def test_wheel_holds_every_module_and_the_sources(built):
    _, wheel, _ = built
    assert wheel.name == f"zygote_torch-{zt.__version__}-py3-none-any.whl"  # pure Python, and it says so
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in _source_packages():
        folder = ROOT.joinpath(*package.split("."))
        for module in folder.glob("*.py"):
            assert f"{package.replace('.', '/')}/{module.name}" in names
    assert "zygote_torch/py.typed" in names
    for source in _build.CPU_SOURCES + _build.CUDA_SOURCES + _build.HEADERS:
        assert f"zygote_torch/_csrc/{source}" in names


def test_wheel_metadata(built):
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as z:
        meta = email.message_from_bytes(z.read(f"zygote_torch-{zt.__version__}.dist-info/METADATA"))
    assert meta["Name"] == "zygote_torch" and meta["Version"] == zt.__version__
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["License-Expression"] == "MIT"
    requires = meta.get_all("Requires-Dist")
    assert "torch>=2.13" in requires and "numpy" in requires
    assert any(r.startswith("matplotlib") and 'extra == "demo"' in r for r in requires)
    assert any(r.startswith("pytest") and 'extra == "test"' in r for r in requires)
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert meta.get_payload().startswith("# zygote_torch")  # the README is the long description
    assert meta["Description-Content-Type"] == "text/markdown"


def test_sdist_can_build_the_kernels_and_run_the_tests(built):
    """The sdist holds every C++/CUDA source and header (the first sdist had no
    ops_cpu_kernels.h, so a wheel built from it had no kernels), the tests with their helpers, the
    examples and the docs."""
    sdist, _, _ = built
    root = f"zygote_torch-{zt.__version__}/"
    names = {n.removeprefix(root) for n in tarfile.open(sdist).getnames()}
    for source in _build.CPU_SOURCES + _build.CUDA_SOURCES + _build.HEADERS:
        assert f"csrc/{source}" in names
    for needed in ("pyproject.toml", "setup.py", "LICENSE", "README.md", "tests/helpers.py", "tests/conftest.py",
                   "tests/opinfo_known_failures.py", "examples/train_gpt.py", "docs/semantics.md",
                   "zygote_torch/ops/_build.py", "zygote_torch/py.typed"):
        assert needed in names, needed
    assert not any(n.endswith((".so", ".pyc")) for n in names)


def test_a_build_without_the_extension_says_so(built):
    _, _, log = built
    assert "ZYGOTE_TORCH_NO_EXT=1: building no extension (a pure-Python wheel)" in log


def test_version_is_the_installed_metadata():
    import importlib.metadata
    assert zt.__version__ == importlib.metadata.version("zygote_torch")
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "zygote_torch.__version__"}


# -- the CUDA toolkit ------------------------------------------------------------------------------

def _toolkit(root: pathlib.Path, cudart: str | None = "lib64/libcudart.so.13") -> pathlib.Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    if cudart:
        (root / cudart).parent.mkdir(parents=True, exist_ok=True)
        (root / cudart).write_text("")
    return root


def test_cuda_home_from_a_toolkit_folder(tmp_path):
    kit = _toolkit(tmp_path / "cuda-13.0")
    home, how = _build.find_cuda_home(environ={"CUDA_HOME": str(kit)}, which=lambda _: None)
    assert (home, how) == (str(kit.resolve()), "$CUDA_HOME")


@pytest.fixture
def no_usual_toolkit(monkeypatch, tmp_path):
    """/usr/local/cuda, the last place tried, made a missing folder (this machine has a toolkit there)."""
    monkeypatch.setattr(_build, "USUAL_CUDA_HOMES", (str(tmp_path / "usr-local-cuda"),))


def test_cuda_home_skips_an_nvcc_outside_a_toolkit(tmp_path, no_usual_toolkit):
    """The failure reported: an nvcc on PATH in a folder without the CUDA libraries (here: a
    wrapper script in /usr/local/bin) made the build guess its parent as CUDA_HOME, compile for
    minutes and fail to link -lcudart."""
    lone = _toolkit(tmp_path / "usr-local", cudart=None)
    home, why = _build.find_cuda_home(environ={}, which=lambda _: str(lone / "bin" / "nvcc"),
                                      torch_guess=str(lone))
    assert home is None and "no CUDA toolkit" in why and str(lone) in why


def test_cuda_home_falls_back_to_usual_place(tmp_path, monkeypatch):
    kit = _toolkit(tmp_path / "cuda-13.0")
    lone = _toolkit(tmp_path / "usr-local", cudart=None)
    monkeypatch.setattr(_build, "USUAL_CUDA_HOMES", (str(kit),))
    home, how = _build.find_cuda_home(environ={}, which=lambda _: str(lone / "bin" / "nvcc"), torch_guess=str(lone))
    assert (home, how) == (str(kit.resolve()), str(kit))


def test_cuda_home_follows_nvcc_to_its_toolkit(tmp_path):
    kit = _toolkit(tmp_path / "cuda", cudart="targets/x86_64-linux/lib/libcudart.so")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(kit / "bin" / "nvcc")
    home, how = _build.find_cuda_home(environ={"CUDA_HOME": str(tmp_path / "missing")},
                                      which=lambda _: str(tmp_path / "bin" / "nvcc"))
    assert home == str(kit.resolve()) and how.startswith("nvcc on PATH")


def test_setup_skips_cuda_without_a_toolkit(tmp_path, capsys, no_usual_toolkit):
    """setup.py's one line where torch is a CUDA build but no toolkit is found."""
    spec = importlib.util.spec_from_file_location("zt_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # (setup() itself runs only as __main__)

    class FakeTorchCE:
        CUDA_HOME = str(tmp_path / "nowhere")

    import torch
    cuda, torch.version.cuda = torch.version.cuda, "13.0"
    old_path = os.environ.get("PATH", "")
    env_keep = {k: os.environ.pop(k) for k in ("CUDA_HOME", "CUDA_PATH", "ZYGOTE_TORCH_NO_CUDA") if k in os.environ}
    os.environ["PATH"] = str(tmp_path)
    try:
        home = setup._cuda_home(_build, FakeTorchCE)
    finally:
        torch.version.cuda = cuda
        os.environ["PATH"] = old_path
        os.environ.update(env_keep)
    err = capsys.readouterr().err
    assert home is None
    assert err.count("\n") == 1 and "no CUDA toolkit" in err and "CPU extension only" in err


# -- without the compiled kernels ------------------------------------------------------------------

WITHOUT_KERNELS = """
import importlib.abc, sys, warnings

class NoExtension(importlib.abc.MetaPathFinder):  # as in a pure-Python wheel: no zygote_torch._C*
    def find_spec(self, name, path=None, target=None):
        if name in ("zygote_torch._C", "zygote_torch._C_cuda"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoExtension())
import torch, torch.nn.functional as F
import zygote_torch as zt
from zygote_torch.ops import kernel_choice as fused

assert zt.ops.available() == {"cpu": False, "cuda": False}
fused.USE_KERNELS_ON_CPU = True  # ask for the kernels at every size: the pure-torch path answers
torch.manual_seed(0)
x = torch.randn(64, 300, dtype=torch.float64)
t = torch.randint(0, 300, (64,))
w = torch.randn(300, dtype=torch.float64)
f = lambda x, w: F.cross_entropy(F.gelu(F.layer_norm(x, (300,), w)), t)
for _ in range(3):
    dynamic = zt.gradient(f, x, w)
    staged = zt.compile(lambda x, w: zt.gradient(f, x, w))(x, w)
xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
reference = torch.autograd.grad(f(xr, wr), (xr, wr))
for got in (dynamic, staged):
    for a, b in zip(got, reference):
        assert (a - b).abs().max().item() < 1e-12, (a - b).abs().max().item()
print("same as torch.autograd")
"""


def test_without_kernels_one_warning_and_torchs_gradients():
    env = {k: v for k, v in os.environ.items() if k not in ("ZYGOTE_TORCH_NO_EXT", "ZYGOTE_TORCH_BUILD", "PYTHONWARNINGS")}
    run = subprocess.run([sys.executable, "-c", WITHOUT_KERNELS], capture_output=True, text=True, env=env,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "same as torch.autograd" in run.stdout
    warning_lines = [line for line in run.stderr.splitlines() if "KernelsNotBuiltWarning" in line]
    assert len(warning_lines) == 1, run.stderr
    assert "compiled CPU kernels are not there" in warning_lines[0]
    assert "pip install --no-build-isolation" in warning_lines[0] and "ZYGOTE_TORCH_BUILD=1" in warning_lines[0]


def test_no_ext_switch_warns_of_nothing():
    env = dict(os.environ, ZYGOTE_TORCH_NO_EXT="1")
    run = subprocess.run([sys.executable, "-c", "import zygote_torch as zt; print(zt.ops.available())"],
                         capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "{'cpu': False, 'cuda': False}" in run.stdout and "KernelsNotBuilt" not in run.stderr


def test_missing_cuda_kernels_warn_once(monkeypatch, recwarn):
    """A CUDA build of torch whose CUDA kernels are missing: the first op on a CUDA tensor warns,
    once (checked on the loader's state; no GPU is needed)."""
    from zygote_torch.ops import _loader
    import torch
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setitem(_loader.LOADED, "cuda", False)
    monkeypatch.setattr(_loader, "_WARNED", set())
    monkeypatch.delitem(_loader.ERRORS, "env", raising=False)
    assert [_loader.has_kernels("cuda") for _ in range(3)] == [False] * 3
    said = [w for w in recwarn if issubclass(w.category, _loader.KernelsNotBuiltWarning)]
    assert len(said) == 1 and "compiled CUDA kernels are not there" in str(said[0].message)


def test_setup_names_the_setuptools_it_needs(monkeypatch):
    """A venv's bundled setuptools (65 on Python 3.11) has no bdist_wheel and cannot read
    pyproject's license: --no-build-isolation then failed with `invalid command 'bdist_wheel'`."""
    spec = importlib.util.spec_from_file_location("zt_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    floor = PYPROJECT["build-system"]["requires"]
    assert floor == [f"setuptools>={setup.SETUPTOOLS_FLOOR[0]}"]
    monkeypatch.setattr(setup.setuptools, "__version__", "65.5.0")
    with pytest.raises(SystemExit, match=r"setuptools 65.5.0 is too old .* pip install 'setuptools>=77'"):
        setup._check_setuptools()
    monkeypatch.setattr(setup.setuptools, "__version__", "77.0.3")
    setup._check_setuptools()
