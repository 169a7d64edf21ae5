PYTHON ?= python

.PHONY: install test lint format demo

# One-time set-up: torch from the exact pin first (a looser requirement would download CUDA wheels).
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .
