"""Encoder speed report (``make bench-encoder``; part of ``make bench``). One process, interleaved rounds.

1. **ours vs timm.** One training step (forward, loss, backward, AdamW, zero_grad) of our ``LatentViT`` and of
   timm's ``VisionTransformer`` at identical width, depth, heads, MLP ratio, tokens (latent ``resolution/8``,
   patch 2) and batch, per size and precision (fp32; bf16 autocast). Three contenders share the rounds: ours
   (``ov3common.optim.build_adamw``: fused AdamW), timm with the optimizer its users get
   (``timm.optim.create_optimizer_v2(model, "adamw")``: torch's default AdamW, the per-tensor loop on a CPU) and
   timm with our fused AdamW (the model alone). FLOPs of both steps are counted (equal work: ratio ≈ 1).
2. **MFU.** FLOPs of our step (``ov3common.log.count_flops``: torch's FlopCounterMode, SDPA's CPU kernel
   included) per second over the measured matmul peak (``ov3common.log.measure_matmul_peak``: best square matmul
   over a size sweep), the peak probed inside the same interleaved rounds as the step.
3. **torch.compile.** Eager vs compiled (``nn.Module.compile``, inductor) step of ours and of timm, and compiled
   ours vs compiled timm; compile time is the first call.
4. **Frozen VAE** (``encoder.bench_vae``). The OV3 step at 256 px with the VAE encoding on the fly vs cached
   latents; the VAE encode / decode in bf16 autocast and channels_last vs fp32: time and the effect on outputs.
5. **rFID pipeline** (``rfid=true``; ``eval.bench_fid``): the metric work before / now, cold and warm.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import timm.models.vision_transformer as tv
import timm.optim
import torch

from encoder.bench_vae import frozen_vae, frozen_vae_markdown
from encoder.models import LatentViT, vit_config
from ov3common.bench import interleaved, machine, op_profile, op_profile_markdown, ratio, ratio_text
from ov3common.checkpoint import atomic_write_json
from ov3common.config import import_object, parse_cli
from ov3common.heap import heap_reuse
from ov3common.linear import cpu_linear_field, use_onednn_linear, uses_onednn_linear
from ov3common.log import count_flops, get_logger, measure_matmul_peak
from ov3common.optim import build_adamw

log = get_logger("encoder.bench")


@dataclass
class BenchConfig:
    sizes: list[str] = field(default_factory=lambda: ["S/2", "B/2"])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    resolution: int = 128  # image px: latent resolution/8, tokens (resolution/16)^2
    batch: int = 8
    rounds: int = 9
    warmup: int = 2
    timm_optimizer: bool = True  # also time timm with timm's own optimizer factory (what its users get)
    heap_reuse: bool = True  # CPU: the step sections run under ov3common.heap.heap_reuse, as our trainers do
    # ours on a CPU: nn.Linear through ov3common.linear, as our trainers (train.cpu_linear); timm keeps aten's.
    # Where it switches, fp32 rows also time ours with aten's linear ("ours (aten)": the same kernels as timm)
    cpu_linear: str = cpu_linear_field()
    mfu_size: str = "B/2"  # MFU of this size's step (fp32 and bf16), peak probed in the same rounds
    # MFU of that size's step (ours alone) at larger batches too: at batch 8 (512 tokens) the weight-gradient
    # GEMMs reduce over only 512 rows, which this CPU runs well below its square-matmul peak
    mfu_batches: list[int] = field(default_factory=lambda: [32])
    compile_sizes: list[str] = field(default_factory=lambda: ["S/2"])  # [] = no compile section
    profile_sizes: list[str] = field(default_factory=lambda: ["S/2"])  # torch.profiler top ops; [] = none
    profile_steps: int = 3
    compile_rounds: int = 5
    device: str = "auto"
    threads: int = 0  # 0 = torch's default (all cores)
    vae: bool = True  # section 4
    vae_path: str = ""  # empty: random weights of the architecture `vae_arch`
    vae_arch: str = "flux"  # flux (FLUX.1 VAE) | tiny (tests)
    vae_effect_path: str = ""  # a trained VAE (e.g. runs/toy/vae): the bf16/channels_last effect on its outputs
    vae_effect_images: str = "data/toy/images/val"  # ... measured on (the first 8 of) these images
    vae_resolution: int = 256
    vae_batch: int = 1
    vae_rounds: int = 3
    lpips: bool = True
    rfid: bool = False  # section 5: the rFID pipeline's metric work, before / now cold / now warm (eval.bench_fid)
    rfid_images: str = "data/toy/images/val"
    rfid_max_images: int = 200  # three variants, 'before' at ~0.25 s per image per core: minutes
    rfid_batch: int = 16
    rfid_weights: str = "weights/inception_fid/inception-2015-12-05-fidhelper.pth"
    rfid_bench: str = "eval.bench_fid:encoder_bench_rfid"  # function(this config, device) -> the row (by name: eval)
    out: str = "runs/bench/encoder.json"


def make_step(model: torch.nn.Module, forward, bf16: bool, device: torch.device, opt=None):
    opt = opt if opt is not None else build_adamw(model, 1e-4, weight_decay=0.1)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timm_vit(vcfg, lat_side: int, device: torch.device) -> torch.nn.Module:
    """timm's ViT at our shape: patch 2 on 16-channel latents, no class token, mean pool → LayerNorm → Linear."""

    return tv.VisionTransformer(img_size=lat_side, patch_size=vcfg.patch_size, in_chans=vcfg.in_channels,
                                num_classes=vcfg.embed_dim, global_pool="avg", embed_dim=vcfg.width,
                                depth=vcfg.depth, num_heads=vcfg.heads, mlp_ratio=vcfg.mlp_ratio, class_token=False,
                                fc_norm=True).to(device)


