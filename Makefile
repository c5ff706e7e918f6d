# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both create or reuse a local venv and install the project from its own files.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mgm-installed

.PHONY: demo test test-fast lint install browser clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[all]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m client.demo

# The web demo's test drives Debian's Chromium (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "chromium is not installed: the browser test will be skipped"; fi; }

# Lint and types first: they fail in seconds, before the suite's servers start.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) browser lint
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q -rs tests

# The edit loop: unit tests only (no tritonserver, nothing marked slow).
test-fast: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q -m "not server and not slow and not gpu" tests

clean:
	rm -rf $(VENV) work_dirs
