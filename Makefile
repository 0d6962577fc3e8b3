# One command to a green test run (`make test`), one to a demo (`make demo`).
# Both create .venv and install the project on first use; torch 2.13.0 (CPU wheel) is
# installed first when the venv has no torch, so pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
# Test processes (pytest-xdist). A test module stays on one worker and the tests that start a
# Triton server share one (--dist loadgroup; groups in tests/conftest.py), so module-scoped
# servers start once and one Triton runs at a time; session fixtures are built once per worker.
TEST_WORKERS ?= 2
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.diffserve-installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,cpu]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/diffserve demo

clean:
	rm -rf var .pytest_cache
