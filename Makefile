# SciStream: `make demo` and `make test` are all a new user needs (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint format bench system-deps bench-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "SciStream needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# stunnel (the second backend) and iperf3 (the benchmark) come from the system's packages.
system-deps:
	@scripts/system-deps stunnel4

bench-deps:
	@scripts/system-deps stunnel4 iperf3

demo: setup
	$(BIN)/scistream demo

test: setup system-deps lint
	scripts/run-tests $(BIN)

lint: setup
	$(BIN)/ruff check scistream tests
	$(BIN)/ruff format --check scistream tests
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format scistream tests
	$(BIN)/ruff check --fix scistream tests

bench: setup bench-deps
	scripts/run-isolated $(BIN)/python -m scistream.bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
