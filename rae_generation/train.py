"""``make rae-train``: DiT-DH flow matching on frozen-encoder tokens (one readable loop; torchrun DDP; resumable).

Run folder::

    <out_dir>/config.yaml            # the resolved config
    <out_dir>/generator.json         # what a sampler needs: model config, classes, shift, normalisation, encoder
    <out_dir>/stats.safetensors      # normalisation statistics (mean, std), computed once
    <out_dir>/checkpoints/step_N/    # model, ema, optimizer, scheduler, data position, RNG (ov3common.checkpoint)
    <out_dir>/metrics.jsonl          # loss, grad norm, lr, throughput; skipped NaN/Inf steps
    <out_dir>/preview.png            # EMA samples at the end (one row per class, when an encoder is known)

Exact resume: every step reseeds torch from (seed, step, rank), the data order is a pure function of (seed, epoch)
(:class:`~ov3common.data.ResumableSampler`) and the checkpoint stores the samples consumed in the epoch, so a
killed run resumed from its checkpoint ends with bitwise the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from encoder.export import load_encoder
from ov3common import dist as D
from ov3common.attention import set_attention_impl
from ov3common.checkpoint import (
    CheckpointManager,
    atomic_write_json,
    load_model_state,
    load_optim_state,
    model_state,
    optim_state,
)
from ov3common.config import import_object, parse_cli, save_config, to_dict
from ov3common.data import ResumableSampler
from ov3common.guard import TrainingDiverged
from ov3common.images import SkipStats
from ov3common.linear import use_onednn_linear
from ov3common.log import get_logger
from ov3common.optim import build_adamw, clip_grad_norm, constant_then_linear, warmup_cosine
from ov3common.trainer import Loop
from rae_generation.config import RAETrainConfig
from rae_generation.data import LatentDataset, Normalizer, collate_images, open_source, token_sums
from rae_generation.flow import flow_loss, sample_t, shift_factor
from rae_generation.models import DiTDH, DiTDHConfig, dit_config
from rae_generation.sample import write_preview

log = get_logger("rae.train")
GENERATOR_FORMAT = "rae-generator"


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·model`` for every parameter (the buffers are constants)."""
    ema_p, model_p = list(ema.parameters()), [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)


def model_config(cfg, in_dim: int, grid: int, num_classes: int) -> DiTDHConfig:
    m = cfg.model
    over = {k: m[k] for k in ("width", "depth", "heads", "head_width", "head_heads") if m[k] > 0}
    if m.head_depth >= 0:
        over["head_depth"] = m.head_depth
    return dit_config(m.size, in_dim=in_dim, grid=grid, num_classes=num_classes, class_dropout=m.class_dropout,
                      class_embed_std=m.class_embed_std, rope=m.rope, pos_embed=m.pos_embed, qk_norm=m.qk_norm,
                      grad_ckpt=m.grad_ckpt, **over)


def _identity(batch):
    return batch


class TrainData:
    """The training set: a latent cache, or images encoded on the fly by the frozen encoder."""

    def __init__(self, cfg, info: D.DistInfo):
        d = cfg.data
        self.encoder_path, self.encoder = d.encoder, None
        if d.latents:
            self.dataset = LatentDataset(d.latents, flip=d.flip)
            meta = self.dataset.meta
            self.classes, self.image_size = self.dataset.classes, int(meta["image_size"])
            self.num_tokens, self.channels = self.dataset.num_tokens, self.dataset.channels
            self.encoder_path = d.encoder or meta.get("encoder", "")
            self.fingerprint = meta.get("fingerprint", str(Path(d.latents).resolve()))
            self.collate = _identity
        elif d.images and d.encoder:
            self.encoder = load_encoder(d.encoder, device=info.device)
            self.dataset = open_source(d.images, d.image_size)
            self.classes, self.image_size = list(self.dataset.classes), d.image_size
            self.fingerprint = f"{Path(d.images).resolve()}|{Path(d.encoder).resolve()}|{d.image_size}"
            side = d.image_size // (self.encoder.downsample * self.encoder.patch_size)
            self.num_tokens, self.channels = side * side, self.encoder.width
            self.collate = collate_images
        else:
            raise ValueError("data: set data.latents (a cache from make cache-rae-latents) or both data.images and "
                             "data.encoder (encode on the fly)")
        self.grid = int(round(self.num_tokens**0.5))
        self.flip = d.flip

    def __len__(self) -> int:
        return len(self.dataset)

    def sums(self, max_samples: int, device: torch.device) -> dict[str, torch.Tensor]:
        if isinstance(self.dataset, LatentDataset):
            return self.dataset.stats_sums()
        sub = Subset(self.dataset, range(min(len(self.dataset), max_samples)))
        total = None
        for batch in DataLoader(sub, batch_size=64, collate_fn=collate_images):
            if batch["labels"].numel():
                s = token_sums(self.encoder.encode(batch["images"].to(device))[0].float().cpu())
                total = s if total is None else {k: total[k] + s[k] for k in s}
        if total is None:
            raise RuntimeError(f"{self.dataset}: no decodable images for the normalisation statistics")
        return total

    def loader(self, sampler: ResumableSampler, batch: int, workers: int) -> DataLoader:
        return DataLoader(self.dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
                          collate_fn=self.collate, persistent_workers=False)

    def tokens(self, batch: dict, device: torch.device, skips: SkipStats) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's (tokens, labels) on ``device``; images encoded on the fly count their bad samples in ``skips``."""
        if "tokens" in batch:
            return batch["tokens"].to(device), batch["labels"].to(device)
        skips.update(batch["stats"])
        images = batch["images"].to(device)
        if self.flip and len(images):  # p = 0.5 per sample, from the step's seed (exact resume)
            mirror = torch.rand(len(images)) < 0.5
            images[mirror] = images[mirror].flip(-1)
        z = self.encoder.encode(images)[0].float() if len(batch["labels"]) else \
            torch.zeros(0, self.num_tokens, self.channels, device=device)
        return z, batch["labels"].to(device)


