"""DiT-DH: a DiT trunk plus a wide, shallow DDT-style head, on the token grid of a frozen encoder (patch 1).

Trunk: tokens ``x_t [B, N, C]`` → Linear to width W (+ fixed 2-D sin-cos positions) → blocks with adaLN-Zero
conditioned on ``c = emb(t) + emb(class)``. Head: ``x_t`` embedded again at the head width, blocks whose adaLN is
conditioned *per token* on the trunk output (``Linear(s + emb(t))``), a final adaLN layer, Linear back to C.
Blocks: RMSNorm, SDPA attention with 2-D RoPE (half of each head's dims rotate with the row, half with the column),
SwiGLU MLP (hidden ``2/3 · mlp_ratio · W``). Class dropout replaces the label with a null class (index
``num_classes``) during training, so classifier-free guidance can ask for the unconditional model.
Sizes (``DIT_SIZES``): S, B, L, XL follow DiT widths/depths with RAE's 2 × 2048 head; ``toy``/``tiny`` are ours.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ov3common.attention import attention

__all__ = ["DIT_SIZES", "DiTDHConfig", "DiTDH", "dit_config", "build_model", "count_params"]

_HEAD_XL = dict(head_width=2048, head_depth=2, head_heads=16)
DIT_SIZES: dict[str, dict] = {
    "tiny": dict(width=32, depth=2, heads=2, head_width=48, head_depth=1, head_heads=2),
    "toy": dict(width=128, depth=4, heads=4, head_width=192, head_depth=1, head_heads=4),
    "S": dict(width=384, depth=12, heads=6, **_HEAD_XL),
    "B": dict(width=768, depth=12, heads=12, **_HEAD_XL),
    "L": dict(width=1024, depth=24, heads=16, **_HEAD_XL),
    "XL": dict(width=1152, depth=28, heads=16, **_HEAD_XL),
}


@dataclass
class DiTDHConfig:
    """Hyper-parameters of :class:`DiTDH`; ``in_dim``/``grid``/``num_classes`` come from the data."""

    in_dim: int = 768  # token channels C of the encoder
    grid: int = 16  # token grid side (N = grid²)
    num_classes: int = 1000
    width: int = 1152
    depth: int = 28
    heads: int = 16
    head_width: int = 2048
    head_depth: int = 2
    head_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1
    class_embed_std: float = 0.02  # init std of the class table (DiT: 0.02; larger = faster conditioning early on)
    rope: bool = True
    rope_theta: float = 10000.0
    pos_embed: bool = True  # fixed 2-D sin-cos added to the trunk input (as RAE)
    qk_norm: bool = False
    grad_ckpt: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> DiTDHConfig:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"DiTDHConfig: unknown keys {bad}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def dit_config(size: str, **overrides) -> DiTDHConfig:
    """A named size from :data:`DIT_SIZES` plus overrides (``in_dim``, ``grid``, ``num_classes``, ...)."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT-DH size {size!r}; known: {sorted(DIT_SIZES)}")
    return DiTDHConfig(**{**DIT_SIZES[size], **overrides})


