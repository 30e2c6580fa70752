"""Losses of the two branches: contrastive + captioning (understanding), pixel L1 + latent L1 + LPIPS
(reconstruction). Every loss is normalised so that the mean over ranks equals the single-process value for the
same global batch (DDP averages gradients over ranks)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import lpips
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ov3common.dist import all_gather_with_grad, get_rank, get_world_size, step_seed

IGNORE = -100
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 100.0


class LogitScale(nn.Module):
    """Learnable temperature: ``exp(s)`` with ``s`` initialised at ln(1/0.07), clamped at 100."""

    def __init__(self, init: float = LOGIT_SCALE_INIT, max_scale: float = LOGIT_SCALE_MAX):
        super().__init__()
        self.value = nn.Parameter(torch.full((1,), float(init)))  # 1-D: FSDP2 cannot shard 0-d parameters
        self.max_scale = max_scale

    def forward(self) -> Tensor:
        return self.value.exp().clamp(max=self.max_scale)[0]


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """All-gather rows of ``x`` from every rank with gradients, allowing different row counts per rank (bad
    samples are dropped locally). Returns (rows of all ranks in rank order, offset of this rank's rows)."""

    world = get_world_size()
    if world == 1:
        return x, 0

    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts_i = [int(c) for c in counts]
    m = max(counts_i)
    padded = torch.cat([x, x.new_zeros(m - x.shape[0], *x.shape[1:])]) if m > x.shape[0] else x
    allx = all_gather_with_grad(padded)
    keep = torch.cat([torch.arange(c, device=x.device) + r * m for r, c in enumerate(counts_i)])
    return allx[keep], sum(counts_i[: get_rank()])


def global_mean(values: Tensor, n_global: Tensor | int, world_size: int = 1) -> Tensor:
    """``sum(local values) · W / N_global``: its mean over ranks (what DDP's gradient averaging optimises) is the
    mean over the global batch, whatever the local counts."""
    return values.sum() * world_size / max(float(n_global), 1.0)


def contrastive_rows(img: Tensor, txt: Tensor, scale: Tensor, distributed: bool = False) -> Tensor:
    """Symmetric InfoNCE per local row, ``(CE_i2t + CE_t2i) / 2``, against the features of every rank."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    if distributed:
        all_img, off = gather_rows(img)
        all_txt, _ = gather_rows(txt)
    else:
        all_img, all_txt, off = img, txt, 0
    labels = torch.arange(img.shape[0], device=img.device) + off
    i2t = F.cross_entropy(scale * img @ all_txt.t(), labels, reduction="none")
    t2i = F.cross_entropy(scale * txt @ all_img.t(), labels, reduction="none")
    return 0.5 * (i2t + t2i)


def caption_targets(ids: Tensor, pad_id: int) -> Tensor:
    """Targets for ``TextDecoder`` logits: ``ids[:, 1:]`` with padding → ignore index."""
    tgt = ids[:, 1:].clone()
    tgt[tgt == pad_id] = IGNORE
    return tgt


def caption_token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of every valid (non-ignored) target token, flattened."""
    flat_t = targets.flatten()
    ce = F.cross_entropy(logits.float().flatten(0, 1), flat_t, ignore_index=IGNORE, reduction="none")
    return ce[flat_t != IGNORE]


# ----------------------------------------------------------------------------- LPIPS
TV_WEIGHT_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def _torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))


def find_lpips_backbone(net: str, path: str = "") -> Path | None:
    """Local torchvision backbone weights for LPIPS: ``path`` (file) or ``$TORCH_HOME/hub/checkpoints``."""
    if path:
        return Path(path) if Path(path).is_file() else None
    cand = _torch_home() / "hub" / "checkpoints" / TV_WEIGHT_FILES[net]
    return cand if cand.is_file() else None


class LPIPSLoss(nn.Module):
    """LPIPS from the ``lpips`` package, frozen. ``backbone='pretrained'`` needs the torchvision weights locally
    (a configured file or TORCH_HOME); ``'random'`` uses a random backbone: NOT a real perceptual loss."""

    def __init__(self, net: str = "vgg", backbone: str = "pretrained", backbone_path: str = "",
                 logger: logging.Logger | None = None):
        super().__init__()

        if net not in TV_WEIGHT_FILES:
            raise ValueError(f"loss.lpips_net: {net!r} not in {sorted(TV_WEIGHT_FILES)}")
        log = logger or logging.getLogger(__name__)
        if backbone == "pretrained":
            wpath = find_lpips_backbone(net, backbone_path)
            if wpath is None:
                where = backbone_path or str(_torch_home() / "hub" / "checkpoints" / TV_WEIGHT_FILES[net])
                raise FileNotFoundError(
                    f"LPIPS backbone weights not found: {where}. Put torchvision's {TV_WEIGHT_FILES[net]} there "
                    f"(or set loss.lpips_backbone_path=FILE / TORCH_HOME), or set loss.w_lpips=0 to disable LPIPS, "
                    f"or loss.lpips_backbone=random (a random backbone: NOT a real perceptual loss).")
        elif backbone != "random":
            raise ValueError(f"loss.lpips_backbone: {backbone!r} (pretrained | random)")
        self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        self.real = backbone == "pretrained"
        if self.real:
            tv_sd = torch.load(str(wpath), map_location="cpu", weights_only=True)  # torchvision .pth format
            own = self.model.net.state_dict()
            mapped = {k: tv_sd[f"features.{k.split('.', 1)[1]}"] for k in own}
            self.model.net.load_state_dict(mapped, strict=True)
        else:
            log.warning("LPIPS uses a RANDOM %s backbone: the 'lpips' loss is NOT a real perceptual loss", net)
        self.model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPSLoss:
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample LPIPS ``[B]`` between images in [-1, 1]."""
        return self.model(x.float(), y.float(), normalize=False).flatten()


def reconstruction_rows(pred_latents: Tensor, latents: Tensor, pred_images: Tensor | None,
                        images: Tensor | None, lpips_fn: LPIPSLoss | None) -> dict[str, Tensor]:
    """Per-sample latent L1, pixel L1 and LPIPS (absent terms left out)."""
    out = {"latent_l1": (pred_latents.float() - latents.float()).abs().flatten(1).mean(1)}
    if pred_images is not None:
        out["pixel_l1"] = (pred_images.float() - images.float()).abs().flatten(1).mean(1)
        if lpips_fn is not None:
            out["lpips"] = lpips_fn(pred_images, images)
    return out


def token_noise(index: Tensor, tokens: Tensor, step: int, seed: int, tau: float) -> Tensor:
    """σ·ε with σ ~ U[0, τ], ε ~ N(0, I) per sample, from a generator keyed by (seed, step, sample index): the
    same whatever the number of ranks. Shared by the joint trainer and the decoder-only trainer."""
    g = torch.Generator(device=tokens.device)
    out = []
    for i in index.tolist():
        g.manual_seed(step_seed(seed, step, -1 - i))  # negative "rank" slot = the sample id
        sigma = torch.rand((), generator=g, device=tokens.device) * tau
        out.append(sigma * torch.randn(tokens.shape[1:], generator=g, device=tokens.device))
    return torch.stack(out).to(tokens.dtype)
