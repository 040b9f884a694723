# Two commands do everything: `make demo` (install + train on the embedded default) and
# `make test` (install + the test suite). VENV=path picks another virtual environment.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install demo test lint bench gpu-wheels test-triton

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# circuit-tracer pins transformers<=4.57; only its CLT loader is used (tests), so no deps
	$(PY) -m pip install -q --no-deps circuit-tracer==0.5.0
	touch $@

# a rerun replaces the previous demo run (--overwrite); pass ARGS="--run_name NAME" to keep it
demo: install
	$(PY) -m vlm_sparsify --run_name demo --overwrite true $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

# ruff, then mypy on vlm_sparsify and benchmarks ([tool.mypy] in pyproject.toml; the same check
# is a test, tests/test_typing.py)
lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(PY) -m mypy

bench: install
	$(PY) -m vlm_sparsify.bench $(ARGS)

# The Triton tests (vlm_sparsify/triton_decode.py's decoder, topk_encoder.py's weight gradient) on
# the CPU, through Triton's interpreter, in a venv of their own (with triton installed, sparsify
# would pick its Triton kernels for CPU tensors; the suite above skips these tests without a GPU).
TRITON_VENV ?= .venv-triton
test-triton:
	test -x $(TRITON_VENV)/bin/python || (python3 -m venv $(TRITON_VENV) \
		&& $(TRITON_VENV)/bin/pip install -q torch==2.13.0 triton \
		&& $(TRITON_VENV)/bin/pip install -q -e ".[test]")
	TRITON_INTERPRET=1 SPARSIFY_DISABLE_TRITON=1 $(TRITON_VENV)/bin/python -m pytest -q \
		tests/test_triton_kernels.py tests/test_topk_encoder_backward.py tests/test_replacement.py \
		tests/test_bench.py -k "triton or encoder_backward" $(ARGS)

# Wheels for `scripts/gpu_bench.sh` on a GPU machine without network (torch comes with the
# machine): this package and the pure-Python dependencies it lacks, at the venv's versions.
GPU_WHEEL_DEPS := eai-sparsify transformers easy-vqa datasets dill multiprocess schedulefree \
	simple-parsing docstring-parser natsort pytest pluggy iniconfig
gpu-wheels: install
	rm -f .whl/*.whl
	$(PY) -m pip wheel -q --no-deps -w .whl .
	for v in 3.11 3.12 3.13; do $(PY) -m pip download -q --no-deps --only-binary=:all: \
		--python-version $$v -d .whl $$($(PY) -m pip freeze \
		| grep -iE '^($(shell echo $(GPU_WHEEL_DEPS) | tr ' ' '|' | sed 's/-/[-_]/g'))=='); done
