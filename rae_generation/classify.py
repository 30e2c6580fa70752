"""Class accuracy of generated samples (``make rae-classacc``), measured two ways; toy numbers check the pipeline.

* **pixels**: a small CNN trained on the real images of the class split (independent of the encoder) classifies
  the decoded samples of an ADM npz. Reference numbers: its accuracy on real val images, and on the encoder's
  reconstructions of them (the ceiling for anything decoded by that encoder).
* **tokens** (the encoder's own features): a small per-token MLP with max/mean pooling, trained on the cached
  train tokens, classifies the generated tokens directly (``samples_tokens.safetensors`` written by
  ``rae-sample``), so a blurry decoder does not hide what the generator got right. Reference: its accuracy on the
  tokens of real val images.

Results go to ``<npz stem>_class_accuracy.json`` beside the samples.
"""

from __future__ import annotations

import fcntl
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from encoder.export import load_encoder
from ov3common.checkpoint import atomic_write_json, load_safetensors, save_safetensors
from ov3common.config import choice_field, parse_cli, path_field
from ov3common.log import get_logger, progress
from rae_generation.data import ImageFolderSource, LatentDataset, Normalizer, collate_images

log = get_logger("rae.classify")


@dataclass
class ClassifyConfig:
    train: str = path_field("data/toy/classes/train", "dir")
    val: str = path_field("data/toy/classes/val", "dir")
    encoder: str = path_field("", "dir")  # reconstruction ceiling (pixels) and val tokens (tokens)
    latents: str = path_field("", "dir")  # the train latent cache: enables the token classifier
    npz: str = path_field("", "file")  # samples to score (arr_0 / arr_1); tokens: <stem>_tokens.safetensors
    RENAMED = {"out": "out_dir"}
    out_dir: str = "runs/toy/rae/classifier"
    pixel_dir: str = ""  # where the pixel classifier is trained once and shared by every row ("" = out_dir)
    image_size: int = 64
    epochs: int = 4
    token_epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    retrain: bool = False
    # the classifiers' training steps under bf16 autocast (weights, evaluation and features stay fp32): the pixel CNN
    # ~2x faster on a CPU with AMX; the toy config uses it (val accuracy: docs/notes/demo.md)
    precision: str = choice_field("fp32", ("fp32", "bf16"))
    # class names "<a>_<b>" (toy: colour_shape): also report how often each part is right, named by these
    factors: list[str] = field(default_factory=list)


