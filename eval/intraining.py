"""In-training evaluation that equals offline evaluation: one function per number, called on the live model by the
trainer and on a saved checkpoint offline, so the two agree exactly (tested).

* Encoder — val reconstruction PSNR and image->text retrieval R@1 (:func:`encoder.evaluate.evaluate`, τ = 0):
  ``train.eval_every=N`` in ``encoder.train`` logs ``val/*`` every N steps on the live model (no reload);
  :func:`encoder_checkpoint_eval` rebuilds the run from its ``config.yaml``, loads a checkpoint and runs the same
  function on the same val batches.
* RAE — gFID of K class-balanced samples of the EMA model: ``eval.every=N`` in ``rae_generation.train`` calls
  :class:`RAEInTrainEval` (the live EMA, wrapped in a sampling :class:`~rae_generation.sample.Generator`);
  :func:`rae_checkpoint_gfid` loads the checkpoint with ``load_generator`` and calls the same :func:`gfid_of`.
  ``make eval-all``'s gFID piece on that checkpoint (same ``per_class``, ``seed``, ``steps``, ``cfg_scale``, real set
  and batch size) gives the same number too: it samples through the same generator and scores with the same
  :func:`eval.fid.compute_metrics`.

    python -m eval.intraining encoder --run runs/toy/encoder [--checkpoint step_00000100]
    python -m eval.intraining rae --run runs/toy/rae/ov3 [--checkpoint step_00000500]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from encoder.data import Tokenize, tokenizer_dir
from encoder.evaluate import evaluate
from encoder.export import load_encoder
from encoder.ov3 import OV3Model
from encoder.train import Config, val_batches
from encoder.vae import build_vae
from eval import gfid
from eval.fid import compute_metrics
from eval.inception import DEFAULT_WEIGHTS
from ov3common import checkpoint as C
from ov3common.checkpoint import CheckpointManager
from ov3common.config import load_config
from ov3common.linear import use_onednn_linear
from rae_generation.config import RAETrainConfig
from rae_generation.sample import Generator, load_generator


# ---------------------------------------------------------------------------------------------------- encoder
def _resolve(run: Path, checkpoint: str | None) -> Path:
    if checkpoint in (None, "", "latest"):
        found = CheckpointManager(run / "checkpoints").latest()
        if found is None:
            raise FileNotFoundError(f"{run}/checkpoints: no valid checkpoint")
        return Path(found)
    p = Path(checkpoint)
    p = p if p.is_dir() else run / "checkpoints" / checkpoint
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (looked in {run / 'checkpoints'})")
    return p


def encoder_checkpoint_eval(run_dir: str | Path, checkpoint: str | None = None, device: str = "cpu") -> dict:
    """The encoder trainer's val evaluation (PSNR, retrieval) of a saved checkpoint of ``run_dir``."""

    run = Path(run_dir)
    cfg = load_config(Config, str(run / "config.yaml"))
    ckpt = _resolve(run, checkpoint)
    tokenize = Tokenize(tokenizer_dir(cfg.data), cfg.data.max_text_len)
    vae = build_vae(cfg.vae, torch.device(device))
    model = OV3Model(cfg.model, cfg.loss, tokenize.vocab_size, tokenize.pad, cfg.data.max_text_len, vae, None,
                     seed=cfg.seed).to(device)
    state, _ = C.CheckpointManager(run / "checkpoints").load(ckpt)
    C.load_model_state(model, state["model"])
    use_onednn_linear(model, cfg.train.cpu_linear)  # the trainer's linear layers on a CPU: the same products
    val = val_batches(cfg, tokenize, cfg.train.stages[-1].resolution)
    out = evaluate(model, val, None, cfg.grid_n, cfg.train.precision == "bf16")
    return {**out, "checkpoint": str(ckpt), "step": int(state["progress"]["step"])}


