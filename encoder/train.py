"""Train the OpenVision 3 encoder: ``python -m encoder.train --config configs/encoder/toy.yaml key=value ...``
(under ``torchrun`` for several processes). One readable loop: progressive-resolution stages, AdamW + warmup/cosine,
joint understanding + reconstruction losses, exact resume, NaN guard, bad-sample counts, eval, export."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from encoder.data import (
    Collate,
    DataConfig,
    ImageTextDecoder,
    Tokenize,
    load_stream_state,
    recap_report,
    shard_list,
    stream_state,
    tokenizer_dir,
    train_loader,
    val_items,
)
from encoder.evaluate import evaluate
from encoder.export import export_from_state
from encoder.latent_cache import LatentCache, vae_identity
from encoder.losses import LPIPSLoss
from encoder.ov3 import LossConfig, ModelConfig, OV3Model
from encoder.vae import VAEConfig, build_vae
from ov3common import checkpoint as C
from ov3common.config import choice_field, parse_cli, save_config
from ov3common.data import lockstep
from ov3common.dist import all_reduce_mean, barrier, cleanup, init_distributed, wrap_model
from ov3common.linear import cpu_linear_field, use_onednn_linear
from ov3common.log import get_logger
from ov3common.optim import build_adamw, clip_grad_norm, staged_warmup_cosine, warmup_cosine
from ov3common.trainer import Loop


@dataclass
class StageConfig:
    resolution: int = 32
    steps: int = 100
    batch_size: int = 64  # global (split over ranks)
    micro_batch: int = 0  # samples per forward on a rank (memory): the rank's batch runs in chunks of at most this
    #                       many, gradients accumulated; contrastive negatives are those of a chunk. 0 = all at once
    lr: float = 0.0  # peak LR of this stage (train.schedule=per_stage); 0 = train.lr
    warmup_steps: int = -1  # this stage's warmup (per_stage); -1 = train.warmup_steps
    min_lr_ratio: float = -1.0  # this stage's cosine floor, x its peak (per_stage); -1 = train.min_lr_ratio


@dataclass
class TrainConfig:
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(32, 300, 64), StageConfig(64, 100, 64)])
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    # per_stage: each stage its own warmup + cosine from its own peak LR (OpenVision's pretrain + fine-tune runs);
    # single: one warmup + cosine over all the stages' steps (the toy recipe)
    schedule: str = choice_field("per_stage", ("per_stage", "single"))
    fresh_optimizer_per_stage: bool = False  # drop AdamW's moments when a stage starts (a fine-tune from the weights)
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = choice_field("fp32", ("fp32", "bf16"))  # bf16: autocast, fp32 master weights
    compile: bool = False  # torch.compile (inductor) the ViT, ViT decoder and text towers (CPU and GPU)
    strategy: str = choice_field("ddp", ("ddp", "fsdp2", "none"))
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0: leave as is)
    cpu_linear: str = cpu_linear_field()  # CPU fp32 nn.Linear: ov3common.linear (auto | onednn | aten)
    log_every: int = 10
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to <out_dir>/tb
    ckpt_every: int = 100  # steps between checkpoints (and the last step); <= 0: the last step only
    eval_every: int = 0  # > 0: val PSNR + retrieval of the live model every N steps (= eval.intraining offline)
    keep_last: int = 2
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    inject_nan_steps: list[int] = field(default_factory=list)  # tests: poison the loss at these (1-based) steps
    log_indices: bool = False  # debug: write the sample indices of every step (resume tests)


@dataclass
class Config:
    RENAMED = {"train.bf16": "train.precision", "train.nan_at_steps": "train.inject_nan_steps",
               "train.dist": "train.strategy", "train.max_grad_norm": "train.grad_clip", "out": "out_dir"}
    out_dir: str = "runs/toy/encoder"
    seed: int = 0
    export_dir: str = ""  # empty: <out_dir>/export; "none": no export
    grid_n: int = 8
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def val_batches(cfg: Config, tokenize: Tokenize, resolution: int) -> list[dict]:
    items = val_items(cfg.data, ImageTextDecoder(tokenize, resolution, cfg.data, seed=cfg.seed, crop="center"))
    collate = Collate(tokenize.pad)
    return [b for b in (collate(items[i:i + 64]) for i in range(0, len(items), 64)) if b["n"]]


def build_schedule(opt: torch.optim.Optimizer, tr: TrainConfig):
    """``train.schedule``: one warmup + cosine per stage (each from its own peak LR), or one over all steps."""
    if tr.schedule == "single":
        return warmup_cosine(opt, tr.warmup_steps, sum(s.steps for s in tr.stages), tr.min_lr_ratio)
    return staged_warmup_cosine(opt, [(s.steps, (s.lr or tr.lr) / tr.lr, tr.warmup_steps if s.warmup_steps < 0
                                       else s.warmup_steps, tr.min_lr_ratio if s.min_lr_ratio < 0 else s.min_lr_ratio)
                                      for s in tr.stages])


def micro_parts(batch: dict, stage: StageConfig, world: int, device) -> int:
    """How many chunks this step's batch runs in: ceil(rank batch / micro_batch), the same on every rank (their
    backward passes are collectives); one when some rank has fewer valid samples than chunks."""
    per_rank = stage.batch_size // world
    parts = -(-per_rank // stage.micro_batch) if 0 < stage.micro_batch < per_rank else 1
    if parts > 1 and world > 1:
        n = torch.tensor([float(batch["n"])], device=device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        return parts if n.item() >= parts else 1
    return parts if batch["n"] >= parts else 1


def split_batch(batch: dict, parts: int) -> list[dict]:
    """The batch's samples in ``parts`` near-equal chunks (per-sample tensors and lists cut along the first axis)."""
    n = batch["n"]
    if parts <= 1:
        return [batch]
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    per_sample = [k for k, v in batch.items() if isinstance(v, torch.Tensor | list) and len(v) == n]
    return [{**batch, **{k: batch[k][a:b] for k in per_sample}, "n": b - a} for a, b in zip(bounds, bounds[1:])]


