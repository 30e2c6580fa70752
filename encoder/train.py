"""Train the OpenVision 3 encoder: ``python -m encoder.train --config configs/encoder/toy.yaml key=value ...``
(under ``torchrun`` for several processes). One readable loop: progressive-resolution stages, AdamW + warmup/cosine,
joint understanding + reconstruction losses, exact resume, NaN guard, bad-sample counts, eval, export."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from encoder.data import (
    Collate,
    DataConfig,
    ImageTextDataset,
    LatentCache,
    TarIndex,
    Tokenize,
    shard_list,
    tokenizer_dir,
)
from encoder.evaluate import evaluate
from encoder.losses import LPIPSLoss
from encoder.ov3 import LossConfig, ModelConfig, OV3Model
from encoder.vae import FrozenVAE, build_random_vae, load_frozen_vae, tiny_vae_config
from ov3common import checkpoint as C
from ov3common.config import parse_cli, path_field, save_config, to_dict
from ov3common.dist import all_reduce_mean, barrier, cleanup, init_distributed, step_seed, wrap_model
from ov3common.guard import NonFiniteGuard
from ov3common.images import SkipStats
from ov3common.log import MetricLogger, get_logger, read_jsonl
from ov3common.optim import build_adamw, warmup_cosine


@dataclass
class VAESource:
    path: str = path_field("runs/toy/vae", "exists")  # diffusers folder or FLUX ae.safetensors
    config: str = path_field("", "file")  # diffusers config.json for a single file (default: FLUX.1)
    scaling_factor: float = 0.0  # 0: the VAE config's value (FLUX.1: 0.3611)
    shift_factor: float = 0.0  # OV3 applies no shift
    random_tiny: bool = False  # tests only: a random tiny VAE, `path` ignored
    precision: str = "fp32"  # fp32 | bf16: encode/decode under bf16 autocast (effect measured by encoder.bench)
    channels_last: bool = False  # NHWC weights/inputs for the VAE convolutions


@dataclass
class Stage:
    resolution: int = 32
    steps: int = 100
    batch_size: int = 64  # global (split over ranks)


@dataclass
class TrainConfig:
    stages: list[Stage] = field(default_factory=lambda: [Stage(32, 300, 64), Stage(64, 100, 64)])
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16: bool = False  # bf16 autocast
    compile: bool = False  # torch.compile (inductor) the ViT, ViT decoder and text towers (CPU and GPU)
    strategy: str = "ddp"  # ddp | fsdp2 | none
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0: leave as is)
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 2
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    nan_at_steps: list[int] = field(default_factory=list)  # debug: poison the loss at these (1-based) steps
    log_indices: bool = False  # debug: write the sample indices of every step (resume tests)


@dataclass
class Config:
    out_dir: str = "runs/toy/encoder"
    seed: int = 0
    export_dir: str = ""  # empty: <out_dir>/export; "none": no export
    grid_n: int = 8
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    vae: VAESource = field(default_factory=VAESource)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def build_vae(vc: VAESource, device) -> FrozenVAE:
    if vc.random_tiny:
        return FrozenVAE(build_random_vae(tiny_vae_config()), scaling_factor=vc.scaling_factor or 1.0,
                         precision=vc.precision, channels_last=vc.channels_last).to(device)
    if not vc.path:
        raise FileNotFoundError("vae.path: empty (set a local VAE folder/file, or `make toy-vae`)")
    return load_frozen_vae(vc.path, vc.config or None, vc.scaling_factor or None, vc.shift_factor, vc.precision,
                           vc.channels_last).to(device)


def build_index(shards: list[str], cache: Path, is_main: bool) -> TarIndex:
    if is_main:
        TarIndex(shards, str(cache))
    barrier()
    return TarIndex(shards, str(cache))


def val_batches(cfg: Config, tokenize: Tokenize, resolution: int, out: Path, is_main: bool) -> list[dict]:
    index = build_index(shard_list(cfg.data, "val"), out / "index_val.json", is_main)
    ds = ImageTextDataset(index, tokenize, resolution, cfg.data, seed=cfg.seed)
    items = [ds[i] for i in range(min(cfg.data.val_size, len(ds)))]
    collate = Collate(tokenize.pad)
    return [b for b in (collate(items[i:i + 64]) for i in range(0, len(items), 64)) if b["n"]]


def truncate_log(path: Path, step: int) -> None:
    """After a resume from ``step``: drop the rows a killed attempt wrote past it."""
    if path.is_file():
        rows = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
        C.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


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
    index = build_index(shard_list(cfg.data, "train"), out / "index_train.json", info.is_main)
    latents = LatentCache(cfg.data.latent_cache, index) if cfg.data.latent_cache else None
    ds = ImageTextDataset(index, tokenize, tr.stages[0].resolution, cfg.data, seed=cfg.seed, latents=latents)
    val = val_batches(cfg, tokenize, tr.stages[-1].resolution, out, info.is_main)

    torch.manual_seed(cfg.seed)
    model = OV3Model(cfg.model, cfg.loss, tokenize.vocab_size, tokenize.pad, cfg.data.max_text_len, vae, lpips,
                     seed=cfg.seed).to(info.device)
    wrapped = wrap_model(model, tr.strategy, info)
    if tr.compile:  # in place: parameter names, checkpoints and the DDP/FSDP2 wrapping are unchanged
        for part in (model.vit, model.decoder, model.text_encoder, model.text_decoder):
            part.compile()
    opt = build_adamw(model, tr.lr, (tr.beta1, tr.beta2), tr.weight_decay)
    total = sum(s.steps for s in tr.stages)
    sched = warmup_cosine(opt, tr.warmup_steps, total, tr.min_lr_ratio)
    guard = NonFiniteGuard(tr.max_bad_steps)
    ckpt = C.CheckpointManager(out / "checkpoints", tr.keep_last)
    metrics = MetricLogger(out)
    from ov3common.data import ResumableSampler

    sampler = ResumableSampler(len(ds), seed=cfg.seed, rank=info.rank, world_size=world)
    prog: dict = {"step": 0, "epoch": 0, "consumed": 0, "baseline": {}}
    skips = SkipStats()
    loaded = ckpt.load()
    if loaded is not None:
        state, rank_state = loaded
        C.load_model_state(model, state["model"])
        C.load_optim_state(model, opt, state["optim"])
        sched.load_state_dict(state["sched"])
        guard.load_state_dict(state["guard"])
        prog = state["progress"]
        skips.load_state_dict(rank_state.get("skip", {}))
        C.restore_rng(rank_state.get("rng", {}))
        log.info("resumed at step %d (epoch %d, %d samples consumed)", prog["step"], prog["epoch"], prog["consumed"])
    if info.is_main:  # drop rows a killed attempt wrote after the checkpoint we continue from (or all of them)
        truncate_log(metrics.path, prog["step"] if loaded is not None else -1)
        truncate_log(out / "indices.jsonl", prog["step"] if loaded is not None else -1)
    if loaded is None:
        prog["baseline"] = evaluate(model, val, out / "recon_grid_untrained.png", cfg.grid_n, tr.bf16, wrapped)
        metrics.log(0, {f"untrained/{k}": v for k, v in prog["baseline"].items()})
        log.info("untrained model: %s", prog["baseline"])

    def save() -> None:
        ckpt.save(prog["step"], {"model": C.model_state(model), "optim": C.optim_state(model, opt),
                                 "sched": sched.state_dict(), "guard": guard.state_dict(), "progress": dict(prog)},
                  {"rng": C.capture_rng(), "skip": skips.state_dict()})

    def end_epoch() -> None:
        red = skips.reduce()
        red.log(log, prog["epoch"])
        metrics.log(prog["step"], {"epoch": prog["epoch"], **{f"skipped/{k}": v for k, v in red.skipped.items()},
                                   **{f"converted/{k}": v for k, v in red.converted.items()},
                                   "skipped_total": red.total()})
        skips.__init__()

    bounds = [sum(s.steps for s in tr.stages[: i + 1]) for i in range(len(tr.stages))]
    collate = Collate(tokenize.pad)
    t_last, n_last = time.time(), 0
    while prog["step"] < total:
        si = next(i for i, b in enumerate(bounds) if prog["step"] < b)
        stage = tr.stages[si]
        ds.resolution, ds.epoch = stage.resolution, prog["epoch"]
        sampler.set_epoch(prog["epoch"], prog["consumed"])
        loader = DataLoader(ds, batch_size=stage.batch_size // world, sampler=sampler, drop_last=True,
                            collate_fn=collate, num_workers=cfg.data.num_workers,
                            persistent_workers=False, pin_memory=info.device.type == "cuda")
        exhausted = True
        for batch in loader:
            step = prog["step"]
            torch.manual_seed(step_seed(cfg.seed, step, info.rank))
            prog["consumed"] += batch["n_drawn"]
            skips.skipped.update(batch["skipped"])
            skips.converted.update(batch["converted"])
            n_tok = int((batch["recap"][:, 1:] != tokenize.pad).sum()) if batch["n"] else 0
            counts = torch.tensor([float(batch["n"]), float(n_tok)], device=info.device)
            if world > 1:
                torch.distributed.all_reduce(counts)
            if tr.log_indices:
                with open(out / f"indices_rank{info.rank}.jsonl" if world > 1 else out / "indices.jsonl", "a") as f:
                    f.write(json.dumps({"step": step + 1, "epoch": prog["epoch"],
                                                      "index": batch.get("index", torch.empty(0)).tolist()}) + "\n")
            if counts[0] == 0:
                log.warning("step %d: no valid sample in the batch on any rank; step skipped", step)
                losses = None
            else:
                with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=tr.bf16):
                    losses = wrapped(to_device(batch, info.device), step, counts[0], counts[1], world)
                loss = losses["loss"]
                if step + 1 in tr.nan_at_steps:  # 1-based, like the logged steps
                    loss = loss * float("nan")
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)  # DDP/FSDP2-aware
                gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
                if guard.bad(torch.stack([loss.detach().float(), gnorm.detach().float()]), step):
                    losses = None  # non-finite loss or gradient: no update (grads are zeroed below)
                else:
                    opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            prog["step"] += 1
            n_last += batch["n"]
            if losses is not None and (prog["step"] % tr.log_every == 0 or prog["step"] == total):
                keys = sorted(losses)
                vals = all_reduce_mean(torch.stack([losses[k].detach().float() for k in keys]))
                dt = time.time() - t_last
                row = {k: float(v) for k, v in zip(keys, vals)}
                row.update(lr=sched.get_last_lr()[0], grad_norm=float(gnorm), resolution=stage.resolution,
                           samples_per_s=n_last * world / max(dt, 1e-9))
                metrics.log(prog["step"], row)
                log.info("step %d/%d res %d loss %.4f (caption %.3f contrastive %.3f pixel %.3f latent %.3f)",
                         prog["step"], total, stage.resolution, row["loss"], row["caption"], row["contrastive"],
                         row.get("pixel_l1", math.nan), row["latent_l1"])
                t_last, n_last = time.time(), 0
            elif losses is None:
                metrics.log(prog["step"], {"skipped_step": 1})
            if (prog["step"] % tr.ckpt_every == 0 or prog["step"] == total) and guard.consecutive == 0:
                save()  # never right after a skipped (non-finite) step: the latest checkpoint stays a good one
            if prog["step"] >= bounds[si]:
                exhausted = False
                break
        if exhausted:  # the epoch's data ran out
            end_epoch()
            prog["epoch"] += 1
            prog["consumed"] = 0
    end_epoch()
    final = evaluate(model, val, out / "recon_grid.png", cfg.grid_n, tr.bf16, wrapped)
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


def export_from_state(sd: dict, cfg: Config, vae: FrozenVAE, export_dir: str) -> Path:
    from encoder.export import export_encoder
    from encoder.ov3 import build_vit

    _, vit, dec = build_vit(cfg.model, vae.latent_channels)
    vit.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vit.")})
    dec.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("decoder.")})
    copy = cfg.vae.random_tiny or Path(cfg.vae.path).is_dir()
    return export_encoder(export_dir, vit, dec, vae.to("cpu"), cfg.train.stages[-1].resolution, cfg.loss.tau,
                          copy_vae=copy, vae_source=None if copy else str(Path(cfg.vae.path).resolve()),
                          vae_config=cfg.vae.config or None, extra={"trained_config": to_dict(cfg)})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(Config, argv, default_config="configs/encoder/toy.yaml")
    try:
        train(cfg)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
