"""Toy-world generation metrics with signal at toy scale (eval-all's ``toygen`` piece), beside Inception gFID.

* **toy FID**: the Fréchet distance between the generated samples and the real val class split in the pooled
  features of the pixel classifier that ``make rae-classacc`` trains on the toy world's own classes
  (:class:`rae_generation.classify.ToyClassifier`; one classifier for every row, so the rows share one feature
  space). Inception was trained on ImageNet photos; on 64 px flat toy shapes its features carry little class
  signal. Interval: the percentile bootstrap over samples of :func:`eval.fid_bootstrap.fid_interval`.
* **class accuracy**: that classifier's top-1 accuracy on the decoded samples (chance 1 / classes), with the
  Wilson interval (:func:`eval.intervals.wilson`).

Toy numbers check the pipeline; they are not paper numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval.fid import frechet_distance, gaussian_stats
from eval.fid_bootstrap import fid_interval
from eval.intervals import wilson
from ov3common.checkpoint import load_safetensors
from rae_generation.classify import ToyClassifier, embed, load_folder, predict


def load_classifier(folder: str | Path) -> tuple[ToyClassifier, list[str]]:
    """The pixel classifier of ``make rae-classacc`` (``pixels.safetensors`` + ``pixels.json``)."""
    folder = Path(folder)
    weights, info = folder / "pixels.safetensors", folder / "pixels.json"
    if not weights.is_file() or not info.is_file():
        raise FileNotFoundError(f"no pixel classifier in {folder} (make rae-classacc trains it)")
    classes = json.loads(info.read_text())["classes"]
    model = ToyClassifier(len(classes))
    model.load_state_dict(load_safetensors(weights))
    return model.eval(), classes


def read_samples(npz: str | Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images (resized to ``image_size``) and labels of an ADM npz (arr_0, arr_1)."""
    with np.load(npz) as f:
        imgs, labels = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(f["arr_1"])
    if imgs.shape[-1] != image_size:
        imgs = F.interpolate(imgs.float(), size=image_size, mode="bilinear", antialias=True)
        imgs = imgs.round().clamp(0, 255).to(torch.uint8)
    return imgs, labels.long()


def toy_metrics(classifier: str | Path, samples: str | Path, real: str | Path, image_size: int = 64,
                n_boot: int = 200, seed: int = 0) -> dict:
    """Toy FID and class accuracy of the samples npz against the real class-split folder, with 95% intervals."""
    model, classes = load_classifier(classifier)
    imgs, labels = read_samples(samples, image_size)
    vx, _, real_classes = load_folder(str(real), image_size)
    if list(real_classes) != list(classes):
        raise ValueError(f"{real}: classes differ from the classifier's ({len(real_classes)} vs {len(classes)})")
    f, r = embed(model, imgs), embed(model, vx)
    mu_r, sigma_r = gaussian_stats(r)
    mu, sigma = gaussian_stats(f)
    point = frechet_distance(mu, sigma, mu_r, sigma_r, features1=f)
    hits = int((predict(model, imgs) == labels).sum())
    return {"toy_fid": point, "toy_fid_interval": fid_interval(f, mu_r, sigma_r, n_boot=n_boot, seed=seed,
                                                                 point=point),
            "class_acc": hits / len(labels), "class_acc_interval": wilson(hits, len(labels)).to_dict(),
            "n": len(labels), "num_real": len(r), "num_classes": len(classes), "samples": str(samples),
            "classifier": str(classifier), "features": f"ToyClassifier.embed ({f.shape[1]}-d)"}