# ----------------------------------------------------------------------------------------------- pieces
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return y * self.weight if self.weight is not None else y


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def rope_2d(grid: int, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Rotations ``[grid², head_dim/2, 2]`` (cos, sin) for 2-D RoPE: the first half of the rotated pairs turns with
    the row, the second half with the column. ``head_dim`` must be a multiple of 4. Stored as real numbers so a
    ``module.to(dtype)`` cannot drop an imaginary part."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    ang = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=-1)
    return torch.stack([ang.cos(), ang.sin()], dim=-1).float()


def apply_rope(x: Tensor, rot: Tensor, token_dim: int = -2) -> Tensor:
    """Rotate consecutive pairs of ``x`` (tokens on ``token_dim``, head dims last: ``[B, H, N, Dh]`` by default)
    by ``rot [N, Dh/2, 2]`` (one complex product; an fp32 view of ``x`` is used without a copy when its strides
    allow, as for q and k sliced together out of the qkv projection)."""
    xf = x.float().unflatten(-1, (-1, 2))
    if xf.stride(-1) != 1 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()
    r = torch.view_as_complex(rot.float().contiguous())
    r = r.view(r.shape[0], *([1] * (-token_dim - 2)), r.shape[1])
    return torch.view_as_real(torch.view_as_complex(xf) * r).flatten(-2).type_as(x)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position table ``[grid², dim]`` (half the channels per axis)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    parts = []
    for p in (cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega):
        parts += [p.sin(), p.cos()]
    emb = torch.cat(parts, dim=-1).float()
    return F.pad(emb, (0, dim - emb.shape[-1]))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attn_impl = "sdpa"  # ov3common.attention.set_attention_impl: sdpa | flash

    def forward(self, x: Tensor, rope: Tensor | None) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim)
        if rope is not None and isinstance(self.q_norm, nn.Identity):  # q and k rotated in one product
            qk, v = qkv.split([2, 1], dim=2)  # (backward: one cat, not a zero-filled slice gradient plus an add)
            (q, k), v = apply_rope(qk, rope, token_dim=-4).permute(2, 0, 3, 1, 4), v.squeeze(2).transpose(1, 2)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q, k, v, impl=self.attn_impl)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x·(1 + scale) + shift`` (adaLN)."""
    return torch.addcmul(shift, x, 1 + scale)


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero. ``c_act`` is ``SiLU(c)`` of the condition, ``[B, W]`` (trunk)
    or ``[B, N, W]`` (head): every block of a stack shares it, so :class:`DiTDH` applies the SiLU of
    ``ada = Sequential(SiLU, Linear)`` once per stack and each block runs only its Linear ``ada[1]``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = RMSNorm(dim, affine=False)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = RMSNorm(dim, affine=False)
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_ratio * dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c_act: Tensor, rope: Tensor | None) -> Tensor:
        mod = self.ada[1](c_act)
        if mod.ndim == 2:
            mod = mod.unsqueeze(1)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        x = torch.addcmul(x, g1, self.attn(modulate(self.norm1(x), sh1, sc1), rope))
        return torch.addcmul(x, g2, self.mlp(modulate(self.norm2(x), sh2, sc2)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, affine=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        """``c_act`` = SiLU of the condition (see :class:`Block`)."""
        shift, scale = self.ada[1](c_act).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """t ∈ [0, 1] → sinusoidal features of ``1000·t`` (DiT's 256 frequencies) → MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------- model
class DiTDH(nn.Module):
    """Velocity model ``v(x_t, t, y)`` on token grids: ``x_t [B, N, C]``, ``t [B]`` in [0, 1], ``y [B]`` class
    ids (``num_classes`` = the null class). Returns ``[B, N, C]``."""

    def __init__(self, cfg: DiTDHConfig):
        super().__init__()
        self.cfg = cfg
        c, w, hw = cfg.in_dim, cfg.width, cfg.head_width
        self.null_class = cfg.num_classes
        self.x_embed = nn.Linear(c, w)
        self.t_embed = TimestepEmbedder(w)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, w)  # + the null class
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.head_x_embed = nn.Linear(c, hw)
        self.head_cond = nn.Linear(w, hw)
        self.head_blocks = nn.ModuleList(
            Block(hw, cfg.head_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.head_depth))
        self.final = FinalLayer(hw, c)
        n = cfg.grid * cfg.grid
        self.register_buffer("pos", sincos_2d(w, cfg.grid) if cfg.pos_embed else torch.zeros(n, w), persistent=False)
        empty = torch.empty(0)
        self.register_buffer("rope", rope_2d(cfg.grid, w // cfg.heads, cfg.rope_theta) if cfg.rope else empty,
                             persistent=False)
        self.register_buffer("head_rope", rope_2d(cfg.grid, hw // cfg.head_heads, cfg.rope_theta) if cfg.rope
                             else empty, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, zeroed adaLN and output layers (adaLN-Zero: every block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=self.cfg.class_embed_std)
        for lin in self.t_embed.mlp[0], self.t_embed.mlp[2]:
            nn.init.normal_(lin.weight, std=0.02)
        for blk in (*self.blocks, *self.head_blocks, self.final):
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def fsdp_units(self) -> list[nn.Module]:
        return [*self.blocks, *self.head_blocks]

    def _run(self, blk: Block, x: Tensor, c: Tensor, rope) -> Tensor:
        if self.cfg.grad_ckpt and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, c, rope, use_reentrant=False)
        return blk(x, c, rope)

    @torch.compiler.disable  # eager RNG under torch.compile: compiled and eager runs drop the same labels
    def drop_labels(self, y: Tensor) -> Tensor:
        """Class dropout (training only): each label becomes the null class with probability ``class_dropout``."""
        if not self.training or self.cfg.class_dropout <= 0:
            return y
        drop = torch.rand(y.shape[0], device=y.device) < self.cfg.class_dropout
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        n = self.cfg.grid * self.cfg.grid
        if x.ndim != 3 or x.shape[1] != n or x.shape[2] != self.cfg.in_dim:
            raise ValueError(f"DiTDH expects x [B, {n}, {self.cfg.in_dim}], got {tuple(x.shape)}")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        temb = self.t_embed(t)
        c = temb + self.y_embed(self.drop_labels(y))
        rope = self.rope if self.cfg.rope else None
        s = self.x_embed(x) + self.pos.to(x.dtype)
        c_act = F.silu(c)
        for blk in self.blocks:
            s = self._run(blk, s, c_act, rope)
        hc = F.silu(self.head_cond(s + temb.unsqueeze(1)))  # per-token condition for the head (DDT), SiLU'd
        h = self.head_x_embed(x)
        head_rope = self.head_rope if self.cfg.rope else None
        for blk in self.head_blocks:
            h = self._run(blk, h, hc, head_rope)
        return self.final(h, hc)


def build_model(size: str, **overrides) -> DiTDH:
    return DiTDH(dit_config(size, **overrides))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
