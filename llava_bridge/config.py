"""The LLaVA training config (an ``ov3common.config`` dataclass) and its translation to ``TrainingArguments``.

Defaults are the toy world's stage 1; ``configs/llava/real_stage{1,2}.yaml`` carry LLaVA-1.5's hyper-parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ov3common.config import ConfigError, path_field

TUNES = ("projector", "full", "lora")


@dataclass
class ModelCfg:
    llm: str = "runs/toy/llm"  # transformers causal-LM folder (tokenizer inside)
    vision_tower: str = "runs/toy/encoder/export"  # OV3 encoder export, or a CLIP/SigLIP vision model folder
    select_layer: int = -2  # mm_vision_select_layer
    select_feature: str = "patch"  # OV3: patch | mean | pooled ; HF: patch | cls_patch | pooled
    projector_type: str = "mlp2x_gelu"  # mlp2x_gelu | linear
    pretrain_projector: str = path_field("", "exists")  # stage-1 mm_projector.safetensors (or its folder)
    template: str = "plain"  # plain | vicuna_v1 | chat_template
    model_max_length: int = 2048
    image_aspect_ratio: str = "pad"  # pad | crop
    attn_implementation: str = "sdpa"
    dtype: str = "float32"  # weights dtype when loading the LM (bf16 mixed precision is train.bf16)


@dataclass
class DataCfg:
    train: list[str] = field(default_factory=lambda: ["data/toy/llava/pretrain.json"])  # .json/.jsonl/.tar/dirs
    image_root: str = "data/toy/images"
    shard_caption: str = "txt"  # for tar shards: txt | json.<field>
    num_workers: int = 0
    group_by_modality_length: bool = False
    max_samples: int = 0  # 0 = all (toy runs use a prefix)
    # a folder: the frozen tower's features of every training image, computed once and reused (image folders only;
    # for small towers / datasets such as the toy world). "" = run the tower on every step, as LLaVA.
    feature_cache: str = ""


@dataclass
class TrainCfg:
    tune: str = "projector"  # projector (stage 1) | full (stage 2) | lora
    output_dir: str = "runs/toy/llava/ov3_stage1"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 16  # per device
    grad_accum: int = 1
    lr: float = 1e-3
    mm_projector_lr: float = 0.0  # 0 = same as lr (LoRA recipe: 2e-5)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    bf16: bool = False
    tf32: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (HF TrainingArguments.torch_compile; inductor on CPU and GPU)
    deepspeed: str = ""  # a DeepSpeed JSON (configs/llava/zero{2,3}.json); "" = plain DDP / single process
    save_steps: int = 0  # 0 = only the final save
    save_total_limit: int = 2
    logging_steps: int = 10
    seed: int = 42
    resume: str = "auto"  # auto (newest valid checkpoint in output_dir) | none | a checkpoint folder
    max_bad_steps: int = 5  # consecutive non-finite losses that stop the run
    use_cpu: bool = False  # forced on when no GPU is visible
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    report_to: str = "none"
    log_samples: bool = False  # append each step's sample ids to output_dir/samples.jsonl (audits data order)


@dataclass
class LlavaTrainConfig:
    """LLaVA-1.5 training (stage 1: projector; stage 2: LLM + projector; or LoRA)."""

    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)


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

    need("model.vision_tower", cfg.model.vision_tower, "dir")
    need("model.llm", cfg.model.llm, "dir")
    if not cfg.data.train:
        raise ConfigError("data.train: no training data given")
    for i, p in enumerate(cfg.data.train):
        need("data.train", p) if i == 0 else need(f"data.train.{i}", p)
    if cfg.data.image_root:
        need("data.image_root", cfg.data.image_root, "dir")
    if cfg.train.tune not in TUNES:
        raise ConfigError(f"train.tune: must be one of {TUNES}, got {cfg.train.tune!r}")
    if cfg.train.deepspeed:
        need("train.deepspeed", cfg.train.deepspeed)
    if cfg.train.tune == "projector" and cfg.model.pretrain_projector:
        raise ConfigError("model.pretrain_projector: stage 1 (train.tune=projector) starts from a fresh projector")


def training_arguments(cfg, use_cpu: bool):
    """``TrainingArguments`` for ``cfg.train`` (create it BEFORE loading the LM: under ZeRO-3 it switches
    ``from_pretrained`` to partitioned loading)."""
    from transformers import TrainingArguments

    t = cfg.train
    kw = dict(
        output_dir=t.output_dir, num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler, max_grad_norm=t.max_grad_norm, bf16=t.bf16,
        deepspeed=t.deepspeed or None,
        save_strategy="steps" if t.save_steps > 0 else "no", save_steps=max(t.save_steps, 1),
        save_total_limit=t.save_total_limit, logging_steps=t.logging_steps, logging_first_step=True,
        seed=t.seed, data_seed=t.seed, use_cpu=use_cpu, report_to=t.report_to, remove_unused_columns=False,
        dataloader_num_workers=cfg.data.num_workers,
    )
    if t.tf32:
        kw["tf32"] = True
    if t.compile:
        kw["torch_compile"] = True
    if t.gradient_checkpointing:
        kw["activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
           else "gradient_checkpointing"] = True
    return TrainingArguments(**kw)
