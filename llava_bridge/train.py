"""Train LLaVA-1.5 with the HF Trainer (+ DeepSpeed): stage 1 (projector), stage 2 (LLM + projector) or LoRA.

    torchrun --nproc_per_node N -m llava_bridge.train --config configs/llava/toy_stage1.yaml [key=value ...]

Resumes by default from the newest complete checkpoint in ``out_dir`` (``train.resume=auto``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from llava_bridge.config import LlavaTrainConfig, check_inputs, training_arguments
from llava_bridge.data import Collator, LlavaDataset
from llava_bridge.feature_cache import build_feature_cache
from llava_bridge.model import MMSettings, attach_vision, load_lm, load_tokenizer
from llava_bridge.trainer import LlavaTrainer, find_resumable_checkpoint
from llava_bridge.vision import build_vision_tower
from ov3common.checkpoint import atomic_write_json
from ov3common.config import ConfigError, import_object, parse_cli, save_config
from ov3common.dist import barrier, cleanup
from ov3common.guard import TrainingDiverged
from ov3common.images import SkipStats
from ov3common.log import MetricLogger, TrainProgress, get_logger

log = get_logger("llava_bridge.train")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lora_targets(model) -> list[str]:
    """Names of every Linear in the LLM except the projector and the LM head (LLaVA's find_all_linear_names)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "mm_projector" not in name and "lm_head" not in name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def set_trainable(model, cfg):
    """Freeze per ``train.tune``; returns the (possibly peft-wrapped) model."""
    tune = cfg.train.tune
    if tune == "projector":
        model.requires_grad_(False)
        model.model.mm_projector.requires_grad_(True)
    elif tune == "full":
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.train.lora_r, lora_alpha=cfg.train.lora_alpha, lora_dropout=cfg.train.lora_dropout,
                          target_modules=lora_targets(model), bias="none", task_type="CAUSAL_LM")
        # peft would upcast the adapters to fp32 next to a bf16 projector: DeepSpeed ZeRO-3 flattens all trainable
        # tensors into one buffer and refuses mixed dtypes, so every trainable tensor keeps the LM's dtype
        model = get_peft_model(model, lcfg, autocast_adapter_dtype=False)
        model.get_base_model().model.mm_projector.requires_grad_(True)
    one_trainable_dtype(model)
    return model


