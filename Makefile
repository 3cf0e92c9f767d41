# `make test` creates .venv (CPU only: no CUDA torch is ever downloaded) and runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test install bench-preprocess clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

bench-preprocess: $(STAMP)
	$(PY) bench/preprocess.py

clean:
	rm -rf $(VENV) build *.egg-info
