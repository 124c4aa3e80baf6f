# The two commands of the README: `make demo` (the main job: a character GPT trained with
# zygote_torch) and `make test` (the test suite). `make seed` runs Zygote's README examples.
# Each creates .venv on first use. TORCH picks the torch wheel: the CPU build by default; on a GPU
# machine use e.g. `make test TORCH=torch` for the CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo seed test install clean

$(VENV)/.installed: setup.py Makefile $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)" numpy tqdm pytest hypothesis expecttest
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/train_gpt.py

seed: $(VENV)/.installed
	$(PY) examples/seed_examples.py

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
