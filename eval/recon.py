"""Reconstruction metrics in torch over batches: PSNR, SSIM, LPIPS (the ``lpips`` package).

All functions take image tensors ``[B, 3, H, W]`` in [-1, 1] (the project's convention) on any device and return
per-image values (numpy float64); :class:`ReconMetrics` accumulates them over batches and reports means (+ 95%
bootstrap intervals over images).

* PSNR: on [0, 1] (data range 1), per image over all pixels and channels, float64; identical images (infinite PSNR)
  are capped at ``PSNR_CAP`` dB so means stay finite. Equal to ``skimage.metrics.peak_signal_noise_ratio``.
* SSIM: on [0, 1] (**data range 1**), per channel then averaged over RGB, with scikit-image's algorithm
  (``structural_similarity``) exactly: the filtered means / variances / covariance, K1 = 0.01, K2 = 0.03, the border
  of the filter's radius cropped before the mean. Windows:
    - ``gaussian`` (default, what reports show): Wang et al. 2004 — an 11x11 Gaussian, sigma 1.5 (scipy's radius
      int(3.5 * 1.5 + 0.5) = 5), population covariance; = ``structural_similarity(a, b, data_range=1,
      channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``;
    - ``uniform``: scikit-image's default window — 7x7 uniform, sample covariance (N / (N - 1)); =
      ``structural_similarity(a, b, data_range=1, channel_axis=-1)``.
  Both are tested against scikit-image within 1e-5 (float32: up to ~7e-6 on photos; float64: ~1e-14; the cropped
  border never sees padding, so only 'valid' convolutions are needed). Images must be at least the window's size.
  The window is applied separably (a column pass, then a row pass) to the five maps of all channels at once, as one
  channels_last depthwise convolution.
* LPIPS: on [-1, 1] through ``encoder.losses.LPIPSLoss`` (the project's one LPIPS loader: torchvision backbone
  weights from a local file or ``$TORCH_HOME/hub/checkpoints``). Without local backbone weights it runs with a
  random backbone and every output says so (:data:`RANDOM_LABEL`): such a number is not a perceptual score.
  :class:`LPIPSMetric` runs the package's network and formula faster (see there), within 1e-6 of its forward.

PSNR and SSIM run over chunks of ``CHUNK_PIXELS`` (4 images at 256 px) so that their elementwise passes stay in the
CPU's caches; the values do not depend on the batch or the chunk (tested). ``psnr_skimage`` / ``ssim_skimage`` are
the per-image scikit-image references and :meth:`LPIPSMetric.package` the lpips package's forward (tests and
``eval.bench_fid``'s "before" pipeline).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from encoder.losses import LPIPSLoss, find_lpips_backbone
from eval.fused import fuse_sequential
from eval.intervals import mean_interval

PSNR_CAP = 100.0
RANDOM_LABEL = "random backbone: not a real perceptual score"
SSIM_K1, SSIM_K2 = 0.01, 0.03
LPIPS_EPS = 1e-10  # lpips.normalize_tensor's
GAUSS_SIGMA, GAUSS_TRUNCATE = 1.5, 3.5
SSIM_WINDOWS = ("gaussian", "uniform")
CHUNK_PIXELS = 4 * 256 * 256


def _unit(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W]; got {tuple(x.shape)}")
    return (x.detach().to(dtype).clamp(-1, 1) + 1) / 2


def _check_pair(ref: torch.Tensor, rec: torch.Tensor) -> None:
    if ref.shape != rec.shape:
        raise ValueError(f"reference {tuple(ref.shape)} and reconstruction {tuple(rec.shape)} differ in shape")


def _chunk(x: torch.Tensor) -> int:
    """Images per chunk of CHUNK_PIXELS: per-image metrics run chunk by chunk, so that their many elementwise passes
    stay in the CPU's caches (about 3x faster than whole batches at 256 px; the values do not depend on it)."""
    return max(1, CHUNK_PIXELS // (x.shape[-2] * x.shape[-1]))


@torch.no_grad()
def psnr(ref: torch.Tensor, rec: torch.Tensor) -> np.ndarray:
    """Per-image PSNR (dB) on [0, 1], capped at PSNR_CAP. The squared error in float64: a float32 image in [-1, 1]
    is exact in float64, and so is (a - b) / 2 = the difference on [0, 1]."""
    _check_pair(ref, rec)
    if ref.ndim != 4 or ref.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W]; got {tuple(ref.shape)}")
    rec = rec.to(ref.device)
    mse = torch.cat([torch.linalg.vector_norm((a.detach().clamp(-1, 1).double() - b.detach().clamp(-1, 1).double())
                                              .flatten(1), dim=1).square()
                     for a, b in zip(ref.split(_chunk(ref)), rec.split(_chunk(ref)))]) / (4 * ref[0].numel())
    val = 10 * torch.log10(1.0 / mse.clamp(min=1e-300))
    return torch.where(mse == 0, torch.full_like(val, PSNR_CAP), val.clamp(max=PSNR_CAP)).cpu().numpy()


