"""ViT encoder on VAE latents and ViT decoder back to latents (DiT/timm style, one size registry).

Shapes: latents ``[B, C, h, w]`` (h = H/8) → patch ``p`` (2) → ``N = (h/p)·(w/p)`` tokens of width ``D``.
``z_u`` is the final token sequence through a LayerNorm without affine (so the reconstruction noise τ is in
units of feature std); the pooled embedding is mean-pool → LayerNorm → Linear. A converted official
(open_clip layout) checkpoint uses the ``class_token / learned pos-emb / ln_pre / cls pool`` switches instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ov3common.attention import packed_attention
from ov3common.linear import OneDNNLinear, onednn_applies

# ----------------------------------------------------------------------------- size registry
VIT_SIZES: dict[str, dict] = {
    "tiny": dict(width=64, depth=2, heads=2, embed_dim=64),
    "toy": dict(width=128, depth=4, heads=4, embed_dim=128),
    "S/2": dict(width=384, depth=12, heads=6, embed_dim=384),
    "B/2": dict(width=768, depth=12, heads=12, embed_dim=768),
    "L/2": dict(width=1024, depth=24, heads=16, embed_dim=768),
}


@dataclass
class ViTConfig:
    """Encoder hyper-parameters; defaults are OUR design (docs/design.md §1), switches cover the open_clip layout."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    embed_dim: int = 768  # pooled embedding size
    mlp_ratio: float = 4.0
    patch_size: int = 2
    in_channels: int = 16
    act: str = "gelu"  # gelu | gelu_tanh | quick_gelu
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    patch_bias: bool = True
    pos_embed: str = "sincos"  # sincos (any grid) | learned (fixed grid_size, includes the class token slot)
    grid_size: int = 0  # token grid side; required for pos_embed=learned
    class_token: bool = False
    norm_pre: bool = False
    pool: str = "mean"  # mean: mean → LN → Linear ; cls: final_norm(x)[:, 0] → proj
    final_norm_affine: bool = False  # False: z_u = LN without affine (ours); True: open_clip ln_post
    proj_bias: bool = True
    # open_clip heads (converted checkpoints): pool avg = mean of the normed patch tokens, none = every token
    # (pooled [B, prefix+N, E]); final_ln_after_pool: final_norm on the pooled vector only, tokens = raw stream
    final_ln_after_pool: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"ViTConfig: unknown keys {bad}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DecoderConfig:
    """ViT decoder: tokens [B,N,in_dim] → patch-1 transformer → linear to p·p·C latent values per token."""

    in_dim: int = 768
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 2  # the encoder's patch: each token un-patchifies to p×p latent pixels
    out_channels: int = 16
    act: str = "gelu"
    norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> DecoderConfig:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"DecoderConfig: unknown keys {bad}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def vit_config(size: str, **overrides) -> ViTConfig:
    """Named size from ``VIT_SIZES`` plus overrides (e.g. ``in_channels=4``)."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown encoder size {size!r}; known: {sorted(VIT_SIZES)}")
    return ViTConfig(**{**VIT_SIZES[size], **overrides})


def decoder_config_for(enc: ViTConfig, size: str | None = None, **overrides) -> DecoderConfig:
    """Decoder of the same width/depth as the encoder (ours) unless a size is named."""
    s = VIT_SIZES[size] if size else dict(width=enc.width, depth=enc.depth, heads=enc.heads)
    base = dict(in_dim=enc.width, width=s["width"], depth=s["depth"], heads=s["heads"],
                mlp_ratio=enc.mlp_ratio, patch_size=enc.patch_size, out_channels=enc.in_channels,
                act=enc.act, norm_eps=enc.norm_eps)
    return DecoderConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- building blocks
def sincos_2d(dim: int, h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[h*w, dim]`` (MAE convention: first half rows, second half cols)."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim {dim} must be divisible by 4")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float64),
                            torch.arange(w, device=device, dtype=torch.float64), indexing="ij")
    out_y = ys.reshape(-1, 1) * omega[None]
    out_x = xs.reshape(-1, 1) * omega[None]
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return emb.to(dtype)


def cached_sincos(cache: dict, dim: int, h: int, w: int, device, dtype) -> Tensor:
    """``sincos_2d`` memoised per module (grid, device, dtype): no recomputation every step."""
    key = (dim, h, w, str(device), dtype)
    if key not in cache:
        cache[key] = sincos_2d(dim, h, w, device=device, dtype=dtype)
    return cache[key]


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r} (gelu | gelu_tanh | quick_gelu)")


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, :func:`ov3common.attention.packed_attention`."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_impl = "sdpa"  # ov3common.attention.set_attention_impl: sdpa | flash

    def mix(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """The attention output before the output projection, ``[B, N, C]``."""
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, c // self.heads)
        return packed_attention(qkv, attn_mask=attn_mask, is_causal=is_causal, impl=self.attn_impl)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self.proj(self.mix(x, attn_mask, is_causal))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden, dim)

    def hidden(self, x: Tensor) -> Tensor:
        """``act(fc1(x))``: the input of ``fc2``."""
        return self.act(self.fc1(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden(x))


def residual_linear(x: Tensor, h: Tensor, lin: nn.Linear) -> Tensor:
    """``x + lin(h)`` for ``[B, N, ·]`` tensors. Where the dtypes agree and autocast is off, the residual (plus the
    bias) is the GEMM's accumulator (``addmm_`` with beta 1): one pass and one allocation fewer than a Linear and
    an add (measured 3 % less CPU time per S/2 training step in fp32). Same values up to float rounding order."""
    if isinstance(lin, OneDNNLinear) and onednn_applies(h, lin.weight):
        return x + lin(h)  # where ov3common.linear chose oneDNN, its product beats aten's addmm_ accumulator
    if (x.dtype == h.dtype == lin.weight.dtype and lin.bias is not None and x.dim() == 3
            and not torch.is_autocast_enabled(x.device.type)):
        b, n, c = x.shape
        return torch.add(x.reshape(b * n, c), lin.bias).addmm_(h.reshape(b * n, -1), lin.weight.t()).view(b, n, c)
    return x + lin(h)


class Block(nn.Module):
    """Pre-norm transformer block (shared by the ViT, the ViT decoder and the text models)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-6,
                 qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = residual_linear(x, self.attn.mix(self.norm1(x), attn_mask, is_causal), self.attn.proj)
        return residual_linear(x, self.mlp.hidden(self.norm2(x)), self.mlp.fc2)


