PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test bench lint format

install:
	# the same install steps as the Dockerfile: CPU torch first, then the project with its test extra
	PYTHON=$(PY) scripts/install.sh $(VENV) --test --editable

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
