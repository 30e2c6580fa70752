"""lmms-eval model ``openvision3_llava`` (entry point ``lmms_eval.models`` → :func:`manifest`), so that

    lmms-eval --model openvision3_llava --model_args pretrained=runs/toy/llava/stage2 --tasks pope,seedbench

evaluates a trained folder (stage 2, LoRA or stage 1). The class works without lmms-eval installed (it then
derives from ``object``; the tests drive it with request stand-ins); with lmms-eval it derives from
``lmms_eval.api.model.lmms``. Requests follow lmms-eval's ``Instance.args``:

* ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``
* ``loglikelihood``: ``(context, doc_to_target, doc_to_visual, doc_id, task, split)`` → ``(sum log p, is_greedy)``
* ``generate_until_multi_round``: ``(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)``;
  later rounds come from ``doc_to_text(doc, previous_output, round_idx, previous_round_info)``.

LLaVA-1.5 takes one image per question: the first visual is used (a warning counts the others).
"""

from __future__ import annotations

import torch
from PIL import Image

from llava_bridge.generate import generate_ids, score_continuations
from llava_bridge.model import load_llava
from ov3common.log import get_logger

log = get_logger("llava_bridge.lmms_plugin")
MODEL_ID = "openvision3_llava"
MAX_ROUNDS = 64

try:  # lmms-eval is an optional extra (make test-lmms); the plugin's logic does not need it
    from lmms_eval.api.model import lmms as _Base
except ImportError:  # pragma: no cover - exercised by `make test` without the extra
    _Base = object


def manifest():
    """The ``lmms_eval.models`` entry-point payload (lmms-eval >= 0.6 registry_v2)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.OpenVision3Llava")


def _first_image(visuals) -> Image.Image | None:
    if visuals is None:
        return None
    if isinstance(visuals, Image.Image):
        return visuals.convert("RGB")
    visuals = [v for v in visuals if v is not None]
    if not visuals:
        return None
    if len(visuals) > 1:
        log.warning("LLaVA-1.5 uses one image per question: %d given, the first is used", len(visuals))
    if not isinstance(visuals[0], Image.Image):
        raise TypeError(f"openvision3_llava takes PIL images, got {type(visuals[0]).__name__} (video is unsupported)")
    return visuals[0].convert("RGB")


def _cut(text: str, until) -> str:
    for stop in [until] if isinstance(until, str) else (until or []):
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()


class OpenVision3Llava(_Base):
    """``pretrained``: a llava_bridge output folder; ``vision_tower``: override of ``mm_vision_tower``."""

    def __init__(self, pretrained: str, vision_tower: str | None = None, device: str | None = None,
                 batch_size: int | str = 1, conv_template: str | None = None, max_new_tokens: int = 16, **kwargs):
        if _Base is not object:
            super().__init__()
        else:
            self._rank, self._world_size, self.task_dict = 0, 1, {}
        if kwargs:
            log.warning("openvision3_llava ignores model_args %s", sorted(kwargs))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_llava(pretrained, vision_tower, device=device)
        self.device = torch.device(device)
        self.batch_size_per_gpu = int(batch_size)
        self.template = conv_template or getattr(self.model.config, "conv_template", None) or "vicuna_v1"
        self.max_new_tokens = int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests) -> list[str]:
        out: list[str] = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            image = _first_image(doc_to_visual(self._doc(task, split, doc_id)))
            out.append(self._generate(context, image, gen_kwargs or {}, ()))
        return out

    def _generate(self, context: str, image, gen_kwargs: dict, history) -> str:
        if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature", 0) or 0) > 0:
            log.warning("openvision3_llava decodes greedily (do_sample/temperature ignored)")
        n = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
        ids = generate_ids(self.model, self.tokenizer, [image], [context], n, 1, self.template, [history])[0]
        return _cut(self.tokenizer.decode(ids, skip_special_tokens=True), gen_kwargs.get("until"))

    def generate_until_multi_round(self, requests) -> list[tuple[str, ...]]:
        """Round 0 answers ``context``; then ``doc_to_text(doc, previous_output=..., round_idx=...,
        previous_round_info=...)`` gives ``(visuals, context, terminal, round_results, info)`` until ``terminal``.
        Earlier rounds are the conversation history. Returns every round's answer (as lmms-eval's LLaVA models)."""
        out: list[tuple[str, ...]] = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            image = _first_image(doc_to_visual(doc))
            history: list[tuple[str, str]] = []
            answers: list[str] = []
            info = None
            for round_idx in range(MAX_ROUNDS):
                if round_idx:
                    visuals, context, terminal, round_res, info = doc_to_text(
                        doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info)
                    if round_res is not None:
                        answers = list(round_res)
                    if terminal:
                        break
                    image = _first_image(visuals) or image
                answer = self._generate(context, image, dict(gen_kwargs or {}), tuple(history))
                answers.append(answer)
                history.append((context, answer))
            out.append(tuple(answers))
        return out

    # ------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | image, prompt) and whether greedy decoding would produce it."""
        images, contexts, targets = [], [], []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            target = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            images.append(_first_image(doc_to_visual(doc)))
            contexts.append(context)
            targets.append(str(target))
        return score_continuations(self.model, self.tokenizer, images, contexts, targets, self.batch_size,
                                   self.template)


__all__ = ["OpenVision3Llava", "manifest"]
