"""Train only a ViT decoder for a frozen encoder (RAE stage 1): ``make rae-decoder`` /
``python -m encoder.train_decoder --config configs/encoder/decoder_toy.yaml key=value ...`` (torchrun for DDP).

For an encoder without a decoder (a converted official checkpoint ships none) or to replace one. Per step:
images → frozen VAE encoder → frozen ViT → ``z_u``; ``z_u + σ·ε`` (σ ~ U[0, τ] per sample, as in RAE's stage 1
and in our joint training) → ViT decoder → VAE latents → frozen VAE decoder → pixels; loss = pixel L1 + latent
L1 + LPIPS (weights ``loss.w_*``). Only the decoder has parameters to train. Resumable (checkpoints of decoder,
optimiser, schedule, data position, RNG); progress on rank 0. Output: ``<out_dir>/export``, the encoder export
with this decoder (same encoder weights and VAE reference), so rFID and RAE generation use it; ``summary.json``
compares its val PSNR (and rFID with ``rfid.images``) with the source export's own decoder when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from encoder.data import get_field
from encoder.evaluate import psnr
from encoder.export import FrozenEncoder, export_encoder, load_encoder
from encoder.losses import LPIPSLoss, reconstruction_rows, token_noise
from encoder.models import ViTDecoder, decoder_config_for
from ov3common import checkpoint as C
from ov3common.config import choice_field, import_object, parse_cli, path_field, save_config
from ov3common.data import ResumableSampler
from ov3common.dist import all_reduce_mean, barrier, cleanup, init_distributed, wrap_model
from ov3common.images import BadSample, center_crop_resize, decode_image, save_image_grid, to_tensor_pm1
from ov3common.linear import cpu_linear_field, use_onednn_linear
from ov3common.log import get_logger
from ov3common.optim import build_adamw, clip_grad_norm, warmup_cosine
from ov3common.shards import expand_urls, index_tar, read_member
from ov3common.trainer import Loop


@dataclass
class DecoderModelConfig:
    init: str = choice_field("fresh", ("fresh", "export"))  # fresh: a new decoder (the export's own, if any, is
    #                                                         dropped) | export: fine-tune the export's
    size: str = ""  # "": the encoder's width/depth/heads (our default design); or a VIT_SIZES name ("B/2", ...)
    width: int = 0  # 0: from size
    depth: int = 0
    heads: int = 0
    grad_checkpointing: bool = False


@dataclass
class DecoderLossConfig:
    tau: float = 0.8  # σ ~ U[0, τ] per sample (RAE's noise_tau 0.8)
    tau_units: str = choice_field("abs", ("abs", "rms"))  # abs: token units (our z_u is a LayerNorm: std 1) | rms: × the
    #                                                      RMS of z_u on the val set (raw-token towers)
    w_pixel: float = 1.0
    w_latent: float = 1.0
    w_lpips: float = 1.0
    lpips_net: str = "vgg"
    lpips_backbone: str = "pretrained"  # pretrained (local torchvision weights) | random (NOT perceptual)
    lpips_backbone_path: str = path_field("", "file")


@dataclass
class ImageDataConfig:
    root: str = path_field("", "dir")  # the toy world: shards under <root>/wds/{train,val}/ unless given
    train_shards: str = ""
    val_shards: str = ""
    image_field: str = "jpg;jpeg;png;webp"
    resolution: int = 0  # 0: the export's image_size
    val_size: int = 256
    num_workers: int = 0


@dataclass
class DecoderTrainConfig:
    steps: int = 400
    batch_size: int = 32  # global (split over ranks)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = choice_field("fp32", ("fp32", "bf16"))  # bf16: autocast, fp32 master weights
    strategy: str = choice_field("ddp", ("ddp", "fsdp2", "none"))
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0: leave as is)
    cpu_linear: str = cpu_linear_field()  # CPU fp32 nn.Linear: ov3common.linear (auto | onednn | aten)
    log_every: int = 10
    ckpt_every: int = 100  # steps between checkpoints (and the last step); <= 0: the last step only
    keep_last: int = 2
    max_bad_steps: int = 5


@dataclass
class RFIDConfig:
    images: str = path_field("", "dir")  # folder of val images; empty: no rFID at the end
    max_images: int = 0  # 0: all
    weights: str = ""  # FID Inception weights; empty: eval.fid's default (make fid-weights)
    cache_dir: str = "runs/fid_cache"  # Inception statistics of the originals, shared by both rFIDs ("": none)
    batch_size: int = 16
    # the comparison, by name (encoder imports nothing of eval): function(this config, new export, source export,
    # source has a decoder, out_dir, device) -> {"rfid": ..., "rfid/psnr": ..., "source/rfid": ...}
    hook: str = "eval.rfid:compare_decoders"


@dataclass
class Config:
    out_dir: str = "runs/toy/decoder"
    seed: int = 0
    encoder: str = path_field("runs/toy/encoder/export", "dir")  # the frozen encoder export
    export_dir: str = ""  # empty: <out_dir>/export
    grid_n: int = 8
    model: DecoderModelConfig = field(default_factory=DecoderModelConfig)
    loss: DecoderLossConfig = field(default_factory=DecoderLossConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    train: DecoderTrainConfig = field(default_factory=DecoderTrainConfig)
    rfid: RFIDConfig = field(default_factory=RFIDConfig)


class ImageDataset(Dataset):
    """Images only (centre crop + resize to ``resolution``, in [-1, 1]) from webdataset shards read by random
    access (``ov3common.shards``: member offsets indexed once per process; a decoder run is short, so map-style
    is enough); a bad sample comes back as ``{"bad": reason}`` and is dropped by :func:`collate`."""

    def __init__(self, shard_paths: list[str], resolution: int, image_field: str):
        self.shards, self.resolution, self.image_field = shard_paths, resolution, image_field
        self.samples = [(si, members) for si, path in enumerate(shard_paths) for _, members in index_tar(path)]
        self._handles: dict = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:  # open file handles stay in the process that opened them
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, i: int) -> dict:
        try:
            si, spans = self.samples[i]
            members = {ext: read_member(self.shards[si], off, size, self._handles) for ext, (off, size) in spans.items()}
            img = decode_image(get_field(members, self.image_field, {}))
        except BadSample as e:
            return {"bad": e.reason, "index": i}
        return {"index": i, "image": to_tensor_pm1(center_crop_resize(img, self.resolution))}


def collate(items: list[dict]) -> dict:
    good = [x for x in items if "bad" not in x]
    batch: dict = {"n": len(good), "n_drawn": len(items), "bad": [x["bad"] for x in items if "bad" in x]}
    if good:
        batch["index"] = torch.tensor([x["index"] for x in good])
        batch["image"] = torch.stack([x["image"] for x in good])
    return batch


def shards(cfg: ImageDataConfig, split: str) -> list[str]:
    pattern = cfg.train_shards if split == "train" else cfg.val_shards
    if not pattern and not cfg.root:
        raise FileNotFoundError(f"data.{split}_shards: not set (and no data.root toy world to default to)")
    pattern = pattern or f"{cfg.root}/wds/{split}/*.tar"
    found = expand_urls(pattern)
    if not found:
        raise FileNotFoundError(f"data.{split}_shards: no .tar shards match {pattern!r}")
    return found


def build_decoder(cfg: Config, enc: FrozenEncoder) -> ViTDecoder:
    mc = cfg.model
    over = {k: getattr(mc, k) for k in ("width", "depth", "heads") if getattr(mc, k)}
    dec = ViTDecoder(decoder_config_for(enc.vit.cfg, mc.size or None, **over))
    if mc.init == "export":
        if enc.decoder is None:
            raise ValueError(f"model.init=export: {cfg.encoder} has no decoder (use model.init=fresh)")
        if enc.decoder.cfg != dec.cfg:
            raise ValueError(f"model.init=export: the export's decoder is {enc.decoder.cfg}, not {dec.cfg}")
        dec.load_state_dict(enc.decoder.state_dict())
    dec.grad_checkpointing = mc.grad_checkpointing
    return dec


@torch.no_grad()
def val_psnr(enc: FrozenEncoder, decoder: ViTDecoder | None, batches: list[Tensor], grid: Path | None = None,
             grid_n: int = 8) -> float:
    """Mean PSNR (τ = 0) of ``decoder`` (None: the export's own) on the val images; optional PNG grid."""
    ps, rec0 = [], None
    for x in batches:
        tokens, _ = enc.encode(x)
        lat = (decoder if decoder is not None else enc.decoder)(tokens.to(enc.dtype))
        rec = enc.vae.decode(lat.to(enc.dtype)).float().clamp(-1, 1)
        ps.append(psnr(rec, x.to(rec.device)).cpu())
        rec0 = rec.cpu() if rec0 is None else rec0
    if grid is not None:
        n = min(grid_n, len(rec0))
        save_image_grid(torch.cat([batches[0][:n].cpu(), rec0[:n]]), grid, nrow=n,
                        row_labels=["original", "reconstruction"])
    return float(torch.cat(ps).mean())


def train(cfg: Config) -> dict:
    info = init_distributed(cfg.train.device)
    log = get_logger("encoder.train_decoder")
    tr, world = cfg.train, info.world_size
    if tr.threads:
        torch.set_num_threads(tr.threads)
    if tr.batch_size % world:
        raise ValueError(f"train.batch_size {tr.batch_size} not divisible by {world} processes")
    out = Path(cfg.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    enc = load_encoder(cfg.encoder, device=info.device)
    # a CPU run: the frozen encoder too (faster, and its decoder, the source rows, runs the same products as the one
    # trained here)
    use_onednn_linear(enc, tr.cpu_linear)
    res = cfg.data.resolution or enc.image_size
    if res % (enc.downsample * enc.patch_size):
        raise ValueError(f"data.resolution {res}: not a multiple of {enc.downsample * enc.patch_size}")
    grid = (res // (enc.downsample * enc.patch_size),) * 2
    lpips = None
    if cfg.loss.w_lpips > 0:
        with torch.random.fork_rng():
            torch.manual_seed(1234)  # a random backbone is the same on every rank and every resume
            lpips = LPIPSLoss(cfg.loss.lpips_net, cfg.loss.lpips_backbone, cfg.loss.lpips_backbone_path, log)
        lpips = lpips.to(info.device)

    torch.manual_seed(cfg.seed)
    decoder = build_decoder(cfg, enc).to(info.device)
    use_onednn_linear(decoder, tr.cpu_linear)
    wrapped = wrap_model(decoder, tr.strategy, info)
    opt = build_adamw(decoder, tr.lr, (tr.beta1, tr.beta2), tr.weight_decay)
    sched = warmup_cosine(opt, tr.warmup_steps, tr.steps, tr.min_lr_ratio)
    loop = Loop(out, tr.steps, "decoder", seed=cfg.seed, rank=info.rank, log_every=tr.log_every,
                ckpt_every=tr.ckpt_every, keep_last=tr.keep_last, max_bad_steps=tr.max_bad_steps, skip_rows=True,
                logger=log,
                heap_reuse=info.device.type == "cpu")

    ds = ImageDataset(shards(cfg.data, "train"), res, cfg.data.image_field)
    val_ds = ImageDataset(shards(cfg.data, "val"), res, cfg.data.image_field)
    val_items = collate([val_ds[i] for i in range(min(cfg.data.val_size, len(val_ds)))])
    if not val_items["n"]:
        raise ValueError(f"data.val_shards: no decodable image among the first {cfg.data.val_size}")
    val = [val_items["image"][i:i + 64].to(info.device) for i in range(0, val_items["n"], 64)]
    tau = cfg.loss.tau
    if cfg.loss.tau_units == "rms":  # the val set is fixed: the same scale on every rank and every resume
        with torch.no_grad():
            rms = torch.cat([enc.encode(x)[0].float().square().mean((1, 2)) for x in val]).mean().sqrt()
        tau = cfg.loss.tau * float(rms)
        log.info("loss.tau_units=rms: z_u RMS %.4f on the val set, noise σ ~ U[0, %.4f]", float(rms), tau)

    sampler = ResumableSampler(len(ds), seed=cfg.seed, rank=info.rank, world_size=world)

    def restore(state: dict, rank_state: dict) -> None:
        C.load_model_state(decoder, state["model"])
        C.load_optim_state(decoder, opt, state["optim"])
        sched.load_state_dict(state["sched"])
        loop.load_state_dict({**state["progress"], "guard": state["guard"], "skips": rank_state.get("skip", {})})

    def save() -> None:
        loop.save({"model": C.model_state(decoder), "optim": C.optim_state(decoder, opt),
                   "sched": sched.state_dict(), "guard": loop.guard.state_dict(),
                   "progress": {"step": loop.step, "epoch": loop.epoch, "consumed": loop.consumed}},
                  {"skip": loop.skips.state_dict()})

    def open_data(new_epoch: bool) -> DataLoader:
        sampler.set_epoch(loop.epoch, loop.consumed)
        return DataLoader(ds, batch_size=tr.batch_size // world, sampler=sampler, drop_last=True, collate_fn=collate,
                          num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda")

    loop.resume(restore)
    bf16 = tr.precision == "bf16"
    for batch in loop.batches(open_data):
        step = loop.step
        loop.skips.skipped.update(batch["bad"])
        n = torch.tensor([float(batch["n"])], device=info.device)
        if world > 1:
            torch.distributed.all_reduce(n)
        losses = None
        if n.item() == 0:
            log.warning("step %d: no decodable image in the batch on any rank; step skipped", step)
        elif batch["n"] == 0:
            raise RuntimeError(f"step {step}: this rank's batch is empty while others are not (bad shards?)")
        else:
            img = batch["image"].to(info.device)
            with torch.no_grad():
                lat = enc.encode_latents(img)
                z = enc.encode_from_latents(lat)[0]
            noisy = z + token_noise(batch["index"], z, step, cfg.seed, tau) if tau > 0 else z
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=bf16):
                pred_lat = wrapped(noisy, grid)
                need_px = cfg.loss.w_pixel > 0 or cfg.loss.w_lpips > 0
                pred_img = enc.vae.decode(pred_lat) if need_px else None
                rows = reconstruction_rows(pred_lat, lat, pred_img, img if need_px else None, lpips)
            losses = {k: v.mean() for k, v in rows.items()}
            loss = (cfg.loss.w_latent * losses["latent_l1"] + cfg.loss.w_pixel * losses.get("pixel_l1", 0.0)
                    + cfg.loss.w_lpips * losses.get("lpips", 0.0))
            losses["loss"] = loss
            loss.backward()
            gnorm = clip_grad_norm(decoder.parameters(), tr.grad_clip)
            if loop.guard.bad(torch.stack([loss.detach().float(), gnorm.detach().float()]), step):
                losses = None
            else:
                opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loop.advance(drawn=batch["n_drawn"])
        row = None
        if losses is not None and loop.due(tr.log_every):
            keys = sorted(losses)
            vals = all_reduce_mean(torch.stack([losses[k].detach().float() for k in keys]))
            row = {k: float(v) for k, v in zip(keys, vals)}
            row.update(lr=sched.get_last_lr()[0], grad_norm=float(gnorm), skipped_samples=loop.skips.total())
        loop.report(int(n.item()), row)
        if losses is None:
            loop.log_row({"skipped_step": 1})
        if loop.save_due():
            save()

    decoder.eval()
    summary = {"steps": tr.steps, "resolution": res, "tau": tau, "encoder": str(Path(cfg.encoder).resolve()),
               "val/n": int(val_items["n"]), "val/psnr": val_psnr(enc, decoder, val, out / "recon_grid.png",
                                                                  cfg.grid_n),
               "nonfinite_steps_skipped": loop.guard.skipped_total}
    if enc.decoder is not None:  # the source export's own decoder (jointly trained), same val images
        summary["source/val/psnr"] = val_psnr(enc, None, val)
        summary["psnr_gap_db"] = summary["source/val/psnr"] - summary["val/psnr"]
    export_dir = Path(cfg.export_dir or out / "export")
    if info.is_main:
        vae_ref = enc.config["vae"]
        vae_src = Path(vae_ref["path"])
        vae_src = vae_src if vae_src.is_absolute() else Path(cfg.encoder) / vae_src
        extra = {k: v for k, v in enc.config.items() if k not in {
            "format", "version", "image_size", "patch_size", "grid_size", "num_tokens", "width", "embed_dim",
            "latent_size", "tau", "encoder", "decoder", "vae"}}
        extra["decoder_training"] = {"source_export": str(Path(cfg.encoder).resolve()), "out_dir": str(out.resolve()),
                                     "steps": tr.steps, "tau": tau, "val_psnr": summary["val/psnr"]}
        export_encoder(export_dir, enc.vit, decoder.cpu(), enc.vae.cpu(), enc.image_size, enc.tau,
                       copy_vae=vae_ref["path"] == "vae", vae_source=str(vae_src.resolve()),
                       vae_config=vae_ref.get("config"), extra=extra)
        enc.vae.to(info.device)
        log.info("exported the encoder with the new decoder to %s", export_dir)
        C.atomic_write_json(out / "summary.json", summary)
        if cfg.rfid.images:
            compare = import_object(cfg.rfid.hook, "rfid.hook")
            summary.update(compare(cfg.rfid, export_dir, Path(cfg.encoder), enc.decoder is not None, out, info.device))
            C.atomic_write_json(out / "summary.json", summary)
        log.info("final: %s", summary)
    loop.log_row(summary, step=tr.steps)
    loop.close()
    barrier()
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(Config, argv, default_config="configs/encoder/decoder_toy.yaml")
    try:
        train(cfg)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