# ---------------------------------------------------------------------------------------------------- RAE
def gfid_of(generator, real: str | Path, weights: str | Path, *, per_class: int, seed: int = 0,
            steps: int | None = None, cfg_scale: float | None = None, batch_size: int = 32, fid_batch_size: int = 32,
            cache_dir: str | Path | None = None, device: str = "cpu") -> dict:
    """gFID of ``per_class`` samples of every class of a :class:`~rae_generation.sample.Generator` vs ``real`` (a
    class-split folder, folder or npz): sampled as ``make eval-all`` samples (sample i's noise from (seed, i))."""

    weights = weights or DEFAULT_WEIGHTS

    real_src: str | Path | list[Path] = real
    if Path(real).is_dir() and all(p.is_dir() for p in Path(real).iterdir()):
        real_src = gfid.class_real_images(real)
    done = [0]

    def generate(labels: torch.Tensor) -> torch.Tensor:
        x = generator.sample(labels, steps=steps, cfg_scale=cfg_scale, seed=seed, batch_size=len(labels),
                             offset=done[0])
        done[0] += len(labels)
        return x

    with torch.random.fork_rng():
        images, labels = gfid.generate_samples(generate, generator.num_classes, per_class, batch_size, seed)
    r = compute_metrics(images, real_src, weights, cache_dir=cache_dir, batch_size=fid_batch_size, kid=False,
                        prc=False, isc=False, sfid=False, device=device)
    return {"gfid": r["fid"], "n": int(len(images)), "ref_stats_sha256": r["ref_stats_sha256"]}


class RAEInTrainEval:
    """gFID of the live EMA model every ``cfg.every`` steps (built once: generator wrapper, encoder, real set)."""

    def __init__(self, cfg, ema, norm, shift: float, data, sample_cfg, device):
        if not cfg.real or not data.encoder_path:
            raise ValueError("eval.every > 0 needs eval.real (real images) and an encoder to decode samples")
        enc = data.encoder or load_encoder(data.encoder_path, device=device)
        self.cfg, self.device = cfg, device
        self.gen = Generator(ema, norm, shift, data.classes, enc, data.image_size,
                             {"steps": sample_cfg.steps, "method": sample_cfg.method, "cfg_scale": sample_cfg.cfg_scale,
                              "interval": tuple(sample_cfg.interval)})

    def __call__(self) -> dict:
        c = self.cfg
        was = self.gen.model.training
        r = gfid_of(self.gen, c.real, c.weights, per_class=c.per_class, seed=c.seed, steps=c.steps or None,
                    cfg_scale=None if c.cfg_scale < 0 else c.cfg_scale, batch_size=c.batch_size,
                    cache_dir=c.cache_dir or None, device=str(self.device))
        self.gen.model.train(was)
        return {f"eval/gfid_{r['n']}": r["gfid"], "eval/gfid": r["gfid"], "eval/gfid_n": r["n"]}


def rae_checkpoint_gfid(run_dir: str | Path, checkpoint: str = "latest", device: str = "cpu",
                        overrides: dict | None = None) -> dict:
    """The in-training gFID (the run's ``eval`` settings, or ``overrides``) of a saved checkpoint's EMA weights."""

    run = Path(run_dir)
    cfg = load_config(RAETrainConfig, str(run / "config.yaml"))
    c = {**{k: getattr(cfg.eval, k) for k in ("real", "weights", "per_class", "seed", "steps", "cfg_scale",
                                              "batch_size", "cache_dir")}, **(overrides or {})}
    gen = load_generator(run, device=device, checkpoint=checkpoint)
    r = gfid_of(gen, c["real"], c["weights"], per_class=c["per_class"], seed=c["seed"], steps=c["steps"] or None,
                cfg_scale=None if c["cfg_scale"] < 0 else c["cfg_scale"], batch_size=c["batch_size"],
                cache_dir=c["cache_dir"] or None, device=device)
    return {**r, "checkpoint": str(gen.checkpoint)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.intraining", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("encoder", "rae"))
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoint", default="latest")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    fn = encoder_checkpoint_eval if args.what == "encoder" else rae_checkpoint_gfid
    print(json.dumps(fn(args.run, args.checkpoint, args.device), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
