# Build skeleton for OSCAR. Everything here is non-interactive (CI runs with CI=true, no stdin).
#
#   make deps       system packages: autotools (DTLSSocket builds from source), libcoap3-bin,
#                   postgresql (the server binaries the AS store's tests run on PostgreSQL with),
#                   redis-server (the proxy cluster's tests start private servers of it),
#                   chromium (the admin console's browser tests drive it headless),
#                   iproute2 (the multicast tests make a private network namespace)
#   make .stamp-venv  create .venv and install the project with the [test] extra
#   make demo       create .venv, install, run oscar-demo (ARGS passed to it, e.g. --keep-running)
#   make check      the fast tier, under a minute: lint, format check, typecheck, import contracts,
#                   and every test that starts no process (tests/tiers.py; ARGS passed to pytest)
#   make test       everything: deps, venv, lint, typecheck, import contracts, the whole suite (CI)
#   make bench      every benchmark; writes bench/results.json and docs/PERFORMANCE.md
#                   (ARGS=--quick: under three minutes; ARGS='NAME ...': some modules)
#   make fuzz       every fuzz target for FUZZ_SECONDS each (default 300); corpus in fuzz/corpus/,
#                   new crash inputs in tests/fuzz_crashes/<target>/ (FUZZ_TARGETS='cbor ...': some)
#   make lint | typecheck | imports | clean

PY ?= python3
VENV = .venv
BIN = $(VENV)/bin
STAMP = .stamp-venv
ARGS ?=
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?=

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test
export DEBIAN_FRONTEND := noninteractive

.PHONY: deps venv demo check test lint typecheck imports bench clean fuzz

# apt_install CHECK_CMDS PACKAGES: install PACKAGES unless every command in CHECK_CMDS exists.
define apt_install
	missing=""; \
	for c in $(1); do command -v "$$c" >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" -ne 0 ]; then \
			echo "error: missing$$missing; run as root: apt-get install -y $(2)" >&2; exit 1; \
		fi; \
		echo "deps: installing $(2) (missing:$$missing)"; \
		apt-get update -qq || echo "deps: apt-get update reported problems; continuing" >&2; \
		apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
	fi
endef

# apt_install_unless GLOB PACKAGES: install PACKAGES unless a file matches GLOB (for programs
# outside PATH: PostgreSQL's initdb is in /usr/lib/postgresql/<major>/bin). The tests start a
# private cluster of their own (tests/pg_harness.py); no system cluster needs to run.
define apt_install_unless
	if ! compgen -G "$(1)" >/dev/null; then \
		if [ "$$(id -u)" -ne 0 ]; then \
			echo "error: missing $(1); run as root: apt-get install -y $(2)" >&2; exit 1; \
		fi; \
		echo "deps: installing $(2) (missing: $(1))"; \
		apt-get update -qq || echo "deps: apt-get update reported problems; continuing" >&2; \
		apt-get install -y -qq --no-install-recommends $(2) >/dev/null; \
	fi
endef

deps:
	@$(call apt_install,autoreconf automake,autoconf automake libtool)
	@$(call apt_install,coap-client-openssl,libcoap3-bin)
	@$(call apt_install,ip,iproute2)
	@$(call apt_install_unless,/usr/lib/postgresql/*/bin/initdb,postgresql)
	@$(call apt_install,redis-server,redis-server)
	@$(call apt_install,chromium,chromium chromium-driver)

venv: $(STAMP)

# Re-installs only when pyproject.toml changes; deps is order-only so it never forces a re-install.
$(STAMP): pyproject.toml | deps
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "error: $(PY) is older than Python 3.11 (tomllib); run make PY=python3.X" >&2; exit 1; }
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# The demo needs the project, the AS extra and ops (the daemons serve --metrics); a venv made for
# the tests has them too.
.stamp-demo: pyproject.toml | deps
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "error: $(PY) is older than Python 3.11 (tomllib); run make PY=python3.X" >&2; exit 1; }
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[as,ops]'
	touch $@

demo: .stamp-demo
	$(BIN)/oscar-demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy oscar oscar_io authz_server producer consumer proxy demo bench

# The dependency rule between the packages: the contracts in pyproject.toml ([tool.importlinter]).
imports: $(STAMP)
	$(BIN)/lint-imports --no-cache --no-logo

# --check-tier: only the tests that start no process; one that starts a process fails (tests/tiers.py).
check: $(STAMP) lint typecheck imports
	$(BIN)/pytest --check-tier -q $(ARGS)

test: deps $(STAMP) lint typecheck imports
	$(BIN)/pytest --durations=25 $(ARGS)

fuzz: $(STAMP)
	$(BIN)/python -m fuzz --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# The benchmarks also need the [bench] extra (matplotlib for the plots, pyinstrument to profile).
.stamp-bench: pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

bench: .stamp-bench
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) $(STAMP) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis \
		.import_linter_cache
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
