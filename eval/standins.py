"""Real-format stand-ins: every asset a real run reads, in its real on-disk format, tiny and with random weights.

Used by ``make smoke-real`` (full-size models on these formats) and by the end-to-end test that runs the real
configs through ``make`` (sizes cut by overrides). Nothing here is downloaded:

* :func:`flux_vae` — a diffusers ``AutoencoderKL`` with FLUX.1's config (``encoder.vae.FLUX_VAE_CONFIG``; widths can
  be cut), random weights, saved with ``save_pretrained`` (``config.json`` + ``diffusion_pytorch_model.safetensors``);
* :func:`vgg16_features` — torchvision's VGG16 weights file layout (``features.*`` keys; random weights), the file
  LPIPS' backbone is read from (``loss.lpips_backbone_path``);
* :func:`sp_tokenizer` — a real Llama-family SentencePiece ``tokenizer.model`` (mistral-common ships Mistral-7B's
  32k model) with a ``LlamaTokenizer`` config;
* :func:`llama` — an HF ``LlamaForCausalLM`` folder (any width / depth) with that tokenizer;
* :func:`datacomp_shards` — webdataset shards in the Recap-DataComp-1B layout of img2dataset (``KEY.jpg``,
  ``KEY.txt`` alt-text, ``KEY.json`` with ``re_caption``);
* :func:`imagenet_folder` — ``<root>/<wnid>/<file>.JPEG``;
* :func:`llava_json` — LLaVA-1.5 records (``{id, image?, conversations}``) + images;
* :func:`lmms_pope` / :func:`lmms_seed` — lmms-lab/POPE and lmms-lab/SEED-Bench parquet (``data/test-*.parquet``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw
from torchvision.models import vgg16
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from encoder.vae import FLUX_VAE_CONFIG

WORDS = ("a photo of the red green blue dog cat car tree house on in with small large bright dark "
         "standing sitting next to near under over grass road sky water wall").split()
COLOURS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40), (200, 80, 200), (40, 200, 200)]


def image(seed: int, size: int) -> Image.Image:
    """A random background with one coloured shape (decodable, not constant)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    lo, hi = sorted(rng.integers(size // 8, size - size // 8, 2))
    (d.ellipse if seed % 2 else d.rectangle)((lo, lo, max(hi, lo + 2), max(hi, lo + 2)),
                                            fill=COLOURS[seed % len(COLOURS)])
    return img


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n)).capitalize() + "."


def flux_vae(out: str | Path, block_out_channels: list[int] | None = None, norm_num_groups: int | None = None,
             seed: int = 0) -> Path:
    """A FLUX.1-architecture VAE (diffusers layout, random weights); ``block_out_channels`` cuts the widths."""


    cfg = dict(FLUX_VAE_CONFIG)
    if block_out_channels:
        cfg["block_out_channels"] = list(block_out_channels)
    if norm_num_groups:
        cfg["norm_num_groups"] = norm_num_groups
    torch.manual_seed(seed)
    out = Path(out)
    AutoencoderKL.from_config(cfg).save_pretrained(str(out), safe_serialization=True)
    return out


def vgg16_features(out: str | Path, seed: int = 0) -> Path:
    """A ``vgg16-397923af.pth``-layout file with random weights (the ``features.*`` tensors LPIPS maps)."""

    torch.manual_seed(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in vgg16().features.state_dict().items()}, out)
    return out