def contenders(size: str, cfg: BenchConfig, device: torch.device, bf16: bool, compiled: bool = False,
               batch: int = 0, cpu_linear: str | None = None):
    """(ours, timm) models and loss closures on one random latent batch (the losses touch every output);
    ``batch`` 0: the configured one; ``cpu_linear``: ours' linear layers on a CPU (None: ``cfg.cpu_linear``)."""
    vcfg = vit_config(size)
    lat_side = cfg.resolution // 8
    x = torch.randn(batch or cfg.batch, vcfg.in_channels, lat_side, lat_side, device=device)
    ours, ref = LatentViT(vcfg).to(device), timm_vit(vcfg, lat_side, device)
    use_onednn_linear(ours, cpu_linear or cfg.cpu_linear)
    if compiled:
        ours.compile()
        ref.compile()

    def f_ours():
        tok, pooled = ours(x)
        return tok.float().square().mean() + pooled.float().square().mean()

    def f_ref():
        feats = ref.forward_features(x)
        return feats.float().square().mean() + ref.forward_head(feats).float().square().mean()

    return vcfg, ours, ref, f_ours, f_ref


def vs_timm(size: str, precision: str, cfg: BenchConfig, device: torch.device, peak_probe: bool) -> dict:
    bf16 = precision == "bf16"
    vcfg, ours, ref, f_ours, f_ref = contenders(size, cfg, device, bf16)
    steps = {"ours": make_step(ours, f_ours, bf16, device)}
    if cfg.timm_optimizer:
        ref_opt = timm.optim.create_optimizer_v2(ref, "adamw", lr=1e-4, weight_decay=0.1)
        steps["timm"] = make_step(ref, f_ref, bf16, device, ref_opt)
    steps["timm_fused"] = make_step(ref, f_ref, bf16, device)
    if uses_onednn_linear(ours) and not bf16:  # like-for-like kernels too
        _, ours_a, _, f_ours_a, _ = contenders(size, cfg, device, bf16, cpu_linear="aten")
        steps["ours_aten"] = make_step(ours_a, f_ours_a, bf16, device)
    flops = count_flops(steps["ours"])
    flops_ref = count_flops(steps["timm_fused"])
    rates: list[float] = []
    if peak_probe:  # the matmul peak inside the same rounds (same load, same clocks)
        steps["peak"] = peak_probe_fn(bf16, device, rates)
    t = interleaved(steps, cfg.rounds, cfg.warmup, device)
    grid = cfg.resolution // 8 // vcfg.patch_size
    out = {"size": size, "precision": precision, "tokens": grid**2, "grid": grid, "batch": cfg.batch, "width": vcfg.width, "depth": vcfg.depth, "heads": vcfg.heads,
           "params_ours": sum(p.numel() for p in ours.parameters()),
           "params_timm": sum(p.numel() for p in ref.parameters()),
           "flops_per_step": flops, "flops_ratio_ours_over_timm": flops / flops_ref,
           "step_s": {k: statistics.median(v) for k, v in t.items() if k != "peak"},
           "ours_over_timm_fused": ratio(t["ours"], t["timm_fused"])}
    if "timm" in t:
        out["ours_over_timm"] = ratio(t["ours"], t["timm"])
    if "ours_aten" in t:
        out["ours_linear"] = "onednn"
        out["ours_aten_over_timm"] = ratio(t["ours_aten"], t["timm" if "timm" in t else "timm_fused"])
    if peak_probe:
        out.update(mfu_fields(flops, t["ours"], rates))
    return out


