"""zygote_torch: Zygote.jl's programming model for PyTorch.

Besides the Python package this builds the custom-op extension of csrc/ (see zygote_torch/ops):

- ``zygote_torch._C``: the CPU kernels, always (torch.utils.cpp_extension.CppExtension);
- ``zygote_torch._C_cuda``: the CPU and the CUDA kernels, when torch is a CUDA build and nvcc is
  found (CUDA_HOME); no GPU is needed to build. Architectures: $TORCH_CUDA_ARCH_LIST, by default
  "8.0;9.0+PTX" (A100, H100/H200, PTX for newer cards).

Neither is required: a missing toolkit is a message, a failed compile a warning, and the package
then runs the pure-torch implementation of the same ops. Environment switches:
ZYGOTE_TORCH_NO_EXT=1 (build no extension), ZYGOTE_TORCH_NO_CUDA=1 (CPU extension only).
"""
import os
import shutil
import sys

from setuptools import find_packages, setup


def _note(msg):
    print(f"zygote_torch setup: {msg}", file=sys.stderr, flush=True)


def _extensions():
    if os.environ.get("ZYGOTE_TORCH_NO_EXT") == "1":
        _note("ZYGOTE_TORCH_NO_EXT=1: building no extension (the pure-torch ops are used)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as e:  # torch missing at build time: pure Python install
        _note(f"torch not importable ({e}); building no extension")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join("csrc")
    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]  # (ATen's vec headers have `#pragma unroll`)
    # The CPU kernels: ops_cpu.cpp (baseline instruction set, and the dispatch) first, then the
    # AVX2 / AVX512 builds of the same kernels, whose instruction set is set in the source (so the
    # flags stay the same for every file and the extension loads on any CPU; see ops_cpu_kernels.h).
    cpu_sources = [os.path.join(csrc, f) for f in ("ops_cpu.cpp", "ops_cpu_avx2.cpp", "ops_cpu_avx512.cpp")]
    exts = []
    if os.environ.get("ZYGOTE_TORCH_CUDA_ONLY") != "1":  # (benchmarks/gpu_check.py builds only _C_cuda)
        exts.append(ce.CppExtension(
            "zygote_torch._C", cpu_sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DZT_EXT_NAME=_C"]},
            extra_link_args=["-fopenmp"]))

    if os.environ.get("ZYGOTE_TORCH_NO_CUDA") == "1":
        _note("ZYGOTE_TORCH_NO_CUDA=1: CPU extension only")
    elif not torch.version.cuda:
        _note("torch is a CPU build: CPU extension only")
    elif not ce.CUDA_HOME or not (os.path.exists(os.path.join(ce.CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")):
        _note("CUDA toolkit (nvcc) not found (set CUDA_HOME): CPU extension only; "
              "the CUDA ops fall back to pure torch")
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        _note(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        exts.append(ce.CUDAExtension(
            "zygote_torch._C_cuda",
            cpu_sources + [os.path.join(csrc, "ops_cuda_rows.cu"), os.path.join(csrc, "ops_cuda_misc.cu")],
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DZT_EXT_NAME=_C_cuda"],
                                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=["-fopenmp"]))

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


ext_modules, cmdclass = _extensions()

setup(
    name="zygote_torch",
    version="0.1.0",
    description="Zygote-style source-to-source gradients for PyTorch: torch.fx capture, ChainRules-style rrules",
    packages=find_packages(include=["zygote_torch", "zygote_torch.*"]),
    python_requires=">=3.11",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"test": ["pytest", "hypothesis", "expecttest"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
