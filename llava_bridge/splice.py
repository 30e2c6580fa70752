"""Splice image features into a padded text batch (LLaVA's ``prepare_inputs_labels_for_multimodal``, vectorised).

Each ``IMAGE_TOKEN_INDEX`` (−200) in ``input_ids`` is replaced by the ``N_k`` feature vectors of the next image
(images are consumed in row-major order of the placeholders); its labels become ``IGNORE_INDEX``. Only positions
with ``attention_mask == 1`` are kept; the result is re-padded on the side given (right for training, left for
generation) and truncated to ``max_length``. Rows without a placeholder are text-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llava_bridge import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class Spliced:
    inputs_embeds: Tensor  # [B, L', H]
    attention_mask: Tensor  # [B, L'] long
    labels: Tensor | None  # [B, L'] or None
    position_ids: Tensor  # [B, L'] (0.. over the valid positions, 1 on padding as HF does)


def splice(input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None, embed_fn,
           image_features: Tensor | list[Tensor] | None, max_length: int | None = None,
           padding_side: str = "right") -> Spliced:
    """``embed_fn(ids [B,L]) -> [B,L,H]``; ``image_features`` ``[M,N,H]`` or a list of ``[N_k,H]`` (M = number of
    placeholders in the batch). Raises ``ValueError`` if the counts disagree."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    b, seq = input_ids.shape
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_img = (input_ids == IMAGE_TOKEN_INDEX) & valid
    n_img = int(is_img.sum())
    feats = _as_list(image_features)
    if n_img != len(feats):
        raise ValueError(f"batch has {n_img} image placeholders but {len(feats)} images")
    text_embeds = embed_fn(torch.where(is_img | ~valid, torch.zeros_like(input_ids), input_ids))
    hidden, dtype = text_embeds.shape[-1], text_embeds.dtype
    for f in feats:
        if f.ndim != 2 or f.shape[-1] != hidden:
            raise ValueError(f"image features must be [N, {hidden}] per image, got {tuple(f.shape)}")

    # size of every position after expansion: 1 per valid text token, N_k per image, 0 for padding
    sizes = valid.long()
    if n_img:
        sizes[is_img] = torch.tensor([f.shape[0] for f in feats], device=device)
    ends = sizes.cumsum(1)
    starts = ends - sizes  # position of each token in its row's compact sequence
    lengths = ends[:, -1]
    out_len = int(lengths.max()) if b else 0
    if max_length is not None:
        out_len = min(out_len, max_length)
    lengths = lengths.clamp(max=out_len)
    shift = (out_len - lengths)[:, None] if padding_side == "left" else torch.zeros_like(lengths)[:, None]
    starts = starts + shift

    embeds = text_embeds.new_zeros(b, out_len, hidden)
    out_labels = None if labels is None else torch.full((b, out_len), IGNORE_INDEX, dtype=labels.dtype,
                                                        device=device)
    # text tokens
    text = valid & ~is_img
    rows, cols = text.nonzero(as_tuple=True)
    dest = starts[rows, cols]
    keep = (dest >= shift[rows, 0]) & (dest < shift[rows, 0] + lengths[rows])
    rows, cols, dest = rows[keep], cols[keep], dest[keep]
    embeds[rows, dest] = text_embeds[rows, cols]
    if out_labels is not None:
        out_labels[rows, dest] = labels[rows, cols]
    # image tokens
    if n_img:
        irow, icol = is_img.nonzero(as_tuple=True)  # row-major = the order images are consumed in
        n_per = torch.tensor([f.shape[0] for f in feats], device=device)
        flat = torch.cat([f.to(dtype) for f in feats], 0)
        rr = irow.repeat_interleave(n_per)
        within = torch.arange(flat.shape[0], device=device) - (n_per.cumsum(0) - n_per).repeat_interleave(n_per)
        dd = starts[irow, icol].repeat_interleave(n_per) + within
        keep = dd < shift[rr, 0] + lengths[rr]
        embeds = embeds.index_put((rr[keep], dd[keep]), flat[keep])
    pos = torch.arange(out_len, device=device)[None]
    mask = (pos >= shift) & (pos < shift + lengths[:, None])
    position_ids = (mask.long().cumsum(1) - 1).masked_fill(~mask, 1)
    return Spliced(embeds, mask.long(), out_labels, position_ids)


def _as_list(image_features) -> list[Tensor]:
    if image_features is None:
        return []
    if isinstance(image_features, Tensor):
        if image_features.ndim != 3:
            raise ValueError(f"image_features must be [M, N, H], got {tuple(image_features.shape)}")
        return list(image_features.unbind(0))
    return list(image_features)
