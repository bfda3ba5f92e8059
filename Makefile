# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo
PRESET ?= tiny
PYTEST_ARGS ?=

.PHONY: demo test install install-test llama-cpp clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is installed first and pinned so that pip takes the local CPU build instead of a multi-GB CUDA
# download; pyproject's range admits it, so the package install adds nothing on top.
# The `classical` extra (jieba, a few seconds to install) gives the report its classical-tools column.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[classical]"
	touch $@

# The GGUF export tests run the real llama.cpp: .ci/llama-cpp.sh compiles llama-cpp-python once into a wheel
# cache outside the tree (minutes) and afterwards only installs that wheel.
$(VENV)/.installed-test: pyproject.toml .ci/llama-cpp.sh $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	bash .ci/llama-cpp.sh $(BIN)/python
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
llama-cpp: $(VENV)/.installed
	bash .ci/llama-cpp.sh $(BIN)/python

demo: $(VENV)/.installed
	$(BIN)/matelike run --preset $(PRESET) --out $(DEMO_OUT)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
