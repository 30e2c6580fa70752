"""LLaVA on top of any transformers causal LM (Llama/Vicuna, Mistral, Qwen2, ...), loaded from a local path.

``llava_class(base)`` returns a subclass of the LM's own class (``LlamaForCausalLM`` → ``OV3LlavaLlamaForCausalLM``)
whose ``forward`` / ``generate`` also take ``images`` (pixels for the tower) or ``image_features`` (tower outputs)
and splice them at the −200 placeholders. The projector is ``self.model.mm_projector`` (keys
``model.mm_projector.{0,2}.*``); the frozen tower is held outside the module tree (not saved, not sharded by
ZeRO-3, never trained) and named in the config (``mm_vision_tower``).

Saved folders:
* stage 1 (projector only): ``mm_projector.safetensors`` + ``config.json`` (the LM's config + ``mm_*`` fields);
* stage 2: a full ``save_pretrained`` folder (LM + projector) + tokenizer; loads back with :func:`load_llava`;
* LoRA: ``adapter_model.safetensors`` + ``adapter_config.json`` + ``mm_projector.safetensors`` + ``config.json``;
  :func:`load_llava` merges it on request (``merge_lora=True``).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from llava_bridge import IMAGE_TOKEN_INDEX
from llava_bridge.projector import FILENAME as PROJECTOR_FILE
from llava_bridge.projector import build_projector, load_projector_state
from llava_bridge.splice import splice
from llava_bridge.vision import build_vision_tower

MM_FIELDS = ("mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
             "mm_vision_select_feature", "image_aspect_ratio", "tokenizer_model_max_length", "conv_template",
             "mm_num_image_tokens")


class LlavaMixin:
    """Adds the projector, the (unregistered) vision tower and the splice to a causal LM class."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._tower: tuple = ()
        if getattr(config, "mm_projector_type", None):
            self.init_projector()

    # -- modules
    def init_projector(self) -> nn.Module:
        cfg = self.config
        self.model.mm_projector = build_projector(cfg.mm_projector_type, cfg.mm_hidden_size, cfg.hidden_size)
        return self.model.mm_projector

    @property
    def mm_projector(self) -> nn.Module:
        return self.model.mm_projector

    def set_vision_tower(self, tower: nn.Module | None) -> None:
        self._tower = (tower,) if tower is not None else ()

    @property
    def vision_tower(self) -> nn.Module | None:
        return self._tower[0] if self._tower else None

    # -- features
    def tower_features(self, images: Tensor) -> Tensor:
        """Pixels through the frozen tower (moved to the projector's device if needed) → features ``[M, N, C]``."""
        tower = self.vision_tower
        if tower is None:
            raise RuntimeError("the model has no vision tower: call set_vision_tower() or pass image_features")
        proj = self.model.mm_projector
        ref = proj[0].weight if isinstance(proj, nn.Sequential) else proj.weight
        if next(tower.parameters()).device != ref.device:
            tower.to(ref.device)
        return tower(images.to(ref.device))

    def encode_images(self, images: Tensor | None = None, image_features: Tensor | None = None) -> Tensor:
        """Pixels (through the frozen tower) or precomputed tower features → projected ``[M, N, H]``."""
        if image_features is None:
            image_features = self.tower_features(images)
        return self.model.mm_projector(image_features.to(self.dtype))

    def prepare_multimodal(self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None,
                           images: Tensor | None, image_features: Tensor | None, padding_side: str = "right"):
        n_img = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        has = images is not None or image_features is not None
        feats = self.encode_images(images, image_features) if has and n_img else None
        dummy = None
        if feats is None and self.training:
            # keep every projector parameter in the graph (DDP / ZeRO-3 expect a gradient on each rank), and call
            # the projector BEFORE the embeddings as the image path does: ZeRO-3 gathers in call order
            h = self.config.mm_hidden_size
            dummy = self.model.mm_projector(torch.zeros(1, h, dtype=self.dtype, device=input_ids.device))
        out = splice(input_ids, attention_mask, labels, self.get_input_embeddings(), feats,
                     getattr(self.config, "tokenizer_model_max_length", None), padding_side)
        if dummy is not None:
            out.inputs_embeds = out.inputs_embeds + 0.0 * dummy.sum()
        return out

    # -- transformers entry points
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, images: Tensor | None = None,
                image_features: Tensor | None = None, **kwargs):
        if inputs_embeds is None and input_ids is not None and (self.training or images is not None or
                                                                image_features is not None or bool((input_ids < 0).any())):
            sp = self.prepare_multimodal(input_ids, attention_mask, labels, images, image_features)
            input_ids, inputs_embeds, attention_mask, labels = None, sp.inputs_embeds, sp.attention_mask, sp.labels
            position_ids = sp.position_ids
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                 images: Tensor | None = None, image_features: Tensor | None = None, **kwargs):
        """Greedy/sampled generation from a LEFT-padded batch with placeholders; returns only new tokens."""
        if input_ids is None:
            return super().generate(attention_mask=attention_mask, **kwargs)
        sp = self.prepare_multimodal(input_ids, attention_mask, None, images, image_features, "left")
        return super().generate(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask, **kwargs)


@functools.cache
def llava_class(base: type) -> type:
    """``OV3Llava<Base>`` = LlavaMixin + the LM's class (cached, so isinstance checks hold)."""
    return type(f"OV3Llava{base.__name__}", (LlavaMixin, base), {"__module__": __name__})


