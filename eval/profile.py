"""Full-size models of the real configs on the meta device: parameters, FLOPs per sample and activation memory,
counted without allocating or computing anything (``make smoke-real``, ``make gpu-smoke``).

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one training step (forward + backward) on meta tensors.
* Activations: the bytes autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``; parameters
  excluded, each tensor counted once by its base), per transformer block and outside the blocks, counted with
  activation checkpointing off. With checkpointing on, the projection is ``outside + sum(block inputs) + the largest
  block's saved bytes`` (one block is recomputed at a time). Meta tensors carry the parameters' dtype: fp32 models
  are counted in fp32, an upper bound of bf16 autocast (whose norm and activation inputs are partly fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx.experimental._config as fx_config
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from encoder.losses import LPIPSLoss
from encoder.ov3 import OV3Model
from encoder.train import Config
from encoder.vae import FLUX_VAE_CONFIG, FrozenVAE, build_random_vae
from ov3common.config import load_config
from rae_generation.config import RAETrainConfig
from rae_generation.flow import flow_loss
from rae_generation.models import DiTDH
from rae_generation.train import model_config

META = torch.device("meta")
fx_config.meta_nonzero_assume_all_nonzero = True  # boolean masks on meta: every element counts (the caption mask)

# a Llama-2-7B / Vicuna-7B-v1.5 sized LM (the LLaVA-1.5 configs' model.llm)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
BERT_VOCAB = 30522  # the encoder configs' tokenizer (bert-base-uncased)


@dataclass
class Profile:
    trainable: int = 0  # parameters
    frozen: int = 0
    flops: float = 0.0  # per sample, one training step (forward + backward)
    saved: float = 0.0  # activation bytes per sample, no checkpointing
    saved_ckpt: float = 0.0  # ... with activation checkpointing of the blocks
    blocks: int = 0
    largest_unit: int = 0  # parameters of the largest block (an FSDP2 unit)
    extra: dict = field(default_factory=dict)


def count(model: nn.Module) -> tuple[int, int]:
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, sum(p.numel() for p in model.parameters()) - train


def saved_bytes(step: Callable[[], None]) -> int:
    """Bytes autograd saves for the backward during ``step`` (parameters excluded, each tensor once by its base)."""
    return int(profile_step(step, [], 1).saved)


def profile_step(step: Callable[[], None], blocks: list[nn.Module], batch: int) -> Profile:
    """Run ``step`` (forward + backward on meta tensors) once; count FLOPs and saved bytes, per block too."""
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # ids stay unique while profiling
    total = [0]
    per_block: list[list[int]] = []
    inputs: list[int] = []

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter) and id(base) not in seen:
            seen.add(id(base))
            keep.append(base)
            total[0] += base.numel() * base.element_size()
        return t

    def pre(mod, args):
        per_block.append([total[0], 0])
        inputs.append(sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)))

    def post(mod, args, out):
        per_block[-1][1] = total[0] - per_block[-1][0]

    hooks = [b.register_forward_pre_hook(pre) for b in blocks] + [b.register_forward_hook(post) for b in blocks]
    try:
        with FlopCounterMode(display=False) as fc, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for h in hooks:
            h.remove()
    in_blocks = sum(b[1] for b in per_block)
    outside = total[0] - in_blocks
    ckpt = outside + sum(inputs) + max((b[1] for b in per_block), default=0)
    return Profile(flops=fc.get_total_flops() / batch, saved=total[0] / batch, saved_ckpt=ckpt / batch,
                   blocks=len(blocks), largest_unit=max((sum(p.numel() for p in b.parameters()) for b in blocks),
                                                        default=0))


# ------------------------------------------------------------------------------------------- the encoder
def encoder_model(cfg, device=META, vae_widths: list[int] | None = None):
    """OV3Model of an encoder config with a FLUX.1-architecture VAE (``vae_widths`` cut its channels) and an LPIPS
    network (random weights)."""

    with torch.device(device):
        vae_cfg = {**FLUX_VAE_CONFIG, **({"block_out_channels": vae_widths} if vae_widths else {})}
        vae = FrozenVAE(build_random_vae(vae_cfg), scaling_factor=0.3611)
        lpips = LPIPSLoss(cfg.loss.lpips_net, "random").to(device) if cfg.loss.w_lpips > 0 else None
        model = OV3Model(cfg.model, cfg.loss, BERT_VOCAB, 0, cfg.data.max_text_len, vae, lpips)
    return model, vae, lpips


def encoder_batch(cfg, batch: int, resolution: int, device=META, alt_len: int = 32) -> dict:
    """One batch of the encoder's inputs: images, alt-text / one recaption sentence (``alt_len`` tokens) and the
    recaption at ``data.max_text_len`` tokens (the decoder's worst case)."""
    ids = dict(dtype=torch.long, device=device)
    return {"image": torch.zeros(batch, 3, resolution, resolution, device=device),
            "alt": torch.ones(batch, alt_len, **ids), "sent": torch.ones(batch, alt_len, **ids),
            "recap": torch.ones(batch, cfg.data.max_text_len, **ids), "index": torch.arange(batch)}


def profile_encoder(cfg, resolution: int, batch: int = 2) -> Profile:
    model, vae, lpips = encoder_model(cfg)
    model.lc = OmegaConf.create({**OmegaConf.to_container(cfg.loss), "tau": 0.0})  # the noise draws from a
    # generator (not on meta); it is an elementwise add: no FLOPs or memory to speak of
    for m in (model.vit, model.decoder, model.text_encoder, model.text_decoder):
        m.grad_checkpointing = False
    b = encoder_batch(cfg, batch, resolution)
    n_tok = batch * (cfg.data.max_text_len - 1)

    def step():
        model(b, 0, batch, n_tok, 1)["loss"].backward()

    p = profile_step(step, model.fsdp_units(), batch)
    p.trainable, _ = count(model)
    p.frozen = sum(x.numel() for x in vae.parameters()) + (sum(x.numel() for x in lpips.parameters()) if lpips else 0)
    return p


# ------------------------------------------------------------------------------------------- DiT-DH (RAE)
def dit_model(cfg, tokens: int = 256, channels: int = 768, classes: int = 1000, device=META):
    with torch.device(device):
        return DiTDH(model_config(cfg, channels, int(round(tokens ** 0.5)), classes))


def dit_step(model, batch: int, tokens: int, channels: int, device=META, autocast: bool = False):
    x = torch.zeros(batch, tokens, channels, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    t = torch.full((batch,), 0.5, device=device)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = flow_loss(model, x, y, t, torch.zeros_like(x))
        loss.backward()

    return step


def profile_dit(cfg, tokens: int = 256, channels: int = 768, batch: int = 2) -> Profile:
    model = dit_model(cfg, tokens, channels).train()
    model.cfg.class_dropout = 0.0  # a random draw (not on meta); a label swap, no compute
    model.cfg.grad_ckpt = False  # counted per block; the checkpointed projection is derived
    p = profile_step(dit_step(model, batch, tokens, channels), model.fsdp_units(), batch)
    p.trainable, p.frozen = count(model)
    return p


def autocast_ratio(kind: str) -> float:
    """Activation bytes per sample of a real bf16-autocast CPU step / those counted on meta (fp32), for the same
    model and shapes: the factor that turns the meta count of an fp32 model into its bf16-autocast activations.
    Per sample = the difference between batch 4 and batch 2 (the per-step weight casts cancel). Measured on small
    instances of the same blocks: DiT-DH ``toy`` on 16 tokens x 128; the encoder's towers at ``toy`` size with the
    FLUX VAE's blocks at a quarter of its widths, 32 px."""

    torch.manual_seed(0)
    per_device = []
    for device in (META, torch.device("cpu")):
        ac = device.type == "cpu"
        if kind == "dit":
            cfg = load_config(RAETrainConfig, None, ["model.size=toy", "model.class_dropout=0.0"])
            model = dit_model(cfg, 16, 128, device=device).train()
            steps = [dit_step(model, b, 16, 128, device, ac) for b in (2, 4)]
        else:
            cfg = load_config(Config, None, ["model.size=toy", "loss.tau=0.0", "loss.lpips_backbone=random"])
            model, _, _ = encoder_model(cfg, device, vae_widths=[32, 64, 128, 128])

            def make(batch, model=model, cfg=cfg, device=device, ac=ac):
                b = encoder_batch(cfg, batch, 32, device)

                def step():
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
                        loss = model(b, 0, batch, batch * (cfg.data.max_text_len - 1), 1)["loss"]
                    loss.backward()
                return step

            steps = [make(2), make(4)]
        two, four = (saved_bytes(s) for s in steps)
        per_device.append(four - two)
    return per_device[1] / per_device[0]


# ------------------------------------------------------------------------------------------- LLaVA's LM
def llama_model(layers: int | None = None, dtype=torch.bfloat16, device=META, **over):
    cfg = LlamaConfig(**{**LLAMA_7B, **over, **({"num_hidden_layers": layers} if layers else {})})
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def lora_params(model: nn.Module, r: int) -> int:
    """LoRA adapters of rank ``r`` on every Linear of the LM but the head (LLaVA's find_all_linear_names)."""
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and "lm_head" not in n)


def profile_llm(tune: str, seq: int = 2048, batch: int = 1, lora_r: int = 128) -> Profile:
    """The 7B LM's step on ``seq`` tokens (image tokens included): ``full`` (stage 2: every weight trains),
    ``projector`` (stage 1: the LM is frozen, gradients flow to the inputs) or ``lora`` (adapters only; counted as
    the frozen LM's step, the adapters' own FLOPs are ~r/hidden of it)."""
    model = llama_model()
    model.requires_grad_(tune == "full")
    h = model.config.hidden_size
    emb = torch.zeros(batch, seq, h, device=META, dtype=torch.bfloat16, requires_grad=tune != "full")
    labels = torch.zeros(batch, seq, dtype=torch.long, device=META)

    def step():
        model(inputs_embeds=emb, labels=labels).loss.backward()

    p = profile_step(step, list(model.model.layers), batch)
    total = sum(x.numel() for x in model.parameters())
    p.trainable = total if tune == "full" else lora_params(model, lora_r) if tune == "lora" else 0
    p.frozen = 0 if tune == "full" else total
    return p


def profile_tower(encoder_cfg, resolution: int = 256) -> Profile:
    """The frozen OV3 tower's forward per image (FLUX VAE encoder + ViT), as LLaVA runs it."""
    model, vae, _ = encoder_model(encoder_cfg)
    img = torch.zeros(1, 3, resolution, resolution, device=META)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.vit(vae.encode(img))
    return Profile(trainable=0, frozen=sum(sum(count(m)) for m in (model.vit, vae)), flops=fc.get_total_flops())
