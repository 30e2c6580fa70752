"""``make smoke-real``: every real config at full size, on this CPU, in under ten minutes.

For each config (encoder B/2 and L/2, LLaVA-1.5 stage 1 / stage 2 / LoRA on a 7B LM, RAE DiT-DH S/B/L/XL):

* the model at full size on the meta device (``eval.profile``): parameters, FLOPs per sample of one training step
  (forward + backward, ``FlopCounterMode``) and the activation bytes autograd saves per sample;
* memory per GPU on 8 x 80 GB with the config's sharding plan, **projected** (not measured): parameters + gradients
  + optimizer states as the plan stores them (FSDP2 / ZeRO-3: sharded over the 8 GPUs; DDP / ZeRO-2 frozen weights:
  replicated; fp32 master weights, AdamW's two fp32 moments, DDP's gradient buckets, the EMA copy) + activations
  for the config's per-GPU batch; "fits" leaves 10 % of the 80 GB for the allocator and communication buffers, and
  the largest per-GPU micro-batch that fits is given when the batch does not;
* the time of the config's whole schedule on 8 x H100 (989 dense bf16 TFLOP/s each) at an ASSUMED 40 % MFU — a
  projection from the FLOP count, not a measurement;
* one real training step on this machine where its memory allows (checked against MemAvailable first):
  the encoder at B/2, 256 px, FLUX.1-architecture VAE + LPIPS, batch 2; DiT-DH XL on 256 tokens x 768, batch 1;
  LLaVA stage 2 through its real trainer on a Llama-7B-width LM cut to 2 layers, 2048 tokens, DeepSpeed ZeRO-3 on
  2 processes. Random weights everywhere (LPIPS with a random VGG unless torchvision's weights are in TORCH_HOME).

Writes ``reports/smoke_real.md`` and ``reports/smoke_real.json``; ``--skip-steps`` projects only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from encoder.export import export_encoder
from encoder.models import LatentViT, ViTDecoder, decoder_config_for, vit_config
from encoder.train import Config
from encoder.vae import FLUX_VAE_CONFIG, FrozenVAE, build_random_vae
from eval import profile as P
from eval import standins as S
from eval.profile import autocast_ratio
from llava_bridge.config import LlavaTrainConfig
from ov3common.config import load_config
from ov3common.optim import build_adamw
from rae_generation.config import RAETrainConfig
from rae_generation.flow import flow_loss, sample_t, shift_factor
from rae_generation.train import update_ema

ROOT = Path(__file__).resolve().parents[1]
GPUS, GPU_MEM, USABLE, H100_PEAK, MFU = 8, 80e9, 0.9, 989e12, 0.40
IMAGENET = 1_281_167
ENCODERS = {"encoder B/2": "configs/encoder/ov3_b2.yaml", "encoder L/2": "configs/encoder/ov3_l2.yaml"}
LLAVA = {"LLaVA stage 1": "configs/llava/real_stage1.yaml", "LLaVA stage 2": "configs/llava/real_stage2.yaml",
         "LLaVA LoRA": "configs/llava/real_lora.yaml"}
RAE = {f"RAE DiT-DH {s}": f"configs/rae/imagenet_{s.lower()}.yaml" for s in ("S", "B", "L", "XL")}
# LLaVA-1.5's data, for the time projection: samples and an ASSUMED mean sequence (256 image tokens + text)
LLAVA_DATA = {"projector": (558_128, 256 + 48), "full": (665_298, 256 + 512), "lora": (665_298, 256 + 512)}
GB = 1e9


def load(schema, path: str, overrides=()):
    return load_config(schema, str(ROOT / path), list(overrides))


def fit(static: float, act_per_sample: float, per_gpu: int, micro: int = 0) -> dict:
    """Memory per GPU for ``per_gpu`` samples a step, run ``micro`` at a time (0: all at once)."""
    live = min(per_gpu, micro) if micro > 0 else per_gpu
    total = static + act_per_sample * live
    room = GPU_MEM * USABLE - static
    return {"static_gb": static / GB, "act_gb": act_per_sample * live / GB, "total_gb": total / GB,
            "fits": total <= GPU_MEM * USABLE, "max_micro_batch": max(0, int(room // act_per_sample)),
            "per_gpu_batch": per_gpu, "micro_batch": live}


def hours(flops: float, ckpt: bool = False) -> float:
    """On 8 x H100 at the assumed MFU; activation checkpointing recomputes the forward (+1/3, an upper bound)."""
    return flops * (4 / 3 if ckpt else 1) / (GPUS * H100_PEAK * MFU) / 3600


def encoder_rows(ratio: float) -> list[dict]:
    rows = []
    for name, path in ENCODERS.items():
        cfg = load(Config, path)
        for i, st in enumerate(cfg.train.stages):
            p = P.profile_encoder(cfg, st.resolution)
            act = ratio * (p.saved_ckpt if cfg.model.grad_checkpointing else p.saved)
            # FSDP2: fp32 params, grads and AdamW moments sharded (16 B / param / 8); two units gathered (prefetch);
            # the frozen VAE and LPIPS replicated in fp32
            static = 16 * p.trainable / GPUS + 2 * 4 * p.largest_unit + 4 * p.frozen
            rows.append({"name": f"{name} stage {i + 1} ({st.resolution} px)", "config": path,
                         "plan": f"FSDP2 ({p.blocks} block units + root), frozen FLUX VAE + LPIPS replicated, "
                                 f"bf16 autocast, {'activation ckpt' if cfg.model.grad_checkpointing else 'no ckpt'}",
                         "params_m": p.trainable / 1e6, "frozen_m": p.frozen / 1e6, "gflops": p.flops / 1e9,
                         **fit(static, act, st.batch_size // GPUS, st.micro_batch),
                         "hours": hours(p.flops * st.steps * st.batch_size, cfg.model.grad_checkpointing), "steps": st.steps,
                         "global_batch": st.batch_size})
    return rows


def llava_rows() -> list[dict]:
    tower = P.profile_tower(load(Config, ENCODERS["encoder B/2"]))
    rows = []
    for name, path in LLAVA.items():
        cfg = load(LlavaTrainConfig, path)
        t, seq = cfg.train, cfg.model.model_max_length
        p = P.profile_llm(t.tune, seq, lora_r=t.lora_r)
        act = p.saved_ckpt if t.gradient_checkpointing else p.saved
        zero = json.loads((ROOT / t.deepspeed).read_text())["zero_optimization"]["stage"] if t.deepspeed else 0
        lm = p.trainable + p.frozen
        h = P.LLAMA_7B["hidden_size"]
        proj = 768 * h + h + h * h + h  # mlp2x_gelu from the B/2 tower's 768 channels (trains in every stage)
        p.trainable += proj
        if t.tune == "full":  # bf16 weights + bf16 grads + fp32 master + AdamW moments, ZeRO-3 partitioned
            static = 16 * (lm + proj) / GPUS if zero == 3 else 16 * (lm + proj)
        else:  # frozen bf16 LM (ZeRO-3 partitions it, ZeRO-2 replicates it) + the trainable part's states
            static = 2 * lm / (GPUS if zero == 3 else 1) + 16 * p.trainable / (GPUS if zero else 1)  # (+ projector)
        if zero == 3:
            static += 2 * 1e9  # stage3_max_live_parameters (1e9, bf16): gathered weights in flight
        static += 4 * tower.frozen  # the frozen OV3 tower (fp32), replicated
        samples, mean_seq = LLAVA_DATA[t.tune]
        mean = P.profile_llm(t.tune, mean_seq, lora_r=t.lora_r).flops + tower.flops
        rows.append({"name": f"{name} (Llama-7B, {seq} tokens)", "config": path,
                     "plan": f"DeepSpeed ZeRO-{zero}, HF Trainer, bf16, tune={t.tune}"
                             + (", gradient ckpt" if t.gradient_checkpointing else ""),
                     "params_m": p.trainable / 1e6, "frozen_m": (p.frozen + tower.frozen) / 1e6,
                     "gflops": (p.flops + tower.flops) / 1e9, **fit(static, act, t.batch_size),
                     "hours": hours(mean * samples * t.epochs, t.gradient_checkpointing), "steps": math.ceil(samples / (t.batch_size * GPUS)),
                     "global_batch": t.batch_size * GPUS, "note": f"time at an assumed mean of {mean_seq} tokens"})
    return rows


def rae_rows(ratio: float) -> list[dict]:
    rows = []
    for name, path in RAE.items():
        cfg = load(RAETrainConfig, path)
        p = P.profile_dit(cfg)
        act = ratio * (p.saved_ckpt if cfg.model.grad_ckpt else p.saved)
        static = (4 + 4 + 4 + 8 + 4) * p.trainable  # DDP: params, grads, buckets, AdamW, EMA; fp32, replicated
        rows.append({"name": f"{name} (256 tokens x 768)", "config": path,
                     "plan": "DDP (replicated), EMA on every rank, bf16 autocast"
                             + (", activation ckpt" if cfg.model.grad_ckpt else ""), "params_m": p.trainable / 1e6,
                     "frozen_m": 0.0, "gflops": p.flops / 1e9, **fit(static, act, cfg.train.batch_size // GPUS),
                     "hours": hours(p.flops * cfg.train.steps * cfg.train.batch_size, cfg.model.grad_ckpt),
                     "steps": cfg.train.steps,
                     "global_batch": cfg.train.batch_size})
    return rows


# ------------------------------------------------------------------------------------------- real CPU steps
def mem_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return float("inf")


def step_encoder() -> dict:
    cfg = load(Config, ENCODERS["encoder B/2"], ["loss.lpips_backbone=random"])
    torch.manual_seed(0)
    model, vae, lpips = P.encoder_model(cfg, device="cpu")
    opt = build_adamw(model, 1e-4, (0.9, 0.95), 0.2)
    batch = P.encoder_batch(cfg, 2, 256, device="cpu")
    batch["image"] = torch.rand_like(batch["image"]) * 2 - 1
    batch["alt"] = torch.randint(1000, 30000, batch["alt"].shape)
    batch["sent"] = torch.randint(1000, 30000, batch["sent"].shape)
    batch["recap"] = torch.randint(1000, 30000, batch["recap"].shape)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, 0, 2, 2 * (cfg.data.max_text_len - 1), 1)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {"seconds": time.perf_counter() - t0, "loss": float(out["loss"]),
            "losses": {k: round(float(v), 4) for k, v in out.items() if v.numel() == 1}}


def step_rae() -> dict:


    cfg = load(RAETrainConfig, RAE["RAE DiT-DH XL"])
    torch.manual_seed(0)
    model = P.dit_model(cfg, device="cpu").train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = build_adamw(model, cfg.train.lr, tuple(cfg.train.betas), cfg.train.weight_decay)
    x, y = torch.randn(1, 256, 768), torch.tensor([3])
    t = sample_t(1, shift=shift_factor(256, 768, cfg.flow.shift_base))
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = flow_loss(model, x, y, t, torch.randn_like(x))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    opt.step()
    update_ema(ema, model, cfg.train.ema_decay)
    return {"seconds": time.perf_counter() - t0, "loss": float(loss)}


def step_llava(work: Path) -> dict:
    """LLaVA stage 2 (real_stage2.yaml) through its trainer: 2 processes, ZeRO-3, on real-format stand-ins."""

    S.llama(work / "llm", hidden=4096, intermediate=11008, layers=2, heads=32)
    vae = FrozenVAE(build_random_vae(FLUX_VAE_CONFIG), scaling_factor=0.3611)
    vcfg = vit_config("B/2", in_channels=16)
    export_encoder(work / "enc", LatentViT(vcfg), ViTDecoder(decoder_config_for(vcfg)), vae, 256, 0.8)
    data = S.llava_json(work / "data", n=4, size=256, words=1600)  # answers past 2048 tokens: truncated
    over = [f"model.llm={work / 'llm'}", f"model.vision_tower={work / 'enc'}", "model.pretrain_projector=",
            f"data.train=[{data['instruct']}]", f"data.image_root={data['images']}", "data.num_workers=0",
            f"out_dir={work / 'run'}", "train.max_steps=1", "train.batch_size=1", "train.ckpt_every=0",
            "train.tf32=false", "data.group_by_modality_length=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "llava_bridge.train", "--config", str(ROOT / LLAVA["LLaVA stage 2"]), *over]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OV3_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise RuntimeError(f"llava_bridge.train exited {r.returncode}: {r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = next(x["loss"] for x in rows if "loss" in x)
    return {"seconds": time.perf_counter() - t0, "loss": loss, "note": "2 processes incl. start-up"}


STEPS = {"encoder": (step_encoder, 12 * GB, "encoder B/2 stage 2 (256 px)"),
         "rae": (step_rae, 18 * GB, "RAE DiT-DH XL (256 tokens x 768)"),
         "llava": (step_llava, 16 * GB, "LLaVA stage 2 (Llama-7B, 2048 tokens)")}


def run_step(name: str) -> dict:
    """One real step in a child process (its memory returns to the system), if MemAvailable allows."""
    need = STEPS[name][1]
    have = mem_available()
    if have < need:
        return {"skipped": f"needs ~{need / GB:.0f} GB, {have / GB:.1f} GB available now"}
    cmd = [sys.executable, "-m", "eval.smoke_real", "--step", name]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in r.stdout.splitlines()[::-1] if x.startswith("SMOKE ")), None)
    if r.returncode or line is None:
        return {"failed": (r.stderr or r.stdout)[-1500:]}
    return json.loads(line[6:])


# ------------------------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    head = ("| config | sharding plan | params (M) trainable / frozen | GFLOPs / sample (fwd+bwd) | per-GPU batch | "
            "memory / GPU, projected (GB): states + activations = total | fits 8 x 80 GB? | "
            "8 x H100 time, projected | CPU step (this machine) |\n|---|---|---|---|---|---|---|---|---|\n")
    out = []
    for r in rows:
        fits = ("yes" if r["fits"] else "no") + f" (micro-batch <= {r['max_micro_batch']})"
        step = r.get("step") or {}
        cpu = ("—" if not step else f"skipped ({step['skipped']})" if "skipped" in step
               else f"failed ({step['failed'][-200:]!r})" if "failed" in step
               else f"{step['seconds']:.1f} s, loss {step['loss']:.3f}")
        out.append(f"| {r['name']} (`{r['config']}`) | {r['plan']} | {r['params_m']:.0f} / {r['frozen_m']:.0f} | "
                   f"{r['gflops']:,.0f} | {r['per_gpu_batch']}"
                   + (f" in {r['per_gpu_batch'] // r['micro_batch']} x {r['micro_batch']}"
                      if r["micro_batch"] < r["per_gpu_batch"] else "") + f" | {r['static_gb']:.1f} + {r['act_gb']:.1f} = "
                   f"{r['total_gb']:.1f} | {fits} | {r['hours']:.1f} h ({r['steps']:,} steps of "
                   f"{r['global_batch']:,}) | {cpu} |")
    return head + "\n".join(out) + "\n"


def report(rows: list[dict], seconds: float, ratios: dict) -> str:
    return f"""# make smoke-real

