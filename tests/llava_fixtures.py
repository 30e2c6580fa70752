"""A tiny LLaVA world for the llava_bridge tests (not collected: no ``test_`` prefix).

Word-level tokenizer (built with ``tokenizers`` like the toy world's), a random 2-layer Llama, a random tiny OV3
encoder export (32 px → 4 tokens), a few coloured images, LLaVA JSONs (plain + vicuna_v1 with text-only records).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from encoder.export import write_random_export
from llava_bridge.conversation import VICUNA_SYSTEM

__all__ = ["llava_world", "word_tokenizer", "llama_sp_tokenizer"]  # the fixtures test modules star-import

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square")
WORDS = ("a chat between curious user and an artificial intelligence assistant the gives helpful detailed polite "
         "answers to s questions describe image is there in this picture what color shape yes no it one two "
         "answer question using single word or phrase with option letter from given choices directly how many "
         "sides does have three four hello hi").split()


def build_tokenizer(out: Path):
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    words = sorted(set(WORDS) | set(COLORS) | set(SHAPES) | set(string.punctuation) | set("abcd")
                   | set(VICUNA_SYSTEM.lower().replace(".", " ").replace(",", " ").replace("'", " ").split()))
    vocab = specials + [w for w in words if w not in specials]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=2048, padding_side="right")
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def build_lm(out: Path, tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_images(root: Path) -> list[dict]:
    """8 images (non-square 40×32) of one coloured shape each; returns scene dicts."""
    root.mkdir(parents=True, exist_ok=True)
    scenes = []
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        img = Image.new("RGB", (40, 32), (128, 128, 128))
        d = ImageDraw.Draw(img)
        box = (10, 6, 30, 26)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
        name = f"img{i}.png"
        img.save(root / name)
        scenes.append({"image": name, "color": color, "shape": shape})
    return scenes


def records(scenes: list[dict]) -> tuple[list[dict], list[dict]]:
    pretrain = [{"id": f"p{i}", "image": s["image"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": f"A {s['color']} {s['shape']}."}]} for i, s in enumerate(scenes)]
    instruct = []
    for i, s in enumerate(scenes):
        instruct.append({"id": f"q{i}", "image": s["image"], "conversations": [
            {"from": "human", "value": f"Is there a {s['shape']} in the image?\n<image>"},
            {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": "What color is it?"},
            {"from": "gpt", "value": f"It is {s['color']}."}]})
        if i % 3 == 0:
            instruct.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": "How many sides does a square have?"},
                {"from": "gpt", "value": "Four."}]})
    return pretrain, instruct


def benchmarks(scenes: list[dict]) -> tuple[list[dict], list[dict]]:
    """Toy POPE (yes/no, 3 categories) and SeedBench (4 choices) rows in lmms-lab's columns, with questions and
    choices of different lengths (so a batch is left-padded)."""
    cats = ("random", "popular", "adversarial")
    pope, seed = [], []
    for i, s in enumerate(scenes):
        other = SHAPES[1 - SHAPES.index(s["shape"])]
        qs = (f"Is there a {s['shape']} in the image?",
              f"Is there a {s['color']} {other} in this picture with a {s['color']} shape?")
        for j, q in enumerate(qs):
            pope.append({"question_id": f"pope{i}_{j}", "question": q, "answer": "yes" if j == 0 else "no",
                         "image": s["image"], "category": cats[(i + j) % 3]})
        colors = list(COLORS)
        choices = [colors[(colors.index(s["color"]) + k) % 4] for k in range(4)]
        choices[1] = f"a {choices[1]} {other} with {choices[0]}"  # a longer choice
        order = [(i + k) % 4 for k in range(4)]
        seed.append({"question_id": f"seed{i}", "question": "What color is the shape?" if i % 2 else
                     "What color is the shape in this picture?", "image": s["image"], "data_type": "image",
                     "category": ("scene", "identity")[i % 2], "answer": "ABCD"[order.index(0)],
                     **{f"choice_{x}": choices[o] for x, o in zip("abcd", order)}})
    return pope, seed


def build_world(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(root / "tok")
    build_lm(root / "llm", tok)
    write_random_export(root / "enc", size="tiny", image_size=32)
    scenes = build_images(root / "images")
    pretrain, instruct = records(scenes)
    (root / "pretrain.json").write_text(json.dumps(pretrain))
    (root / "instruct.json").write_text(json.dumps(instruct))
    pope, seed = benchmarks(scenes)
    for name, rows in (("pope", pope), ("seed", seed)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"pope": root / "pope.jsonl", "seed": root / "seed.jsonl","root": root, "tok": root / "tok", "llm": root / "llm", "enc": root / "enc", "images": root / "images",
            "pretrain": root / "pretrain.json", "instruct": root / "instruct.json", "scenes": scenes}


@pytest.fixture(scope="session")
def llava_world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("llava_world"))


@pytest.fixture(scope="session")
def word_tokenizer(llava_world):
    return AutoTokenizer.from_pretrained(llava_world["tok"])


@pytest.fixture(scope="session")
def llama_sp_tokenizer(tmp_path_factory):
    """A real Llama-family SentencePiece tokenizer, offline: mistral-common ships Mistral-7B-v0.1's 32k model."""


    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common is not installed")
    src = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    d = tmp_path_factory.mktemp("sp_tok")
    shutil.copy(src, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048, "legacy": False}))
    return AutoTokenizer.from_pretrained(d)


def rng_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
