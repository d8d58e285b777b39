# Two commands on a fresh machine: `make demo` runs the proxy, `make test` runs the tests.
# Each makes the virtualenv (.venv) with everything it needs on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:8080

.PHONY: demo test test-all test-h11 lint interop-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pooled-proxy demo --listen $(LISTEN)

test: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"

test-all: $(STAMP)
	$(VENV)/bin/pytest

# The same suite on pure-Python h11, the fallback when the h11-mypyc accelerator is absent.
test-h11: $(STAMP)
	POOLED_PROXY_H11=h11 $(VENV)/bin/pytest -m "not slow"

# ruff (lint and format) on the whole tree, mypy --strict on the package.
lint: $(STAMP)
	$(VENV)/bin/ruff check pooled_proxy tests bench
	$(VENV)/bin/ruff format --check pooled_proxy tests bench
	$(VENV)/bin/mypy --strict pooled_proxy

# The programs the interop tests run (nginx, h2load, nghttp, chromium, node, curl), with apt;
# without them `make test` skips those tests.
interop-deps:
	.ci/interop-deps

# pooled-proxy against nginx, HAProxy and Caddy on this machine, then what the inspector and
# a trivial hook add per request (bench/README.md); BENCH_ARGS=--quick shortens the first
bench: $(STAMP)
	$(VENV)/bin/python bench/vs_nginx.py $(BENCH_ARGS)
	$(VENV)/bin/python bench/inspector_overhead.py
	$(VENV)/bin/python bench/hooks_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