def base_model(model):
    """The LLaVA model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def one_trainable_dtype(model) -> torch.dtype:
    """Cast every trainable tensor to the LM's dtype (the dtype its weights were loaded in); returns it.
    DeepSpeed keeps fp32 master weights of them under bf16; without DeepSpeed a bf16 LM trains bf16 tensors."""
    dtype = base_model(model).get_input_embeddings().weight.dtype
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return dtype


def compile_decoder(model) -> None:
    """``train.compile_scope=lm``: compile the LM's decoder stack (``model.model``: embeddings in, hidden states out)
    in place, with dynamic shapes (the batch's length varies); the image splice before it and the LM head after it
    run eagerly. Parameter names, and so checkpoints, are unchanged."""
    base_model(model).model.compile(dynamic=True)


class _MetricsCallback:
    """Mirror the Trainer's logs into ``output_dir/metrics.jsonl`` (ov3common.log.MetricLogger) and show the run's
    progress (ov3common.log.TrainProgress: step / total, loss, samples/s, ETA) in place of the Trainer's bar."""

    def __init__(self, out_dir: str, log_every: int):
        logger = MetricLogger(out_dir)

        class CB(TrainerCallback):
            bar = None

            def on_train_begin(self, args, state, control, **kw):
                self.bar = TrainProgress(state.max_steps, state.global_step, "llava", log_every, log)
                self.per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size

            def on_step_end(self, args, state, control, **kw):
                if self.bar is not None:
                    self.bar.update(self.per_step)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs:
                    if self.bar is not None and isinstance(logs.get("loss"), int | float):
                        self.bar.loss = float(logs["loss"])
                    logger.log(state.global_step, {k: v for k, v in logs.items() if isinstance(v, int | float)})

            def on_train_end(self, args, state, control, **kw):
                if self.bar is not None:
                    self.bar.close()

        self.callback = CB()


def build(cfg):
    """(trainer, resume checkpoint) for a parsed config; the TrainingArguments exist before the LM is loaded."""
    check_inputs(cfg)
    use_cpu = cfg.train.use_cpu or not torch.cuda.is_available()
    if cfg.train.deepspeed:  # DeepSpeed's own comm must exist before ZeRO-3 partitioned loading (gloo on CPU)
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if use_cpu else "nccl")
    args = training_arguments(cfg, use_cpu)

    set_seed(args.seed)
    m = cfg.model
    tower = build_vision_tower(m.vision_tower, m.select_layer, m.select_feature, m.image_aspect_ratio)
    model = load_lm(m.llm, DTYPES[m.dtype], m.attn_implementation)
    model.config.use_cache = False
    tokenizer = load_tokenizer(m.llm, m.model_max_length)
    mm = MMSettings(m.vision_tower, m.select_layer, m.select_feature, m.projector_type, m.image_aspect_ratio,
                    m.model_max_length, m.template)
    attach_vision(model, tower, mm, m.pretrain_projector or None)
    model = set_trainable(model, cfg)
    if cfg.train.compile and cfg.train.compile_scope == "lm":
        compile_decoder(model)
    stats = SkipStats()
    ds = LlavaDataset(cfg.data.train, cfg.data.image_root or None, tokenizer, m.template, tower.processor,
                      m.model_max_length, tower.num_tokens, stats, cfg.data.shard_caption)
    if cfg.data.max_samples:
        ds.items = ds.items[: cfg.data.max_samples]
    if cfg.data.feature_cache:
        images = [img for _, img, _ in ds.items if img is not None]
        if not all(isinstance(img, Path) for img in images):
            raise ConfigError("data.feature_cache: works with JSON records and an image folder, not with tar shards")
        ds.features = build_feature_cache(tower, images, cfg.data.feature_cache)
    if cfg.data.pretokenize:
        ds.pretokenize()
    if stats.total():
        log.warning("dropped %d records while building the dataset: %s", stats.total(), stats.as_dict()["skipped"])
    extra = {"llm_path": str(Path(m.llm).resolve()), "conv_template": m.template}
    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=ds, data_collator=Collator(tokenizer.pad_token_id),
        processing_class=tokenizer, tune=cfg.train.tune, mm_projector_lr=cfg.train.mm_projector_lr,
        max_bad_steps=cfg.train.max_bad_steps, skip_stats=stats, extra_config=extra,
        modality_lengths=ds.modality_lengths if cfg.data.group_by_modality_length else None,
        length_group=cfg.data.length_group,
        callbacks=[_MetricsCallback(cfg.out_dir, cfg.train.log_every).callback],
        sample_log=str(Path(cfg.out_dir) / "samples.jsonl") if cfg.train.log_indices else None)

    trainer.remove_callback(ProgressCallback)  # TrainProgress shows step / total, loss, samples/s and ETA instead
    trainer.remove_callback(PrinterCallback)  # the logs go to metrics.jsonl (and the progress line)
    if cfg.train.eval_every > 0:
        trainer.add_callback(import_object(cfg.eval.hook, "eval.hook")(trainer, cfg.eval, cfg.train.eval_every))
    resume = None
    if cfg.train.resume == "auto":
        resume = find_resumable_checkpoint(cfg.out_dir, quarantine=args.process_index == 0)
    elif cfg.train.resume != "none":
        resume = cfg.train.resume
        if not Path(resume).is_dir():
            raise ConfigError(f"train.resume: checkpoint folder does not exist: {resume}")
    return trainer, resume


def main(argv=None) -> int:
    try:
        rc = _main(argv)
        barrier()  # every rank has saved
        return rc
    finally:  # a process group left open at exit aborts the other ranks' gloo threads ("terminate called ...")
        cleanup()


def _main(argv=None) -> int:
    cfg = parse_cli(LlavaTrainConfig, argv, description=__doc__)
    trainer, resume = build(cfg)
    out = Path(cfg.out_dir)
    if trainer.args.process_index == 0:
        save_config(cfg, out / "train_config.yaml")
    if resume:
        log.info("resuming from %s", resume)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except TrainingDiverged as e:
        log.error("%s", e)
        return 3
    trainer.save_model(str(out))
    report = trainer.skip_report()
    if trainer.args.process_index == 0:
        atomic_write_json(out / "skip_stats.json", report)
        log.info("skipped samples: %s; converted to RGB: %s; non-finite loss steps: %d; saved to %s",
                 report["skipped"], report["converted"], report["nonfinite_loss_steps"], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
