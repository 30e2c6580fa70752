"""``make bench-rae``: DiT-DH training-step time vs diffusers' ``DiTTransformer2DModel`` of comparable width, depth
and tokens (as a ratio), and sampling throughput (images/s, decoding included when the run has an encoder).

The reference is diffusers' DiT with adaLN-Zero, patch 1 on the same token grid, width = the trunk width, depth =
trunk + head blocks, the same heads, in/out channels = the token channels. Both step the same way: forward, MSE,
backward, AdamW. Timings on a busy machine are inflated; the ratio is the number to read.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ov3common.config import parse_cli, path_field
from ov3common.log import count_flops, get_logger
from rae_generation.models import DiTDH, DiTDHConfig, count_params, dit_config

log = get_logger("rae.bench")


@dataclass
class BenchConfig:
    run: str = path_field("", "dir")  # a trained run: its model config (and encoder, for sampling)
    size: str = "toy"  # without a run: the DiT-DH size ...
    in_dim: int = 128  # ... and the token shape / classes it is measured on
    grid: int = 4
    num_classes: int = 64
    batch_size: int = 64
    iters: int = 8
    warmup: int = 2
    precision: str = "fp32"  # fp32 | bf16
    sample_steps: int = 25
    sample_batch: int = 64
    cfg_scale: float = 1.0
    device: str = "auto"
    out: str = ""  # bench.json (default: <run>/bench.json when a run is given)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``step()`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def diffusers_reference(cfg: DiTDHConfig):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=cfg.heads, attention_head_dim=cfg.width // cfg.heads,
                                 in_channels=cfg.in_dim, out_channels=cfg.in_dim, num_layers=cfg.depth + cfg.head_depth,
                                 sample_size=cfg.grid, patch_size=1, num_embeds_ada_norm=cfg.num_classes + 1,
                                 norm_num_groups=1)


def train_step_fn(model, kind: str, cfg: DiTDHConfig, batch: int, device: torch.device, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n = cfg.grid * cfg.grid
    x = torch.randn(batch, n, cfg.in_dim, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    t = torch.rand(batch, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if kind == "ditdh":
                out = model(x, t, y)
            else:  # diffusers wants [B, C, H, W] and timesteps in [0, 1000)
                img = x.transpose(1, 2).reshape(batch, cfg.in_dim, cfg.grid, cfg.grid)
                out = model(img, timestep=t * 999, class_labels=y).sample
                out = out.reshape(batch, cfg.in_dim, n).transpose(1, 2)
        loss = (out.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv=None) -> dict:
    cfg = parse_cli(BenchConfig, argv, default_config=None)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.run:
        spec = json.loads((Path(cfg.run) / "generator.json").read_text())
        mcfg = DiTDHConfig.from_dict(spec["model"])
    else:
        mcfg = dit_config(cfg.size, in_dim=cfg.in_dim, grid=cfg.grid, num_classes=cfg.num_classes)
    torch.manual_seed(0)
    bf16 = cfg.precision == "bf16"
    ours = DiTDH(mcfg).to(device).train()
    ref = diffusers_reference(mcfg).to(device).train()
    step_ours = train_step_fn(ours, "ditdh", mcfg, cfg.batch_size, device, bf16)
    step_ref = train_step_fn(ref, "diffusers", mcfg, cfg.batch_size, device, bf16)
    f_ours, f_ref = count_flops(step_ours), count_flops(step_ref)
    t_ours = time_steps(step_ours, cfg.iters, cfg.warmup, device)
    t_ref = time_steps(step_ref, cfg.iters, cfg.warmup, device)
    result = {"device": str(device), "precision": cfg.precision, "batch_size": cfg.batch_size,
              "tokens": mcfg.grid**2, "channels": mcfg.in_dim,
              "ditdh": {"params_M": count_params(ours) / 1e6, "trunk": [mcfg.depth, mcfg.width],
                        "head": [mcfg.head_depth, mcfg.head_width], "step_s": t_ours, "step_gflop": f_ours / 1e9,
                        "gflop_per_s": f_ours / t_ours / 1e9},
              "diffusers_dit": {"params_M": count_params(ref) / 1e6, "depth": mcfg.depth + mcfg.head_depth,
                                "width": mcfg.width, "step_s": t_ref, "step_gflop": f_ref / 1e9,
                                "gflop_per_s": f_ref / t_ref / 1e9},
              "step_time_ratio_ditdh_over_diffusers": t_ours / t_ref}
    del ref
    if cfg.run:
        from rae_generation.sample import load_generator

        gen = load_generator(cfg.run, device=device)
        labels = torch.arange(cfg.sample_batch) % gen.num_classes
        decode = gen.encoder is not None
        fn = (lambda: gen.sample(labels, cfg.sample_steps, cfg.cfg_scale, batch_size=cfg.sample_batch)) if decode \
            else (lambda: gen.sample_latents(labels, cfg.sample_steps, cfg.cfg_scale, batch_size=cfg.sample_batch))
        secs = time_steps(fn, max(1, cfg.iters // 4), 1, device)
        result["sampling"] = {"images_per_s": cfg.sample_batch / secs, "steps": cfg.sample_steps,
                              "cfg_scale": cfg.cfg_scale, "decoded": decode, "batch": cfg.sample_batch}
    out = Path(cfg.out) if cfg.out else (Path(cfg.run) / "bench.json" if cfg.run else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"DiT-DH {mcfg.depth}x{mcfg.width} + head {mcfg.head_depth}x{mcfg.head_width} "
          f"({result['ditdh']['params_M']:.2f}M): {t_ours * 1e3:.1f} ms/step | diffusers DiT "
          f"{mcfg.depth + mcfg.head_depth}x{mcfg.width} ({result['diffusers_dit']['params_M']:.2f}M): "
          f"{t_ref * 1e3:.1f} ms/step | ratio {t_ours / t_ref:.2f}  [{device}, batch {cfg.batch_size}, "
          f"{mcfg.grid**2} tokens x {mcfg.in_dim}, {cfg.precision}]")
    print(f"matmul work per step: DiT-DH {f_ours / 1e9:.2f} GFLOP ({f_ours / t_ours / 1e9:.1f} GFLOP/s), diffusers DiT "
          f"{f_ref / 1e9:.2f} GFLOP ({f_ref / t_ref / 1e9:.1f} GFLOP/s): the time ratio over the work ratio is "
          f"{(t_ours / t_ref) / (f_ours / f_ref):.2f}")
    if "sampling" in result:
        s = result["sampling"]
        print(f"sampling: {s['images_per_s']:.1f} images/s ({s['steps']} Euler steps, cfg {s['cfg_scale']}, "
              f"{'decoded to pixels' if s['decoded'] else 'tokens only'})")
    return result


if __name__ == "__main__":
    main()
