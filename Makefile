# Two commands do everything: `make demo` (install + train on the embedded default) and
# `make test` (install + the test suite). VENV=path picks another virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install demo test lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# circuit-tracer pins transformers<=4.57; only its CLT loader is used (tests), so no deps
	$(PY) -m pip install -q --no-deps circuit-tracer==0.5.0
	touch $@

demo: install
	$(PY) -m vlm_sparsify $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m vlm_sparsify.bench $(ARGS)
