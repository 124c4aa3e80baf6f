"""The compiled extension of csrc/; everything else about the package is in pyproject.toml.

- ``zygote_torch._C``: the CPU kernels, whenever torch is importable at build time;
- ``zygote_torch._C_cuda``: the CPU and the CUDA kernels, when torch is a CUDA build and a CUDA
  toolkit is found (a folder with bin/nvcc and lib64/libcudart: $CUDA_HOME, $CUDA_PATH, the nvcc
  on PATH, /usr/local/cuda; zygote_torch/ops/_build.py). No GPU is needed to build.
  Architectures: $TORCH_CUDA_ARCH_LIST, by default "8.0;9.0+PTX" (A100, H100/H200, PTX for newer).

torch is importable at build time only without build isolation: ``pip install
--no-build-isolation .`` (torch installed first). ``pip install .`` builds in a fresh environment
without torch, so the wheel is pure Python; zygote_torch then warns once at import and runs the
pure-torch implementations of the same ops. Neither extension is required: a missing toolkit is a
message, a failed compile a warning, never a failed install.

Environment switches: ZYGOTE_TORCH_NO_EXT=1 (build no extension), ZYGOTE_TORCH_NO_CUDA=1 (CPU
extension only), ZYGOTE_TORCH_CUDA_ONLY=1 (only _C_cuda: benchmarks/gpu_check.py).
"""
import importlib.util
import os
import sys

import setuptools
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
SETUPTOOLS_FLOOR = (77, 0)  # as pyproject.toml's [build-system]: an isolated build gets it from there


def _check_setuptools():
    """--no-build-isolation builds with the environment's own setuptools; an older one fails on
    pyproject.toml's license field, or has no bdist_wheel (a venv's bundled setuptools 65)."""
    found = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    if found < SETUPTOOLS_FLOOR:
        sys.exit(f"zygote_torch setup: setuptools {setuptools.__version__} is too old to build this package; "
                 f"pip install 'setuptools>={SETUPTOOLS_FLOOR[0]}' and build again")


def _note(msg):
    print(f"zygote_torch setup: {msg}", file=sys.stderr, flush=True)


def _load_build_description():
    """zygote_torch/ops/_build.py, loaded by its path (the package itself is not importable yet)."""
    spec = importlib.util.spec_from_file_location("_zygote_torch_build", os.path.join(HERE, "zygote_torch", "ops", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_home(build, ce):
    """The CUDA toolkit to build with, or None (with the reason said) for a CPU-only build."""
    import torch

    if os.environ.get("ZYGOTE_TORCH_NO_CUDA") == "1":
        _note("ZYGOTE_TORCH_NO_CUDA=1: CPU extension only")
        return None
    if not torch.version.cuda:
        _note(f"torch {torch.__version__} is a CPU build: CPU extension only")
        return None
    home, how = build.find_cuda_home(torch_guess=ce.CUDA_HOME)
    if home is None:
        _note(f"{how}: CPU extension only, the CUDA ops run in pure torch (set CUDA_HOME to a toolkit to build them)")
    else:
        _note(f"CUDA toolkit {home} (from {how})")
    return home


def _extensions():
    if os.environ.get("ZYGOTE_TORCH_NO_EXT") == "1":
        _note("ZYGOTE_TORCH_NO_EXT=1: building no extension (a pure-Python wheel)")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension as ce
    except Exception as e:  # noqa: BLE001  (torch missing at build time: build isolation)
        _note(f"torch is not importable here ({type(e).__name__}: {e}): building no extension, the wheel is "
              "pure Python; for the compiled kernels install torch first and use pip install --no-build-isolation")
        return [], {}

    build = _load_build_description()
    csrc = "csrc"
    cpu_sources = [os.path.join(csrc, f) for f in build.CPU_SOURCES]
    include = [os.path.join(HERE, csrc)]
    exts = []
    if os.environ.get("ZYGOTE_TORCH_CUDA_ONLY") != "1":
        exts.append(ce.CppExtension(
            "zygote_torch._C", cpu_sources, include_dirs=include,
            extra_compile_args={"cxx": list(build.CXX_FLAGS) + [build.name_flag("_C")]},
            extra_link_args=list(build.LINK_FLAGS)))
    home = _cuda_home(build, ce)
    if home is not None:
        ce.CUDA_HOME = home  # what CUDAExtension and BuildExtension read
        os.environ["CUDA_HOME"] = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCHS)
        _note(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        exts.append(ce.CUDAExtension(
            "zygote_torch._C_cuda", cpu_sources + [os.path.join(csrc, f) for f in build.CUDA_SOURCES],
            include_dirs=include,
            extra_compile_args={"cxx": list(build.CXX_FLAGS) + [build.name_flag("_C_cuda")],
                                "nvcc": list(build.NVCC_FLAGS)},
            extra_link_args=list(build.LINK_FLAGS)))

    class BuildExtensionOrWarn(ce.BuildExtension):
        """A failed compile is a warning, never a failed install: the ops fall back to pure torch."""

        failed = set()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self.failed.add(ext.name)
                _note(f"WARNING: building {ext.name} failed ({type(e).__name__}: {e}); "
                      "zygote_torch will use the pure-torch ops instead")

        def _built_only(self, method, *args):
            every = self.extensions
            self.extensions = [e for e in every if e.name not in self.failed]
            try:
                return method(*args)
            finally:
                self.extensions = every

        def copy_extensions_to_source(self):
            return self._built_only(super().copy_extensions_to_source)

        def get_outputs(self):
            return self._built_only(super().get_outputs)

        def get_output_mapping(self):
            return self._built_only(super().get_output_mapping)

    return exts, {"build_ext": BuildExtensionOrWarn}


if __name__ == "__main__":  # (setuptools' build backend runs this file as __main__ too)
    _check_setuptools()
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
