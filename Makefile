# eelab: `make lab` opens the workbench, `make test` runs the tests. Both create or reuse .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.eelab-installed

.PHONY: lab test e2e install bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml (the one list of dependencies) changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[notebooks,dev]'
	touch $(STAMP)

install: $(STAMP)

# root (containers, CI boxes) needs --allow-root; a normal user does not get it
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG)

test: $(STAMP)
	$(PY) -m pytest -q

# JupyterLab in headless Chromium (tests/e2e, not part of `make test`); needs Debian's /usr/bin/chromium
e2e: $(STAMP)
	$(PY) -m pytest -q tests/e2e

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
