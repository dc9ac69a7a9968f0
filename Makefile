# make repro: set up (once) and run the DVC pipeline.
# make test:  set up (once) and run the test suite.
# make setup: .venv from requirements.txt, and the page template that makes `dvc plots show` render
#             offline (vega, vega-lite, vega-embed from package-lock.json via `npm ci`, inlined).
PYTHON ?= python3
NPM ?= npm
VENV ?= .venv
BIN := $(VENV)/bin
PLOTS_TEMPLATE := build/dvc_plots_template.html
# The venv first on PATH, so dvc.yaml's `python` is the project's.
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup repro test bench clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	@command -v $(NPM) >/dev/null || { echo "npm not found: install Node.js and npm (e.g. apt-get install nodejs npm)"; exit 1; }
	$(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

# Writes the template and points .dvc/config.local's plots.html_template at it.
$(PLOTS_TEMPLATE): node_modules/.installed kneexray/offline_plots.py $(VENV)/.installed
	$(BIN)/python -m kneexray.offline_plots --out $@

setup: $(VENV)/.installed $(PLOTS_TEMPLATE)
	@grep -qs html_template .dvc/config.local || $(BIN)/python -m kneexray.offline_plots --out $(PLOTS_TEMPLATE)

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
