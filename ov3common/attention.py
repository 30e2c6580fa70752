"""Scaled dot-product attention for every model here: one function, the fastest kernel measured per case.

``attention(q, k, v)`` is ``softmax(q kᵀ / √d + mask) v`` on ``[B, H, N, D]``, exactly what
``F.scaled_dot_product_attention`` computes, and it calls SDPA (flash / memory-efficient kernels on GPU, the CPU
flash kernel in fp32 and without autograd). One case goes another way: on the **CPU in bf16/fp16 with autograd**,
the CPU flash kernel's backward is 4× slower than two batched matmuls and a softmax (8.9 vs 2.0 ms for
``[8, 6, 64, 64]``, 34 vs 16 ms for DiT-DH's ``[2, 16, 256, 128]`` head, one thread; ``encoder.bench`` measures
the step), so that case runs the explicit formula (the softmax in the input dtype, like SDPA's math kernel without
its upcast). Masks follow SDPA: a bool mask is True where attention is allowed, a float mask is added to the
scores.

``impl="flash"`` (``model.attn: flash`` in the encoder and RAE configs, set on a built model by
:func:`set_attention_impl`) calls flash-attn's ``flash_attn_func`` where it applies: CUDA, bf16/fp16, no mask
(the ViT, the ViT decoder, DiT-DH, a causal text decoder without padding). A call with a mask, in fp32 or on the CPU
runs SDPA as above. Asking for flash where flash-attn does not import is a config error naming the key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ov3common.config import ConfigError

__all__ = ["ATTN_IMPLS", "FLASH_INSTALL", "attention", "check_attn_impl", "require_flash", "set_attention_impl",
           "uses_explicit_path"]

ATTN_IMPLS = ("sdpa", "flash")
FLASH_INSTALL = "pip install flash-attn --no-build-isolation (or the project's extra: pip install -e '.[gpu]')"


def require_flash(key: str, name: str = "flash") -> None:
    """A :class:`ConfigError` naming ``key`` unless flash-attn imports here."""
    try:
        import flash_attn  # noqa: F401  (optional extra)
    except ImportError as e:
        raise ConfigError(f"{key}: {name} needs flash-attn, which does not import here ({e}); {FLASH_INSTALL}; "
                          "or use sdpa") from e


def check_attn_impl(impl: str, key: str = "model.attn") -> None:
    """``sdpa`` always; ``flash`` only where flash-attn imports (a :class:`ConfigError` naming ``key`` otherwise)."""
    if impl not in ATTN_IMPLS:
        raise ConfigError(f"{key}: {impl!r} is not one of {ATTN_IMPLS}")
    if impl == "flash":
        require_flash(key)


def set_attention_impl(model: torch.nn.Module, impl: str, key: str = "model.attn") -> int:
    """Set the kernel of every attention module of ``model`` (those with an ``attn_impl``); returns how many."""
    check_attn_impl(impl, key)
    n = 0
    for m in model.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl, n = impl, n + 1
    return n


def _flash(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
    from flash_attn import flash_attn_func  # [B, N, H, D] in, [B, N, H, D] out

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal).transpose(1, 2)


def uses_explicit_path(q: Tensor) -> bool:
    """True where :func:`attention` takes the explicit matmul-softmax path (CPU, 16-bit, autograd on)."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled() and (
        q.requires_grad)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
              impl: str = "sdpa") -> Tensor:
    """``[B, H, N, D]`` attention; see the module docstring for which kernel runs."""
    if impl == "flash" and attn_mask is None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return _flash(q, k, v, is_causal)
    if not uses_explicit_path(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        n, m = scores.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril_()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return torch.matmul(scores.softmax(-1), v)
