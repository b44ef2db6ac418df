# The README's commands. PYTHON may point at a virtualenv's interpreter.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# CPU wheel of torch, installed only when torch is missing: an existing (CUDA) torch is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev demo test test-fast lint typecheck clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e .

install-dev:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	$(PYTHON) -c "import deepspeed" 2>/dev/null || $(PIP) install --no-build-isolation "deepspeed>=0.16"

demo: install
	$(PYTHON) -m bigft demo

test: install-dev
	$(PYTHON) -m pytest -q

test-fast: install-dev
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check bigft tests bench
	$(PYTHON) -m ruff format --check bigft tests bench

typecheck:
	$(PYTHON) -m mypy

clean:
	rm -rf runs build *.egg-info .pytest_cache .mypy_cache .ruff_cache
