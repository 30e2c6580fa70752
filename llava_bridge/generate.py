"""Greedy, batched answers from a trained LLaVA folder.

    python -m llava_bridge.generate --model runs/toy/llava/stage2 --image a.jpg --image b.jpg \\
        --prompt "Is there a red circle in the image?"

One ``--prompt`` applies to every image; or give one ``--prompt`` per ``--image``. ``--image none`` asks a
text-only question. Prints one JSON line per answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from PIL import Image

from llava_bridge import IGNORE_INDEX
from llava_bridge.conversation import Rendered, generation_prompt, tokenize_rendered
from llava_bridge.model import load_llava
from ov3common.images import decode_image


def tokenize_prompt(tokenizer, text: str) -> list[int]:
    """BOS + chunks with ``IMAGE_TOKEN_INDEX`` where ``<image>`` is (as for training)."""
    return tokenize_rendered(tokenizer, Rendered(text, (), ()), "prompt")[0]


def left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s):], mask[i, n - len(s):] = torch.tensor(s), 1
    return ids, mask


def _template(model, template: str | None) -> str:
    return template or getattr(model.config, "conv_template", None) or "vicuna_v1"


@torch.no_grad()
def answer(model, tokenizer, images: Sequence[Image.Image | None], questions: Sequence[str],
           max_new_tokens: int = 64, batch_size: int = 8, template: str | None = None,
           histories: Sequence[Sequence[tuple[str, str]]] | None = None) -> list[str]:
    """Greedy answers; ``images[i]`` may be None (text-only). ``histories[i]``: earlier (question, answer) turns."""
    ids = generate_ids(model, tokenizer, images, questions, max_new_tokens, batch_size, template, histories)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


@torch.no_grad()
def generate_ids(model, tokenizer, images: Sequence[Image.Image | None], questions: Sequence[str],
                 max_new_tokens: int = 64, batch_size: int = 8, template: str | None = None,
                 histories: Sequence[Sequence[tuple[str, str]]] | None = None) -> list[list[int]]:
    """The new token ids of each answer (up to and without the first EOS / padding)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    template = _template(model, template)
    processor = model.vision_tower.processor
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for s in range(0, len(questions), batch_size):
        imgs, qs = images[s:s + batch_size], questions[s:s + batch_size]
        hist = histories[s:s + batch_size] if histories else [()] * len(qs)
        prompts = [generation_prompt(template, q, im is not None, tokenizer, h) for im, q, h in zip(imgs, qs, hist)]
        ids, mask = left_pad([tokenize_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
        pixels = [processor(im) for im in imgs if im is not None]
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             images=torch.stack(pixels).to(device) if pixels else None,
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in gen.tolist():
            end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            out.append(row[:end])
    return out


@torch.no_grad()
def score_continuations(model, tokenizer, images: Sequence[Image.Image | None], contexts: Sequence[str],
                        continuations: Sequence[str], batch_size: int = 8,
                        template: str | None = None) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | image, prompt), whether greedy decoding would produce it)`` for each item.

    The prompt is the template's generation prompt for ``contexts[i]``; the continuation follows it after a space,
    as an answer would. Batched with left padding (the scores do not depend on the batch); an image object that
    occurs several times in a batch is encoded once.
    """
    if not len(images) == len(contexts) == len(continuations):
        raise ValueError(f"{len(images)} images, {len(contexts)} contexts, {len(continuations)} continuations")
    template = _template(model, template)
    processor = model.vision_tower.processor
    device = next(model.parameters()).device
    out: list[tuple[float, bool]] = []
    for s in range(0, len(contexts), batch_size):
        ids_l, lab_l, pixels, which, seen = [], [], [], [], {}
        for im, ctx, cont in zip(images[s:s + batch_size], contexts[s:s + batch_size], continuations[s:s + batch_size]):
            prompt = generation_prompt(template, ctx, im is not None, tokenizer)
            text = prompt + " " + cont.strip()
            ids, labels = tokenize_rendered(tokenizer, Rendered(text, ((len(prompt), len(text)),), (False,)),
                                            "continuation")
            ids_l.append(ids)
            lab_l.append(labels)
            if im is not None:
                if id(im) not in seen:  # the same image (e.g. one question's choices) goes through the tower once
                    seen[id(im)] = len(pixels)
                    pixels.append(processor(im))
                which.append(seen[id(im)])
        ids_t, mask = left_pad(ids_l, tokenizer.pad_token_id)
        lab_t, _ = left_pad(lab_l, IGNORE_INDEX)
        feats = model.tower_features(torch.stack(pixels))[torch.tensor(which)] if pixels else None
        sp = model.prepare_multimodal(ids_t.to(device), mask.to(device), lab_t.to(device), None, feats, "left")
        logits = model(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                       position_ids=sp.position_ids).logits[:, :-1].float()
        target = sp.labels[:, 1:]
        keep = target != IGNORE_INDEX
        picked = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        hit = (logits.argmax(-1) == target) | ~keep
        for row in range(len(ids_l)):
            out.append((float(picked[row][keep[row]].sum()), bool(hit[row].all())))
    return out


@torch.no_grad()
def rank_choices(model, tokenizer, images: Sequence[Image.Image | None], questions: Sequence[str],
                 choices: Sequence[Sequence[str]], batch_size: int = 8,
                 template: str | None = None) -> list[tuple[int, list[float]]]:
    """Multiple choice by likelihood ranking (ours; summed log-probabilities of the choice text, no EOS): the index of the choice whose text is the
    most likely answer to ``questions[i]`` (sum of token log-probabilities), and every choice's score."""
    flat = [(im, q, c) for im, q, cs in zip(images, questions, choices, strict=True) for c in cs]
    scores = score_continuations(model, tokenizer, [f[0] for f in flat], [f[1] for f in flat],
                                 [f[2] for f in flat], batch_size, template)
    out, k = [], 0
    for cs in choices:
        mine = [lp for lp, _ in scores[k:k + len(cs)]]
        out.append((max(range(len(cs)), key=mine.__getitem__), mine))
        k += len(cs)
    return out


def read_image(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return decode_image(f.read())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a stage-1, stage-2 or LoRA output folder")
    ap.add_argument("--image", action="append", default=[], help="image file (repeatable); 'none' = text-only")
    ap.add_argument("--prompt", action="append", required=True, help="question (one, or one per --image)")
    ap.add_argument("--vision-tower", default=None, help="override mm_vision_tower from config.json")
    ap.add_argument("--template", default=None, help="plain | vicuna_v1 | chat_template (default: from config)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    paths = a.image or ["none"]
    prompts = a.prompt * len(paths) if len(a.prompt) == 1 else a.prompt
    if len(prompts) != len(paths):
        ap.error(f"{len(a.prompt)} prompts for {len(paths)} images: give one, or one per image")
    model, tok = load_llava(a.model, a.vision_tower, device=a.device)
    images = [None if p == "none" else read_image(p) for p in paths]
    answers = answer(model, tok, images, prompts, a.max_new_tokens, a.batch_size, a.template)
    for p, q, ans in zip(paths, prompts, answers):
        print(json.dumps({"image": p, "prompt": q, "answer": ans}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