Every real config built at full size (on the meta device: nothing allocated), with one real CPU training step where
this machine's memory allows. Generated by `make smoke-real` in {seconds:.0f} s.

{table(rows)}
How the numbers are made:
- **params / GFLOPs**: the full-size model of the config; FLOPs of one training step (forward + backward) per sample,
  counted by `torch.utils.flop_counter.FlopCounterMode` on meta tensors. Encoder: FLUX.1-architecture VAE (encode +
  decode), LPIPS (VGG), ViT + ViT decoder + text encoder + text decoder, the recaption at `data.max_text_len` tokens,
  alt-text and sentence at 32. LLaVA: the 7B LM on `model_max_length` tokens (image tokens included) + the frozen OV3
  B/2 tower's forward (stage 1 and LoRA: the LM frozen, gradients flow through it to the inputs).
- **memory per GPU (projected, not measured)**: states = parameters + gradients + optimizer as the plan stores them on
  one of 8 GPUs (FSDP2 / ZeRO-3: sharded by 8; DDP, frozen towers, ZeRO-2's frozen LM: replicated; fp32 masters, two
  fp32 AdamW moments; DDP gradient buckets and the EMA copy for RAE; FSDP2: two gathered block units in flight;
  ZeRO-3: 1e9 live bf16 parameters); activations = the bytes autograd saves per sample (saved-tensor hooks on the meta
  step; with activation checkpointing: outside the blocks + every block's input + one block's recompute) x the
  per-GPU batch. The encoder and DiT-DH (fp32 weights, bf16 autocast) are counted in fp32 on meta and scaled by the
  bf16-autocast / fp32 ratio of saved bytes per sample measured on a small real CPU step of the same blocks
  (encoder {ratios['encoder']:.2f}, DiT-DH {ratios['dit']:.2f}); LLaVA's LM is bf16. "Fits" leaves 10 % of 80 GB.
