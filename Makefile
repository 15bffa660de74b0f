# Graftmesh — the two commands a new user needs are `make run` and `make test`.
# Both create .venv on first use and install the project with its dev extras,
# every version pinned by constraints.txt.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run up test test-fast lint proto bench constraints clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

$(VENV): $(STAMP)

# The console's browser tests drive Debian's Chromium, installed here (as root, from
# the distribution's packages), never downloaded by a test tool. Without it they skip.
BROWSER_STAMP := $(VENV)/.browser
$(BROWSER_STAMP): $(STAMP)
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium and chromium-driver for the browser tests"; \
	    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	      || { apt-get update -q >/dev/null 2>&1 \
	           && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
	      || echo "could not install chromium: the browser tests will be skipped"; \
	  else echo "no chromium (apt-get install chromium chromium-driver): browser tests skip"; fi; \
	fi
	@touch $@

run: $(VENV)
	$(VENV)/bin/graftmesh demo

up: $(VENV)
	$(VENV)/bin/graftmesh up

lint: $(VENV)
	$(VENV)/bin/ruff check common services tests bench tools
	$(VENV)/bin/ruff format --check common services tests bench tools
	$(VENV)/bin/mypy common services

# pytest exits 5 when it collected nothing: an empty suite is a failure here too.
test: lint $(BROWSER_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; fi; exit $$rc

test-fast: $(VENV)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

proto: $(VENV)
	$(PY) tools/gen_proto.py

bench: $(VENV)
	$(PIP) install --quiet -c constraints.txt -e '.[dev,bench]'
	$(PY) -m bench

constraints: $(VENV)
	$(PIP) freeze --exclude-editable | grep -v '^graftmesh' \
	  | sed 's/^torch==\(.*\)+cpu/torch==\1/' > constraints.body
	{ sed -n '/^#/p' constraints.txt; cat constraints.body; } > constraints.txt.new
	rm constraints.body && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .graftmesh
