# Two entry points a new user needs: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-compare bench-tracing bench-agent clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/infermon demo

test: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Before/after in one run: infermon at REF (own worktree and venv in a temp dir) beside this checkout.
bench-compare: $(STAMP)
	@test -n "$(REF)" || { echo "usage: make bench-compare REF=<git ref> [ARGS='--rounds 3 --strace']"; exit 2; }
	$(BIN)/python -m bench.baseline $(REF) -- $(ARGS)

bench-tracing: $(STAMP)
	$(BIN)/python -m bench.tracing

bench-agent: $(STAMP)
	$(BIN)/python -m bench.agent_cpu

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
