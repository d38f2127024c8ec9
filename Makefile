# Two commands: `make run` (demo end to end as an MLflow Project run) and `make test` (the test-suite).
# Both build .venv from pyproject.toml on first use; the install is redone when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One store for `mlflow run` and the runs it starts (mltrack's own default is the same sqlite file).
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.PHONY: run test install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Editable install with the exact pins of pyproject.toml (torch==2.14.1, torchvision==0.29.1, ...).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The venv's bin goes first on PATH, so `python` inside `mlflow run --env-manager local` is the venv's.
run: $(STAMP)
	$(BIN)/mltrack demo-data data/digits
	$(BIN)/mltrack split --raw-data data/digits/raw --folds 5
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . -P fold=0 --env-manager local --experiment-name digits

# Two pytest workers (pytest-xdist): many tests wait on CLI subprocesses and servers, so two workers on a
# 2-core machine took about 12 min where one took 20 (measured here). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal
