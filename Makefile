# `make run`: create the environment if missing, then run the whole pipeline with DVC.
# `make test`: create the environment if missing, then run the whole test suite.
# `make test-fast`: the same without the end-to-end runs (tests marked slow): the inner loop.
# Both spread the tests over one worker per core, a module per worker (its module-scoped fixtures
# are built once), and list the 15 slowest tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Stage commands (`bkd ...`) and dvc come from the project's environment.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install run test test-fast bench clean

install: $(VENV)/.installed

# Re-installs when the dependencies change. torch/torchvision are pinned to the builds on local disk.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

run: install
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf runs metrics reports plots models cache/*.zarr cache/*.identity.json