def peak_probe_fn(bf16: bool, device: torch.device, rates: list[float]):
    """A contender for :func:`ov3common.bench.interleaved` that appends the matmul peak (FLOP/s) to ``rates``."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return lambda: rates.append(measure_matmul_peak(dtype, device, seconds=0.5))


def mfu_fields(flops: int, times: list[float], rates: list[float]) -> dict:
    """MFU of a step of ``flops`` timed ``times`` against the peaks ``rates`` probed in the same rounds."""
    s, peak = statistics.median(times), statistics.median(rates)
    return {"matmul_peak_flops": peak, "achieved_flops": flops / s, "mfu": flops / s / peak,
            "mfu_rounds": [flops / x / p for x, p in zip(times, rates)]}


def mfu_at_batch(size: str, precision: str, batch: int, cfg: BenchConfig, device: torch.device) -> dict:
    """MFU of our step alone at ``batch`` (the matmul peak probed inside the same rounds)."""
    bf16 = precision == "bf16"
    vcfg, ours, _, f_ours, _ = contenders(size, cfg, device, bf16, batch=batch)
    step = make_step(ours, f_ours, bf16, device)
    flops = count_flops(step)
    rates: list[float] = []
    t = interleaved({"ours": step, "peak": peak_probe_fn(bf16, device, rates)}, max(3, cfg.rounds // 2),
                    cfg.warmup, device)
    return {"size": size, "precision": precision, "batch": batch, "tokens": (cfg.resolution // 8 // vcfg.patch_size) ** 2,
            "flops_per_step": flops, "step_s": {"ours": statistics.median(t["ours"])},
            **mfu_fields(flops, t["ours"], rates)}


def profile_steps(size: str, precision: str, cfg: BenchConfig, device: torch.device) -> dict:
    """Where the step's time goes: torch.profiler of ours, timm+fused and timm (its own optimizer)."""
    bf16 = precision == "bf16"
    _, ours, ref, f_ours, f_ref = contenders(size, cfg, device, bf16)
    steps = {"ours": make_step(ours, f_ours, bf16, device), "timm+fused": make_step(ref, f_ref, bf16, device)}
    if cfg.timm_optimizer:
        steps["timm"] = make_step(ref, f_ref, bf16, device,
                                  timm.optim.create_optimizer_v2(ref, "adamw", lr=1e-4, weight_decay=0.1))
    return {"size": size, "precision": precision, **op_profile(steps, cfg.profile_steps, device=device)}