- **8 x H100 time (projected)**: the schedule's FLOPs (steps x global batch x FLOPs / sample, x 4/3 with activation
  checkpointing) / (8 x 989 TFLOP/s x an ASSUMED 40 % MFU). LLaVA: LLaVA-1.5's sample counts at an assumed mean length (see the JSON). Not a measurement:
  `make gpu-smoke` measures step time and MFU on a GPU.
- **CPU step**: one optimizer step of the real model (random weights, bf16 autocast, AdamW) on this 2-core CPU:
  {STEPS['encoder'][2]} batch 2 with the FLUX.1-architecture VAE and LPIPS; {STEPS['rae'][2]} batch 1 with EMA;
  {STEPS['llava'][2]} through `llava_bridge.train` with its real config (DeepSpeed ZeRO-3, 2 processes, a 2-layer
  LM of Llama-7B width). A step is skipped when MemAvailable is below its need (the machine is shared).
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "reports"))
    ap.add_argument("--skip-steps", action="store_true", help="projections only (no real CPU step)")
    ap.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in a child process
    a = ap.parse_args(argv)
    if a.step:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        with tempfile.TemporaryDirectory() as tmp:
            res = step_llava(Path(tmp)) if a.step == "llava" else STEPS[a.step][0]()
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
        print("SMOKE " + json.dumps(res))
        return 0

    t0 = time.time()
    ratios = {k: autocast_ratio(k) for k in ("encoder", "dit")}
    print(f"bf16-autocast / fp32 activation bytes (measured on small real CPU steps): {ratios}", file=sys.stderr)
    rows = encoder_rows(ratios["encoder"]) + llava_rows() + rae_rows(ratios["dit"])
    print(f"projections done in {time.time() - t0:.0f} s", file=sys.stderr)
    if not a.skip_steps:
        for name, (_, _, title) in STEPS.items():
            print(f"real CPU step: {title} ...", file=sys.stderr)
            res = run_step(name)
            target = {"encoder": "encoder B/2 stage 2", "rae": "RAE DiT-DH XL", "llava": "LLaVA stage 2"}[name]
            next(r for r in rows if r["name"].startswith(target))["step"] = res
            print(f"  {res}", file=sys.stderr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = report(rows, time.time() - t0, ratios)
    (out / "smoke_real.md").write_text(md)
    (out / "smoke_real.json").write_text(json.dumps({"gpus": GPUS, "gpu_mem": GPU_MEM, "assumed_mfu": MFU,
                                                     "autocast_ratio": ratios, "llava_data": LLAVA_DATA,
                                                     "rows": rows}, indent=1))
    print(table(rows))
    print(f"-> {out / 'smoke_real.md'}")
    failed = [r["name"] for r in rows if "failed" in (r.get("step") or {})]
    if failed:
        print(f"smoke-real: the real step failed for {', '.join(failed)} (the table says why)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
