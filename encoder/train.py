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
    LatentCache,
    Tokenize,
    load_stream_state,
    recap_report,
    shard_list,
    stream_state,
    tokenizer_dir,
    train_loader,
    vae_identity,
    val_items,
)
from encoder.evaluate import evaluate
from encoder.export import export_from_state
from encoder.losses import LPIPSLoss
from encoder.ov3 import LossConfig, ModelConfig, OV3Model
from encoder.vae import VAEConfig, build_vae
from ov3common import checkpoint as C
from ov3common.config import choice_field, parse_cli, save_config
from ov3common.data import lockstep
from ov3common.dist import all_reduce_mean, barrier, cleanup, init_distributed, step_seed, wrap_model
from ov3common.guard import NonFiniteGuard
from ov3common.images import SkipStats
from ov3common.log import MetricLogger, TrainProgress, get_logger, read_jsonl
from ov3common.optim import build_adamw, staged_warmup_cosine, warmup_cosine


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
    log_every: int = 10
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to <out_dir>/tb
    ckpt_every: int = 100
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


def truncate_log(path: Path, step: int) -> None:
    """After a resume from ``step``: drop the rows a killed attempt wrote past it."""
    if path.is_file():
        rows = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
        C.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


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
    wrapped = wrap_model(model, tr.strategy, info)
    if tr.compile:  # in place: parameter names, checkpoints and the DDP/FSDP2 wrapping are unchanged
        for part in (model.vit, model.decoder, model.text_encoder, model.text_decoder):
            part.compile()
    opt = build_adamw(model, tr.lr, (tr.beta1, tr.beta2), tr.weight_decay)
    total = sum(s.steps for s in tr.stages)
    sched = build_schedule(opt, tr)
    guard = NonFiniteGuard(tr.max_bad_steps)
    ckpt = C.CheckpointManager(out / "checkpoints", tr.keep_last)
    metrics = MetricLogger(out, tensorboard=tr.tensorboard)
    prog: dict = {"step": 0, "epoch": 0, "baseline": {}}
    skips = SkipStats()
    first = {"kept": 0, "recap_from_alt": 0}  # over the first data.recap_check_steps steps (this rank)
    streams: dict = {}  # this rank's data streams: resume state after the last consumed batch
    loaded = ckpt.load()
    if loaded is not None:
        state, rank_state = loaded
        C.load_model_state(model, state["model"])
        C.load_optim_state(model, opt, state["optim"])
        sched.load_state_dict(state["sched"])
        guard.load_state_dict(state["guard"])
        prog = state["progress"]
        skips.load_state_dict(rank_state.get("skip", {}))
        first = rank_state.get("first", first)
        streams = load_stream_state(rank_state.get("data", {}), cfg.data, world, prog["epoch"])
        C.restore_rng(rank_state.get("rng", {}))
        log.info("resumed at step %d (epoch %d, %d data streams)", prog["step"], prog["epoch"], len(streams))
    if info.is_main:  # drop rows a killed attempt wrote after the checkpoint we continue from (or all of them)
        truncate_log(metrics.path, prog["step"] if loaded is not None else -1)
        truncate_log(out / "indices.jsonl", prog["step"] if loaded is not None else -1)
    if world > 1:
        truncate_log(out / f"indices_rank{info.rank}.jsonl", prog["step"] if loaded is not None else -1)
    if loaded is None:
        prog["baseline"] = evaluate(model, val, out / "recon_grid_untrained.png", cfg.grid_n, bf16, wrapped)
        metrics.log(0, {f"untrained/{k}": v for k, v in prog["baseline"].items()})
        log.info("untrained model: %s", prog["baseline"])

    def save() -> None:
        ckpt.save(prog["step"], {"model": C.model_state(model), "optim": C.optim_state(model, opt),
                                 "sched": sched.state_dict(), "guard": guard.state_dict(), "progress": dict(prog)},
                  {"rng": C.capture_rng(), "skip": skips.state_dict(), "first": first,
                   "data": stream_state(streams, cfg.data, world, prog["epoch"])})

    def end_epoch() -> None:
        red = skips.reduce()
        red.log(log, prog["epoch"])
        metrics.log(prog["step"], {"epoch": prog["epoch"], **{f"skipped/{k}": v for k, v in red.skipped.items()},
                                   **{f"converted/{k}": v for k, v in red.converted.items()},
                                   "skipped_total": red.total()})
        skips.__init__()

    bounds = [sum(s.steps for s in tr.stages[: i + 1]) for i in range(len(tr.stages))]
    collate = Collate(tokenize.pad)
    bar = TrainProgress(total, prog["step"], "encoder", tr.log_every, log)
    while prog["step"] < total:
        si = next(i for i, b in enumerate(bounds) if prog["step"] < b)
        stage = tr.stages[si]
        decoder.resolution = stage.resolution
        fresh = not streams  # the loader starts the epoch (not a resumed or stage-switched position in it)
        loader = train_loader(cfg.data, urls, decoder, collate, cfg.seed, info.rank, world, stage.batch_size,
                              prog["epoch"], streams, pin_memory=info.device.type == "cuda")
        exhausted, n_steps = True, 0
        for batch in lockstep(loader, info.device):
            step = prog["step"]
            if tr.fresh_optimizer_per_stage and si > 0 and step == bounds[si - 1]:
                opt.state.clear()  # the stage starts from the weights only (its own schedule warms up again)
                log.info("stage %d (%d px): AdamW moments reset", si + 1, stage.resolution)
            n_steps += 1
            torch.manual_seed(step_seed(cfg.seed, step, info.rank))
            streams = loader.state
            skips.skipped.update(batch["skipped"])
            skips.skipped.update(batch["shard_errors"])
            skips.converted.update(batch["converted"])
            if step < cfg.data.recap_check_steps:
                first["kept"] += batch["n"]
                first["recap_from_alt"] += batch["converted"].get("recap_from_alt", 0)
                if step + 1 == min(cfg.data.recap_check_steps, total):
                    metrics.log(step + 1, recap_report(first, step + 1, cfg.data, log, info.device))
            n_tok = int((batch["recap"][:, 1:] != tokenize.pad).sum()) if batch["n"] else 0
            counts = torch.tensor([float(batch["n"]), float(n_tok)], device=info.device)
            if world > 1:
                torch.distributed.all_reduce(counts)
            if tr.log_indices:
                with open(out / f"indices_rank{info.rank}.jsonl" if world > 1 else out / "indices.jsonl", "a") as f:
                    f.write(json.dumps({"step": step + 1, "epoch": prog["epoch"], "key": batch["key"]}) + "\n")
            if counts[0] == 0:
                log.warning("step %d: no valid sample in the batch on any rank; step skipped", step)
                losses = None
            else:
                losses = forward_backward(wrapped, batch, micro_parts(batch, stage, world, info.device), step,
                                          counts, world, bf16, info.device, step + 1 in tr.inject_nan_steps)
                loss = losses["loss"]
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)  # DDP/FSDP2-aware
                gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
                if guard.bad(torch.stack([loss.detach().float(), gnorm.detach().float()]), step):
                    losses = None  # non-finite loss or gradient: no update (grads are zeroed below)
                else:
                    opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            prog["step"] += 1
            row = None
            if losses is not None and (prog["step"] % tr.log_every == 0 or prog["step"] == total):
                keys = sorted(losses)
                vals = all_reduce_mean(torch.stack([losses[k].detach().float() for k in keys]))
                row = {k: float(v) for k, v in zip(keys, vals)}
            bar.update(int(counts[0]), row and row["loss"], row and (
                f"res {stage.resolution} caption {row['caption']:.3f} contrastive {row['contrastive']:.3f} "
                f"pixel {row.get('pixel_l1', math.nan):.3f} latent {row['latent_l1']:.3f}"))
            if row is not None:
                row.update(lr=sched.get_last_lr()[0], grad_norm=float(gnorm), resolution=stage.resolution,
                           samples_per_s=bar.samples_per_s, eta_s=bar.eta_s)
                metrics.log(prog["step"], row)
            elif losses is None:
                metrics.log(prog["step"], {"skipped_step": 1})
            if (prog["step"] % tr.ckpt_every == 0 or prog["step"] == total) and guard.consecutive == 0:
                save()  # never right after a skipped (non-finite) step: the latest checkpoint stays a good one
            if tr.eval_every and prog["step"] % tr.eval_every == 0 and prog["step"] < total:
                metrics.log(prog["step"], evaluate(model, val, None, cfg.grid_n, bf16, wrapped))
            if prog["step"] >= bounds[si]:
                exhausted = False
                break
        if exhausted:  # the epoch's data ran out (on some rank: they stop together)
            if n_steps == 0 and fresh:
                raise ValueError(f"epoch {prog['epoch']}: the training shards hold less than one batch per data "
                                 f"stream (batch_size {stage.batch_size}); use fewer streams or more data")
            end_epoch()
            prog["epoch"] += 1
            streams = {}
    bar.close()
    end_epoch()
    final = evaluate(model, val, out / "recon_grid.png", cfg.grid_n, bf16, wrapped)
    base = prog["baseline"]
    summary = {**final, "untrained/psnr": base.get("val/psnr"), "untrained/r1_i2t": base.get("val/r1_i2t"),
               "psnr_gain_db": final["val/psnr"] - base.get("val/psnr", math.nan), "steps": total,
               "nonfinite_steps_skipped": guard.skipped_total}
    metrics.log(total, summary)
    log.info("final: %s", summary)
    export_dir = cfg.export_dir or str(out / "export")
    full = C.model_state(model) if export_dir != "none" else None
    if info.is_main:
        C.atomic_write_json(out / "summary.json", summary)
        if export_dir != "none":
            export_from_state(full, cfg, vae, export_dir)
            log.info("exported the frozen encoder to %s", export_dir)
    metrics.close()
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
