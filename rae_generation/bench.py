"""``make bench-rae`` / part of ``make bench``: DiT-DH training-step time against RAE's own DiT-DH, compile
speed-ups, and (with a trained ``run``) against diffusers' DiT plus sampling throughput. One process,
interleaved rounds (``ov3common.bench``).

* **vs RAE** (``rae=true``): our ``DiTDH`` and RAE's ``DiTwDDTHead`` (bytetriper/RAE ``src/stage2/models/DDT.py``,
  imported from the local checkout whose ``src/`` is ``$RAE_SRC``; nothing of it is copied here) at RAE's
  DiT-DH-S config (``configs/stage2/training/ImageNet256/DiTDH-S_DINOv2-B.yaml``: trunk 12 × 384, 6 heads; head
  2 × 2048, 16 heads; SwiGLU, RMSNorm, RoPE, sin-cos positions; 16 × 16 tokens × 768 channels, 1000 classes).
  Two steps per precision: the **model step** (forward, MSE to a target, backward, AdamW — RAE:
  ``utils.optim_utils.build_optimizer``, fused; ours: ``ov3common.optim.build_adamw``, fused — zero_grad) and the
  **trainer step**, which adds what each trainer does every step after the backward: gradient clipping at 1.0
  (RAE: ``torch.nn.utils.clip_grad_norm_``; ours: ``ov3common.optim.clip_grad_norm``, bitwise the same result
  without torch's multiply-by-1 pass when the norm is below the limit), the non-finite check (ours: ``ov3common.guard`` on the clip's
  norm; RAE has none) and the EMA update (RAE: ``utils.train_utils.update_ema``, a per-parameter ``mul_`` +
  ``add_``; ours: ``rae_generation.train.update_ema``, one ``_foreach_lerp_``). Same work on both sides; the
  trainer step is what a training run pays. Without ``RAE_SRC`` the comparison is skipped and the output says so.
* **torch.compile**: eager vs ``nn.Module.compile()`` of ours (and of RAE's model when present).
* **vs diffusers** (``diffusers=true``, with ``run`` or a size): diffusers' ``DiTTransformer2DModel`` with
  adaLN-Zero, patch 1 on the same grid, width = the trunk width, depth = trunk + head blocks; sampling images/s
  from a trained ``run``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from ov3common.bench import interleaved, machine, op_profile, op_profile_markdown, ratio, ratio_text
from ov3common.config import parse_cli, path_field
from ov3common.guard import NonFiniteGuard
from ov3common.heap import heap_reuse
from ov3common.linear import cpu_linear_field, use_onednn_linear, uses_onednn_linear
from ov3common.log import count_flops, get_logger
from ov3common.optim import build_adamw, clip_grad_norm
from rae_generation.models import DiTDH, DiTDHConfig, count_params, dit_config
from rae_generation.sample import load_generator
from rae_generation.train import update_ema

log = get_logger("rae.bench")

# RAE's released DiT-DH-S (stage 2) config, the keyword arguments of its DiTwDDTHead
RAE_DITDH_S = dict(input_size=16, patch_size=1, in_channels=768, hidden_size=[384, 2048], depth=[12, 2],
                   num_heads=[6, 16], mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, use_qknorm=False,
                   use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True)


@dataclass
class BenchConfig:
    rae: bool = True  # ours vs RAE's DiTwDDTHead (needs $RAE_SRC)
    rae_batch: int = 2
    heap_reuse: bool = True  # CPU: the steps run under ov3common.heap.heap_reuse, as our trainers do (both alike)
    # ours on a CPU: nn.Linear through ov3common.linear, as our trainer (train.cpu_linear); RAE keeps aten's. Where
    # it switches, fp32 rows also time ours with aten's linear ("ours (aten)": the same GEMM kernels as RAE)
    cpu_linear: str = cpu_linear_field()
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    rounds: int = 11
    profile: bool = True  # torch.profiler top ops of both model steps (with RAE), every precision
    profile_steps: int = 2
    compile: bool = True  # compile speed-ups (ours; RAE's too when present), first precision only
    compile_rounds: int = 3
    diffusers: bool = False  # ours vs diffusers' DiT (+ sampling with `run`)
    run: str = path_field("", "dir")  # a trained run: its model config (and encoder, for sampling)
    size: str = "toy"  # diffusers comparison without a run: the DiT-DH size ...
    in_dim: int = 128  # ... and the token shape / classes it is measured on
    grid: int = 4
    num_classes: int = 64
    batch_size: int = 64
    iters: int = 8
    warmup: int = 2
    precision: str = "fp32"  # diffusers comparison: fp32 | bf16
    sample_steps: int = 25
    sample_batch: int = 64
    cfg_scale: float = 1.0
    device: str = "auto"
    threads: int = 0
    out: str = ""  # bench.json (default: runs/bench/rae.json, or <run>/bench.json when a run is given)


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


def load_rae() -> tuple[type | None, object | None, object | None, str]:
    """(DiTwDDTHead, build_optimizer, update_ema, note) from ``$RAE_SRC``; (None, None, None, why) when it is not
    available."""
    src = os.environ.get("RAE_SRC", "")
    if not src:
        return None, None, None, ("skipped: RAE_SRC is not set (point it at the src/ folder of a bytetriper/RAE "
                                  "checkout)")
    if not (Path(src) / "stage2" / "models" / "DDT.py").is_file():
        return None, None, None, f"skipped: RAE_SRC={src} has no stage2/models/DDT.py"
    if src not in sys.path:
        sys.path.insert(0, src)
    from stage2.models.DDT import DiTwDDTHead  # noqa: PLC0415 (RAE_SRC's own code: on sys.path from here on)
    from utils.optim_utils import build_optimizer  # noqa: PLC0415
    from utils.train_utils import update_ema as rae_update_ema  # noqa: PLC0415

    return DiTwDDTHead, build_optimizer, rae_update_ema, f"RAE_SRC={src}"


def rae_pair(batch: int, device: torch.device, bf16: bool, compiled: bool = False, trainer: bool = False,
             cpu_linear: str = "aten"):
    """Step functions of ours and RAE's DiT-DH-S on one batch, and both models. ``trainer``: each step also clips
    the gradients, checks them (ours) and updates an EMA copy, as the two trainers do. ``cpu_linear``: ours' linear
    layers on a CPU (:func:`ov3common.linear.use_onednn_linear`)."""
    DiTwDDTHead, build_optimizer, rae_update_ema, _ = load_rae()
    torch.manual_seed(0)
    k = RAE_DITDH_S
    ref = DiTwDDTHead(**k).to(device).train()
    mcfg = dit_config("S", in_dim=k["in_channels"], grid=k["input_size"], num_classes=k["num_classes"],
                      class_dropout=k["class_dropout_prob"])
    ours = DiTDH(mcfg).to(device).train()
    use_onednn_linear(ours, cpu_linear)
    if compiled:
        ours.compile()
        ref.compile()
    n, c, g = mcfg.grid**2, mcfg.in_dim, mcfg.grid
    x = torch.randn(batch, n, c, device=device)
    img = x.transpose(1, 2).reshape(batch, c, g, g).contiguous()  # RAE's model takes [B, C, H, W]
    target = torch.randn_like(x)
    target_img = target.transpose(1, 2).reshape(batch, c, g, g).contiguous()
    y = torch.randint(0, mcfg.num_classes, (batch,), device=device)
    t = torch.rand(batch, device=device)
    opt_ours = build_adamw(ours, 2e-4, betas=(0.9, 0.95))
    opt_ref, _ = build_optimizer([p for p in ref.parameters() if p.requires_grad],
                                 {"optimizer": {"lr": 2e-4, "betas": [0.9, 0.95], "weight_decay": 0.0}})

    guard = NonFiniteGuard()

    def after_ours(model, loss, ema):  # rae_generation.train: clip, guard on the clip's norm, step, EMA
        gnorm = clip_grad_norm(model.parameters(), 1.0)
        if not guard.bad(torch.stack([loss.detach().float(), gnorm.detach().float()]), 0):
            opt_ours.step()
            update_ema(ema, model, 0.9995)

    def after_rae(model, loss, ema):  # RAE's train.py: clip, step, EMA
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_ref.step()
        rae_update_ema(ema, model, decay=0.9995)

    def step(model, opt, inp, tgt, after):
        ema = copy.deepcopy(model).requires_grad_(False) if trainer else None

        def f():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(inp, t, y)
            loss = (out.float() - tgt).pow(2).mean()
            loss.backward()
            if trainer:
                after(model, loss, ema)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        return f

    return (step(ours, opt_ours, x, target, after_ours), step(ref, opt_ref, img, target_img, after_rae), ours,
            ref)


def vs_rae(cfg: BenchConfig, device: torch.device) -> dict:
    note = load_rae()[-1]
    res: dict = {"note": note, "config": dict(RAE_DITDH_S), "batch": cfg.rae_batch, "rounds": cfg.rounds, "rows": [],
                 "cpu_linear": cfg.cpu_linear if device.type == "cpu" else ""}
    if note.startswith("skipped"):
        print(f"ours vs RAE: {note}")
        return res
    for prec in cfg.precisions:
        for kind in ("model", "trainer"):
            s_ours, s_ref, ours, ref = rae_pair(cfg.rae_batch, device, prec == "bf16", trainer=kind == "trainer",
                                                cpu_linear=cfg.cpu_linear)
            steps = {"ours": s_ours, "rae": s_ref}
            onednn = uses_onednn_linear(ours) and prec == "fp32"
            if onednn:  # like-for-like kernels too: ours with aten's linear (its RAE copy is not timed)
                steps["ours_aten"], *_ = rae_pair(cfg.rae_batch, device, False, trainer=kind == "trainer")
            f_ours, f_ref = count_flops(s_ours), count_flops(s_ref)
            t = interleaved(steps, cfg.rounds, 1, device)
            row = {"precision": prec, "step": kind, "params_ours": count_params(ours), "params_rae": count_params(ref),
                   "flops_per_step": f_ours, "flops_ratio_ours_over_rae": f_ours / f_ref,
                   "step_s": {k: statistics.median(v) for k, v in t.items()},
                   "ours_over_rae": ratio(t["ours"], t["rae"]), "ours_linear": "onednn" if onednn else "aten"}
            if onednn:
                row["ours_aten_over_rae"] = ratio(t["ours_aten"], t["rae"])
            res["rows"].append(row)
            print(f"DiT-DH-S {prec} {kind} step, batch {cfg.rae_batch}: ours {row['step_s']['ours'] * 1e3:.0f} ms, "
                  f"RAE {row['step_s']['rae'] * 1e3:.0f} ms -> ours/RAE {row['ours_over_rae']['median']:.3f} "
                  f"(FLOP ratio {row['flops_ratio_ours_over_rae']:.3f})"
                  + (f"; ours (aten linear)/RAE {row['ours_aten_over_rae']['median']:.3f}" if onednn else ""),
                  flush=True)
            del s_ours, s_ref, ours, ref, steps
        if cfg.profile:
            s_ours, s_ref, *_ = rae_pair(cfg.rae_batch, device, prec == "bf16", cpu_linear=cfg.cpu_linear)
            res.setdefault("profiles", []).append(
                {"precision": prec, **op_profile({"ours": s_ours, "rae": s_ref}, cfg.profile_steps, device=device)})
            del s_ours, s_ref
    return res


def compile_speedups(cfg: BenchConfig, device: torch.device) -> dict:
    """Eager vs compiled step of ours (and RAE's) DiT-DH-S, or of the toy size without RAE."""
    prec = cfg.precisions[0]
    bf16 = prec == "bf16"
    have_rae = not load_rae()[-1].startswith("skipped")
    if have_rae:
        e_ours, e_ref, *_ = rae_pair(cfg.rae_batch, device, bf16, cpu_linear=cfg.cpu_linear)
        c_ours, c_ref, *_ = rae_pair(cfg.rae_batch, device, bf16, compiled=True, cpu_linear=cfg.cpu_linear)
        steps = {"ours": e_ours, "rae": e_ref, "ours_compiled": c_ours, "rae_compiled": c_ref}
        size = "S (RAE's DiT-DH-S config)"
    else:
        mcfg = dit_config(cfg.size, in_dim=cfg.in_dim, grid=cfg.grid, num_classes=cfg.num_classes)
        ours = DiTDH(mcfg).to(device).train()
        comp = DiTDH(mcfg).to(device).train()
        use_onednn_linear(ours, cfg.cpu_linear)  # ours as our trainer runs it on a CPU, eager and compiled
        use_onednn_linear(comp, cfg.cpu_linear)
        comp.compile()
        steps = {"ours": train_step_fn(ours, "ditdh", mcfg, cfg.batch_size, device, bf16),
                 "ours_compiled": train_step_fn(comp, "ditdh", mcfg, cfg.batch_size, device, bf16)}
        size = cfg.size
    first = {}
    for k in [k for k in steps if k.endswith("_compiled")]:
        t0 = time.perf_counter()
        steps[k]()
        first[k] = time.perf_counter() - t0
    t = interleaved(steps, cfg.compile_rounds, 1, device)
    out = {"size": size, "precision": prec, "compile_s": first,
           "cpu_linear": cfg.cpu_linear if device.type == "cpu" else "",
           "step_s": {k: statistics.median(v) for k, v in t.items()},
           "speedup_ours": ratio(t["ours"], t["ours_compiled"])}
    if have_rae:
        out["speedup_rae"] = ratio(t["rae"], t["rae_compiled"])
        out["compiled_ours_over_compiled_rae"] = ratio(t["ours_compiled"], t["rae_compiled"])
    print(f"compile DiT-DH {size} {prec}: speed-up ours {out['speedup_ours']['median']:.2f}x" +
          (f", RAE {out['speedup_rae']['median']:.2f}x, compiled ours/RAE "
           f"{out['compiled_ours_over_compiled_rae']['median']:.3f}" if have_rae else ""), flush=True)
    return out


def vs_diffusers(cfg: BenchConfig, device: torch.device) -> dict:
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
    t = interleaved({"ditdh": step_ours, "diffusers": step_ref}, cfg.iters, cfg.warmup, device)
    t_ours, t_ref = statistics.median(t["ditdh"]), statistics.median(t["diffusers"])
    result = {"precision": cfg.precision, "batch_size": cfg.batch_size, "tokens": mcfg.grid**2, "channels": mcfg.in_dim,
              "ditdh": {"params_M": count_params(ours) / 1e6, "trunk": [mcfg.depth, mcfg.width],
                        "head": [mcfg.head_depth, mcfg.head_width], "step_s": t_ours, "step_gflop": f_ours / 1e9,
                        "gflop_per_s": f_ours / t_ours / 1e9},
              "diffusers_dit": {"params_M": count_params(ref) / 1e6, "depth": mcfg.depth + mcfg.head_depth,
                                "width": mcfg.width, "step_s": t_ref, "step_gflop": f_ref / 1e9,
                                "gflop_per_s": f_ref / t_ref / 1e9},
              "step_time_ratio_ditdh_over_diffusers": ratio(t["ditdh"], t["diffusers"])["median"]}
    del ref
    print(f"DiT-DH {mcfg.depth}x{mcfg.width} + head {mcfg.head_depth}x{mcfg.head_width} "
          f"({result['ditdh']['params_M']:.2f}M): {t_ours * 1e3:.1f} ms/step | diffusers DiT "
          f"{mcfg.depth + mcfg.head_depth}x{mcfg.width} ({result['diffusers_dit']['params_M']:.2f}M): "
          f"{t_ref * 1e3:.1f} ms/step | ratio {result['step_time_ratio_ditdh_over_diffusers']:.2f}  [{device}, "
          f"batch {cfg.batch_size}, {mcfg.grid**2} tokens x {mcfg.in_dim}, {cfg.precision}]")
    print(f"matmul work per step: DiT-DH {f_ours / 1e9:.2f} GFLOP ({f_ours / t_ours / 1e9:.1f} GFLOP/s), diffusers DiT "
          f"{f_ref / 1e9:.2f} GFLOP ({f_ref / t_ref / 1e9:.1f} GFLOP/s): the time ratio over the work ratio is "
          f"{(t_ours / t_ref) / (f_ours / f_ref):.2f}")
    if cfg.run:
        gen = load_generator(cfg.run, device=device)
        labels = torch.arange(cfg.sample_batch) % gen.num_classes
        decode = gen.encoder is not None
        fn = (lambda: gen.sample(labels, cfg.sample_steps, cfg.cfg_scale, batch_size=cfg.sample_batch)) if decode \
            else (lambda: gen.sample_latents(labels, cfg.sample_steps, cfg.cfg_scale, batch_size=cfg.sample_batch))
        secs = time_steps(fn, max(1, cfg.iters // 4), 1, device)
        result["sampling"] = {"images_per_s": cfg.sample_batch / secs, "steps": cfg.sample_steps,
                              "cfg_scale": cfg.cfg_scale, "decoded": decode, "batch": cfg.sample_batch}
        s = result["sampling"]
        print(f"sampling: {s['images_per_s']:.1f} images/s ({s['steps']} Euler steps, cfg {s['cfg_scale']}, "
              f"{'decoded to pixels' if s['decoded'] else 'tokens only'})")
    return result


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["## DiT-DH (`python -m rae_generation.bench`)", ""]
    r = res.get("vs_rae")
    if r is not None:
        lines.append(f"**Ours vs RAE's own `DiTwDDTHead`** at RAE's DiT-DH-S config (trunk 12 × 384, head 2 × 2048, "
                     f"16 × 16 tokens × 768 channels, 1000 classes), batch {r['batch']}, {m['device']} "
                     f"({m['device_name']}), {m['threads']} threads; both with fused AdamW as their trainers use"
                     + (", both under `ov3common.heap.heap_reuse` (as our trainers run on a CPU). " if res.get("heap_reuse")
                        else ". ") +
                     "*model step*: forward, MSE, backward, AdamW, zero_grad; *trainer step*: + clipping at 1.0, "
                     "the non-finite check (ours) and the EMA update, each as its trainer does it (clipping — RAE: "
                     "`clip_grad_norm_`; ours: `ov3common.optim.clip_grad_norm`, the same gradients bitwise without "
                     "torch's multiply-by-1 pass below the limit; EMA — RAE: a per-parameter `mul_`/`add_`; ours: "
                     "one `_foreach_lerp_`). Ratios: median of per-round ratios "
                     f"[min–max] over {r.get('rounds', '?')} interleaved rounds. RAE: {r['note']}."
                     + (f" Ours with `cpu_linear={r['cpu_linear']}` (`ov3common.linear`, as our trainer on a CPU): rows "
                        "marked † ran ours' linear layers on oneDNN; *ours (aten)/RAE* is ours with torch's own linear "
                        "(the same GEMM kernels as RAE)." if r.get("cpu_linear") else ""))
        if r["rows"]:
            lines += ["", "| precision | step | params ours / RAE (M) | FLOP ratio ours/RAE | ours ms | RAE ms | "
                      "**ours/RAE** | ours (aten)/RAE |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for row in r["rows"]:
                dag = " †" if row.get("ours_linear") == "onednn" else ""
                lines.append(f"| {row['precision']}{dag} | {row.get('step', 'model')} | "
                             f"{row['params_ours'] / 1e6:.1f} / {row['params_rae'] / 1e6:.1f} | "
                             f"{row['flops_ratio_ours_over_rae']:.3f} | {row['step_s']['ours'] * 1e3:.0f} | "
                             f"{row['step_s']['rae'] * 1e3:.0f} | **{ratio_text(row['ours_over_rae'])}** | "
                             f"{ratio_text(row['ours_aten_over_rae']) if 'ours_aten_over_rae' in row else '—'} |")
        for pr in r.get("profiles", []):
            lines += [""] + op_profile_markdown(pr, f"Where the time goes: DiT-DH-S model step, {pr['precision']}")
    c = res.get("compile")
    if c:
        lines += ["", f"**torch.compile** (DiT-DH {c['size']}, {c['precision']}): compile "
                  + ", ".join(f"{k.removesuffix('_compiled')} {v:.0f} s" for k, v in c["compile_s"].items())
                  + (f"; ours with `cpu_linear={c['cpu_linear']}` eager and compiled (as our trainer)"
                     if c.get("cpu_linear") else "")
                  + f"; speed-up ours **{ratio_text(c['speedup_ours'])}×**"
                  + (f", RAE {ratio_text(c['speedup_rae'])}×; compiled ours / compiled RAE "
                     f"{ratio_text(c['compiled_ours_over_compiled_rae'])}" if "speedup_rae" in c else "") + "."]
    d = res.get("vs_diffusers")
    if d:
        lines += ["", f"**Ours vs diffusers' DiT** ({d['precision']}, batch {d['batch_size']}, {d['tokens']} tokens × "
                  f"{d['channels']}): DiT-DH {d['ditdh']['step_s'] * 1e3:.0f} ms vs {d['diffusers_dit']['step_s'] * 1e3:.0f}"
                  f" ms, ratio {d['step_time_ratio_ditdh_over_diffusers']:.2f} for "
                  f"{d['ditdh']['step_gflop'] / d['diffusers_dit']['step_gflop']:.2f}× the matmul work."]
        if "sampling" in d:
            lines.append(f"Sampling: {d['sampling']['images_per_s']:.1f} images/s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = parse_cli(BenchConfig, argv, default_config=None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    reuse = cfg.heap_reuse and device.type == "cpu"
    result: dict = {"machine": machine(device), "command": "python -m rae_generation.bench", "heap_reuse": reuse}
    # the training steps as our trainers run them on a CPU (ov3common.trainer.Loop: heap_reuse); both contenders alike
    with heap_reuse(reuse):
        if cfg.rae:
            result["vs_rae"] = vs_rae(cfg, device)
        if cfg.compile:
            result["compile"] = compile_speedups(cfg, device)
    if cfg.diffusers:
        result["vs_diffusers"] = vs_diffusers(cfg, device)
    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    result["markdown"] = markdown(result)
    out = Path(cfg.out) if cfg.out else (Path(cfg.run) / "bench.json" if cfg.run else Path("runs/bench/rae.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", out)
    return result


if __name__ == "__main__":
    main()
