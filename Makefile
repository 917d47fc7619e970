# fedlift: `make demo` runs the flagship job offline; `make test` runs the whole suite.
# Both create .venv and install fedlift with the example's dependencies first.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedlift-installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=

.PHONY: venv data browser demo test reliability check lint typecheck format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml examples/cifar10-tf/requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -e ".[tf,tensorboard,dev,ray,plots,sklearn,mlflow,torch,lightning,web]" \
		-r examples/cifar10-tf/requirements.txt
	@# Bytecode for everything, written once: where PYTHONDONTWRITEBYTECODE is set (CI here)
	@# every process would otherwise compile what it imports (TensorFlow: 8.3 s -> 4.1 s).
	@$(PY) -m compileall -q -j 0 src $(VENV)/lib >/dev/null || true
	@touch $@

# Real Fashion-MNIST (Debian's dataset-fashion-mnist) for the accuracy tests.
data: $(FASHION)

$(FASHION):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "make data: install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)" >&2; \
		exit 1; \
	fi

# A real browser for the report and live-view tests: Debian's chromium and chromium-driver.
CHROMEDRIVER := /usr/bin/chromedriver
browser: $(CHROMEDRIVER)

$(CHROMEDRIVER):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "make browser: install Debian's chromium and chromium-driver (sudo apt-get install chromium chromium-driver)" >&2; \
		exit 1; \
	fi

# The flagship example: CIFAR-10 when available, else the embedded Fashion-MNIST subset.
demo: venv
	cd examples/cifar10-tf && ../../$(PY) tf_client_api_job.py --n_clients 2 --num_rounds 3 \
		--workspace /tmp/fedlift/demo

lint: venv
	$(VENV)/bin/ruff check src tests examples benchmarks fuzz
	$(VENV)/bin/ruff format --check src tests examples benchmarks fuzz

typecheck: venv
	$(VENV)/bin/mypy

check: lint typecheck

format: venv
	$(VENV)/bin/ruff format src tests examples benchmarks fuzz
	$(VENV)/bin/ruff check --fix src tests examples benchmarks fuzz

LEDGER := .reliability/ledger.jsonl

# The whole suite, reliability tests in their reduced forms (slow full forms left out),
# then the reliability table of this run.
test: venv data browser check
	@rm -f $(LEDGER)
	@status=0; $(PY) -m pytest -m "not slow" $(PYTEST_ARGS) || status=$$?; \
		$(PY) tests/reliability_report.py || true; exit $$status

# The reliability suite in its full forms (faults, hostile input, soak), and its table.
reliability: venv data
	@rm -f $(LEDGER)
	@status=0; FEDLIFT_RELIABILITY_FULL=1 $(PY) -m pytest -m reliability $(PYTEST_ARGS) \
		|| status=$$?; $(PY) tests/reliability_report.py || status=1; exit $$status

bench: venv
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache src/*.egg-info
