# mogao - everything a new machine needs goes through `make setup` (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo demo-long bench lint clean

setup: $(VENV)/.installed

# torch==2.13.0 is the CPU wheel these machines carry; any torch>=2.11 already in the venv is kept.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

demo: setup
	$(PY) -m mogao.demo --out runs/demo

demo-long: setup
	$(PY) -m mogao.demo --curriculum recipes/tiny/curriculum-long.yaml --out runs/demo-long

bench: setup
	$(PY) benchmarks/ectf_scaling.py

lint: setup
	$(VENV)/bin/ruff check mogao callbacks tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

# Every GPU figure on one CUDA GPU in <= 9 minutes, into runs/gpu_check (docs/distributed.md, "GPU check").
# No `setup` prerequisite: a rented GPU machine has torch and the wheels brought along, not this venv.
.PHONY: gpu-check
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) benchmarks/gpu_check.py --out runs/gpu_check $(GPU_CHECK_ARGS)
