# The two commands: `make demo` and `make test`. Both create the environment on first use.
PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: env test lint demo bench bench-quick clean

env: $(STAMP)

$(STAMP): requirements-dev.txt requirements-data.txt pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps -r requirements-data.txt
	$(PYTHON) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PYTHON) -m pytest -q tests

# ruff check + ruff format --check, configured in pyproject.toml ([tool.ruff])
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info

# `make demo`: examples/run_clm.py (a stock Trainer script) through the launcher with --optim metaoptimize on
# Shakespeare's plays; prints progress, the learned step sizes at the end, and writes $(DEMO_OUT)/step_sizes.png.
DEMO_OUT ?= runs/demo
demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PYTHON) examples/demo.py --output_dir $(DEMO_OUT)

# Benchmarks (docs/benchmarks.md). Every process computes on one thread; BENCH_JOBS task processes run side by
# side (the overhead timings always run alone). Resumable: stored runs with unchanged settings are reused.
BENCH_JOBS ?= 2
BENCH_ENV  := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

bench: $(STAMP)
	$(BENCH_ENV) $(PYTHON) -m benchmarks.run --suite full --jobs $(BENCH_JOBS)

bench-quick: $(STAMP)
	$(BENCH_ENV) $(PYTHON) -m benchmarks.run --suite quick --force