def compile_speedups(size: str, precision: str, cfg: BenchConfig, device: torch.device) -> dict:
    bf16 = precision == "bf16"
    _, ours, ref, f_ours, f_ref = contenders(size, cfg, device, bf16)
    _, c_ours, c_ref, fc_ours, fc_ref = contenders(size, cfg, device, bf16, compiled=True)
    steps = {"ours": make_step(ours, f_ours, bf16, device), "timm": make_step(ref, f_ref, bf16, device),
             "ours_compiled": make_step(c_ours, fc_ours, bf16, device),
             "timm_compiled": make_step(c_ref, fc_ref, bf16, device)}
    first = {}
    for k in ("ours_compiled", "timm_compiled"):
        t0 = time.perf_counter()
        steps[k]()
        first[k] = time.perf_counter() - t0
    t = interleaved(steps, cfg.compile_rounds, 1, device)
    return {"size": size, "precision": precision, "compile_s": first,
            "step_s": {k: statistics.median(v) for k, v in t.items()},
            "speedup_ours": ratio(t["ours"], t["ours_compiled"]), "speedup_timm": ratio(t["timm"], t["timm_compiled"]),
            "compiled_ours_over_compiled_timm": ratio(t["ours_compiled"], t["timm_compiled"])}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["## Encoder (`python -m encoder.bench`)", "",
             f"Training step = forward + loss + backward + AdamW + zero_grad; batch {res['config']['batch']}, "
             f"{res['config']['resolution']} px images = {res['config']['resolution'] // 8}² 16-channel latents, "
             f"patch 2. {m['device']} ({m['device_name']}), {m['threads']} threads. `timm` = timm's "
             "`VisionTransformer` with `timm.optim.create_optimizer_v2(model, 'adamw')` (what a timm user runs); "
             "`timm+fused` = the same model with our fused AdamW (the models alone)."
             + (f" Ours with `cpu_linear={res['config'].get('cpu_linear')}` (`ov3common.linear`, as our trainers on a "
                "CPU): fp32 rows marked † ran ours' linear layers on oneDNN; *ours (aten)/timm* is ours with torch's "
                "own linear (the same GEMM kernels as timm)." if res["config"].get("cpu_linear") else "")
             + (" Every step section ran under `ov3common.heap.heap_reuse` (as our trainers run on a CPU), every "
                "contender alike." if res["config"].get("heap_reuse") else ""), "",
             "| size | precision | tokens | FLOP ratio ours/timm | ours ms | timm ms | timm+fused ms | "
             "**ours/timm** | ours/timm+fused | ours (aten)/timm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in res["vs_timm"]:
        s = v["step_s"]
        dag = " †" if v.get("ours_linear") == "onednn" else ""
        lines.append(f"| {v['size']} | {v['precision']}{dag} | {v['tokens']} | {v['flops_ratio_ours_over_timm']:.3f} | "
                     f"{s['ours'] * 1e3:.0f} | {s.get('timm', math.nan) * 1e3:.0f} | {s['timm_fused'] * 1e3:.0f} | "
                     f"**{ratio_text(v['ours_over_timm']) if 'ours_over_timm' in v else 'n/a'}** | "
                     f"{ratio_text(v['ours_over_timm_fused'])} | "
                     f"{ratio_text(v['ours_aten_over_timm']) if 'ours_aten_over_timm' in v else '—'} |")
    mfu = [v for v in res["vs_timm"] if "mfu" in v]
    if mfu:
        mfu = mfu + res.get("mfu_batches", [])
        lines += ["", "**MFU** (FLOPs of the step per second — torch's FlopCounterMode: the linear layers, the "
                  "patch convolution and attention, forward and backward — over the best square-matmul FLOP/s "
                  "of a size sweep, probed inside the same rounds; batch 8 = the rows above, larger batches: our "
                  "step alone):", "",
                  "| size | precision | batch | GFLOP/step | achieved GFLOP/s | peak GFLOP/s | **MFU** [range] |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for v in mfu:
            lines.append(f"| {v['size']} | {v['precision']} | {v.get('batch', res['config']['batch'])} | "
                         f"{v['flops_per_step'] / 1e9:.1f} | "
                         f"{v['achieved_flops'] / 1e9:.1f} | {v['matmul_peak_flops'] / 1e9:.1f} | **{v['mfu']:.2f}** "
                         f"[{min(v['mfu_rounds']):.2f}–{max(v['mfu_rounds']):.2f}] |")
    for pr in res.get("profiles", []):
        lines += [""] + op_profile_markdown(pr, f"Where the time goes: {pr['size']} {pr['precision']}")
    if res.get("compile"):
        lines += ["", "**torch.compile** (inductor; `nn.Module.compile()` on the model, the optimizer eager):", "",
                  "| size | precision | compile s (ours / timm) | speed-up ours | speed-up timm | "
                  "compiled ours / compiled timm |", "| --- | --- | --- | --- | --- | --- |"]
        for c in res["compile"]:
            lines.append(f"| {c['size']} | {c['precision']} | {c['compile_s']['ours_compiled']:.0f} / "
                         f"{c['compile_s']['timm_compiled']:.0f} | {ratio_text(c['speedup_ours'])}× | "
                         f"{ratio_text(c['speedup_timm'])}× | {ratio_text(c['compiled_ours_over_compiled_timm'])} |")
    if res.get("frozen_vae"):
        lines += [""] + frozen_vae_markdown(res["frozen_vae"])
    if res.get("rfid"):
        lines += ["", "**rFID pipeline** (`eval.bench_fid`, images: " + str(res["rfid"].get("images", "?")) + "). "
                  + res["rfid"]["markdown"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(BenchConfig, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    torch.manual_seed(0)
    reuse = cfg.heap_reuse and dev.type == "cpu"
    res: dict = {"machine": machine(dev), "config": {"batch": cfg.batch, "resolution": cfg.resolution,
                                                     "heap_reuse": reuse,
                                                     "cpu_linear": cfg.cpu_linear if dev.type == "cpu" else ""},
                 "command": "python -m encoder.bench", "vs_timm": [], "compile": [], "profiles": []}
    # the training steps as our trainers run them on a CPU (ov3common.trainer.Loop: heap_reuse); every contender alike
    with heap_reuse(reuse):
        for size in cfg.sizes:
            for prec in cfg.precisions:
                v = vs_timm(size, prec, cfg, dev, peak_probe=size == cfg.mfu_size)
                res["vs_timm"].append(v)
                msg = (f"{size} {prec}: ours {v['step_s']['ours'] * 1e3:.0f} ms, timm+fused "
                       f"{v['step_s']['timm_fused'] * 1e3:.0f} ms -> ours/timm+fused {v['ours_over_timm_fused']['median']:.3f}")
                if "ours_over_timm" in v:
                    msg += f", timm {v['step_s']['timm'] * 1e3:.0f} ms -> ours/timm {v['ours_over_timm']['median']:.3f}"
                if "mfu" in v:
                    msg += f"; MFU {v['mfu']:.2f} of {v['matmul_peak_flops'] / 1e9:.0f} GFLOP/s"
                if "ours_aten_over_timm" in v:
                    msg += f"; ours (aten linear)/timm {v['ours_aten_over_timm']['median']:.3f}"
                print(msg, flush=True)
        res["mfu_batches"] = []
        for batch in (b for b in cfg.mfu_batches if b != cfg.batch) if cfg.mfu_size in cfg.sizes else ():
            for prec in cfg.precisions:
                v = mfu_at_batch(cfg.mfu_size, prec, batch, cfg, dev)
                res["mfu_batches"].append(v)
                print(f"{cfg.mfu_size} {prec} batch {batch}: ours {v['step_s']['ours'] * 1e3:.0f} ms; MFU {v['mfu']:.2f} "
                      f"of {v['matmul_peak_flops'] / 1e9:.0f} GFLOP/s", flush=True)
        for size in cfg.profile_sizes:
            for prec in cfg.precisions:
                res["profiles"].append(profile_steps(size, prec, cfg, dev))
        for size in cfg.compile_sizes:
            for prec in cfg.precisions:
                c = compile_speedups(size, prec, cfg, dev)
                res["compile"].append(c)
                print(f"compile {size} {prec}: speed-up ours {c['speedup_ours']['median']:.2f}x, timm "
                      f"{c['speedup_timm']['median']:.2f}x, compiled ours/timm "
                      f"{c['compiled_ours_over_compiled_timm']['median']:.3f}", flush=True)
    if cfg.vae:
        res["frozen_vae"] = frozen_vae(cfg, dev)
        print(f"frozen VAE: cached latents {res['frozen_vae']['ov3_step']['speedup_cached']['median']:.2f}x; "
              f"bf16 encode {res['frozen_vae']['vae_precision']['encode_speedup']['bf16']['median']:.2f}x", flush=True)
    if cfg.rfid:
        res["rfid"] = import_object(cfg.rfid_bench, "rfid_bench")(cfg, dev)
        print("rFID pipeline: " + ", ".join(f"{v} {x['images_per_s']:.2f} images/s"
                                            for v, x in res["rfid"]["variants"].items()), flush=True)
    res["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    res["markdown"] = markdown(res)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.out, res)
    log.info("wrote %s", cfg.out)
    return res


if __name__ == "__main__":
    main()
