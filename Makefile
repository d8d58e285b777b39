# Two commands on a fresh machine: `make demo` runs the proxy, `make test` runs the tests.
# Each makes the virtualenv (.venv) with everything it needs on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:8080

# The modules mypyc compiles (listed in pooled_proxy/_compiled.py), and the mark of their last
# in-place build.
COMPILED_SOURCES := $(shell $(PYTHON) -c 'import runpy; print(*runpy.run_path("pooled_proxy/_compiled.py")["source_paths"]())')
COMPILED := build/.compiled-in-place
BUILD_FILES := setup.py build_backend.py

.PHONY: demo test test-all test-h11 compiled lint interop-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip 'setuptools>=77'
	$(VENV)/bin/pip install --quiet -e '.[test,lint]' --config-settings editable_mode=compat
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pooled-proxy demo --listen $(LISTEN)

# The compiled build, in the working tree: an extension module beside each listed module's
# source, and their shared library at the top (pooled_proxy__mypyc.*.so, found through the
# venv's path to the tree: editable_mode=compat above); rebuilt when a source changes. The
# tree's Python imports them first (POOLED_PROXY_PURE=1 takes the source instead). They are
# touched at the end: a copy keeps the time of the build it came from when the C did not
# change, and the suite refuses extension modules older than their source.
compiled: $(COMPILED)

$(COMPILED): $(STAMP) $(COMPILED_SOURCES) pooled_proxy/_compiled.py setup.py
	rm -f pooled_proxy__mypyc.*.so && find pooled_proxy -name '*.so' -delete
	POOLED_PROXY_COMPILE=1 $(VENV)/bin/python setup.py --quiet build_ext --inplace
	touch pooled_proxy__mypyc.*.so $(COMPILED_SOURCES:.py=.*.so) $@

# The suite on the compiled build: our compiled modules and h11-mypyc. Where they cannot be
# compiled (no C compiler or Python headers), on the pure-Python build, with a line saying
# so; not under POOLED_PROXY_REQUIRE_COMPILED (CI), where that is a failure.
on_compiled_build = if $(MAKE) --no-print-directory compiled; then $(VENV)/bin/pytest $(1); \
	elif [ -n "$$POOLED_PROXY_REQUIRE_COMPILED" ]; then exit 1; \
	else echo "make: the modules did not compile (above); testing the pure-Python build"; \
	POOLED_PROXY_PURE=1 $(VENV)/bin/pytest $(1); fi

test: $(STAMP)
	@$(call on_compiled_build,-m "not slow")

test-all: $(STAMP)
	@$(call on_compiled_build,)

# The same suite on the pure-Python build (our modules' source and pure h11), the fallback
# when there is no compiler or no h11-mypyc: POOLED_PROXY_PURE=1 leaves the .so files unused.
test-h11: $(STAMP)
	POOLED_PROXY_PURE=1 $(VENV)/bin/pytest -m "not slow"

# ruff (lint and format) on the whole tree, mypy --strict on the package and its build.
lint: $(STAMP)
	$(VENV)/bin/ruff check pooled_proxy tests bench $(BUILD_FILES)
	$(VENV)/bin/ruff format --check pooled_proxy tests bench $(BUILD_FILES)
	$(VENV)/bin/mypy --strict pooled_proxy $(BUILD_FILES)

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
	rm -rf $(VENV) .pytest_cache .hypothesis build pooled_proxy__mypyc.*.so
	find pooled_proxy -name '*.so' -delete
