# The two commands of the README: `make demo` (the main job: a character GPT trained with
# zygote_torch) and `make test` (the test suite). `make seed` runs Zygote's README examples,
# `make package-check` builds the sdist and wheels and tests them in fresh venvs (.ci/packaging).
# Each creates .venv on first use: torch, then the package (editable, with the compiled CPU
# kernels) and its `test` and `demo` extras.
#
# TORCH is what pip installs for torch: by default torch==2.13.0, which pip takes from a local
# CPU wheel where there is one (this project's machines) and otherwise from PyPI, whose Linux
# x86-64 wheel is the CUDA build (about 5 GB with its NVIDIA packages; it runs on a CPU too).
# For the CPU build anywhere (about 200 MB), give torch's own CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# PYTHON picks the interpreter (3.11 or 3.12), e.g. `make test PYTHON=python3.12`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
# What the build needs, pinned here because `--no-build-isolation` builds with the venv's own
# tools (pyproject.toml's [build-system] says the same for isolated builds).
BUILD_TOOLS := "setuptools>=77"

.PHONY: demo seed test install package-check clean

$(VENV)/.installed: pyproject.toml setup.py Makefile $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(BUILD_TOOLS) numpy
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q --no-build-isolation -e ".[test,demo]"
	$(PY) -c "import zygote_torch as zt; print('zygote_torch', zt.__version__, 'kernels:', zt.ops.available())"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/train_gpt.py

seed: $(VENV)/.installed
	$(PY) examples/seed_examples.py

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

package-check:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" TORCH_INDEX="$(TORCH_INDEX)" bash .ci/packaging

clean:
	rm -rf $(VENV) build dist *.egg-info
