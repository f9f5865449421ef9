# Two commands: `make lab` (set up, then JupyterLab on labs/) and `make test` (set up, then every
# unit test and every notebook). Both create .venv on first use.
#
# TORCH chooses the torch that is installed when the system has none. The default admits any
# release; on a machine with no GPU you may prefer a CPU build, e.g.
#   make test TORCH='torch==2.13.0'   (a local CPU wheel)   or set PIP_INDEX_URL to PyTorch's CPU index.
# When a torch is already importable (NGC PyTorch container, DGX Spark), the venv reuses it
# (--system-site-packages) and never replaces it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch>=2.4
EXTRAS ?= dev,quant
JOBS ?= 2
CELL_TIMEOUT ?= 120
PORT ?= 8888
LAB_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.effarch-installed

.PHONY: lab test unit labs check-labs doctor lint clean

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') found: reusing it"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PY) -m pip install "$(TORCH)"; \
	fi
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $@

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=labs --port=$(PORT) $(LAB_ARGS)

# Unit tests and notebooks in one pytest run over both cores. Labs run as students get them,
# solutions run strict (effarch.testing sets EFFARCH_STRICT per notebook); tiny profile forced.
test: $(STAMP)
	EFFARCH_PROFILE=tiny HF_HUB_OFFLINE=1 $(PY) -m pytest -p effarch.testing -n $(JOBS) \
	  --dist loadfile --nbmake --nbmake-timeout=$(CELL_TIMEOUT) --nbmake-kernel=python3 \
	  tests $(wildcard labs/*.ipynb) $(wildcard solutions/*.ipynb)

unit: $(STAMP)
	EFFARCH_PROFILE=tiny HF_HUB_OFFLINE=1 $(PY) -m pytest -p effarch.testing tests

labs: $(STAMP)
	$(PY) scripts/build_labs.py

check-labs: $(STAMP)
	$(PY) scripts/build_labs.py --check

doctor: $(STAMP)
	$(PY) -m effarch doctor

lint: $(STAMP)
	$(VENV)/bin/ruff check src scripts tests

clean:
	rm -rf $(VENV) .pytest_cache
