# Two entry points do all the set-up on a fresh machine:
#   make run    create .venv, install pigeon, run the demo
#   make test   create .venv, install pigeon with its dev tools, run lint, types and tests
#               (on 3.11; then the tests on 3.12 and 3.13 too)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint typecheck pytest pythons bench clean

# (the build compiles src/pigeon/_fastring.c and, with mypyc, the modules src/pigeon/_compiled.py
# lists: an edited one makes pigeon run all of them as Python until this installs again)
$(STAMP): pyproject.toml hatch_build.py src/pigeon/_fastring.c src/pigeon/_compiled.py \
		$(wildcard src/pigeon/server/*.py src/pigeon/server/core/*.py src/pigeon/protocol/*.py \
		src/pigeon/framing/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench,uvloop]'
	touch $(STAMP)

# The broker on its default store (dashboard at http://127.0.0.1:7879/), plus the demo:
# locally, then through the broker.
run: $(STAMP)
	$(BIN)/pigeon serve --port 7878 --http 127.0.0.1:7879 & broker=$$!; \
	trap 'kill $$broker 2>/dev/null; wait $$broker' EXIT; \
	$(BIN)/pigeon demo --broker pigeon://127.0.0.1:7878/demo

test: lint typecheck pytest pythons

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples scripts
	$(BIN)/ruff format --check src tests benchmarks examples scripts

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite on the compiled path (tests/test_compiled.py checks that it is); the
# Python 3.12 run in `make pythons` is the pure-Python path.
pytest: $(STAMP)
	PIGEON_EXPECT_COMPILED=1 $(BIN)/pytest
	# the local queue again on its pure-Python path (the fallback where nothing compiles)
	PIGEON_PURE_PYTHON=1 $(BIN)/pytest -q tests/backends/test_local.py tests/backends/test_local_waits.py \
		tests/backends/test_local_dedup.py tests/backends/test_local_message.py tests/conformance -k local

# the suite but the slow fault tests on Python 3.12 and 3.13 (scripts/test-pythons)
pythons:
	bash scripts/test-pythons

bench: $(STAMP)
	$(BIN)/python benchmarks/framing.py
	$(BIN)/python benchmarks/local.py
	$(BIN)/python benchmarks/broker.py
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/store_cost.py
	$(BIN)/python benchmarks/consumers.py

clean:
	rm -rf $(VENV) .venv-3.12 .venv-3.13 .pytest_cache .mypy_cache .ruff_cache
