"""The vision→language projector with LLaVA's layout and parameter names.

``mlp2x_gelu`` = ``Sequential(Linear(d_vis, d_llm), GELU(), Linear(d_llm, d_llm))`` → keys ``0.*`` and ``2.*``;
``linear`` = ``Linear(d_vis, d_llm)`` (LLaVA-1.0). It lives at ``model.mm_projector`` inside the LLM, so the
saved keys are ``model.mm_projector.0.weight`` etc., exactly as in LLaVA checkpoints.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ov3common.checkpoint import load_safetensors, save_safetensors

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "mlpNx_gelu")
PREFIX = "model.mm_projector."
FILENAME = "mm_projector.safetensors"


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """``linear`` | ``mlp{N}x_gelu`` (N Linear layers with GELU between, LLaVA's regex)."""
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown mm_projector_type {projector_type!r}: use 'linear' or 'mlp2x_gelu'")
    layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(1, int(m.group(1))):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)


def projector_state(projector: nn.Module) -> dict[str, torch.Tensor]:
    """The projector's tensors under LLaVA's key names (``model.mm_projector.*``), on CPU."""
    return {PREFIX + k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}


def save_projector(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write ``state`` (keys ``model.mm_projector.*``) as safetensors (atomic)."""
    bad = [k for k in state if not k.startswith(PREFIX)]
    if bad:
        raise KeyError(f"projector keys must start with {PREFIX!r}: {bad[:3]}")
    save_safetensors(path, state, {k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def load_projector_state(path: str | os.PathLike, projector: nn.Module) -> None:
    """Load a projector file into ``projector``; a key or shape mismatch raises naming the file and the shapes."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"projector file does not exist: {path}")
    sd = load_safetensors(path)
    sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()}
    own = projector.state_dict()
    if set(sd) != set(own):
        raise KeyError(f"{path}: projector keys {sorted(sd)} do not match the model's {sorted(own)} "
                       "(mm_projector_type differs?)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: {PREFIX}{k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)} (check mm_hidden_size = the tower's width and the LLM's "
                             "hidden_size)")
    projector.load_state_dict(sd)
