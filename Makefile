# SciStream: `make demo` and `make test` are all a new user needs (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A second venv with every direct dependency at the floor pyproject.toml declares.
LOWEST       := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed
CONSTRAINTS  := constraints/lowest.txt

.PHONY: setup demo test test-lowest lint format bench system-deps bench-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "SciStream needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# stunnel (the second backend), Prometheus (which the metrics test scrapes s2cs with), systemd
# (systemd-analyze checks the service unit) and iperf3 (the benchmark) come from the system's packages.
system-deps:
	@scripts/system-deps stunnel4 prometheus systemd

bench-deps:
	@scripts/system-deps stunnel4 iperf3

demo: setup
	$(BIN)/scistream demo

test: setup system-deps lint test-lowest
	scripts/run-tests $(BIN)

# Lint and the unit tests with the lowest versions pyproject.toml allows, so that no floor is a
# guess. A failure here only: raise that floor in pyproject.toml and constraints/lowest.txt, or do
# without what only a newer version has. The venv is made anew when pyproject.toml or the
# constraints change (a leftover package of an earlier install could hide a missing one), else
# reused; mypy keeps its cache there, as one of another version would be rebuilt every run.
test-lowest: $(LOWEST_STAMP)
	@echo "== lint and unit tests with every dependency at its floor ($(CONSTRAINTS))"
	$(LOWEST)/bin/ruff check scistream tests
	$(LOWEST)/bin/ruff format --check scistream tests
	$(LOWEST)/bin/mypy --cache-dir $(LOWEST)/.mypy_cache
	$(LOWEST)/bin/python -m pytest -q -p no:cacheprovider tests/unit

$(LOWEST_STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "SciStream needs Python 3.11 or newer")'
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST)/bin/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	@touch $@

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
	rm -rf $(VENV) $(LOWEST) .pytest_cache .mypy_cache .ruff_cache .hypothesis
