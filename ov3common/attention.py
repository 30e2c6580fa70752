"""Scaled dot-product attention for every model here: one function, the fastest kernel measured per case.

``attention(q, k, v)`` is ``softmax(q kᵀ / √d + mask) v`` on ``[B, H, N, D]``, exactly what
``F.scaled_dot_product_attention`` computes, and it calls SDPA (flash / memory-efficient kernels on GPU, the CPU
flash kernel in fp32 and without autograd). One case goes another way: on the **CPU in bf16/fp16 with autograd**,
the CPU flash kernel's backward is 4× slower than two batched matmuls and a softmax (8.9 vs 2.0 ms for
``[8, 6, 64, 64]``, 34 vs 16 ms for DiT-DH's ``[2, 16, 256, 128]`` head, one thread; ``encoder.bench`` measures
the step), so that case runs the explicit formula (the softmax in the input dtype, like SDPA's math kernel without
its upcast). Masks follow SDPA: a bool mask is True where attention is allowed, a float mask is added to the
scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention", "uses_explicit_path"]


def uses_explicit_path(q: Tensor) -> bool:
    """True where :func:`attention` takes the explicit matmul-softmax path (CPU, 16-bit, autograd on)."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled() and (
        q.requires_grad)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """``[B, H, N, D]`` attention; see the module docstring for which kernel runs."""
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