@functools.lru_cache(maxsize=8)
def _window_1d(window: str) -> tuple[torch.Tensor, float]:
    """(1-D window weights, covariance normalisation) as scikit-image builds them."""
    if window == "gaussian":
        r = int(GAUSS_TRUNCATE * GAUSS_SIGMA + 0.5)  # scipy.ndimage's radius
        x = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (x / GAUSS_SIGMA) ** 2)
        return k / k.sum(), 1.0
    if window == "uniform":
        n = 7
        return torch.full((n,), 1.0 / n, dtype=torch.float64), n * n / (n * n - 1)
    raise ValueError(f"ssim window: one of {SSIM_WINDOWS}, got {window!r}")


@torch.no_grad()
def ssim(ref: torch.Tensor, rec: torch.Tensor, window: str = "gaussian",
         dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Per-image SSIM on [0, 1] (data range 1), RGB channels averaged (see the module docstring). float32 (default,
    up to ~7e-6 from scikit-image on photos) or float64 (1e-14, slower: no oneDNN float64 convolution)."""
    _check_pair(ref, rec)
    size = len(_window_1d(window)[0])
    if min(ref.shape[-2:]) < size:
        raise ValueError(f"SSIM ({window} window) needs images of at least {size}x{size} pixels; "
                         f"got {tuple(ref.shape[-2:])}")
    rec = rec.to(ref.device)
    return np.concatenate([_ssim_chunk(a, b, window, dtype) for a, b in zip(ref.split(_chunk(ref)),
                                                                               rec.split(_chunk(ref)))])


def _ssim_chunk(ref: torch.Tensor, rec: torch.Tensor, window: str, dtype: torch.dtype) -> np.ndarray:
    k, cov_norm = _window_1d(window)
    size = len(k)
    # centred on each image-channel's mean (SSIM's variances do not depend on it; the means get it back): float32
    # then loses no precision to the cancellation in E[x^2] - E[x]^2 that C2 = 9e-4 would amplify
    x, y = _unit(ref, dtype), _unit(rec, dtype)
    cx, cy = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)
    b, c, h, w = x.shape
    # the five maps of each channel as 5C channels of one channels_last tensor (oneDNN's depthwise convolution is
    # ~2x faster on it than on NCHW); the window is separable: a column pass, then a row pass
    stack = torch.empty(b, h, w, 5 * c, dtype=dtype, device=x.device).permute(0, 3, 1, 2)
    xc, yc = torch.sub(x, cx, out=stack[:, :c]), torch.sub(y, cy, out=stack[:, c:2 * c])
    torch.mul(xc, xc, out=stack[:, 2 * c:3 * c])
    torch.mul(yc, yc, out=stack[:, 3 * c:4 * c])
    torch.mul(xc, yc, out=stack[:, 4 * c:])
    k = k.to(stack.device, dtype)
    groups = 5 * c
    f = F.conv2d(stack, k.view(1, 1, size, 1).expand(groups, 1, size, 1), groups=groups)
    f = F.conv2d(f, k.view(1, 1, 1, size).expand(groups, 1, 1, size), groups=groups)
    mx, my, sxx, syy, sxy = f.split(c, dim=1)
    num = (sxy - mx * my).mul_(2 * cov_norm).add_(SSIM_K2 ** 2)  # 2 cov(x, y) + C2
    den = (sxx + syy).sub_(mx.square()).sub_(my.square()).mul_(cov_norm).add_(SSIM_K2 ** 2)  # var x + var y + C2
    mx, my = mx + cx, my + cy
    num.mul_((mx * my).mul_(2).add_(SSIM_K1 ** 2))
    den.mul_(mx.square_().add_(my.square_()).add_(SSIM_K1 ** 2))
    return num.div_(den).double().mean(dim=(1, 2, 3)).cpu().numpy()


# ---------------------------------------------------------------------------------------------------- references
def _unit_nhwc(x: torch.Tensor) -> np.ndarray:
    return _unit(x).permute(0, 2, 3, 1).cpu().numpy()


def psnr_skimage(ref: torch.Tensor, rec: torch.Tensor) -> np.ndarray:
    """Per-image ``skimage.metrics.peak_signal_noise_ratio`` (data range 1), capped like :func:`psnr`."""

    _check_pair(ref, rec)
    out = []
    for a, b in zip(_unit_nhwc(ref), _unit_nhwc(rec)):
        out.append(PSNR_CAP if np.array_equal(a, b) else min(PSNR_CAP, float(peak_signal_noise_ratio(a, b,
                                                                                                    data_range=1.0))))
    return np.asarray(out)


def ssim_skimage(ref: torch.Tensor, rec: torch.Tensor, window: str = "gaussian") -> np.ndarray:
    """Per-image ``skimage.metrics.structural_similarity`` with the settings :func:`ssim` reproduces."""

    _check_pair(ref, rec)
    kw = (dict(gaussian_weights=True, sigma=GAUSS_SIGMA, use_sample_covariance=False) if window == "gaussian"
          else {})
    return np.asarray([structural_similarity(a, b, data_range=1.0, channel_axis=-1, **kw)
                       for a, b in zip(_unit_nhwc(ref), _unit_nhwc(rec))], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------- LPIPS
class LPIPSMetric:
    """Per-image LPIPS; ``backbone`` 'auto' (pretrained if the local weights exist, else random), 'pretrained'
    (error if missing) or 'random'. ``label`` says which was used.

    Calling it runs the lpips package's network and formula (scaling layer, trunk slices, unit-normalised features,
    squared differences weighted by the ``lin`` layers, spatial means, summed over layers) with its weights, faster:
    both images of each pair in one trunk pass, channels_last, each convolution + ReLU as one oneDNN primitive
    (:class:`eval.fused.ConvReLU`) and each ``lin`` 1x1 convolution as a matrix-vector product. Within ~1e-6 of
    the package's own forward, the same at any batch size (tested); :meth:`package` is that forward as is (the
    reference)."""

    def __init__(self, net: str = "alex", backbone: str = "auto", backbone_path: str = "",
                 device: str | torch.device = "cpu"):

        if backbone not in ("auto", "pretrained", "random"):
            raise ValueError(f"lpips backbone: {backbone!r} (auto | pretrained | random)")
        found = find_lpips_backbone(net, backbone_path) if backbone != "random" else None
        use = "pretrained" if (backbone == "pretrained" or found is not None) else "random"
        self.loss = LPIPSLoss(net=net, backbone=use, backbone_path=backbone_path).to(device)
        self.device = torch.device(device)
        self.random_backbone = use == "random"
        self.label = RANDOM_LABEL if self.random_backbone else f"lpips v0.1 {net} (torchvision weights: {found})"
        model = self.loss.model
        self._slices = [fuse_sequential(getattr(model.net, f"slice{i}")).to(self.device).eval()
                        for i in range(1, model.net.N_slices + 1)]
        self._lins = [lin.model[-1].weight.detach().reshape(-1) for lin in model.lins]  # [C] per layer

    @torch.no_grad()
    def __call__(self, ref: torch.Tensor, rec: torch.Tensor) -> np.ndarray:
        _check_pair(ref, rec)
        n = len(ref)
        x = torch.cat([ref.to(self.device), rec.to(self.device)]).float()
        h = self.loss.model.scaling_layer(x).contiguous(memory_format=torch.channels_last)
        total = torch.zeros(n, device=self.device)
        for layer, w in zip(self._slices, self._lins):
            h = layer(h)
            # the package's normalize, x / (|x| + eps), as a product with the per-pixel reciprocal (no division per
            # element)
            unit = h * torch.linalg.vector_norm(h, dim=1, keepdim=True).add_(LPIPS_EPS).reciprocal_()
            d = (unit[:n] - unit[n:]).square_()
            # lin (1x1, no bias) as a matrix-vector product per image (a batched one is not batch-independent)
            total += torch.stack([(di.permute(1, 2, 0) @ w).mean() for di in d])
        return total.double().cpu().numpy()

    @torch.no_grad()
    def package(self, ref: torch.Tensor, rec: torch.Tensor) -> np.ndarray:
        """The lpips package's forward as is (the reference :meth:`__call__` is tested against)."""
        _check_pair(ref, rec)
        d = self.loss.model(ref.to(self.device).float(), rec.to(self.device).float(), normalize=False)
        return d.flatten().double().cpu().numpy()


