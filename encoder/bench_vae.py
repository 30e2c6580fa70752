"""The frozen-VAE section of the encoder bench (``python -m encoder.bench``, section 4).

1. The OV3 training step at ``vae_resolution`` px (an encoder of the bench's first size with its decoder, 2-layer
   text towers, the VAE decoder forward + backward, LPIPS) with the VAE encoding on the fly vs cached latents.
2. The VAE encode / decode in bf16 autocast and channels_last vs fp32: time on the FLUX.1 architecture (random
   weights unless ``vae_path`` names a local VAE: the weights do not change the time) and the effect on outputs
   (max abs and relative RMS difference of the latents, max abs difference and PSNR of the decoded images against
   fp32), measured on a trained VAE and real images when ``vae_effect_path`` names one.

LPIPS uses a random backbone when no local weights exist (same cost; timing only).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from encoder.losses import LPIPSLoss, find_lpips_backbone
from encoder.ov3 import LossConfig, ModelConfig, OV3Model
from encoder.vae import FLUX_VAE_CONFIG, FrozenVAE, build_random_vae, load_frozen_vae, tiny_vae_config
from ov3common.bench import interleaved, ratio, ratio_text
from ov3common.images import center_crop_resize, decode_image, to_tensor_pm1
from ov3common.optim import build_adamw

__all__ = ["frozen_vae", "frozen_vae_markdown"]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of ``b`` against ``a``, images in [-1, 1] (data range 2)."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def frozen_vae(cfg, device: torch.device) -> dict:
    """Both parts; ``cfg``: the ``vae*``, ``lpips`` and ``sizes`` fields of ``encoder.bench.BenchConfig``."""
    arch = {"flux": FLUX_VAE_CONFIG, "tiny": tiny_vae_config()}[cfg.vae_arch]

    def build(precision="fp32", channels_last=False):
        vae = (load_frozen_vae(cfg.vae_path, precision=precision, channels_last=channels_last) if cfg.vae_path
               else FrozenVAE(build_random_vae(arch), precision=precision, channels_last=channels_last))
        return vae.to(device)

    vae = build()
    b, r = cfg.vae_batch, cfg.vae_resolution
    torch.manual_seed(0)
    img = torch.rand(b, 3, r, r, device=device) * 2 - 1
    res: dict = {"resolution": r, "batch": b, "vae": cfg.vae_path or f"{cfg.vae_arch} architecture (random weights)"}
    # (a) cached latents vs on-the-fly encoding in the full OV3 step
    lp = None
    if cfg.lpips:
        lp = LPIPSLoss("vgg", "pretrained" if find_lpips_backbone("vgg") is not None else "random").to(device)
    mc = ModelConfig(size=cfg.sizes[0], text_width=256, text_depth=2, text_heads=4, text_decoder_width=256,
                     text_decoder_depth=2, text_decoder_heads=4)
    model = OV3Model(mc, LossConfig(w_lpips=1.0 if lp else 0.0), vocab_size=1000, pad_id=0, max_text_len=32,
                     vae=vae, lpips=lp).to(device)
    ids = torch.randint(3, 1000, (b, 24), device=device)
    batch = {"image": img, "alt": ids, "sent": ids, "recap": ids, "index": torch.arange(b)}
    n = torch.tensor(float(b))
    cached = {**batch, "latent": vae.encode(img)}
    opt = build_adamw(model, 1e-4)

    def ov3_step(bt):
        def step():
            model(bt, 0, n, n * 23)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    t = interleaved({"on_the_fly": ov3_step(batch), "cached": ov3_step(cached)}, cfg.vae_rounds, 1, device)
    res["ov3_step"] = {"model": f"{cfg.sizes[0]} encoder + decoder, 2-layer text towers",
                       "lpips": "off" if lp is None else ("real" if lp.real else "random backbone (timing only)"),
                       "step_s": {k: statistics.median(v) for k, v in t.items()},
                       "speedup_cached": ratio(t["on_the_fly"], t["cached"])}
    # (b) the VAE itself: fp32 vs bf16 vs channels_last, encode and decode (forward; decode + backward as in training)
    variants = {"fp32": vae, "fp32_cl": build("fp32", True), "bf16": build("bf16"), "bf16_cl": build("bf16", True)}
    lat_ref = vae.encode(img)
    z = lat_ref.clone().requires_grad_(True)
    with torch.no_grad():
        img_ref = vae.decode(lat_ref)

    def enc(v):
        return lambda: v.encode(img)

    def dec_bwd(v):
        def f():
            v.decode(z).float().abs().mean().backward()
        return f

    t_enc = interleaved({k: enc(v) for k, v in variants.items()}, cfg.vae_rounds, 1, device)
    t_dec = interleaved({k: dec_bwd(v) for k, v in variants.items()}, cfg.vae_rounds, 1, device)
    effect_on = (f"{res['vae']} on a random image" + ("" if cfg.vae_path else
                 " (random weights: not representative of a trained VAE)"))
    if cfg.vae_effect_path:  # the effect on outputs, measured on a trained VAE and real images
        files = sorted(p for p in Path(cfg.vae_effect_images).iterdir() if p.suffix.lower() in (".png", ".jpg"))[:8]
        img = torch.stack([to_tensor_pm1(center_crop_resize(decode_image(p.read_bytes(), min_side=1), 64))
                           for p in files]).to(device)
        variants = {k: load_frozen_vae(cfg.vae_effect_path, precision=k[:4], channels_last=k.endswith("_cl")).to(device)
                    for k in variants}
        lat_ref = variants["fp32"].encode(img)
        with torch.no_grad():
            img_ref = variants["fp32"].decode(lat_ref)
        effect_on = f"trained VAE {cfg.vae_effect_path} on {len(files)} images of {cfg.vae_effect_images} (64 px)"
    effect = {}
    for k, v in variants.items():
        lat = v.encode(img)
        with torch.no_grad():
            rec = v.decode(lat_ref)
        effect[k] = {"latent_max_abs": (lat - lat_ref).abs().max().item(),
                     "latent_rel_rms": ((lat - lat_ref).square().mean() / lat_ref.square().mean()).sqrt().item(),
                     "decode_max_abs": (rec.float() - img_ref.float()).abs().max().item(),
                     "decode_psnr_db": _psnr(img_ref, rec)}
    res["vae_precision"] = {"encode_s": {k: statistics.median(v) for k, v in t_enc.items()},
                            "decode_fwd_bwd_s": {k: statistics.median(v) for k, v in t_dec.items()},
                            "encode_speedup": {k: ratio(t_enc["fp32"], t_enc[k]) for k in variants},
                            "decode_speedup": {k: ratio(t_dec["fp32"], t_dec[k]) for k in variants},
                            "effect_vs_fp32": effect, "effect_measured_on": effect_on,
                            "timed_on": res["vae"]}
    return res


def frozen_vae_markdown(f: dict) -> list[str]:
    """The section's report lines from :func:`frozen_vae`'s result."""
    o = f["ov3_step"]
    lines = [f"**Frozen VAE** ({f['vae']}, {f['resolution']} px, batch {f['batch']}). OV3 training step "
             f"({o['model']}, VAE decoder fwd+bwd, LPIPS {o['lpips']}): on-the-fly encoding "
             f"{o['step_s']['on_the_fly']:.2f} s, cached latents {o['step_s']['cached']:.2f} s → "
             f"**{ratio_text(o['speedup_cached'])}×** with the cache (the default at real scale).", "",
             "| VAE variant | encode speed-up | decode fwd+bwd speed-up | latent max abs diff | latent rel. RMS "
             "diff | decode max abs diff | decode PSNR vs fp32 (dB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    vp = f["vae_precision"]
    for k, e in vp["effect_vs_fp32"].items():
        lines.append(f"| {k} | {ratio_text(vp['encode_speedup'][k])}× | {ratio_text(vp['decode_speedup'][k])}× | "
                     f"{e['latent_max_abs']:.2e} | {e['latent_rel_rms']:.2e} | {e['decode_max_abs']:.2e} | "
                     f"{e['decode_psnr_db']:.1f} |")
    lines.append(f"\nTimes: {vp['timed_on']} at {f['resolution']} px (decode: forward + backward w.r.t. the "
                 f"latents, as in training). Output differences: {vp['effect_measured_on']}; PSNR with data "
                 "range 2 (images in [-1, 1]).")
    return lines
