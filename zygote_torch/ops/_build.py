"""How the compiled extension of csrc/ is built: its sources, its flags, where CUDA lives.

One description for the two ways to build it: setup.py (``pip install --no-build-isolation .``,
which loads this file by its path, before the package exists) and the build at first use
(``ZYGOTE_TORCH_BUILD=1``: ``torch.utils.cpp_extension.load`` into torch's extension cache, from
the sources that the package carries as ``zygote_torch/_csrc``). It imports nothing of the
package, and torch only inside the functions that need it.

The extensions: ``_C`` holds the CPU kernels; ``_C_cuda`` the same CPU kernels and the CUDA ones.
The CPU sources are one baseline build and the AVX2 / AVX512 builds of the same kernels, whose
instruction set is set in the source, so every file gets the same flags and the extension loads on
any x86 CPU (csrc/ops_cpu_kernels.h).
"""
from __future__ import annotations

import glob
import os
import shutil

CPU_SOURCES = ("ops_cpu.cpp", "ops_cpu_avx2.cpp", "ops_cpu_avx512.cpp", "replay.cpp")
CUDA_SOURCES = ("ops_cuda_rows.cu", "ops_cuda_misc.cu")
HEADERS = ("common.h", "ops_cpu_kernels.h", "cuda_common.cuh")
CXX_FLAGS = ("-O3", "-fopenmp", "-Wno-unknown-pragmas")  # (ATen's vec headers have `#pragma unroll`)
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo")
LINK_FLAGS = ("-fopenmp",)
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # A100, H100/H200, and PTX for newer cards
USUAL_CUDA_HOMES = ("/usr/local/cuda",)  # tried last

# What the user is told to do when the kernels are missing.
HOW_TO_BUILD = ("reinstall from the source with `pip install --no-build-isolation <path or sdist>` "
                "(torch installed first, and a C++ compiler), or set ZYGOTE_TORCH_BUILD=1 to compile "
                "them at the next import")


def name_flag(module_name: str) -> str:
    """The define that names the extension's Python module (csrc/ops_cpu.cpp: PyInit_<name>)."""
    return f"-DZT_EXT_NAME={module_name}"


def _has_cudart(root: str) -> bool:
    libs = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"), os.path.join("targets", "sbsa-linux", "lib"))
    return any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in libs)


def _is_toolkit(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and _has_cudart(root)


def find_cuda_home(environ=os.environ, which=shutil.which, torch_guess: str | None = None) -> tuple[str | None, str]:
    """(a CUDA toolkit folder, how it was found) or (None, why none was taken).

    A toolkit is a folder with ``bin/nvcc`` and ``lib64/libcudart.so*`` (or ``lib/``,
    ``targets/<arch>-linux/lib/``). Tried in turn: $CUDA_HOME, $CUDA_PATH, the parent of the
    folder of the ``nvcc`` on PATH (symbolic links followed), torch's own guess, /usr/local/cuda.
    An ``nvcc`` outside a toolkit folder (a wrapper script in /usr/local/bin, a lone binary) is not
    taken: torch's guess, its parent folder, then fails to link -lcudart after minutes of compiling.
    """
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            candidates.append((environ[var], f"${var}"))
    nvcc = which("nvcc")
    if nvcc:
        candidates.append((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"nvcc on PATH ({nvcc})"))
    if torch_guess:
        candidates.append((torch_guess, "torch's CUDA_HOME"))
    candidates += [(root, root) for root in USUAL_CUDA_HOMES]
    for root, how in candidates:
        if _is_toolkit(root):
            return os.path.realpath(root), how
    tried = ", ".join(dict.fromkeys(root for root, _ in candidates))
    return None, f"no CUDA toolkit (bin/nvcc and lib64/libcudart.so) in: {tried}"


def source_dir() -> str | None:
    """The folder of the C++/CUDA sources: the package's ``_csrc`` (an installed package), else
    the checkout's ``csrc/`` beside the package folder; None when neither has them."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(os.path.dirname(here), "_csrc"), os.path.join(os.path.dirname(os.path.dirname(here)), "csrc")):
        if all(os.path.isfile(os.path.join(folder, f)) for f in CPU_SOURCES + HEADERS):
            return folder
    return None


def build_at_first_use(cuda: bool, verbose: bool = False):
    """Compile the extension with ``torch.utils.cpp_extension.load`` into torch's extension cache
    ($TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions; a later import finds it there
    and recompiles only when a source changed); return (module name, module). Raises on failure."""
    from torch.utils import cpp_extension as ce

    folder = source_dir()
    if folder is None:
        raise FileNotFoundError("the C++ sources (zygote_torch/_csrc or csrc/) are not there")
    name = "zygote_torch_C_cuda" if cuda else "zygote_torch_C"
    sources = [os.path.join(folder, f) for f in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]
    if cuda:
        home, how = find_cuda_home(torch_guess=ce.CUDA_HOME)
        if home is None:
            raise FileNotFoundError(how)
        ce.CUDA_HOME = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    module = ce.load(name=name, sources=sources, extra_include_paths=[folder],
                     extra_cflags=list(CXX_FLAGS) + [name_flag(name)],
                     extra_cuda_cflags=list(NVCC_FLAGS) if cuda else None,
                     extra_ldflags=list(LINK_FLAGS), verbose=verbose)
    return name, module
