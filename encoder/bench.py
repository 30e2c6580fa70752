"""Encoder speed report (``make bench-encoder``), one run, three numbers:

1. our ViT training step (forward + backward + fused AdamW) vs timm's ``VisionTransformer`` of identical width,
   depth, heads, tokens and batch → ratio ours/timm (target ≤ 1.05);
2. that step's achieved FLOP/s (torch's flop counter) vs this machine's measured matmul peak → MFU;
3. the full OV3 training step (ViT + both branches, the VAE decoder forward + backward of the pixel/LPIPS losses
   included) with on-the-fly VAE encoding vs cached latents at 256 px → speed-up.

The VAE is the FLUX.1 architecture with random weights unless ``vae_path`` names a local one (timing does not depend
on the weights); LPIPS uses a random backbone when no local weights exist (same cost). CPU numbers on a shared
machine are inflated by contention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from encoder.models import LatentViT, vit_config
from ov3common.checkpoint import atomic_write_json
from ov3common.config import parse_cli
from ov3common.log import count_flops, get_logger, measure_matmul_peak
from ov3common.optim import build_adamw


@dataclass
class BenchConfig:
    size: str = "S/2"  # GPU: B/2
    resolution: int = 128  # image px for the ViT comparison (latent = /8, tokens = (/16)^2)
    batch: int = 8
    warmup: int = 2
    iters: int = 5
    bf16: bool = False
    device: str = "auto"
    threads: int = 0
    vae_path: str = ""  # empty: FLUX.1 architecture, random weights
    vae_resolution: int = 256
    vae_batch: int = 1
    vae_iters: int = 1
    lpips: bool = True
    out: str = "runs/toy/bench_encoder.json"


def timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds per call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def make_step(model: torch.nn.Module, forward, bf16: bool, device: torch.device):
    opt = build_adamw(model, 1e-4, weight_decay=0.1)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def vit_vs_timm(cfg: BenchConfig, device: torch.device) -> dict:
    import timm.models.vision_transformer as tv

    vcfg = vit_config(cfg.size)
    lat_side = cfg.resolution // 8
    x = torch.randn(cfg.batch, vcfg.in_channels, lat_side, lat_side, device=device)
    ours = LatentViT(vcfg).to(device)
    ref = tv.VisionTransformer(img_size=lat_side, patch_size=vcfg.patch_size, in_chans=vcfg.in_channels,
                               num_classes=vcfg.embed_dim, global_pool="avg", embed_dim=vcfg.width, depth=vcfg.depth,
                               num_heads=vcfg.heads, mlp_ratio=vcfg.mlp_ratio, class_token=False,
                               fc_norm=True).to(device)

    def f_ours():
        tok, pooled = ours(x)
        return tok.float().square().mean() + pooled.float().square().mean()

    def f_ref():
        feats = ref.forward_features(x)
        return feats.float().square().mean() + ref.forward_head(feats).float().square().mean()

    s_ours = make_step(ours, f_ours, cfg.bf16, device)
    s_ref = make_step(ref, f_ref, cfg.bf16, device)
    t_ref = timed(s_ref, cfg.warmup, cfg.iters, device)
    t_ours = timed(s_ours, cfg.warmup, cfg.iters, device)
    t_ref = min(t_ref, timed(s_ref, 0, cfg.iters, device))  # interleave to share any drift of a busy machine
    flops = count_flops(s_ours)
    peak = measure_matmul_peak(torch.bfloat16 if cfg.bf16 else torch.float32, device)
    return {"size": cfg.size, "tokens": (lat_side // vcfg.patch_size) ** 2, "batch": cfg.batch,
            "params_ours": sum(p.numel() for p in ours.parameters()),
            "params_timm": sum(p.numel() for p in ref.parameters()),
            "step_s_ours": t_ours, "step_s_timm": t_ref, "ratio_ours_over_timm": t_ours / t_ref,
            "flops_per_step": flops, "achieved_flops": flops / t_ours, "matmul_peak_flops": peak,
            "mfu": flops / t_ours / peak}


def cached_vs_on_the_fly(cfg: BenchConfig, device: torch.device) -> dict:
    from encoder.losses import LPIPSLoss, find_lpips_backbone
    from encoder.ov3 import LossConfig, ModelConfig, OV3Model
    from encoder.vae import FLUX_VAE_CONFIG, FrozenVAE, build_random_vae, load_frozen_vae

    vae = load_frozen_vae(cfg.vae_path) if cfg.vae_path else FrozenVAE(build_random_vae(FLUX_VAE_CONFIG))
    vae = vae.to(device)
    lp = None
    if cfg.lpips:
        real = find_lpips_backbone("vgg") is not None
        lp = LPIPSLoss("vgg", "pretrained" if real else "random").to(device)
    mc = ModelConfig(size=cfg.size, text_width=256, text_depth=2, text_heads=4, text_decoder_width=256,
                     text_decoder_depth=2, text_decoder_heads=4)
    lc = LossConfig(w_lpips=1.0 if cfg.lpips else 0.0)
    model = OV3Model(mc, lc, vocab_size=1000, pad_id=0, max_text_len=32, vae=vae, lpips=lp).to(device)
    b, r = cfg.vae_batch, cfg.vae_resolution
    ids = torch.randint(3, 1000, (b, 24), device=device)
    img = torch.rand(b, 3, r, r, device=device) * 2 - 1
    batch = {"image": img, "alt": ids, "sent": ids, "recap": ids, "index": torch.arange(b)}
    n = torch.tensor(float(b))
    cached = {**batch, "latent": vae.encode(img)}
    s_fly = make_step(model, lambda: model(batch, 0, n, n * 23)["loss"], cfg.bf16, device)
    s_cache = make_step(model, lambda: model(cached, 0, n, n * 23)["loss"], cfg.bf16, device)
    t_fly = timed(s_fly, 1, cfg.vae_iters, device)
    t_cache = timed(s_cache, 1, cfg.vae_iters, device)
    return {"resolution": r, "batch": b, "vae": cfg.vae_path or "FLUX.1 architecture (random weights)",
            "lpips": (lp is not None) and ("real" if lp.real else "random backbone (timing only)"),
            "step_s_on_the_fly": t_fly, "step_s_cached": t_cache, "speedup_cached": t_fly / t_cache}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(BenchConfig, argv)
    log = get_logger("encoder.bench")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    torch.manual_seed(0)
    res = {"device": str(dev), "threads": torch.get_num_threads(), "bf16": cfg.bf16,
           "vit": vit_vs_timm(cfg, dev)}
    v = res["vit"]
    print(f"[1] ViT {cfg.size}, {v['tokens']} tokens x batch {v['batch']}: ours {v['step_s_ours'] * 1e3:.1f} ms, "
          f"timm {v['step_s_timm'] * 1e3:.1f} ms per training step -> ratio ours/timm {v['ratio_ours_over_timm']:.3f}"
          f" (target <= 1.05)")
    print(f"[2] {v['achieved_flops'] / 1e9:.1f} GFLOP/s achieved vs {v['matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
          f"measured matmul peak -> MFU {v['mfu']:.1%}")
    res["latent_cache"] = cached_vs_on_the_fly(cfg, dev)
    c = res["latent_cache"]
    print(f"[3] OV3 step at {c['resolution']} px x batch {c['batch']} (VAE decoder fwd+bwd, LPIPS {c['lpips']}): "
          f"on-the-fly VAE {c['step_s_on_the_fly']:.2f} s, cached latents {c['step_s_cached']:.2f} s -> "
          f"speed-up {c['speedup_cached']:.2f}x")
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.out, res)
    log.info("wrote %s", cfg.out)
    return res


if __name__ == "__main__":
    main()