def sp_tokenizer(out: str | Path) -> Path:
    """Mistral-7B-v0.1's SentencePiece model (a Llama-family 32k vocabulary) as an HF tokenizer folder."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        raise FileNotFoundError("mistral-common is not installed (pip install -e '.[dev]'): it ships the "
                                "SentencePiece tokenizer.model the stand-ins use")
    src = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
        "legacy": False}))
    return out


def llama(out: str | Path, hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4,
          seed: int = 0) -> Path:
    """An HF Llama (random weights) with :func:`sp_tokenizer`; Llama-2-7B is hidden 4096, intermediate 11008,
    32 heads."""

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(sp_tokenizer(out))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def datacomp_shards(out: str | Path, shards: int = 2, per_shard: int = 16, size: int = 64, seed: int = 0,
                    recaption: bool = True) -> list[Path]:
    """Recap-DataComp-1B shards as img2dataset writes them (``--caption_col org_caption
    --save_additional_columns '["re_caption"]'``): ``KEY.jpg``, ``KEY.txt`` (alt-text), ``KEY.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(shards):
        path = out / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                alt = sentence(rng, 6)
                meta = {"uid": f"{seed}-{key}", "key": key, "status": "success", "width": size, "height": size}
                if recaption:
                    meta["re_caption"] = " ".join(sentence(rng, 12) for _ in range(3))
                _add(tf, f"{key}.jpg", jpeg(image(seed * 100003 + s * 1000 + i, size)))
                _add(tf, f"{key}.txt", alt.encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
        paths.append(path)
    return paths


def imagenet_folder(out: str | Path, classes: int = 4, per_class: int = 4, size: int = 64) -> Path:
    """ImageNet's train layout: ``<root>/n0XXXXXXX/n0XXXXXXX_<i>.JPEG``."""
    out = Path(out)
    for c in range(classes):
        wnid = f"n{1440764 + c:08d}"
        (out / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (out / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(image(c * 1000 + i, size)))
    return out


def llava_json(out: str | Path, n: int = 8, size: int = 64, words: int = 12) -> dict:
    """LLaVA-1.5 records: ``pretrain.json`` (image + caption) and ``instruct.json`` (vicuna turns, every fourth
    record text-only) with ``images/``; ``words`` sets the answers' length (a long one fills 2048 tokens)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pre, ins = [], []
    for i in range(n):
        name = f"{i:06d}.jpg"
        image(i, size).save(out / "images" / name, quality=90)
        pre.append({"id": f"p{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": sentence(rng, words)}]})
        rec = {"id": f"q{i}", "conversations": [
            {"from": "human", "value": "What is in the image?\n<image>" if i % 4 else "Tell me a story."},
            {"from": "gpt", "value": sentence(rng, words)}]}
        if i % 4:
            rec["image"] = name
        ins.append(rec)
    (out / "pretrain.json").write_text(json.dumps(pre))
    (out / "instruct.json").write_text(json.dumps(ins))
    return {"root": out, "images": out / "images", "pretrain": out / "pretrain.json",
            "instruct": out / "instruct.json"}


def _parquet(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.parent.parent


def lmms_pope(out: str | Path, images: int = 2, size: int = 64) -> Path:
    """lmms-lab/POPE's layout: ``data/test-00000-of-00001.parquet`` (question_id, question, answer, image {bytes,
    path}, category, image_source); each image asked about in the three categories."""
    rows, qid = [], 0
    for k in range(images):
        cell = {"bytes": jpeg(image(k, size)), "path": None}
        for cat in ("adversarial", "popular", "random"):
            for obj, ans in (("dog", "yes"), ("car", "no")):
                rows.append({"id": str(qid), "question_id": str(qid), "question": f"Is there a {obj} in the image?",
                             "answer": ans, "image_source": f"COCO_val2014_{k:012d}", "image": cell,
                             "category": cat})
                qid += 1
    return _parquet(rows, Path(out) / "data" / "test-00000-of-00001.parquet")


def lmms_seed(out: str | Path, questions: int = 4, size: int = 64) -> Path:
    """lmms-lab/SEED-Bench's layout: ``data/test-00000-of-00001.parquet`` (question_id, question, choice_a..d,
    answer, image [list of {bytes, path}], data_type, question_type_id, data_id)."""
    rows = [{"answer": "ABCD"[i % 4], "choice_a": "one", "choice_b": "two", "choice_c": "three", "choice_d": "four",
             "data_id": f"{i}.jpg", "data_type": "image", "question": "How many objects are there?",
             "question_id": str(i), "question_type_id": 1 + i % 9,
             "image": [{"bytes": jpeg(image(100 + i, size)), "path": None}]} for i in range(questions)]
    return _parquet(rows, Path(out) / "data" / "test-00000-of-00001.parquet")
