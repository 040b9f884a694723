# Two commands do everything: `make demo` (install + train on the embedded default) and
# `make test` (install + the test suite). VENV=path picks another virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install demo test lint bench gpu-wheels

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

# Wheels for `scripts/gpu_bench.sh` on a GPU machine without network (torch comes with the
# machine): this package and the pure-Python dependencies it lacks, at the venv's versions.
GPU_WHEEL_DEPS := eai-sparsify transformers easy-vqa datasets dill multiprocess schedulefree \
	simple-parsing docstring-parser natsort
gpu-wheels: install
	rm -f .whl/*.whl
	$(PY) -m pip wheel -q --no-deps -w .whl .
	for v in 3.11 3.12 3.13; do $(PY) -m pip download -q --no-deps --only-binary=:all: \
		--python-version $$v -d .whl $$($(PY) -m pip freeze \
		| grep -iE '^($(shell echo $(GPU_WHEEL_DEPS) | tr ' ' '|' | sed 's/-/[-_]/g'))=='); done