class ReconMetrics:
    """Accumulates per-image PSNR / SSIM / LPIPS over batches; :meth:`result` gives means, 95% bootstrap intervals
    of the means over images, and the LPIPS label. ``reference=True`` uses the per-image scikit-image functions and
    the lpips package's forward as is (the slow path, kept to measure against)."""

    def __init__(self, lpips: LPIPSMetric | None = None, ssim_window: str = "gaussian", reference: bool = False):
        self.lpips, self.ssim_window, self.reference = lpips, ssim_window, reference
        self.values: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}

    def update(self, ref: torch.Tensor, rec: torch.Tensor) -> None:
        p, s = (psnr_skimage, ssim_skimage) if self.reference else (psnr, ssim)
        self.values["psnr"].append(p(ref, rec))
        self.values["ssim"].append(s(ref, rec, self.ssim_window))
        if self.lpips is not None:
            self.values["lpips"].append(self.lpips.package(ref, rec) if self.reference else self.lpips(ref, rec))

    def per_image(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.values.items() if v}

    def result(self, n_boot: int = 1000, seed: int = 0) -> dict:
        out: dict = {"n": int(sum(len(v) for v in self.values["psnr"])), "intervals": {},
                     "ssim_window": self.ssim_window, "ssim_data_range": 1.0}
        for k, v in self.values.items():
            vals = np.concatenate(v) if v else None
            out[k] = float(vals.mean()) if vals is not None else None
            if vals is not None and len(vals) and math.isfinite(out[k]):
                out["intervals"][k] = mean_interval(vals, n_boot=n_boot, seed=seed).to_dict()
        if self.lpips is None:
            out["lpips_note"] = "LPIPS not computed"
        else:
            out["lpips_note"] = self.lpips.label
            out["lpips_random_backbone"] = self.lpips.random_backbone
        return out