def forward_backward(wrapped, batch: dict, parts: int, step: int, counts: torch.Tensor, world: int, bf16: bool,
                     device, poison: bool = False) -> dict:
    """Forward + backward of the step's batch, in ``parts`` chunks with accumulated gradients; each chunk's losses
    are its share of the step's global means (``counts``), so they sum to the whole batch's. Gradients are
    synchronised on the last chunk only (DDP ``no_sync``; FSDP2 ``set_requires_gradient_sync``)."""
    chunks = split_batch(batch, parts)
    total: dict = {}
    for j, chunk in enumerate(chunks):
        last = j == len(chunks) - 1
        if hasattr(wrapped, "set_requires_gradient_sync"):
            wrapped.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = wrapped(to_device(chunk, device), step, counts[0], counts[1], world)
            loss = out["loss"] * float("nan") if poison else out["loss"]  # tests: a non-finite loss
            loss.backward()
        for k, v in out.items():
            v = (loss if k == "loss" else v).detach()
            total[k] = v if k == "logit_scale" or k not in total else total[k] + v
    return total


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train(cfg: Config) -> dict:
    info = init_distributed(cfg.train.device)
    log = get_logger("encoder.train")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    tr, world = cfg.train, info.world_size
    bf16 = tr.precision == "bf16"
    for s in tr.stages:
        if s.batch_size % world:
            raise ValueError(f"train.stages: batch_size {s.batch_size} not divisible by {world} processes")
    tokenize = Tokenize(tokenizer_dir(cfg.data), cfg.data.max_text_len)
    vae = build_vae(cfg.vae, info.device)
    lpips = None
    if cfg.loss.w_lpips > 0:
        with torch.random.fork_rng():
            torch.manual_seed(1234)  # a random backbone is the same on every rank and every resume
            lpips = LPIPSLoss(cfg.loss.lpips_net, cfg.loss.lpips_backbone, cfg.loss.lpips_backbone_path, log)
        lpips = lpips.to(info.device)
    urls = shard_list(cfg.data, "train")
    latents = LatentCache(cfg.data.latent_cache, vae_identity(cfg.vae.path, vae), [s.resolution for s in tr.stages],
                          cfg.data.crop) if cfg.data.latent_cache else None
    decoder = ImageTextDecoder(tokenize, tr.stages[0].resolution, cfg.data, seed=cfg.seed, latents=latents,
                               resampled=cfg.data.resampled)
    val = val_batches(cfg, tokenize, tr.stages[-1].resolution)

    torch.manual_seed(cfg.seed)
    model = OV3Model(cfg.model, cfg.loss, tokenize.vocab_size, tokenize.pad, cfg.data.max_text_len, vae, lpips,
                     seed=cfg.seed).to(info.device)
    use_onednn_linear(model, tr.cpu_linear)  # a CPU run: oneDNN products where faster
    wrapped = wrap_model(model, tr.strategy, info)
    if tr.compile:  # in place: parameter names, checkpoints and the DDP/FSDP2 wrapping are unchanged
        for part in (model.vit, model.decoder, model.text_encoder, model.text_decoder):
            part.compile()
    opt = build_adamw(model, tr.lr, (tr.beta1, tr.beta2), tr.weight_decay)
    total = sum(s.steps for s in tr.stages)
    sched = build_schedule(opt, tr)
    loop = Loop(out, total, "encoder", seed=cfg.seed, rank=info.rank, log_every=tr.log_every,
                ckpt_every=tr.ckpt_every, keep_last=tr.keep_last, max_bad_steps=tr.max_bad_steps, skip_rows=True,
                inject_nan_steps=tr.inject_nan_steps, tensorboard=tr.tensorboard, logger=log,
                heap_reuse=info.device.type == "cpu")
    baseline: dict = {}  # the untrained model's val metrics
    first = {"kept": 0, "recap_from_alt": 0}  # over the first data.recap_check_steps steps (this rank)
    streams: dict = {}  # this rank's data streams: resume state after the last consumed batch
    indices = out / (f"indices_rank{info.rank}.jsonl" if world > 1 else "indices.jsonl")  # train.log_indices

    def restore(state: dict, rank_state: dict) -> None:
        nonlocal baseline, first, streams
        C.load_model_state(model, state["model"])
        C.load_optim_state(model, opt, state["optim"])
        sched.load_state_dict(state["sched"])
        loop.load_state_dict({**state["progress"], "guard": state["guard"], "skips": rank_state.get("skip", {})})
        baseline = state["progress"]["baseline"]
        first = rank_state.get("first", first)
        streams = load_stream_state(rank_state.get("data", {}), cfg.data, world, loop.epoch)

    def save() -> None:
        loop.save({"model": C.model_state(model), "optim": C.optim_state(model, opt), "sched": sched.state_dict(),
                   "guard": loop.guard.state_dict(),
                   "progress": {"step": loop.step, "epoch": loop.epoch, "baseline": baseline}},
                  {"skip": loop.skips.state_dict(), "first": first,
                   "data": stream_state(streams, cfg.data, world, loop.epoch)})

    if not loop.resume(restore, logs=[indices]):
        baseline = evaluate(model, val, out / "recon_grid_untrained.png", cfg.grid_n, bf16, wrapped)
        loop.log_row({f"untrained/{k}": v for k, v in baseline.items()}, step=0)
        log.info("untrained model: %s", baseline)

    bounds = [sum(s.steps for s in tr.stages[: i + 1]) for i in range(len(tr.stages))]

    def stage_at(step: int) -> int:
        return next(i for i, b in enumerate(bounds) if step < b)

    collate = Collate(tokenize.pad)
    loader = None

    def open_data(new_epoch: bool):
        """The stage's loader from the streams' position (reopened at each stage: a new resolution and batch)."""
        nonlocal loader, streams
        if new_epoch:
            streams = {}
        stage = tr.stages[stage_at(loop.step)]
        decoder.resolution = stage.resolution
        loader = train_loader(cfg.data, urls, decoder, collate, cfg.seed, info.rank, world, stage.batch_size,
                              loop.epoch, streams, pin_memory=info.device.type == "cuda")
        return lockstep(loader, info.device)  # ranks end an epoch together

    for batch in loop.batches(open_data, stops=bounds):
        step, si = loop.step, stage_at(loop.step)
        stage = tr.stages[si]
        if tr.fresh_optimizer_per_stage and si > 0 and step == bounds[si - 1]:
            opt.state.clear()  # the stage starts from the weights only (its own schedule warms up again)
            log.info("stage %d (%d px): AdamW moments reset", si + 1, stage.resolution)
        streams = loader.state
        loop.skips.skipped.update(batch["skipped"])
        loop.skips.skipped.update(batch["shard_errors"])
        loop.skips.converted.update(batch["converted"])
        if step < cfg.data.recap_check_steps:
            first["kept"] += batch["n"]
            first["recap_from_alt"] += batch["converted"].get("recap_from_alt", 0)
            if step + 1 == min(cfg.data.recap_check_steps, total):
                loop.log_row(recap_report(first, step + 1, cfg.data, log, info.device), step=step + 1)
        n_tok = int((batch["recap"][:, 1:] != tokenize.pad).sum()) if batch["n"] else 0
        counts = torch.tensor([float(batch["n"]), float(n_tok)], device=info.device)
        if world > 1:
            torch.distributed.all_reduce(counts)
        if tr.log_indices:
            with open(indices, "a") as f:
                f.write(json.dumps({"step": step + 1, "epoch": loop.epoch, "key": batch["key"]}) + "\n")
        if counts[0] == 0:
            log.warning("step %d: no valid sample in the batch on any rank; step skipped", step)
            losses = None
        else:
            losses = forward_backward(wrapped, batch, micro_parts(batch, stage, world, info.device), step,
                                      counts, world, bf16, info.device, loop.poisoned())
            loss = losses["loss"]
            gnorm = clip_grad_norm(model.parameters(), tr.grad_clip)  # DDP/FSDP2-aware
            if loop.guard.bad(torch.stack([loss.detach().float(), gnorm.detach().float()]), step):
                losses = None  # non-finite loss or gradient: no update (grads are zeroed below)
            else:
                opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loop.advance()
        row, line = None, ""
        if losses is not None and loop.due(tr.log_every):
            keys = sorted(losses)
            vals = all_reduce_mean(torch.stack([losses[k].detach().float() for k in keys]))
            row = {k: float(v) for k, v in zip(keys, vals)}
            line = (f"res {stage.resolution} caption {row['caption']:.3f} contrastive {row['contrastive']:.3f} "
                    f"pixel {row.get('pixel_l1', math.nan):.3f} latent {row['latent_l1']:.3f}")
            row.update(lr=sched.get_last_lr()[0], grad_norm=float(gnorm), resolution=stage.resolution)
        loop.report(int(counts[0]), row, line)
        if losses is None:
            loop.log_row({"skipped_step": 1})
        if loop.save_due():
            save()  # never right after a skipped (non-finite) step: the latest checkpoint stays a good one
        if tr.eval_every and loop.step % tr.eval_every == 0 and loop.step < total:
            loop.log_row(evaluate(model, val, None, cfg.grid_n, bf16, wrapped))
    loop.report_skips()  # the last (partial) epoch's bad samples
    final = evaluate(model, val, out / "recon_grid.png", cfg.grid_n, bf16, wrapped)
    summary = {**final, "untrained/psnr": baseline.get("val/psnr"), "untrained/r1_i2t": baseline.get("val/r1_i2t"),
               "psnr_gain_db": final["val/psnr"] - baseline.get("val/psnr", math.nan), "steps": total,
               "nonfinite_steps_skipped": loop.guard.skipped_total}
    loop.log_row(summary, step=total)
    log.info("final: %s", summary)
    export_dir = cfg.export_dir or str(out / "export")
    full = C.model_state(model) if export_dir != "none" else None
    if info.is_main:
        C.atomic_write_json(out / "summary.json", summary)
        if export_dir != "none":
            export_from_state(full, cfg, vae, export_dir)
            log.info("exported the frozen encoder to %s", export_dir)
    loop.close()
    barrier()
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(Config, argv, default_config="configs/encoder/toy.yaml")
    try:
        train(cfg)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
