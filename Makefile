# The two set-up commands of the README: `make demo` starts the TRE locally, `make test` runs
# every test. Both install what they need first (apt packages when root, uv, the locked Python
# environment, the proxy from npm), so they work on a fresh Debian machine.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)

.PHONY: setup demo test lint bench

setup: .setup-apt .venv/.synced node_modules/.installed

.setup-apt:
	@# Install only what is missing: a machine may already have Node.js from elsewhere (e.g.
	@# NodeSource, whose nodejs conflicts with Debian's npm package).
	@pkgs=""; \
	for pair in bwrap:bubblewrap chromium:chromium node:nodejs npm:npm git:git make:make; do \
	  command -v $${pair%%:*} >/dev/null || pkgs="$$pkgs $${pair#*:}"; \
	done; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs="$$pkgs python3-venv python3-pip"; \
	[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || pkgs="$$pkgs fonts-dejavu-core"; \
	if [ -n "$$pkgs" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ca-certificates $$pkgs; \
	  else echo "missing system packages; as root run: apt-get install$$pkgs" >&2; exit 1; fi; \
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
