# Two entry points a new user needs: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NATIVE := $(VENV)/.native
# the data plane's hot modules, compiled with mypyc where a C compiler is there (setup.py)
COMPILED := $(addprefix proxy/dataplane/,exchange.py heads.py http.py server.py timer.py upstream.py)

.PHONY: demo dashboards screenshot test test-compiled test-python bench bench-compare bench-tracing bench-agent bench-sampling bench-split clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	INFERMON_PURE_PYTHON=1 $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# compiled in place, beside the sources; without a C compiler this leaves the pure-Python package
$(NATIVE): $(STAMP) $(COMPILED) setup.py
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $(NATIVE)

demo: $(NATIVE)
	$(BIN)/infermon demo

# the suite runs twice: on the compiled data plane (when it was built) and on the pure-Python one
test: $(NATIVE)
	$(BIN)/ruff check proxy tests bench deploy setup.py
	$(BIN)/mypy
	$(BIN)/python -c "import proxy._compiled as c; print('data plane:', c.MODE)"
	$(BIN)/pytest
	INFERMON_PURE_PYTHON=1 $(BIN)/pytest

# deploy/grafana/dashboards/*.json from deploy/grafana/build.py (committed; the tests compare them)
dashboards: $(STAMP)
	$(BIN)/python deploy/grafana/build.py

# docs/status-page.png: the status page at 1366x768 after the browser test's traffic (needs /usr/bin/chromium)
screenshot: $(STAMP)
	INFERMON_SCREENSHOT=docs/status-page.png $(BIN)/pytest tests/admin/test_browser.py -k test_the_page_in_chromium -q

test-compiled: $(NATIVE)
	$(BIN)/pytest

test-python: $(STAMP)
	INFERMON_PURE_PYTHON=1 $(BIN)/pytest

bench: $(NATIVE)
	$(BIN)/python -m bench.run

# Before/after in one run: infermon at REF (own worktree and venv in a temp dir) beside this checkout.
bench-compare: $(NATIVE)
	@test -n "$(REF)" || { echo "usage: make bench-compare REF=<git ref> [ARGS='--rounds 3 --strace']"; exit 2; }
	$(BIN)/python -m bench.baseline $(REF) -- $(ARGS)

bench-tracing: $(NATIVE)
	$(BIN)/python -m bench.tracing

bench-sampling: $(NATIVE)
	$(BIN)/python -m bench.sampling $(ARGS)

bench-split: $(NATIVE)
	$(BIN)/python -m bench.split $(ARGS)

bench-agent: $(STAMP)
	$(BIN)/python -m bench.agent_cpu

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build
	find proxy -name '*.so' -delete
