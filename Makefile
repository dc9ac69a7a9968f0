# make help:       this list.
# make repro:      set up (once) and run the DVC pipeline.
# make test:       set up (once) and run the test suite.
# make test-fast:  the tests without the DVC end-to-end ones (marked slow).
# make lint:       ruff (lint, import order, format check) and mypy, configured in pyproject.toml.
# make setup:      .venv from requirements.txt, and the page template that makes `dvc plots show` render
#                  offline (vega, vega-lite, vega-embed from the vl-convert-python wheel, inlined; Python only).
# make clean-venv: remove .venv (the next setup rebuilds it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pytest-xdist processes for `make test`; tests are handed out one at a time (--maxschedchunk 1) in the
# order tests/conftest.py sets, slowest first, so the workers finish together
TEST_WORKERS ?= 2
PLOTS_TEMPLATE := build/dvc_plots_template.html
# The venv first on PATH, so dvc.yaml's `python` is the project's.
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: help setup repro test test-fast lint clean-venv

help:
	@sed -n 's/^# make /make /p' Makefile

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

# Writes the template and points .dvc/config.local's plots.html_template at it.
$(PLOTS_TEMPLATE): kneexray/report/offline_template.py $(VENV)/.installed
	$(BIN)/python -m kneexray.report.offline_template --out $@

setup: $(VENV)/.installed $(PLOTS_TEMPLATE)
	@grep -qs html_template .dvc/config.local || $(BIN)/python -m kneexray.report.offline_template --out $(PLOTS_TEMPLATE)

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxschedchunk 1 --durations=15

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" --durations=15

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean-venv:
	rm -rf $(VENV)
