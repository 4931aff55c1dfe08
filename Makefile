# eelab: `make lab` opens the workbench, `make test` runs the tests. Both create or reuse .venv.
#   make lab PORT=8899 LAB_ARGS="--no-browser"   another port, more JupyterLab arguments
#   make test TORCH=cpu                           a CPU-only torch (PyTorch's CPU wheel index) in a new .venv
PYTHON   ?= python3
VENV     ?= .venv
PORT     ?=
LAB_ARGS ?=
TORCH    ?= default
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.eelab-installed
# the torch pins, read from pyproject.toml (the one list of dependencies)
TORCH_PINS      := $(shell grep -oE '"torch(vision)?==[^"]+"' pyproject.toml | tr -d '"')
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# the git filter that keeps notebooks' outputs and widget state out of commits (cell ids are kept)
NBSTRIP := '$(abspath $(VENV))/bin/nbstripout' --keep-id --extra-keys metadata.language_info

.PHONY: lab test e2e install bench clean-venv git-filter lab-settings

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes. TORCH=cpu first installs the pinned torch and torchvision from
# PyTorch's CPU wheel index (about 1 GB instead of the 6 GB CUDA build); pip then finds the pins met.
$(STAMP): pyproject.toml | $(PY)
ifeq ($(TORCH),cpu)
	$(PY) -m pip install --quiet $(TORCH_PINS) --index-url $(TORCH_CPU_INDEX)
endif
	$(PY) -m pip install --quiet -e '.[notebooks,dev]'
	touch $(STAMP)

install: $(STAMP)

# In a git checkout: notebooks pass through nbstripout on `git add` and `git diff`, so running and saving
# them in JupyterLab leaves `git status` clean and commits free of outputs (.gitattributes names the filter).
git-filter: $(STAMP)
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  git config filter.nbstripout.clean "$(NBSTRIP)" && \
	  git config filter.nbstripout.smudge cat && \
	  git config diff.ipynb.textconv "$(NBSTRIP) -t"; \
	fi

# JupyterLab settings for this environment only: no "get notified about Jupyter news?" popup, no update check
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json
lab-settings: $(STAMP)
	@mkdir -p $(dir $(LAB_OVERRIDES))
	@printf '%s\n' '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' \
	  > $(LAB_OVERRIDES)

# root (containers, CI boxes) needs --allow-root; a normal user does not get it
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: $(STAMP) git-filter lab-settings
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(PORT),--port=$(PORT) --ServerApp.port_retries=0,) \
	  $(ROOT_FLAG) $(LAB_ARGS)

test: $(STAMP) git-filter
	$(PY) -m pytest -q

# JupyterLab in headless Chromium on a temporary clone (tests/e2e, not part of `make test`); needs Debian's
# /usr/bin/chromium
e2e: $(STAMP) lab-settings
	$(PY) -m pytest -q tests/e2e

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
