"""``make gpu-smoke``: the real configs' models for ~20 steps each on one GPU (bf16 autocast, AdamW): step time,
samples/s and MFU against the GPU's dense bf16 peak. One prepared script, a few minutes on an H100.

    make gpu-smoke                       # every model; ARGS="--only encoder,rae --steps 20 --attn flash"

Per model: the config's full-size model, a per-GPU batch that fits one 80 GB GPU (given in the table; the real runs
shard or micro-batch, ``make smoke-real`` projects their memory), ``--warmup`` untimed steps, then ``--steps``
timed steps (``torch.cuda.synchronize`` around them). FLOPs per sample come from ``FlopCounterMode`` on the meta
device (``eval.profile``, forward + backward), so MFU = FLOPs/sample x samples/s / peak. LLaVA: the Llama-7B-width
LM cut to ``--llm-layers`` layers (a full 7B with AdamW does not fit one GPU without ZeRO), 2048 tokens, frozen OV3
tower included. One GPU, no communication: what it measures is the kernels, not the scaling.

Without CUDA it stops at once with one line (nothing is measured on a CPU); ``--device cpu --tiny`` runs the same
code on toy sizes (the tests do).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from encoder.train import Config
from eval import profile as P
from ov3common.attention import set_attention_impl
from ov3common.config import load_config
from ov3common.log import measure_matmul_peak
from ov3common.optim import build_adamw
from rae_generation.config import RAETrainConfig
from rae_generation.flow import flow_loss
from rae_generation.train import update_ema

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 peak (no sparsity) by device name; else the measured matmul peak is used
PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
         "A800": 312e12, "L40S": 362e12, "A6000": 155e12, "4090": 165e12}
# name: (config, kind, per-GPU batch, resolution / tokens)
MODELS = {
    "encoder B/2 256 px": ("configs/encoder/ov3_b2.yaml", "encoder", 16, 256),
    "encoder B/2 128 px": ("configs/encoder/ov3_b2.yaml", "encoder", 64, 128),
    "encoder L/2 256 px": ("configs/encoder/ov3_l2.yaml", "encoder", 8, 256),
    "RAE DiT-DH XL": ("configs/rae/imagenet_xl.yaml", "rae", 64, 256),
    "RAE DiT-DH S": ("configs/rae/imagenet_s.yaml", "rae", 128, 256),
    "LLaVA stage 2 LM (7B width)": ("configs/llava/real_stage2.yaml", "llava", 2, 2048),
}
TINY = {"encoder": ["model.size=tiny", "model.text_width=32", "model.text_depth=1", "model.text_heads=2",
                    "model.text_decoder_width=32", "model.text_decoder_depth=1", "model.text_decoder_heads=2",
                    "data.max_text_len=16", "loss.lpips_backbone=random"],
        "rae": ["model.size=tiny"]}


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAKS.items():
            if key in name:
                return peak, f"{name}: {peak / 1e12:.0f} TFLOP/s dense bf16 (spec)"

    peak = measure_matmul_peak(torch.bfloat16, device)
    return peak, f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}: " \
                 f"{peak / 1e12:.2f} TFLOP/s (measured bf16 matmul)"


def build(kind: str, config: str, batch: int, size: int, device: torch.device, tiny: bool, attn: str,
          llm_layers: int):
    """(model, step function, FLOPs per sample) for one model of the table."""

    if kind == "encoder":
        cfg = load_config(Config, str(ROOT / config), ["loss.lpips_backbone=random", *(TINY["encoder"] if tiny else []),
                                                       *([f"model.attn={attn}"] if attn != "sdpa" else [])])
        flops = P.profile_encoder(cfg, size).flops
        model, _, _ = P.encoder_model(cfg, device, vae_widths=[32, 64, 128, 128] if tiny else None)
        b = P.encoder_batch(cfg, batch, size, device)
        b["image"] = torch.rand_like(b["image"]) * 2 - 1

        def forward():
            return model(b, 0, batch, batch * (cfg.data.max_text_len - 1), 1)["loss"]
    elif kind == "rae":
        cfg = load_config(RAETrainConfig, str(ROOT / config), [*(TINY["rae"] if tiny else []),
                                                               *([f"model.attn={attn}"] if attn != "sdpa" else [])])
        chans = 32 if tiny else 768
        flops = P.profile_dit(cfg, size, chans).flops
        model = P.dit_model(cfg, size, chans, device=device).train()
        set_attention_impl(model, cfg.model.attn)
        x, y = torch.randn(batch, size, chans, device=device), torch.randint(0, 1000, (batch,), device=device)
        t = torch.rand(batch, device=device)

        def forward():
            return flow_loss(model, x, y, t, torch.randn_like(x))
    else:
        over = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                    vocab_size=1000) if tiny else {}
        layers = 1 if tiny else llm_layers
        meta = P.llama_model(layers, **over)
        emb_meta = torch.zeros(1, size, meta.config.hidden_size, device=P.META, dtype=torch.bfloat16)
        labels_meta = torch.zeros(1, size, dtype=torch.long, device=P.META)
        flops = P.profile_step(lambda: meta(inputs_embeds=emb_meta, labels=labels_meta).loss.backward(),
                               list(meta.model.layers), 1).flops
        model = P.llama_model(layers, dtype=torch.float32, device=device, **over)  # fp32 masters + autocast
        if attn == "flash":
            model.config._attn_implementation = "flash_attention_2"
        model.gradient_checkpointing_enable()
        emb = torch.randn(batch, size, model.config.hidden_size, device=device)
        labels = torch.randint(0, model.config.vocab_size, (batch, size), device=device)

        def forward():
            return model(inputs_embeds=emb, labels=labels).loss
    return model, forward, flops


def measure(name: str, spec: tuple, device: torch.device, steps: int, warmup: int, tiny: bool, attn: str,
            llm_layers: int, peak: float) -> dict:

    config, kind, batch, size = spec
    if tiny:
        batch, size = 2, {"encoder": 32, "rae": 16, "llava": 64}[kind]
    torch.manual_seed(0)
    model, forward, flops = build(kind, config, batch, size, device, tiny, attn, llm_layers)
    opt = build_adamw(model, 1e-4, (0.9, 0.95), 0.0)
    ema = copy.deepcopy(model).requires_grad_(False) if kind == "rae" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, model, 0.9995)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    row = {"name": name, "config": config, "batch": batch, "size": size, "step_s": step_s,
           "samples_per_s": batch / step_s, "tflops": flops * batch / step_s / 1e12,
           "mfu": flops * batch / step_s / peak, "gflops_per_sample": flops / 1e9, "peak_mem_gb": mem,
           "loss": float(loss)}
    del model, opt, ema
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def table(rows: list[dict], where: str, attn: str) -> str:
    out = [f"GPU smoke ({where}; attention {attn}; median of the timed steps)", "",
           "| model (config) | per-GPU batch | step (s) | samples/s | TFLOP/s | MFU | peak memory (GB) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} (`{r['config']}`) | — | failed: {r['error']} | | | | |")
            continue
        out.append(f"| {r['name']} (`{r['config']}`) | {r['batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
                   f"{r['tflops']:.1f} | {100 * r['mfu']:.1f} % | {r['peak_mem_gb']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated substrings of the model names (encoder,rae,llava)")
    ap.add_argument("--attn", choices=("sdpa", "flash"), default="sdpa")
    ap.add_argument("--llm-layers", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (to test this script on a CPU)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "gpu_smoke.md"))
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("make gpu-smoke: no CUDA GPU here (torch.cuda.is_available() is False); nothing was measured. "
              "Run it on a GPU machine (make setup TORCH=\"torch==X+cuXXX ...\").", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak, where = peak_flops(device)
    names = [n for n in MODELS if not a.only or any(s.strip().lower() in n.lower() for s in a.only.split(","))]
    rows = []
    for name in names:
        print(f"== {name}", file=sys.stderr)
        try:
            rows.append(measure(name, MODELS[name], device, a.steps, a.warmup, a.tiny, a.attn, a.llm_layers, peak))
        except torch.OutOfMemoryError as e:
            rows.append({"name": name, "config": MODELS[name][0], "error": f"out of memory ({str(e)[:80]})"})
            torch.cuda.empty_cache()
        print(f"   {rows[-1]}", file=sys.stderr)
    text = table(rows, where, a.attn)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
