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

__all__ = ["ATTN_IMPLS", "FLASH_INSTALL", "attention", "check_attn_impl", "packed_attention", "require_flash",
           "set_attention_impl", "uses_explicit_path", "uses_packed_cpu_path"]

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


def uses_packed_cpu_path(qkv: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> bool:
    """True where :func:`packed_attention` runs :class:`_PackedCPUAttention`: a CPU, float32 / bf16 / fp16, autograd
    on, no mask. Measured per training step against SDPA's CPU kernel with its transposes: bf16 8 % faster (S/2,
    Intel CPU with AMX, one thread); fp32 3 % faster at S/2 and at B/2 (AMD EPYC VM, two threads, 6 interleaved
    rounds). An earlier fp32 measurement on the Intel CPU had it 2 % slower (S/2, one thread): fp32 follows the
    current machine. float64 (gradient checks) keeps SDPA."""
    return (qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and qkv.requires_grad and attn_mask is None and not is_causal)


class _PackedCPUAttention(torch.autograd.Function):
    """``softmax(q kᵀ/√d) v`` on a packed, token-major ``qkv [B, N, 3, H, D]`` with a hand-written backward.

    Against SDPA (or autograd through the explicit formula) on a CPU it saves the transposes around the kernel: the
    output is written token-major (``[B, N, H·D]``, the layout the output projection reads) and the gradient comes
    back packed (``[B, N, 3, H, D]``, the layout of the qkv projection's output), so neither direction needs a
    stack, a cat or an extra transpose; q, k, v are copied once into head-major order. Scores and probabilities
    are kept in the input dtype (as SDPA's math kernel without its upcast); the softmax accumulates in fp32."""

    @staticmethod
    def forward(ctx, qkv: Tensor) -> Tensor:
        b, n, _, h, d = qkv.shape
        x = qkv.permute(2, 0, 3, 1, 4).reshape(3, b * h, n, d)  # one copy: q, k, v head-major
        q, k, v = x.unbind(0)
        scale = 1.0 / math.sqrt(d)
        s = torch.baddbmm(torch.empty(b * h, n, n, dtype=q.dtype), q, k.transpose(1, 2), beta=0.0, alpha=scale)
        p = torch.softmax(s, dim=-1)
        out = torch.empty(b, n, h, d, dtype=qkv.dtype)
        out.permute(0, 2, 1, 3).copy_(torch.bmm(p, v).view(b, h, n, d))
        ctx.save_for_backward(x, p)
        ctx.scale = scale
        return out.view(b, n, h * d)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        x, p = ctx.saved_tensors
        q, k, v = x.unbind(0)
        bh, n, d = q.shape
        b = grad_out.shape[0]
        h = bh // b
        go = grad_out.reshape(b, n, h, d).permute(0, 2, 1, 3).reshape(bh, n, d)
        g = torch.empty(3, bh, n, d, dtype=grad_out.dtype)
        torch.bmm(p.transpose(1, 2), go, out=g[2])
        gs = torch._softmax_backward_data(torch.bmm(go, v.transpose(1, 2)), p, -1, p.dtype)
        torch.baddbmm(g[0], gs, k, beta=0.0, alpha=ctx.scale, out=g[0])
        torch.baddbmm(g[1], gs.transpose(1, 2), q, beta=0.0, alpha=ctx.scale, out=g[1])
        return g.view(3, b, h, n, d).permute(1, 3, 0, 2, 4).contiguous()


def packed_attention(qkv: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                     impl: str = "sdpa") -> Tensor:
    """Self-attention on the packed output of a fused qkv projection, ``qkv [B, N, 3, H, D]`` → ``[B, N, H·D]``
    (token-major, what the output projection reads). CPU training without a mask runs :class:`_PackedCPUAttention`;
    everything else splits the heads and calls :func:`attention` (SDPA / flash-attn / the explicit path)."""
    b, n, _, h, d = qkv.shape
    if uses_packed_cpu_path(qkv, attn_mask, is_causal):
        return _PackedCPUAttention.apply(qkv)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, impl=impl).transpose(1, 2).reshape(b, n, h * d)