def run_blocks(blocks: nn.ModuleList, x: Tensor, grad_ckpt: bool, attn_mask: Tensor | None = None,
               is_causal: bool = False) -> Tensor:
    """Apply blocks, with activation checkpointing when asked and grad is on."""
    for blk in blocks:
        if grad_ckpt and torch.is_grad_enabled():
            x = checkpoint(blk, x, attn_mask, is_causal, use_reentrant=False)
        else:
            x = blk(x, attn_mask, is_causal)
    return x


def init_weights(module: nn.Module) -> None:
    """timm/MAE init: xavier-uniform linears, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- encoder
class LatentViT(nn.Module):
    """ViT on VAE latents. ``forward(latents) -> (tokens z_u [B,N,D], pooled [B,E])``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self._pos_cache: dict = {}
        d = cfg.width
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        if cfg.pos_embed == "learned":
            if cfg.grid_size <= 0:
                raise ValueError("ViTConfig.grid_size must be set for pos_embed='learned'")
            n = cfg.grid_size**2 + int(cfg.class_token)
            self.pos_embed = nn.Parameter(torch.randn(1, n, d) * 0.02)
        elif cfg.pos_embed == "sincos":
            self.pos_embed = None
        else:
            raise ValueError(f"unknown pos_embed {cfg.pos_embed!r} (sincos | learned)")
        self.norm_pre = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.norm_pre else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps, cfg.qkv_bias) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=cfg.final_norm_affine)
        if cfg.pool == "mean":
            if cfg.final_ln_after_pool:
                raise ValueError("final_ln_after_pool needs pool cls | avg | none (pool='mean' has its own LN)")
            self.pool_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        elif cfg.pool in ("cls", "avg", "none"):
            if cfg.pool == "cls" and not cfg.class_token:
                raise ValueError("pool='cls' needs class_token=True")
            self.pool_norm = None
        else:
            raise ValueError(f"unknown pool {cfg.pool!r} (mean | cls | avg | none)")
        self.proj = nn.Linear(d, cfg.embed_dim, bias=cfg.proj_bias)
        init_weights(self)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    @property
    def num_prefix(self) -> int:
        return int(self.cfg.class_token)

    def embed(self, latents: Tensor) -> Tensor:
        """Patchify, add position embedding (and class token): ``[B, prefix + N, D]``."""
        x = self.patch_embed(latents)
        b, d, gh, gw = x.shape
        # contiguous token-major: a transposed view here would carry its strides through every residual add, and
        # each LayerNorm (forward and backward) would copy its input (3 % of a B/2 fp32 training step on a CPU)
        x = x.flatten(2).transpose(1, 2).contiguous()
        if self.pos_embed is None:
            x = x + cached_sincos(self._pos_cache, d, gh, gw, x.device, x.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            if self.pos_embed.shape[1] != x.shape[1]:
                raise ValueError(f"learned pos_embed has {self.pos_embed.shape[1]} slots, input gives "
                                 f"{x.shape[1]} tokens (grid {gh}x{gw}); use the trained resolution")
            x = x + self.pos_embed.to(x.dtype)
        return self.norm_pre(x)

    def head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Final residual stream → (z_u tokens without prefix, pooled embedding)."""
        if self.cfg.final_ln_after_pool:  # open_clip: LN on the pooled vector, tokens un-normed
            return x[:, self.num_prefix:], self.proj(self.final_norm(self._pool(x)))
        xn = self.final_norm(x)
        tokens = xn[:, self.num_prefix:]
        if self.pool_norm is None:
            pooled = self.proj(self._pool(xn))
        else:
            pooled = self.proj(self.pool_norm(x[:, self.num_prefix:].mean(dim=1)))
        return tokens, pooled

    def _pool(self, x: Tensor) -> Tensor:
        """open_clip's pools: cls → the class token; avg → mean of the patch tokens; none → all tokens."""
        if self.cfg.pool == "cls":
            return x[:, 0]
        return x[:, self.num_prefix:].mean(dim=1) if self.cfg.pool == "avg" else x

    def forward(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        x = run_blocks(self.blocks, self.embed(latents), self.grad_checkpointing)
        return self.head(x)

    def forward_features(self, latents: Tensor, layer: int = -1) -> Tensor:
        """Hidden states after block ``layer`` (0-based; negative counts from the end, ``-2`` = penultimate
        block) without the class token. ``layer=-1`` returns ``z_u`` (last block + final norm)."""
        depth = len(self.blocks)
        if layer == -1:
            return self.forward(latents)[0]
        idx = layer if layer >= 0 else depth + layer
        if not 0 <= idx < depth:
            raise ValueError(f"layer {layer} out of range for depth {depth}")
        x = run_blocks(self.blocks[: idx + 1], self.embed(latents), self.grad_checkpointing)
        return x[:, self.num_prefix:]


# ----------------------------------------------------------------------------- decoder
class ViTDecoder(nn.Module):
    """z_u tokens ``[B,N,in_dim]`` on an (gh, gw) grid → latents ``[B,C,gh·p,gw·p]``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self._pos_cache: dict = {}
        self.embed = nn.Linear(cfg.in_dim, cfg.width)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.out = nn.Linear(cfg.width, cfg.patch_size**2 * cfg.out_channels)
        init_weights(self)

    def forward(self, tokens: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        b, n, _ = tokens.shape
        gh, gw = grid if grid is not None else (math.isqrt(n), math.isqrt(n))
        if gh * gw != n:
            raise ValueError(f"ViTDecoder: {n} tokens do not form a {gh}x{gw} grid; pass grid=(h, w)")
        x = self.embed(tokens)
        x = x + cached_sincos(self._pos_cache, x.shape[-1], gh, gw, x.device, x.dtype)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        x = self.out(self.norm(x))
        p, c = self.cfg.patch_size, self.cfg.out_channels
        x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * p, gw * p)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