def _base_class(config) -> type:
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as e:
        raise ValueError(f"model_type {config.model_type!r} has no transformers causal-LM class "
                         "(trust_remote_code is never used)") from e


def _check_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {p}/config.json does not exist")
    return p


@dataclass
class MMSettings:
    vision_tower: str
    select_layer: int = -2
    select_feature: str = "patch"
    projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: str = "pad"
    model_max_length: int = 2048
    template: str = "vicuna_v1"


def load_lm(path: str | os.PathLike, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """The LLaVA subclass of the LM at ``path`` (a projector is built iff its config has ``mm_*`` fields)."""

    path = _check_dir(path, "language model")
    config = AutoConfig.from_pretrained(path)
    cls = llava_class(_base_class(config))
    return cls.from_pretrained(path, dtype=dtype, attn_implementation=attn)


def attach_vision(model, tower: nn.Module, mm: MMSettings, projector_path: str | None = None) -> None:
    """Set the ``mm_*`` config fields, build the projector (unless present) and optionally load stage-1 weights."""
    cfg = model.config
    new = dict(mm_vision_tower=tower.path, mm_hidden_size=tower.hidden_size, mm_projector_type=mm.projector_type,
               mm_vision_select_layer=mm.select_layer, mm_vision_select_feature=mm.select_feature,
               image_aspect_ratio=mm.image_aspect_ratio, tokenizer_model_max_length=mm.model_max_length,
               conv_template=mm.template, mm_num_image_tokens=tower.num_tokens)
    had = getattr(cfg, "mm_projector_type", None)
    if had and (cfg.mm_projector_type, cfg.mm_hidden_size) != (mm.projector_type, tower.hidden_size):
        raise ValueError(f"the LM already has a {cfg.mm_projector_type} projector for mm_hidden_size "
                         f"{cfg.mm_hidden_size}; the tower gives {tower.hidden_size} ({mm.projector_type})")
    for k, v in new.items():
        setattr(cfg, k, v)
    if not had:
        model.init_projector().to(model.dtype)
    if projector_path:
        load_projector_state(projector_path, model.model.mm_projector)
    model.set_vision_tower(tower)


def load_tokenizer(path: str | os.PathLike, model_max_length: int | None = None):
    tok = AutoTokenizer.from_pretrained(path)
    if model_max_length:
        tok.model_max_length = model_max_length
    if tok.pad_token is None:  # LLaVA uses unk as pad for Llama; fall back to eos
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def mm_config(model) -> dict:
    return {k: getattr(model.config, k) for k in MM_FIELDS if hasattr(model.config, k)}


def load_llava(path: str | os.PathLike, vision_tower: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", merge_lora: bool = True, attn: str = "sdpa"):
    """Load a stage-1, stage-2 or LoRA folder → ``(model, tokenizer)``; the tower is attached (``mm_vision_tower``
    from config.json, or ``vision_tower`` to override its path). Stage-1 folders need the LM named in
    config.json (``_name_or_path``, written at save time)."""
    path = _check_dir(path, "LLaVA model")
    cfg = json.loads((path / "config.json").read_text())
    if "mm_projector_type" not in cfg:
        raise ValueError(f"{path}/config.json has no mm_* fields: not a LLaVA folder")
    tower = build_vision_tower(vision_tower or cfg["mm_vision_tower"], cfg["mm_vision_select_layer"],
                               cfg["mm_vision_select_feature"], cfg.get("image_aspect_ratio", "pad"))
    if (path / "adapter_config.json").is_file():
        model, tok = _load_lora(path, cfg, dtype, merge_lora, attn)
    elif (path / PROJECTOR_FILE).is_file() and not any(path.glob("model*.safetensors")):
        base = cfg.get("llm_path")
        if not base:
            raise ValueError(f"{path}: a projector-only folder needs 'llm_path' in config.json")
        model = load_lm(base, dtype, attn)
        for k in MM_FIELDS:
            if k in cfg:
                setattr(model.config, k, cfg[k])
        model.init_projector().to(dtype)
        load_projector_state(path / PROJECTOR_FILE, model.model.mm_projector)
        tok = load_tokenizer(base, cfg.get("tokenizer_model_max_length"))
    else:
        model = load_lm(path, dtype, attn)
        tok = load_tokenizer(path, cfg.get("tokenizer_model_max_length"))
    if tower.hidden_size != cfg["mm_hidden_size"]:
        raise ValueError(f"vision tower {tower.path} gives width {tower.hidden_size}, the projector expects "
                         f"mm_hidden_size {cfg['mm_hidden_size']}")
    model.set_vision_tower(tower)
    model.to(device).eval()
    tower.to(device)
    return model, tok


def _load_lora(path: Path, cfg: dict, dtype, merge: bool, attn: str):
    from peft import PeftModel

    adapter = json.loads((path / "adapter_config.json").read_text())
    base = cfg.get("llm_path") or adapter.get("base_model_name_or_path")
    model = load_lm(base, dtype, attn)
    for k in MM_FIELDS:
        if k in cfg:
            setattr(model.config, k, cfg[k])
    if not hasattr(model.model, "mm_projector"):
        model.init_projector().to(dtype)
    load_projector_state(path / PROJECTOR_FILE, model.model.mm_projector)
    peft_model = PeftModel.from_pretrained(model, str(path), autocast_adapter_dtype=False)  # one dtype, as trained
    tok = load_tokenizer(path if (path / "tokenizer_config.json").is_file() else base,
                         cfg.get("tokenizer_model_max_length"))
    if merge:
        return peft_model.merge_and_unload(), tok
    return peft_model, tok
