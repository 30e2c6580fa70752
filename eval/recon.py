"""Reconstruction metrics: PSNR and SSIM (scikit-image) and LPIPS (the ``lpips`` package).

All functions take image tensors ``[B, 3, H, W]`` in [-1, 1] (the project's convention) and return per-image
values; :class:`ReconMetrics` accumulates them over batches and reports means.

* PSNR: ``skimage.metrics.peak_signal_noise_ratio`` on [0, 1] (data_range 1); identical images (infinite PSNR)
  are capped at ``PSNR_CAP`` dB so means stay finite.
* SSIM: ``skimage.metrics.structural_similarity`` on [0, 1], RGB (channel_axis), with the Gaussian window of
  Wang et al. 2004 (``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``).
* LPIPS: on [-1, 1] through ``encoder.losses.LPIPSLoss`` (the project's one LPIPS loader: torchvision backbone
  weights from a local file or ``$TORCH_HOME/hub/checkpoints``). Without local backbone weights it runs with a
  random backbone and every output says so (:data:`RANDOM_LABEL`): such a number is not a perceptual score.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

PSNR_CAP = 100.0
RANDOM_LABEL = "random backbone: not a real perceptual score"


def _unit_nhwc(x: torch.Tensor) -> np.ndarray:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W]; got {tuple(x.shape)}")
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy().astype(np.float64)


def _pairs(ref: torch.Tensor, rec: torch.Tensor):
    if ref.shape != rec.shape:
        raise ValueError(f"reference {tuple(ref.shape)} and reconstruction {tuple(rec.shape)} differ in shape")
    return zip(_unit_nhwc(ref), _unit_nhwc(rec))


def psnr(ref: torch.Tensor, rec: torch.Tensor) -> np.ndarray:
    """Per-image PSNR (dB) on [0, 1], capped at PSNR_CAP."""
    vals = []
    for a, b in _pairs(ref, rec):
        if np.array_equal(a, b):
            vals.append(PSNR_CAP)
        else:
            vals.append(min(PSNR_CAP, float(peak_signal_noise_ratio(a, b, data_range=1.0))))
    return np.asarray(vals)


def ssim(ref: torch.Tensor, rec: torch.Tensor) -> np.ndarray:
    """Per-image SSIM on [0, 1] with an 11x11 Gaussian window (sigma 1.5)."""
    vals = []
    for a, b in _pairs(ref, rec):
        if min(a.shape[:2]) < 11:
            raise ValueError(f"SSIM needs images of at least 11x11 pixels; got {a.shape[:2]}")
        vals.append(structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False))
    return np.asarray(vals, dtype=np.float64)


class LPIPSMetric:
    """Per-image LPIPS; ``backbone`` 'auto' (pretrained if the local weights exist, else random), 'pretrained'
    (error if missing) or 'random'. ``label`` says which was used."""

    def __init__(self, net: str = "alex", backbone: str = "auto", backbone_path: str = "",
                 device: str | torch.device = "cpu"):
        from encoder.losses import LPIPSLoss, find_lpips_backbone

        if backbone not in ("auto", "pretrained", "random"):
            raise ValueError(f"lpips backbone: {backbone!r} (auto | pretrained | random)")
        found = find_lpips_backbone(net, backbone_path) if backbone != "random" else None
        use = "pretrained" if (backbone == "pretrained" or found is not None) else "random"
        self.loss = LPIPSLoss(net=net, backbone=use, backbone_path=backbone_path).to(device)
        self.device = torch.device(device)
        self.random_backbone = use == "random"
        self.label = RANDOM_LABEL if self.random_backbone else f"lpips v0.1 {net} (torchvision weights: {found})"

    @torch.no_grad()
    def __call__(self, ref: torch.Tensor, rec: torch.Tensor) -> np.ndarray:
        if ref.shape != rec.shape:
            raise ValueError(f"reference {tuple(ref.shape)} and reconstruction {tuple(rec.shape)} differ in shape")
        d = self.loss.model(ref.to(self.device).float(), rec.to(self.device).float(), normalize=False)
        return d.flatten().double().cpu().numpy()


class ReconMetrics:
    """Accumulates PSNR / SSIM / LPIPS over batches; :meth:`result` gives means and the LPIPS label."""

    def __init__(self, lpips: LPIPSMetric | None = None):
        self.lpips = lpips
        self.values: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}

    def update(self, ref: torch.Tensor, rec: torch.Tensor) -> None:
        self.values["psnr"].append(psnr(ref, rec))
        self.values["ssim"].append(ssim(ref, rec))
        if self.lpips is not None:
            self.values["lpips"].append(self.lpips(ref, rec))

    def result(self) -> dict:
        out: dict = {"n": int(sum(len(v) for v in self.values["psnr"]))}
        for k, v in self.values.items():
            out[k] = float(np.concatenate(v).mean()) if v else None
        if self.lpips is None:
            out["lpips_note"] = "LPIPS not computed"
        else:
            out["lpips_note"] = self.lpips.label
            out["lpips_random_backbone"] = self.lpips.random_backbone
        return out
