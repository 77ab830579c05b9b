# Quick start: `make demo` runs the main job on built-in defaults, `make test` runs the tests.
# Both create .venv if it is missing. torch==2.13.0 is installed first on purpose: on the
# project's machines it is a small local CPU build, and a plain `torch` requirement would pull
# a multi-GB CUDA build (see README, "Installing").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint mutate install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.core-installed: pyproject.toml | $(PY)
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e ".[dev,ray]"
	touch $(VENV)/.core-installed $@

install: $(VENV)/.core-installed
install-dev: $(VENV)/.dev-installed

demo: $(VENV)/.core-installed
	$(VENV)/bin/factorlab demo --out runs/demo

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench tools

# Mutation testing of layers/ and methods/ (about 12 minutes on 2 quiet cores; see results/mutation/summary.md)
mutate: $(VENV)/.dev-installed
	$(PIP) install "mutmut==3.8.1"
	rm -rf mutants
	-$(VENV)/bin/mutmut run --max-children 2 > mutants.log 2>&1
	$(PY) tools/mutation_summary.py || (tail -c 2000 mutants.log; exit 1)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache mutants mutants.log
