# SciStream: `make demo` and `make test` are all a new user needs (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A second venv with every direct dependency at the floor pyproject.toml declares.
LOWEST       := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed
CONSTRAINTS  := constraints/lowest.txt

.PHONY: setup demo test test-lowest lint format bench soak system-deps bench-deps images compose-demo swarm-bed swarm-bed-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "SciStream needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# stunnel (the second backend), Prometheus (which the metrics test scrapes s2cs with; its promtool
# checks and unit-tests monitoring/alerts.yml), systemd (systemd-analyze checks the service unit) and
# iperf3 (the benchmark) come from the system's packages.
system-deps:
	@scripts/system-deps stunnel4 prometheus systemd

# matplotlib draws the benchmark's plot (docs/performance.png); no dependency of SciStream itself.
bench-deps: setup
	@scripts/system-deps stunnel4 iperf3
	$(BIN)/python -m pip install --quiet 'matplotlib>=3.6'

demo: setup
	$(BIN)/scistream demo

# The image scistream:VERSION (containers/Dockerfile), built offline from a debootstrapped base and
# wheels made here; scripts/docker-engine installs and starts the engine when it is missing.
images: setup
	@scripts/docker-engine
	scripts/build-images $(BIN)

# Two facilities in containers (containers/compose.yaml), a stream through both, checked, then
# all of it taken down.
compose-demo: images
	$(BIN)/python -m scistream.compose_demo

# A facility of several DTNs on this machine (scripts/swarm-bed; root, cgroup v1): SWARM_NODES
# (3) extra Docker engines, each in network and UTS namespaces of its own, a swarm of 3 managers,
# the image loaded into each; the container tests (tests/containers/test_nodes.py) make their own.
# `make swarm-bed-down` takes it all down again, by pid and namespace.
SWARM_NODES ?= 3
swarm-bed: images
	$(BIN)/python scripts/swarm-bed up $(SWARM_NODES)

swarm-bed-down:
	$(BIN)/python scripts/swarm-bed down

# scripts/run-tests: the unit tests, the integration tests (in a private network namespace when
# root), then the container tests, after it has started the engine and built the images (or one
# line saying why this machine cannot).
test: setup system-deps lint test-lowest
	scripts/run-tests $(BIN)

# Lint and the unit tests with the lowest versions pyproject.toml allows, so that no floor is a
# guess. A failure here only: raise that floor in pyproject.toml and constraints/lowest.txt, or do
# without what only a newer version has. The venv is made anew when pyproject.toml or the
# constraints change (a leftover package of an earlier install could hide a missing one), else
# reused; mypy keeps its cache there, as one of another version would be rebuilt every run.
test-lowest: $(LOWEST_STAMP)
	@echo "== lint and unit tests with every dependency at its floor ($(CONSTRAINTS))"
	$(LOWEST)/bin/ruff check scistream tests containers bench
	$(LOWEST)/bin/ruff format --check scistream tests containers bench
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
	$(BIN)/ruff check scistream tests containers bench
	$(BIN)/ruff format --check scistream tests containers bench
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format scistream tests containers bench
	$(BIN)/ruff check --fix scistream tests containers bench

# The benchmarks (bench/, no part of the package) run from this checkout. The swarm part (the
# swarm runtime against processes) runs on the host's own network, where swarm tasks on host
# networking listen, so as a command of its own, first; it sets up the engine, the image and a
# swarm itself, or says in one line why it cannot. Then the rest in a private network namespace,
# which names each missed goal (bench/goals.py) in a line at the end. Both always run; make bench
# fails when a goal was missed or a part failed, and says which. BENCH_ARGS go to both, e.g.
# `make bench BENCH_ARGS="--json bench.json"` (both parts fill the one file).
bench: setup bench-deps
	@swarm=0; failed=0; \
	echo "$(BIN)/python -m bench --swarm-only $(BENCH_ARGS)"; \
	$(BIN)/python -m bench --swarm-only $(BENCH_ARGS) || swarm=1; \
	echo "scripts/run-isolated $(BIN)/python -m bench --no-swarm --plot docs/performance.png $(BENCH_ARGS)"; \
	scripts/run-isolated $(BIN)/python -m bench --no-swarm --plot docs/performance.png $(BENCH_ARGS) || failed=1; \
	[ $$swarm = 0 ] || echo "FAILED: the swarm part (its error is above, at its end)"; \
	[ $$swarm = 0 ] && exit $$failed || exit 1

# The soak (bench/soak.py, docs/reliability.md): real gateways of both backends for 10 minutes of
# churn, byte-checked traffic and faults on a seeded schedule, then nothing may be left; exits
# non-zero naming each goal missed. SOAK_ARGS, e.g. SOAK_ARGS="--minutes 60 --seed 7 --json soak.json"
# (the seed replays a schedule; each run prints its own).
soak: setup bench-deps
	scripts/run-isolated $(BIN)/python -m bench.soak --plot docs/reliability.png $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST) .pytest_cache .mypy_cache .ruff_cache .hypothesis
