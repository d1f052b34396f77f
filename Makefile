# Two commands for a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU machine takes the local CPU build; a GPU machine the CUDA build of the same release.
TORCH ?= torch==2.13.0
# The Triton whose interpreter runs the kernel tests on the CPU (TRITON_INTERPRET=1); GPU machines may override it
# with the version their torch build requires.
TRITON ?= triton==3.9.0
ARGS ?=

.PHONY: train test venv dev clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e ".[dev]" "$(TRITON)"
	touch $@

venv: $(VENV)/.base
dev: $(VENV)/.dev

# Trains the default model on official CIFAR-10 (downloaded once), or on --data / CUDACNN_DATA; offline, on the
# bundled sample (with a warning). Without a GPU the run is CPU-sized: a few minutes (e.g. ARGS="--epochs 40" for more).
train: $(VENV)/.base
	$(VENV)/bin/cudacnn train $(ARGS)

test: $(VENV)/.dev
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
