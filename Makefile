# The two set-up commands of the README: `make demo` starts the TRE locally, `make test` runs
# every test. Both install what they need first (apt packages when root, uv, the locked Python
# environment, the proxy from npm), so they work on a fresh Debian machine.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
APT_PACKAGES := bubblewrap chromium nodejs npm git make python3 python3-venv python3-pip ca-certificates fonts-dejavu-core

.PHONY: setup demo test lint bench

setup: .setup-apt .venv/.synced node_modules/.installed

.setup-apt:
	@missing=""; for c in bwrap chromium node npm; do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	  else echo "missing system packages; as root run: apt-get install $(APT_PACKAGES)" >&2; exit 1; fi; \
	fi
	@touch $@

$(UV):
	python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	@touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

demo: setup
	$(UV) run tre demo

test: setup
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run pytest

lint: setup
	$(UV) run ruff check .

bench: setup
	$(UV) run python -m benchmarks
