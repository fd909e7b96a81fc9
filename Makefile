# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment first when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo

.PHONY: venv demo test test-fast lint bench gpu-kit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	command -v dciodvfy >/dev/null || ((apt-get update -qq && apt-get install -y -qq dicom3tools) >/dev/null 2>&1 || echo 'dicom3tools (dciodvfy) not installed: its checks will skip')
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cohort demo --dir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check cohort flows tests benchmarks
	$(VENV)/bin/ruff format --check cohort flows tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_foundation.py --repeat 3
	$(PY) benchmarks/bench_radiomics.py --repeat 1
	$(PY) benchmarks/bench_store.py --repeat 1
	$(PY) benchmarks/bench_index.py
	$(PY) benchmarks/bench_segment_cpu.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_scale.py --patients 1000

# Wheels and one real CT for benchmarks/gpu_segment.py on a lent GPU machine; prints the device calls.
gpu-kit: $(STAMP)
	scripts/gpu_kit.sh

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
