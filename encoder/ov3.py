"""The trainable OpenVision 3 model and its joint objective.

``OV3Model`` holds what is trained (ViT encoder, ViT decoder, text encoder, text decoder, logit scale); the frozen
VAE and LPIPS sit outside its parameters (not wrapped by DDP/FSDP, not checkpointed). A branch whose weight is 0
is still computed and logged (measured, not optimised: its weight multiplies it by 0), as in the paper's
branch-isolation ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from encoder.losses import (
    LogitScale,
    LPIPSLoss,
    caption_targets,
    caption_token_losses,
    contrastive_rows,
    global_mean,
    reconstruction_rows,
    token_noise,
)
from encoder.models import LatentViT, ViTConfig, ViTDecoder, decoder_config_for, vit_config
from encoder.text import TextConfig, TextDecoder, TextEncoder
from encoder.vae import FrozenVAE
from ov3common.attention import ATTN_IMPLS, set_attention_impl
from ov3common.config import choice_field, path_field

# ``open_clip``: class token, no ln_pre, mean of the patch tokens → LayerNorm → Linear without bias, z_u = the raw
# last-block tokens (``final_ln_after_pool``), no patch bias: what `encoder.export --open-clip` writes exactly.
# ``ours`` has no class token and normalises z_u, which open_clip's VisionTransformer cannot express.
VIT_LAYOUTS = {"ours": {}, "open_clip": dict(class_token=True, pool="avg", final_ln_after_pool=True,
                                             final_norm_affine=True, patch_bias=False, proj_bias=False)}


@dataclass
class ModelConfig:
    """Sizes; 0 means "from the named size" (decoder: same as the encoder)."""

    size: str = "toy"
    width: int = 0
    depth: int = 0
    heads: int = 0
    embed_dim: int = 0
    decoder_width: int = 0
    decoder_depth: int = 0
    decoder_heads: int = 0
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 4
    text_decoder_width: int = 128
    text_decoder_depth: int = 2
    text_decoder_heads: int = 4
    caption_keep_ratio: float = 1.0  # fraction of visual tokens the text decoder sees (OpenVision 2: 0.35)
    grad_checkpointing: bool = False
    layout: str = choice_field("ours", tuple(VIT_LAYOUTS))  # ours (the default design) | open_clip: the release's
    attn: str = choice_field("sdpa", ATTN_IMPLS)  # sdpa | flash (flash-attn; unmasked CUDA bf16 calls)


@dataclass
class LossConfig:
    """Every weight of the objective (paper: caption 2 : contrastive 1, understanding 2 : reconstruction 1)."""

    tau: float = 0.8  # σ ~ U[0, τ] per sample, in units of z_u's std
    w_und: float = 2.0
    w_rec: float = 1.0
    w_caption: float = 2.0
    w_contrastive: float = 1.0
    w_pixel: float = 1.0
    w_latent: float = 1.0
    w_lpips: float = 1.0
    lpips_net: str = "vgg"  # vgg | alex
    lpips_backbone: str = "pretrained"  # pretrained (local torchvision weights) | random (NOT perceptual)
    lpips_backbone_path: str = path_field("", "file")  # torchvision .pth; empty: $TORCH_HOME/hub/checkpoints
    rec_stop_grad: bool = False  # train the ViT decoder on detached z_u: no reconstruction gradient reaches the
    #                              encoder (an understanding-only encoder with a usable decoder: the baseline row)


def build_vit(mc: ModelConfig, in_channels: int) -> tuple[ViTConfig, LatentViT, ViTDecoder]:
    over = {k: getattr(mc, k) for k in ("width", "depth", "heads", "embed_dim") if getattr(mc, k)}
    vcfg = vit_config(mc.size, in_channels=in_channels, **over, **VIT_LAYOUTS[mc.layout])
    dover = {k.removeprefix("decoder_"): getattr(mc, k)
             for k in ("decoder_width", "decoder_depth", "decoder_heads") if getattr(mc, k)}
    return vcfg, LatentViT(vcfg), ViTDecoder(decoder_config_for(vcfg, **dover))


class OV3Model(nn.Module):
    def __init__(self, mc: ModelConfig, lc: LossConfig, vocab_size: int, pad_id: int, max_text_len: int,
                 vae: FrozenVAE, lpips: LPIPSLoss | None = None, seed: int = 0):
        super().__init__()
        self.mc, self.lc, self.pad_id, self.seed = mc, lc, pad_id, seed
        self.vit_cfg, self.vit, self.decoder = build_vit(mc, vae.latent_channels)
        e = self.vit_cfg.embed_dim
        tcfg = TextConfig(vocab_size=vocab_size, width=mc.text_width, depth=mc.text_depth, heads=mc.text_heads,
                          max_len=max_text_len, embed_dim=e, pad_id=pad_id)
        dcfg = TextConfig(vocab_size=vocab_size, width=mc.text_decoder_width, depth=mc.text_decoder_depth,
                          heads=mc.text_decoder_heads, max_len=max_text_len, embed_dim=e, pad_id=pad_id)
        self.text_encoder = TextEncoder(tcfg)
        self.text_decoder = TextDecoder(dcfg, self.vit_cfg.width, mc.caption_keep_ratio)
        self.logit_scale = LogitScale()
        self.frozen = {"vae": vae, "lpips": lpips}  # plain dict: not parameters of this module
        set_attention_impl(self, mc.attn)
        for m in (self.vit, self.decoder, self.text_encoder, self.text_decoder):
            m.grad_checkpointing = mc.grad_checkpointing

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2 units: every transformer block (the rest is sharded with the root)."""
        return [*self.vit.blocks, *self.decoder.blocks, *self.text_encoder.blocks, *self.text_decoder.blocks]

    def inference(self, batch: dict) -> dict[str, Tensor]:
        """Evaluation outputs at τ = 0 (no noise): pooled image / alt-text embeddings, latents and predictions."""
        lat = self.latents(batch)
        tokens, pooled = self.vit(lat.to(self.vit.patch_embed.weight.dtype))
        p = self.vit_cfg.patch_size
        pred_lat = self.decoder(tokens, (lat.shape[-2] // p, lat.shape[-1] // p))
        return {"pooled": pooled, "txt": self.text_encoder(batch["alt"]), "lat": lat, "pred_lat": pred_lat}

    def latents(self, batch: dict) -> Tensor:
        if "latent" in batch:
            return batch["latent"]
        return self.frozen["vae"].encode(batch["image"])

    def noise(self, index: Tensor, tokens: Tensor, step: int) -> Tensor:
        """σ·ε with σ ~ U[0, τ], ε ~ N(0, I), drawn per sample from a generator keyed by (seed, step, sample
        index): identical whatever the number of ranks (a 2-process run matches a 1-process run)."""
        return token_noise(index, tokens, step, self.seed, self.lc.tau)

    def forward(self, batch: dict, step: int = 0, n_global: Tensor | None = None, tok_global: Tensor | None = None,
                world_size: int = 1, inference: bool = False) -> dict[str, Tensor]:
        """All losses (global means, see ``losses.global_mean``) and the weighted total ``loss``; with
        ``inference=True`` the evaluation outputs instead (through the root module, as FSDP2 requires)."""
        if inference:
            return self.inference(batch)
        lc = self.lc
        lat = self.latents(batch)
        tokens, pooled = self.vit(lat.to(self.vit.patch_embed.weight.dtype))
        out: dict[str, Tensor] = {}
        dist = world_size > 1
        # understanding: contrastive on (web caption, one recaption sentence), averaged; captioning on the recaption
        scale = self.logit_scale()
        rows = 0.5 * (contrastive_rows(pooled, self.text_encoder(batch["alt"]), scale, dist)
                      + contrastive_rows(pooled, self.text_encoder(batch["sent"]), scale, dist))
        out["contrastive"] = global_mean(rows, n_global, world_size)
        ce = caption_token_losses(self.text_decoder(tokens, batch["recap"]), caption_targets(batch["recap"],
                                                                                              self.pad_id))
        out["caption"] = global_mean(ce, tok_global, world_size)
        und = lc.w_caption * out["caption"] + lc.w_contrastive * out["contrastive"]
        # reconstruction: noised z_u → ViT decoder → latents → frozen VAE decoder → pixels
        z = tokens.detach() if lc.rec_stop_grad else tokens
        noisy = z + self.noise(batch["index"], z, step) if lc.tau > 0 else z
        p = self.vit_cfg.patch_size
        pred_lat = self.decoder(noisy, (lat.shape[-2] // p, lat.shape[-1] // p))
        need_px = lc.w_pixel > 0 or lc.w_lpips > 0
        pred_img = self.frozen["vae"].decode(pred_lat) if need_px else None
        lp = self.frozen["lpips"] if lc.w_lpips > 0 else None
        rec_rows = reconstruction_rows(pred_lat, lat, pred_img, batch["image"] if need_px else None, lp)
        out.update({k: global_mean(v, n_global, world_size) for k, v in rec_rows.items()})
        rec = (lc.w_latent * out["latent_l1"] + lc.w_pixel * out.get("pixel_l1", 0.0)
               + lc.w_lpips * out.get("lpips", 0.0))
        out["und"], out["rec"], out["logit_scale"] = und, rec, scale.detach()
        out["loss"] = lc.w_und * und + lc.w_rec * rec
        return out
