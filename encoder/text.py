"""Text towers of the understanding branch: a bidirectional text encoder (contrastive) and a causal prefix text
decoder (captioning), both built from the same pre-norm :class:`encoder.models.Block`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from encoder.models import Block, init_weights, run_blocks


@dataclass
class TextConfig:
    vocab_size: int = 32000
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    max_len: int = 77  # context length (tokens incl. <s> and </s>)
    embed_dim: int = 768  # text-encoder pooled size (= the vision pooled size)
    pad_id: int = 0
    act: str = "gelu"
    norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"TextConfig: unknown keys {bad}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class TextEncoder(nn.Module):
    """Bidirectional transformer over right-padded ids ``[B,L]``; pooled at the last real token (``</s>``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_len, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim)
        init_weights(self)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        b, n = ids.shape
        if n > self.cfg.max_len:
            raise ValueError(f"text length {n} > max_len {self.cfg.max_len}")
        keep = ids != self.cfg.pad_id
        x = self.tok(ids) + self.pos[:, :n]
        mask = keep[:, None, None, :]  # [B,1,1,L] key padding (True = attend)
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing, attn_mask=mask))
        last = keep.long().sum(1).clamp(min=1) - 1
        return self.proj(x[torch.arange(b, device=ids.device), last])


def prefix_causal_mask(n_prefix: int, n_text: int, device=None) -> Tensor:
    """``[P+T, P+T]`` bool mask (True = attend): prefix attends to prefix; text to prefix and earlier text."""
    n = n_prefix + n_text
    i = torch.arange(n, device=device)
    return (i[None, :] < n_prefix) | (i[None, :] <= i[:, None])


class TextDecoder(nn.Module):
    """Causal prefix decoder: visual tokens (projected) then caption tokens, teacher forced.

    ``forward(vis [B,N,Dv], ids [B,L]) -> logits [B,L-1,V]`` predicting ``ids[:, 1:]`` from ``ids[:, :-1]``.
    ``keep_ratio < 1`` keeps a random subset of visual tokens (OpenVision 2 style; uses the global RNG).
    """

    def __init__(self, cfg: TextConfig, vis_dim: int, keep_ratio: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.keep_ratio = keep_ratio
        self.grad_checkpointing = False
        self.vis_proj = nn.Linear(vis_dim, cfg.width)
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_len, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        init_weights(self)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.head.weight = self.tok.weight  # tied

    def forward(self, vis: Tensor, ids: Tensor) -> Tensor:
        if self.training and self.keep_ratio < 1.0:
            n = vis.shape[1]
            k = max(1, round(n * self.keep_ratio))
            idx = torch.randperm(n, device=vis.device)[:k].sort().values
            vis = vis[:, idx]
        inp = ids[:, :-1]
        t = inp.shape[1]
        if t > self.cfg.max_len:
            raise ValueError(f"caption length {t} > max_len {self.cfg.max_len}")
        v = self.vis_proj(vis)
        x = torch.cat([v, self.tok(inp) + self.pos[:, :t]], dim=1)
        mask = prefix_causal_mask(v.shape[1], t, device=x.device)
        x = run_blocks(self.blocks, x, self.grad_checkpointing, attn_mask=mask)
        return self.head(self.norm(x[:, v.shape[1]:]))

    @torch.no_grad()
    def generate(self, vis: Tensor, bos_id: int, eos_id: int, max_new: int = 32) -> Tensor:
        """Greedy captioning (for inspection): returns ids ``[B, <=max_new+1]`` starting with ``bos_id``."""
        ids = torch.full((vis.shape[0], 1), bos_id, dtype=torch.long, device=vis.device)
        done = torch.zeros(vis.shape[0], dtype=torch.bool, device=vis.device)
        for _ in range(min(max_new, self.cfg.max_len - 1)):
            logits = self.forward(vis, torch.cat([ids, ids[:, -1:]], dim=1))[:, -1]
            nxt = logits.argmax(-1).masked_fill(done, self.cfg.pad_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if done.all():
                break
        return ids
