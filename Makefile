# Two commands on a fresh machine (Python 3.11+):  make run   and   make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

.PHONY: install run test test-image lint typecheck bench demo
install: $(BIN)/.installed

run: install  ## worker + beat (+ sandbox provider) on an embedded Redis unless RELIABLE_REDIS__URL is set
	$(BIN)/reliable run

test: install  ## the whole test suite (real Redis if one answers, else an embedded one)
	$(BIN)/python -m pytest

test-image: install  ## build the Docker image on a local base and run it (tests/image; root: starts dockerd)
	tests/image/prepare.sh
	$(BIN)/python -m pytest -s tests/image

lint: install  ## ruff, ruff format --check, mypy --strict (reliability/, config/)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: install  ## mypy --strict on reliability/ and config/ ([tool.mypy] in pyproject.toml)
	$(BIN)/mypy

bench: install  ## throughput and round trips vs bare Celery (not part of the test run)
	$(BIN)/python -m bench.throughput

demo: install  ## a plain-Celery producer bursts work at a running service
	$(BIN)/python examples/demo_producer.py
