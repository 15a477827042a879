# Two entry points on a fresh machine:
#   make demo   create .venv, install qworker, run the Monte Carlo job end to end
#   make test   create .venv, install qworker with test tools, run the test suite
#
# torch is pinned to the CPU build that installs from a local file on the dev
# and CI machines; a looser pin makes pip fetch a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[torch,test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/qworker demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) qworker-data .pytest_cache
