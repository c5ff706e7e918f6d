# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both create or reuse a local venv and install the project from its own files.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mgm-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[all]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m client.demo

test: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q -rs tests

clean:
	rm -rf $(VENV) work_dirs
