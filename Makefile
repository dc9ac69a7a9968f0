# make repro: set up .venv from requirements.txt (once) and run the DVC pipeline.
# make test:  set up .venv (once) and run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The venv first on PATH, so dvc.yaml's `python` is the project's.
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: repro test bench clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

repro: $(VENV)/.installed
	$(BIN)/dvc repro

test: $(VENV)/.installed
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
