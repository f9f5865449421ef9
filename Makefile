# Two commands: `make lab` (set up, then JupyterLab on your own copies of the labs) and
# `make test` (set up, then every unit test, every notebook and every lab in a real browser).
# Both create .venv on first use.
#
# TORCH chooses the torch that is installed when the system has none. The default admits any
# release; on a machine with no GPU you may prefer a CPU build, e.g.
#   make test TORCH='torch==2.13.0'   (a local CPU wheel)   or set PIP_INDEX_URL to PyTorch's CPU index.
# When a torch is already importable (NGC PyTorch container, DGX Spark), the venv reuses it
# (--system-site-packages) and never replaces it.
# CONSTRAINTS: the tested versions of everything but torch; `CONSTRAINTS=` (empty) installs the
#   newest releases pyproject.toml allows instead.
# PORT: JupyterLab's port (default 8888). LAB_ARGS: more `jupyter lab` options; a --port there
#   wins too: `make lab PORT=8899` and `make lab LAB_ARGS=--port=8899` do the same.
# PYTEST_ARGS: more pytest options for `make test`, e.g. PYTEST_ARGS='-m "not browser"'.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch>=2.4
CONSTRAINTS ?= constraints.txt
LAB_EXTRAS ?= lab,finetune,quant
TEST_EXTRAS ?= $(LAB_EXTRAS),dev
JOBS ?= 2
CELL_TIMEOUT ?= 120
PORT ?= 8888
LAB_ARGS ?=
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
VENV_STAMP := $(VENV)/.effarch-venv
LAB_STAMP := $(VENV)/.effarch-lab
TEST_STAMP := $(VENV)/.effarch-test
TINY := EFFARCH_PROFILE=tiny HF_HUB_OFFLINE=1

.PHONY: lab test unit screenshots labs check-labs doctor lint clean

$(VENV_STAMP):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') found: reusing it"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PIP_INSTALL) "$(TORCH)"; \
	fi
	touch $@

# What a student needs (JupyterLab, widgets, peft, bitsandbytes where it installs); no test tools.
$(LAB_STAMP): $(VENV_STAMP) pyproject.toml $(CONSTRAINTS)
	$(PIP_INSTALL) -e ".[$(LAB_EXTRAS)]"
	touch $@

$(TEST_STAMP): $(VENV_STAMP) pyproject.toml $(CONSTRAINTS)
	$(PIP_INSTALL) -e ".[$(TEST_EXTRAS)]"
	touch $@

# Copies labs/ into my-labs/ on first use (an updated lab arrives later as a new copy, never
# over yours), then JupyterLab there; it prints http://127.0.0.1:$(PORT)/lab?token=… to open.
lab: $(LAB_STAMP)
	$(VENV)/bin/effarch-lab --port=$(PORT) $(LAB_ARGS)

# Unit tests, notebooks and the browser test in one pytest run over both cores. Labs run as
# students get them, solutions run strict (effarch.testing sets EFFARCH_STRICT per notebook);
# tiny profile forced. The browser test skips where Chromium is not installed (.ci/run installs it).
test: $(TEST_STAMP)
	$(TINY) $(PY) -m pytest -p effarch.testing -n $(JOBS) \
	  --dist loadfile --nbmake --nbmake-timeout=$(CELL_TIMEOUT) --nbmake-kernel=python3 \
	  tests $(wildcard labs/*.ipynb) $(wildcard solutions/*.ipynb) $(PYTEST_ARGS)

unit: $(TEST_STAMP)
	$(TINY) $(PY) -m pytest -p effarch.testing -m "not browser" tests $(PYTEST_ARGS)

# The browser test alone, keeping its screenshots in data/measurements/ (browser_<lab>.png).
screenshots: $(TEST_STAMP)
	EFFARCH_SCREENSHOTS=data/measurements $(TINY) $(PY) -m pytest -p effarch.testing -m browser \
	  tests/test_browser.py $(PYTEST_ARGS)

labs: $(TEST_STAMP)
	$(PY) scripts/build_labs.py

check-labs: $(TEST_STAMP)
	$(PY) scripts/build_labs.py --check

doctor: $(LAB_STAMP)
	$(VENV)/bin/effarch doctor

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src scripts tests

# Removes the environment only: my-labs/ (your work) stays.
clean:
	rm -rf $(VENV) .pytest_cache
