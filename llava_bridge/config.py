"""The LLaVA training config (an ``ov3common.config`` dataclass) and its translation to ``TrainingArguments``.

Defaults are the toy world's stage 1; ``configs/llava/real_stage{1,2}.yaml`` carry LLaVA-1.5's hyper-parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from ov3common.attention import require_flash
from ov3common.config import ConfigError, choice_field, path_field

TUNES = ("projector", "full", "lora")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")


# ---- in-training evaluation (train.eval_every > 0): eval.llava_live, added by name
@dataclass
class LiveEvalConfig:
    pope: str = ""  # POPE file/folder (eval.benchmarks formats: JSONL, parquet, save_to_disk); "" = none
    seedbench: str = ""  # SeedBench file/folder; "" = none
    image_root: str = ""  # "" = the benchmark's own (images embedded, or beside the file)
    limit_per_category: int = 20  # the subset: the first K questions of each category (0 = all)
    seedbench_protocol: str = choice_field("both", ("generate", "rank", "both"))  # letter | answer ranking
    batch_size: int = 8
    max_new_tokens: int = 16
    # the evaluator, by name (llava_bridge imports nothing of eval): function(trainer, this config, every) -> a
    # transformers TrainerCallback
    hook: str = "eval.llava_live:callback"


@dataclass
class ModelConfig:
    llm: str = "runs/toy/llm"  # transformers causal-LM folder (tokenizer inside)
    vision_tower: str = "runs/toy/encoder/export"  # OV3 encoder export, or a CLIP/SigLIP vision model folder
    select_layer: int = -2  # mm_vision_select_layer
    select_feature: str = "patch"  # OV3: patch | mean | pooled ; HF: patch | cls_patch | pooled
    projector_type: str = "mlp2x_gelu"  # mlp2x_gelu | linear
    pretrain_projector: str = path_field("", "exists")  # stage-1 mm_projector.safetensors (or its folder)
    template: str = "plain"  # plain | vicuna_v1 | chat_template
    model_max_length: int = 2048
    image_aspect_ratio: str = "pad"  # pad | crop
    # the LM's attention (transformers attn_implementation); flash_attention_2 needs the flash-attn extra (GPU)
    attn_implementation: str = choice_field("sdpa", ATTN_IMPLEMENTATIONS)
    # weights dtype when loading the LM (bf16 mixed precision is train.precision); every trainable tensor
    # (projector, LoRA A/B, unfrozen LM) is kept in this dtype
    dtype: str = choice_field("float32", ("float32", "bfloat16", "float16"))


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # required: .json/.jsonl/.tar/dirs
    image_root: str = ""  # images of .json/.jsonl data (relative paths); required with them
    shard_caption: str = "txt"  # for tar shards: txt | json.<field>
    num_workers: int = 0
    group_by_modality_length: bool = False
    # with group_by_modality_length: sort this many megabatches (world x batch) together by length (1 = LLaVA's
    # rule; more = less padding, as HF's group_by_length, which sorts 50 batches at a time)
    length_group: int = 1
    max_samples: int = 0  # 0 = all (toy runs use a prefix)
    # a folder: the frozen tower's features of every training image, computed once and reused (image folders only;
    # for small towers / datasets such as the toy world). "" = run the tower on every step, as LLaVA.
    feature_cache: str = ""
    # tokenize every record once when the dataset is built (batched), not on every step of every epoch; the same
    # ids and labels. For small datasets (the toy world); two int64 tensors per record are kept in memory
    pretokenize: bool = False


@dataclass
class TrainConfig:
    tune: str = choice_field("projector", TUNES)  # projector (stage 1) | full (stage 2) | lora
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16  # per device
    grad_accum: int = 1
    lr: float = 1e-3
    mm_projector_lr: float = 0.0  # 0 = same as lr (LoRA recipe: 2e-5)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    grad_clip: float = 1.0  # HF max_grad_norm
    precision: str = choice_field("fp32", ("fp32", "bf16"))  # bf16: HF Trainer bf16 mixed precision
    tf32: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile (inductor on CPU and GPU); what it compiles: compile_scope
    # model: the whole forward, through HF TrainingArguments.torch_compile (the splice too: graph breaks and
    # recompiles on its data-dependent shapes); lm: only the LM's decoder stack (embeddings in, hidden states out),
    # in place with dynamic shapes, the splice eager (toy stage 2: 1000 steps in 153 s vs 211 s with `model`)
    compile_scope: str = choice_field("model", ("model", "lm"))
    deepspeed: str = ""  # a DeepSpeed JSON (configs/llava/zero{2,3}.json); "" = plain DDP / single process
    ckpt_every: int = 0  # HF save_steps; 0 = only the final save
    keep_last: int = 2  # HF save_total_limit
    log_every: int = 10  # HF logging_steps
    eval_every: int = 0  # in-training POPE / SeedBench on the `eval` section's subset every N steps (0 = off)
    resume: str = "auto"  # auto (newest valid checkpoint in out_dir) | none | a checkpoint folder
    max_bad_steps: int = 5  # consecutive non-finite losses that stop the run
    use_cpu: bool = False  # forced on when no GPU is visible
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    report_to: str = "none"  # HF integrations (wandb, ...); TensorBoard: train.tensorboard
    tensorboard: bool = False  # also report to TensorBoard (HF's TensorBoard callback, <out_dir>/runs)
    log_indices: bool = False  # append each step's sample ids to out_dir/samples.jsonl (audits data order)


@dataclass
class LlavaTrainConfig:
    """LLaVA-1.5 training (stage 1: projector; stage 2: LLM + projector; or LoRA)."""

    RENAMED = {"train.output_dir": "out_dir", "train.seed": "seed", "train.bf16": "train.precision",
               "train.max_grad_norm": "train.grad_clip", "train.save_steps": "train.ckpt_every",
               "train.save_total_limit": "train.keep_last", "train.logging_steps": "train.log_every",
               "train.log_samples": "train.log_indices", "train.dist": "train.strategy"}
    out_dir: str = "runs/toy/llava/ov3_stage1"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: LiveEvalConfig = field(default_factory=LiveEvalConfig)  # eval.llava_live (by name: eval.hook)


HINTS = {
    "model.vision_tower": "run `make pretrain-encoder` (it writes runs/toy/encoder/export) or point "
                          "model.vision_tower at an encoder export / CLIP folder",
    "model.llm": "run `make toy-llm` (it writes runs/toy/llm) or point model.llm at a transformers LM folder",
    "data.image_root": "run `make data` (it writes data/toy/images)",
    "data.train": "run `make data` (it writes data/toy/llava/*.json)",
}


def check_inputs(cfg) -> None:
    """Every input path exists (before any compute); the error names the key, the path and what to run."""
    def need(key: str, p: str, kind: str = "exists") -> None:
        path = Path(p)
        ok = path.is_dir() if kind == "dir" else path.exists()
        if not ok:
            raise ConfigError(f"{key}: path does not exist: {path} — {HINTS.get(key, 'fix the path')}")

    check_attn(cfg.model.attn_implementation)
    need("model.vision_tower", cfg.model.vision_tower, "dir")
    need("model.llm", cfg.model.llm, "dir")
    if not cfg.data.train:
        raise ConfigError("data.train: no training data given")
    for i, p in enumerate(cfg.data.train):
        need("data.train", p) if i == 0 else need(f"data.train.{i}", p)
    if cfg.data.image_root:
        need("data.image_root", cfg.data.image_root, "dir")
    if cfg.train.deepspeed:
        need("train.deepspeed", cfg.train.deepspeed)
    if cfg.train.eval_every > 0 and not (cfg.eval.pope or cfg.eval.seedbench):
        raise ConfigError("train.eval_every: set eval.pope and/or eval.seedbench (benchmark files) to evaluate")
    if cfg.train.tune == "projector" and cfg.model.pretrain_projector:
        raise ConfigError("model.pretrain_projector: stage 1 (train.tune=projector) starts from a fresh projector")


def check_attn(attn: str, key: str = "model.attn_implementation") -> None:
    """``flash_attention_2`` only where flash-attn imports (a config error naming the key otherwise)."""
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"{key}: {attn!r} is not one of {ATTN_IMPLEMENTATIONS}")
    if attn == "flash_attention_2":
        require_flash(key, "flash_attention_2")


def training_arguments(cfg, use_cpu: bool):
    """``TrainingArguments`` for ``cfg.train`` (create it BEFORE loading the LM: under ZeRO-3 it switches
    ``from_pretrained`` to partitioned loading)."""

    t = cfg.train
    kw = dict(
        output_dir=cfg.out_dir, num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler, max_grad_norm=t.grad_clip, bf16=t.precision == "bf16",
        deepspeed=t.deepspeed or None,
        save_strategy="steps" if t.ckpt_every > 0 else "no", save_steps=max(t.ckpt_every, 1),
        save_total_limit=t.keep_last, logging_steps=t.log_every, logging_first_step=True,
        seed=cfg.seed, data_seed=cfg.seed, use_cpu=use_cpu, remove_unused_columns=False,
        report_to=([] if t.report_to == "none" else [t.report_to]) + (["tensorboard"] if t.tensorboard else [])
        or "none",
        dataloader_num_workers=cfg.data.num_workers,
    )
    if t.tf32 and not use_cpu:  # a CUDA matmul setting (HF refuses it without an Ampere GPU)
        kw["tf32"] = True
    if t.compile and t.compile_scope == "model":
        kw["torch_compile"] = True
    if t.gradient_checkpointing:
        kw["activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
           else "gradient_checkpointing"] = True
    return TrainingArguments(**kw)
