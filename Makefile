# make lab   - set up .venv and open the course in JupyterLab
# make test  - set up .venv and run every test (lint, unit, widgets, notebooks under nbval)
# make bench - set up .venv and measure the engine against the per-item DataLoader baseline
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PROFILE ?=

.PHONY: lab test bench lint clean

# the course itself; the test tools (pytest, nbval, ruff, playwright) only for make test
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

# Jupyter refuses to run as root (containers, Colab-like machines) without --allow-root
lab: $(STAMP)
	$(BIN)/python -m lessons.data --prepare
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root,) \
		notebooks/00_start_here.ipynb

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	LESSONS_PROFILE=ci LESSONS_DATA=$(CURDIR)/.cache/test-data $(BIN)/python -m pytest tests \
		--nbval-lax notebooks --nbval-cell-timeout=600 -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m lessons.bench $(if $(PROFILE),--profile $(PROFILE),)
	$(BIN)/python -m widgets.bench $(if $(PROFILE),--profile $(PROFILE),)

clean:
	rm -rf $(VENV) .cache