class ToyClassifier(nn.Module):
    """Strided convolutions with BatchNorm + ReLU, then global max and mean pooling (toy objects are small)."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        spec = [(3, w, 5, 2), (w, 2 * w, 3, 2), (2 * w, 4 * w, 3, 2), (4 * w, 4 * w, 3, 1)]
        layers: list[nn.Module] = []
        for c_in, c_out, k, s in spec:
            layers += [nn.Conv2d(c_in, c_out, k, stride=s, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(8 * w, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """The pooled features the head reads ``[B, 8 * width]`` (eval.toygen's toy-FID feature space)."""
        f = self.features(x)
        return torch.cat([f.amax((2, 3)), f.mean((2, 3))], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


class TokenClassifier(nn.Module):
    """Per-token MLP, max and mean pooled over the tokens, linear; input: normalised tokens ``[B, N, C]``."""

    def __init__(self, channels: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        f = self.mlp(z)
        return self.head(torch.cat([f.amax(1), f.mean(1)], dim=1))


def load_folder(root: str, image_size: int) -> tuple[Tensor, Tensor, list[str]]:
    """All decodable images of an ImageFolder as uint8 ``[N, 3, H, W]`` and their labels."""
    src = ImageFolderSource(root, image_size)
    imgs, labels = [], []
    for b in DataLoader(src, batch_size=256, collate_fn=collate_images):
        imgs.append(((b["images"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels.append(b["labels"])
    return torch.cat(imgs), torch.cat(labels), src.classes


def _float(x: Tensor) -> Tensor:
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch: int = 256) -> Tensor:
    """Top-1 class of each input (images: uint8 NCHW or float in [-1, 1]; or tokens)."""
    model.eval()
    return torch.cat([model(_float(x[i:i + batch])).argmax(1) for i in range(0, len(x), batch)])


def accuracy(model: nn.Module, x: Tensor, labels: Tensor, batch: int = 256) -> tuple[float, Tensor]:
    """Top-1 accuracy and per-class accuracy."""
    pred = predict(model, x, batch)
    correct = (pred == labels).float()
    n = int(labels.max()) + 1 if len(labels) else 0
    per_class = torch.zeros(n).index_add_(0, labels, correct) / torch.bincount(labels, minlength=n).clamp_min(1)
    return float(correct.mean()), per_class


def fit(model: nn.Module, x: Tensor, y: Tensor, epochs: int, cfg, augment, desc: str) -> nn.Module:
    """AdamW + one-cycle LR over ``epochs`` of shuffled mini-batches; ``augment(batch, generator)``."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    steps = max(1, epochs * (len(x) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = progress(total=steps, desc=desc)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - cfg.batch_size + 1, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = F.cross_entropy(model(augment(_float(x[idx]), g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval()


@torch.no_grad()
def embed(model: ToyClassifier, x: Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model.embed(_float(x[i:i + batch])) for i in range(0, len(x), batch)]).double().numpy()


def _hflip(xb: Tensor, g: torch.Generator) -> Tensor:
    flip = torch.rand(len(xb), generator=g) < 0.5  # every toy shape is left-right symmetric
    return torch.where(flip[:, None, None, None], xb.flip(-1), xb)


def _jitter(zb: Tensor, g: torch.Generator) -> Tensor:
    return zb + 0.1 * torch.randn(zb.shape, generator=g)


def factor_accuracy(pred: Tensor, labels: Tensor, classes: list[str], factors: list[str]) -> dict[str, float]:
    """For class names ``"<a>_<b>"`` split at the first ``_``: the accuracy of each part (e.g. colour, shape)."""
    if not factors:
        return {}
    parts = [c.split("_", 1) for c in classes]
    if len(factors) != 2 or any(len(p) != 2 for p in parts):
        raise ValueError(f"factors={factors}: needs two names and class names of the form a_b (got {classes[:3]}...)")
    out = {}
    for j, name in enumerate(factors):
        part = [p[j] for p in parts]
        out[name] = sum(part[a] == part[b] for a, b in zip(pred.tolist(), labels.tolist())) / max(1, len(labels))
    return out


def pixel_classifier(cfg, out: Path) -> tuple[ToyClassifier, dict]:
    """The pixel CNN (trained once in ``pixel_dir``, shared by every row so their toy FIDs share one feature space)
    and its info; the encoder's reconstruction ceiling is kept per row in ``out``."""
    shared = Path(cfg.pixel_dir) if cfg.pixel_dir else out
    weights, info_path = shared / "pixels.safetensors", shared / "pixels.json"
    shared.mkdir(parents=True, exist_ok=True)
    # two rows' rae-classacc may run at once (make demo's lanes): the first trains, the other waits and loads
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if weights.is_file() and info_path.is_file() and not cfg.retrain:
            info = json.loads(info_path.read_text())
            model = ToyClassifier(len(info["classes"]))
            model.load_state_dict(load_safetensors(weights))
        else:
            x, y, classes = load_folder(cfg.train, cfg.image_size)
            model = fit(ToyClassifier(len(classes)), x, y, cfg.epochs, cfg, _hflip, "pixel classifier")
            vx, vy, _ = load_folder(cfg.val, cfg.image_size)
            info = {"classes": classes, "val_accuracy_real": accuracy(model, vx, vy)[0], "epochs": cfg.epochs}
            save_safetensors(weights, model.state_dict())
            atomic_write_json(info_path, info)
    recon_path = out / "pixels_reconstructed.json"
    rec = json.loads(recon_path.read_text()) if recon_path.is_file() else {}
    if cfg.encoder and (rec.get("encoder") != str(Path(cfg.encoder).resolve()) or cfg.retrain):
        enc = load_encoder(cfg.encoder)
        vx, vy, _ = load_folder(cfg.val, cfg.image_size)
        recon = torch.cat([enc.decode(enc.encode(_float(vx[i:i + 128]))[0]) for i in range(0, len(vx), 128)])
        rec = {"val_accuracy_reconstructed": accuracy(model, recon, vy)[0], "encoder": str(Path(cfg.encoder).resolve()),
               "val_factor_accuracy_reconstructed": factor_accuracy(predict(model, recon), vy, info["classes"],
                                                                    list(cfg.factors))}
        atomic_write_json(recon_path, rec)
    return model, {**info, **rec} if cfg.encoder else info


def token_classifier(cfg, out: Path) -> tuple[TokenClassifier, Normalizer, dict]:
    weights, info_path = out / "tokens.safetensors", out / "tokens.json"
    train = LatentDataset(cfg.latents)
    norm = Normalizer.from_sums(train.stats_sums(), "position")
    if weights.is_file() and info_path.is_file() and not cfg.retrain:
        info = json.loads(info_path.read_text())
        model = TokenClassifier(train.channels, len(train.classes))
        model.load_state_dict(load_safetensors(weights))
        return model, norm, info
    x = norm.normalize(train.__getitems__(list(range(len(train))))["tokens"])
    model = fit(TokenClassifier(train.channels, len(train.classes)), x, train.labels, cfg.token_epochs, cfg, _jitter,
                "token classifier")
    info = {"classes": train.classes, "latents": str(Path(cfg.latents).resolve()), "epochs": cfg.token_epochs}
    if cfg.encoder:
        enc = load_encoder(cfg.encoder)
        vx, vy, _ = load_folder(cfg.val, cfg.image_size)
        vz = torch.cat([enc.encode(_float(vx[i:i + 128]))[0] for i in range(0, len(vx), 128)])
        info["val_accuracy_real_tokens"] = accuracy(model, norm.normalize(vz), vy)[0]
    save_safetensors(weights, model.state_dict())
    atomic_write_json(info_path, info)
    return model, norm, info


def main(argv=None) -> dict:
    cfg = parse_cli(ClassifyConfig, argv, default_config="configs/rae/classify_toy.yaml")
    out = Path(cfg.out_dir)
    pix, pinfo = pixel_classifier(cfg, out)
    classes = pinfo["classes"]
    result: dict = {"pixels": {k: v for k, v in pinfo.items() if k != "classes"}}
    log.info("pixel classifier: val accuracy %.3f (real images)%s", pinfo["val_accuracy_real"],
             f", {pinfo['val_accuracy_reconstructed']:.3f} (encoder reconstructions: the ceiling for samples)"
             if "val_accuracy_reconstructed" in pinfo else "")
    tok = None
    if cfg.latents:
        tok, norm, tinfo = token_classifier(cfg, out)
        result["tokens"] = {k: v for k, v in tinfo.items() if k != "classes"}
        if "val_accuracy_real_tokens" in tinfo:
            log.info("token classifier: val accuracy %.3f (tokens of real val images)", tinfo["val_accuracy_real_tokens"])
    if cfg.npz:
        npz = Path(cfg.npz)
        with np.load(npz) as f:
            imgs, labels = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(f["arr_1"])
        labels = labels.long()
        if imgs.shape[-1] != cfg.image_size:
            imgs = F.interpolate(imgs.float(), size=cfg.image_size, mode="bilinear", antialias=True)
            imgs = imgs.round().clamp(0, 255).to(torch.uint8)
        acc, per_class = accuracy(pix, imgs, labels)
        parts = factor_accuracy(predict(pix, imgs), labels, classes, list(cfg.factors))
        result["pixels"].update(sample_accuracy=acc, factor_accuracy=parts,
                                per_class={classes[c]: round(float(a), 3) for c, a in enumerate(per_class)})
        log.info("class accuracy of %d decoded samples (pixel classifier): %.3f (chance %.3f)%s", len(labels), acc,
                 1 / len(classes), "".join(f"; {k} right {v:.3f}" for k, v in parts.items()))
        tok_file = npz.with_name(npz.stem + "_tokens.safetensors")
        if tok is not None and tok_file.is_file():
            t = load_safetensors(tok_file)
            tz, tl = norm.normalize(t["tokens"].float()), t["labels"].long()
            tacc, _ = accuracy(tok, tz, tl)
            tparts = factor_accuracy(predict(tok, tz), tl, classes, list(cfg.factors))
            result["tokens"].update(sample_accuracy=tacc, factor_accuracy=tparts)
            log.info("class accuracy of %d generated token sets (token classifier): %.3f%s", len(tl), tacc,
                     "".join(f"; {k} right {v:.3f}" for k, v in tparts.items()))
        result.update(npz=str(npz), num_samples=len(labels), num_classes=len(classes))
        atomic_write_json(npz.with_name(npz.stem + "_class_accuracy.json"), result)
    return result


if __name__ == "__main__":
    main()
