"""A small toy classifier that measures the class accuracy of generated samples (``make rae-classacc``).

Trained on the real images of the class split (pixels, independent of the encoder), it reports three numbers:
accuracy on real val images (the classifier's own quality), on the encoder's reconstructions of the val images
(the ceiling for samples decoded by that encoder) and on the samples of an ADM npz. Toy numbers check the pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ov3common.checkpoint import atomic_write_json, load_safetensors, save_safetensors
from ov3common.config import parse_cli, path_field
from ov3common.log import get_logger, progress
from rae_generation.data import ImageFolderSource, collate_images

log = get_logger("rae.classify")


@dataclass
class ClassifyConfig:
    train: str = path_field("data/toy/classes/train", "dir")
    val: str = path_field("data/toy/classes/val", "dir")
    encoder: str = path_field("", "dir")  # set: also report the accuracy on reconstructions of val
    npz: str = path_field("", "file")  # set: report the accuracy of these samples (arr_0 / arr_1)
    out: str = "runs/toy/rae/classifier"
    image_size: int = 64
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    retrain: bool = False


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

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        return self.head(torch.cat([f.amax((2, 3)), f.mean((2, 3))], dim=1))


def load_folder(root: str, image_size: int) -> tuple[Tensor, Tensor, list[str]]:
    """All decodable images of an ImageFolder as uint8 ``[N, 3, H, W]`` and their labels."""
    src = ImageFolderSource(root, image_size)
    imgs, labels = [], []
    for b in DataLoader(src, batch_size=256, collate_fn=collate_images):
        imgs.append(((b["images"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels.append(b["labels"])
    return torch.cat(imgs), torch.cat(labels), src.classes


def _float(x: Tensor) -> Tensor:
    return x.float() / 127.5 - 1


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 256) -> tuple[float, Tensor]:
    """Top-1 accuracy and per-class accuracy of ``images`` (uint8 NCHW or float in [-1, 1])."""
    model.eval()
    preds = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        preds.append(model(_float(x) if x.dtype == torch.uint8 else x.float()).argmax(1))
    pred = torch.cat(preds)
    correct = (pred == labels).float()
    n = int(labels.max()) + 1 if len(labels) else 0
    per_class = torch.zeros(n).index_add_(0, labels, correct) / torch.bincount(labels, minlength=n).clamp_min(1)
    return float(correct.mean()), per_class


def train_classifier(cfg) -> tuple[ToyClassifier, list[str]]:
    torch.manual_seed(cfg.seed)
    x, y, classes = load_folder(cfg.train, cfg.image_size)
    model = ToyClassifier(len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    steps = cfg.epochs * (len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(steps, 1), pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = progress(total=steps, desc="toy classifier")
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - cfg.batch_size + 1, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb = _float(x[idx])
            flip = torch.rand(len(idx), generator=g) < 0.5  # every toy shape is left-right symmetric
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model, classes


def main(argv=None) -> dict:
    cfg = parse_cli(ClassifyConfig, argv, default_config="configs/rae/classify_toy.yaml")
    out = Path(cfg.out)
    weights, info_path = out / "model.safetensors", out / "classifier.json"
    if weights.is_file() and info_path.is_file() and not cfg.retrain:
        info = json.loads(info_path.read_text())
        model = ToyClassifier(len(info["classes"]))
        model.load_state_dict(load_safetensors(weights))
        classes = info["classes"]
    else:
        model, classes = train_classifier(cfg)
        vx, vy, _ = load_folder(cfg.val, cfg.image_size)
        info = {"classes": classes, "val_accuracy_real": accuracy(model, vx, vy)[0], "epochs": cfg.epochs}
        if cfg.encoder:
            from encoder.export import load_encoder

            enc = load_encoder(cfg.encoder)
            recon = torch.cat([enc.decode(enc.encode(_float(vx[i:i + 128]))[0]) for i in range(0, len(vx), 128)])
            info["val_accuracy_reconstructed"] = accuracy(model, recon, vy)[0]
            info["encoder"] = str(Path(cfg.encoder).resolve())
        save_safetensors(weights, model.state_dict())
        atomic_write_json(info_path, info)
    log.info("classifier: val accuracy %.3f (real)%s", info["val_accuracy_real"],
             f", {info['val_accuracy_reconstructed']:.3f} (encoder reconstructions)"
             if "val_accuracy_reconstructed" in info else "")
    result = dict(info)
    if cfg.npz:
        with np.load(cfg.npz) as f:
            imgs, labels = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(f["arr_1"])
        if imgs.shape[-1] != cfg.image_size:
            imgs = F.interpolate(imgs.float(), size=cfg.image_size, mode="bilinear", antialias=True)
            imgs = imgs.round().clamp(0, 255).to(torch.uint8)
        acc, per_class = accuracy(model, imgs, labels.long())
        result.update({"npz": str(cfg.npz), "sample_accuracy": acc, "num_samples": len(labels),
                       "per_class": {classes[c]: round(float(a), 3) for c, a in enumerate(per_class)}})
        atomic_write_json(Path(cfg.npz).with_name(Path(cfg.npz).stem + "_class_accuracy.json"), result)
        log.info("class accuracy of %d samples: %.3f (chance %.3f)", len(labels), acc, 1 / len(classes))
    return result


if __name__ == "__main__":
    main()
