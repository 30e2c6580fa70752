"""Text towers and losses: padding invariance, prefix-causal masking, contrastive/caption values, LPIPS policy."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from encoder.losses import (
    IGNORE,
    LogitScale,
    LPIPSLoss,
    caption_targets,
    caption_token_losses,
    contrastive_rows,
    global_mean,
)
from encoder.text import TextConfig, TextDecoder, TextEncoder, prefix_causal_mask

CFG = TextConfig(vocab_size=50, width=32, depth=2, heads=2, max_len=16, embed_dim=24, pad_id=0)


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    enc = TextEncoder(CFG).eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    padded = torch.tensor([[1, 5, 7, 2, 0, 0, 0]])
    assert torch.allclose(enc(ids), enc(padded), atol=1e-5)
    assert enc(ids).shape == (1, 24)


def test_prefix_causal_mask():
    m = prefix_causal_mask(2, 3)
    assert m[0].tolist() == [True, True, False, False, False]  # visual sees visual only
    assert m[3].tolist() == [True, True, True, True, False]  # text sees prefix + earlier text


def test_text_decoder_is_causal_in_text():
    """Changing a later caption token never changes the logits of earlier positions."""
    torch.manual_seed(0)
    dec = TextDecoder(CFG, vis_dim=8).eval()
    vis = torch.randn(1, 4, 8)
    a = torch.tensor([[1, 5, 7, 9, 2]])
    b = a.clone()
    b[0, 3] = 11
    la, lb = dec(vis, a), dec(vis, b)
    assert la.shape == (1, 4, 50)
    assert torch.allclose(la[:, :3], lb[:, :3], atol=1e-5) and not torch.allclose(la[:, 3], lb[:, 3])
    assert dec.head.weight is dec.tok.weight  # tied
    out = dec.generate(vis, bos_id=1, eos_id=2, max_new=5)
    assert out.shape[0] == 1 and out[0, 0] == 1 and out.shape[1] <= 6


def test_keep_ratio_subsets_visual_tokens():
    torch.manual_seed(0)
    dec = TextDecoder(CFG, vis_dim=8, keep_ratio=0.25).train()
    vis = torch.randn(2, 8, 8)
    ids = torch.tensor([[1, 5, 2], [1, 6, 2]])
    assert dec(vis, ids).shape == (2, 2, 50)


def test_contrastive_matches_clip_formula_and_perfect_alignment():
    torch.manual_seed(0)
    img, txt = torch.randn(6, 16), torch.randn(6, 16)
    scale = torch.tensor(10.0)
    rows = contrastive_rows(img, txt, scale)
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6)))
    assert torch.allclose(rows.mean(), ref)
    assert contrastive_rows(img, img, torch.tensor(100.0)).mean() < 1e-3
    ls = LogitScale()
    assert math.isclose(float(ls()), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        ls.value.fill_(10.0)
    assert float(ls()) == 100.0  # clamped


def test_caption_loss_ignores_padding_and_global_mean():
    ids = torch.tensor([[1, 5, 2, 0], [1, 6, 7, 2]])
    tgt = caption_targets(ids, 0)
    assert tgt.tolist() == [[5, 2, IGNORE], [6, 7, 2]]
    logits = torch.randn(2, 3, 10)
    ce = caption_token_losses(logits, tgt)
    assert ce.shape == (5,)
    # two "ranks" with different token counts: mean over ranks of global_mean == the global token mean
    a, b = ce[:2], ce[2:]
    assert torch.allclose((global_mean(a, 5, 2) + global_mean(b, 5, 2)) / 2, ce.mean())


def test_lpips_policy(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lpips_backbone=random"):
        LPIPSLoss("alex", "pretrained")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        LPIPSLoss("alex", "pretrained", backbone_path=str(tmp_path / "nope.pth"))
    log = logging.getLogger("test_lpips")
    with caplog.at_level(logging.WARNING, logger="test_lpips"):
        lp = LPIPSLoss("alex", "random", logger=log)
    assert "NOT a real perceptual loss" in caplog.text and not lp.real
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = lp(x, x.flip(-1))
    assert d.shape == (2,) and torch.all(d >= 0) and lp(x, x).abs().max() < 1e-6
    assert all(not p.requires_grad for p in lp.parameters())


def test_lpips_loads_local_torchvision_weights(tmp_path):
    net = torchvision.models.alexnet(weights=None)
    torch.save(net.state_dict(), tmp_path / "alexnet-owt-7be5be79.pth")
    lp = LPIPSLoss("alex", "pretrained", backbone_path=str(tmp_path / "alexnet-owt-7be5be79.pth"))
    assert lp.real
    assert torch.equal(getattr(lp.model.net.slice1, "0").weight, net.features[0].weight)
    assert torch.equal(getattr(lp.model.net.slice5, "10").weight, net.features[10].weight)