def prepare_run(cfg, data: TrainData, info: D.DistInfo) -> tuple[Path, Normalizer, DiTDHConfig, float]:
    """Check a resumed run matches; write config.yaml, stats.safetensors (when starting) and generator.json."""
    out = Path(cfg.out_dir)
    stats_path, spec_path = out / "stats.safetensors", out / "generator.json"
    mcfg = model_config(cfg, data.channels, data.grid, len(data.classes))
    shift = cfg.flow.shift or shift_factor(data.num_tokens, data.channels, cfg.flow.shift_base)
    resuming = bool(CheckpointManager(out / "checkpoints").all())
    if resuming:
        old = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
        if old.get("data") != data.fingerprint or old.get("model") != mcfg.to_dict():
            raise ValueError(f"{out} holds checkpoints of a run on other data or another model (the latent cache or "
                             f"the encoder changed, or model.* did): resume is impossible; use a new `out_dir` or delete "
                             f"{out}/checkpoints (make clean-toy removes runs/toy)")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if not resuming or not stats_path.is_file():  # computed once per run, kept on resume
            Normalizer.from_sums(data.sums(cfg.data.stats_samples, info.device), cfg.data.norm,
                                 cfg.data.norm_eps).save(stats_path)
    D.barrier()
    norm = Normalizer.load(stats_path).to(info.device)
    if norm.kind != cfg.data.norm:
        raise ValueError(f"data.norm={cfg.data.norm!r} but {stats_path} holds {norm.kind!r} statistics "
                         f"(a resumed run keeps its statistics; use a new out_dir)")
    if info.is_main:
        atomic_write_json(spec_path, {
            "format": GENERATOR_FORMAT, "data": data.fingerprint, "model": mcfg.to_dict(), "classes": data.classes,
            "shift": shift, "norm": norm.kind,
            "encoder": str(Path(data.encoder_path).resolve()) if data.encoder_path else "",
            "image_size": data.image_size, "sample": to_dict(cfg.sample)})
    return out, norm, mcfg, shift


