# make lab   - set up .venv and open the course in JupyterLab
# make test  - set up .venv and run every test (lint, unit, widgets, notebooks under nbval),
#              then make test-colab
# make test-colab - set up .venv-colab with Colab's versions and run the notebooks there
# make bench - set up .venv and measure the engine against the per-item DataLoader baseline
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
COLAB_VENV := .venv-colab
COLAB_STAMP := $(COLAB_VENV)/.installed
PROFILE ?=
# make test runs the tests in TEST_WORKERS processes (pytest-xdist; --dist loadscope keeps each
# notebook's cells, and each test file's tests, in one process, in order) and shares the cores'
# OpenMP threads out between them: much of the suite (imports, kernels, JupyterLab, the browser)
# is single-threaded, so processes use the cores better than threads do (BENCHMARKS.md).
# TEST_WORKERS=0 runs it in one process; a user's own OMP_NUM_THREADS is kept.
TEST_WORKERS ?= 2
TEST_THREADS = $(shell $(PYTHON) -c 'import os; print(max(1, (os.cpu_count() or 1) // max(1, $(TEST_WORKERS))))')

.PHONY: lab test test-colab bench bench-notebooks lint clean

# glibc's malloc with one arena for all threads: a widget trains in a worker thread, and a
# thread's own arena would hand large blocks, and heaps it has emptied, back to the system every
# step (lessons.tuning.keep_freed_memory). A user's own GLIBC_TUNABLES are kept; other C
# libraries ignore the variable.
MALLOC_ENV := GLIBC_TUNABLES=$${GLIBC_TUNABLES:+$$GLIBC_TUNABLES:}glibc.malloc.arena_max=1

# the course itself; the test tools (pytest, nbval, ruff, playwright) only for make test
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

# Colab's own ipywidgets 7, plotly, matplotlib and kernel (tests/colab-requirements.txt), then
# the course over them without its pins, as the notebooks' setup cell installs it on Colab
# (--no-warn-conflicts: on a reinstall the course already there asks for its own pins)
$(COLAB_STAMP): tests/colab-requirements.txt pyproject.toml
	$(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/python -m pip install --quiet --no-warn-conflicts -r tests/colab-requirements.txt
	$(COLAB_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(COLAB_STAMP)

# Jupyter refuses to run as root (containers, Colab-like machines) without --allow-root
lab: $(STAMP)
	$(BIN)/python -m lessons.data --prepare
	$(MALLOC_ENV) $(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root,) \
		notebooks/00_start_here.ipynb

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(MALLOC_ENV) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(TEST_THREADS)} \
		LESSONS_PROFILE=ci LESSONS_DATA=$(CURDIR)/.cache/test-data \
		$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadscope \
		--nbval-lax notebooks --nbval-cell-timeout=600 -p no:cacheprovider
	$(MAKE) --no-print-directory test-colab

# every notebook as Colab runs it: ipywidgets 7, and the matplotlib renderer the widgets pick
# there; the kernel is this environment's own Python (--nbval-current-env). Its run log is kept
# apart from the main run's, so that neither run overlays the other's curves.
test-colab: $(COLAB_STAMP)
	$(MALLOC_ENV) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(TEST_THREADS)} \
		LESSONS_PROFILE=ci LESSONS_DATA=$(CURDIR)/.cache/test-data \
		LESSONS_RUNS=$(CURDIR)/.cache/test-colab-runs LESSONS_PLOT=matplotlib \
		$(COLAB_VENV)/bin/python -m pytest tests/check_colab_env.py -n $(TEST_WORKERS) \
		--dist loadscope --nbval-lax --nbval-current-env notebooks --nbval-cell-timeout=600 \
		-p no:cacheprovider

bench: $(STAMP)
	$(MALLOC_ENV) $(BIN)/python -m lessons.bench $(if $(PROFILE),--profile $(PROFILE),)
	$(MALLOC_ENV) $(BIN)/python -m widgets.bench $(if $(PROFILE),--profile $(PROFILE),)

# every notebook top to bottom in a fresh kernel, timed (the cpu profile by default)
bench-notebooks: $(STAMP)
	$(MALLOC_ENV) $(BIN)/python -m widgets.notebook_bench $(if $(PROFILE),--profile $(PROFILE),)

clean:
	rm -rf $(VENV) $(COLAB_VENV) .cache
