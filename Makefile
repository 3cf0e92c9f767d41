# `make test` creates .venv (CPU only: no CUDA torch is ever downloaded) and runs the suite.
PYTHON ?= python3
# A CPU build of torch, installed before the `train` extra so pip never resolves a CUDA one.
TORCH_CPU ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install bench-preprocess clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PY) -m pip install --quiet -e ".[cpu,train,dask,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/emmae-stream --demo

bench-preprocess: $(STAMP)
	$(PY) bench/preprocess.py

clean:
	rm -rf $(VENV) build *.egg-info