def train(cfg, info: D.DistInfo) -> Path:
    tc = cfg.train
    if tc.batch_size % info.world_size:
        raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by the {info.world_size} ranks")
    data = TrainData(cfg, info)
    out, norm, mcfg, shift = prepare_run(cfg, data, info)
    torch.manual_seed(cfg.seed)
    model = DiTDH(mcfg).to(info.device)
    set_attention_impl(model, cfg.model.attn)
    use_onednn_linear(model, tc.cpu_linear)  # a CPU run: oneDNN products where faster
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = D.wrap_model(model, tc.strategy, info)
    if tc.compile:  # in place: parameter names, checkpoints, the EMA copy and the DDP wrapping are unchanged
        model.compile()
    opt = build_adamw(model, tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    sched = (constant_then_linear(opt, tc.constant_steps, tc.decay_end_step, tc.min_lr_ratio, tc.warmup_steps)
             if tc.schedule == "linear" else warmup_cosine(opt, tc.warmup_steps, tc.steps, tc.min_lr_ratio))
    sampler = ResumableSampler(len(data), seed=cfg.seed, shuffle=True, rank=info.rank, world_size=info.world_size)
    per_rank = tc.batch_size // info.world_size
    if sampler.per_rank < per_rank:
        raise ValueError(f"{len(data)} samples over {info.world_size} ranks is fewer than one batch ({per_rank})")
    # a checkpoint is written on its steps even during a non-finite streak (the weights are the last good ones)
    loop = Loop(out, tc.steps, "rae", seed=cfg.seed, rank=info.rank, log_every=tc.log_every,
                ckpt_every=tc.ckpt_every, keep_last=tc.keep_last, max_bad_steps=tc.max_bad_steps, save_after_bad=True,
                inject_nan_steps=tc.inject_nan_steps, tensorboard=tc.tensorboard, logger=log,
                heap_reuse=info.device.type == "cpu")

    def restore(state: dict, rank_state: dict) -> None:
        load_model_state(net, state["model"])
        ema.load_state_dict(state["ema"])
        load_optim_state(net, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        loop.load_state_dict(state["train"])  # step, epoch, samples consumed in it, NaN guard, bad-sample counts

    loop.resume(restore)
    log.info("DiT-DH %s: %.2fM params; %d samples, %d classes, %d tokens x %d; shift %.3f; %d steps of %d",
             cfg.model.size, sum(p.numel() for p in model.parameters()) / 1e6, len(data), len(data.classes),
             data.num_tokens, data.channels, shift, tc.steps, tc.batch_size)

    def save() -> None:
        loop.save({"model": model_state(net), "ema": ema.state_dict(), "optimizer": optim_state(net, opt),
                   "scheduler": sched.state_dict(), "train": loop.state_dict()})

    def open_data(new_epoch: bool) -> DataLoader:
        sampler.set_epoch(loop.epoch, loop.consumed)
        if isinstance(data.dataset, LatentDataset):
            data.dataset.set_epoch(cfg.seed, loop.epoch)  # which samples are read mirrored (data.flip)
        return data.loader(sampler, per_rank, cfg.data.num_workers)

    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    in_train_eval = None
    if cfg.eval.every > 0 and info.is_main:  # gFID of the live EMA (eval.intraining: equals the offline number)
        in_train_eval = import_object(cfg.eval.hook, "eval.hook")(cfg.eval, ema, norm, shift, data, cfg.sample,
                                                                  info.device)
    net.train()
    for batch in loop.batches(open_data):
        step = loop.step
        z, y = data.tokens(batch, info.device, loop.skips)
        x = norm.normalize(z)
        noise = torch.randn_like(x)
        t = sample_t(x.shape[0], dist=cfg.flow.t_dist, mean=cfg.flow.t_mean, std=cfg.flow.t_std, shift=shift,
                     device=info.device)
        with autocast:
            loss = flow_loss(net, x, y, t, noise)
        if loop.poisoned():
            loss = loss * float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_grad_norm(model.parameters(), tc.grad_clip)
        # the clip's total norm is non-finite iff a gradient is: no second pass over the gradients to check them
        skipped = loop.guard.bad(torch.stack([loss.detach().float(), gnorm.detach().float()]), step)  # K in a row: raise
        if skipped:
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
            decay = min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay
            update_ema(ema, model, decay)
        sched.step()
        if tc.log_indices:
            with open(out / f"indices_rank{info.rank}.jsonl", "a") as f:
                seen = batch.get("seen", batch["index"])  # on the fly: skipped samples count as consumed
                f.write(json.dumps({"step": step, "epoch": loop.epoch, "index": seen.tolist()}) + "\n")
        loop.advance(drawn=per_rank)
        row = None
        if skipped or loop.due(tc.log_every):
            row = {"loss": D.all_reduce_mean(loss.detach()).item(), "grad_norm": float(gnorm),
                   "lr": sched.get_last_lr()[0], "epoch": loop.epoch, "skipped": skipped,
                   "skipped_total": loop.guard.skipped_total}
        loop.report(x.shape[0] * info.world_size, row, f"lr {sched.get_last_lr()[0]:.3g}")
        if loop.save_due():
            save()
        if loop.due(cfg.eval.every):
            if in_train_eval is not None:
                loop.log_row(in_train_eval())
            D.barrier()
    loop.close()
    if tc.preview and info.is_main and data.encoder_path:
        write_preview(out, ema, norm, shift, data, cfg.sample, info.device)
    D.barrier()
    return out


def main(argv=None) -> None:
    cfg = parse_cli(RAETrainConfig, argv, default_config="configs/rae/toy.yaml")
    info = D.init_distributed(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    try:
        train(cfg, info)
    except TrainingDiverged as e:
        log.error("%s", e)
        sys.exit(3)
    finally:
        D.cleanup()


if __name__ == "__main__":
    main()
