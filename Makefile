# Two entry points for a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: env test test-all lint demo bench clean

env: $(VENV)/.installed

# llm-compressor (GPTQ) pins an older transformers than ours: it goes into a folder of its own,
# without its dependencies, which only the GPTQ path puts on sys.path (requirements-quantize.txt)

$(VENV)/.installed: requirements.txt requirements-quantize.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/extras/quantize -r requirements-quantize.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: env
	$(PY) -m pytest -q

test-all: env
	$(PY) -m pytest -q -m "slow or not slow"

lint: env
	$(VENV)/bin/ruff check mtnlg tests bench checkpoint_tools
	$(VENV)/bin/ruff format --check mtnlg tests bench checkpoint_tools

demo: env
	bash launch/demo.sh

clean:
	rm -rf $(VENV) .cache runs out
