PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test bench lint format

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	# the CPU build of torch first, so nothing below pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'

serve: install
	HF_HUB_OFFLINE=1 $(BIN)/adapterserve serve

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/mixed.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
