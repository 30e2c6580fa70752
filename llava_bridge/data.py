"""LLaVA training data: LLaVA JSON / JSONL records (``{id, image?, conversations}``) with an image root, or
webdataset tar shards (image + caption, for ``plain`` pretraining), and the batch collator.

Nothing crashes on bad input: records with a broken structure (``bad_record``), invalid JSONL lines
(``bad_json``) or a missing image file (``missing_image``) are dropped when the dataset is built; an image that
fails to decode when read (``ov3common.images.decode_image``: truncated, not an image, too small, bad aspect...)
is counted and the sample is replaced by the next readable index (deterministic, so resumes stay exact; each
item is counted once per epoch, when it is the sample asked for). Every count
travels with the batch (``batch["_skip"]``) and the trainer logs it. Tokenization mismatches are NOT skipped:
they raise naming the sample.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from llava_bridge import IGNORE_INDEX
from llava_bridge.conversation import BadRecord, normalize_turns, render, tokenize_many, tokenize_rendered
from llava_bridge.shards import TarImage, index_shards, read_tar_member
from ov3common.images import BadSample, SkipStats, decode_image

MAX_FALLBACKS = 32


def load_records(path: str | os.PathLike, stats: SkipStats) -> list[dict]:
    """A LLaVA ``.json`` (a list of records) or ``.jsonl`` (one per line; invalid lines counted as ``bad_json``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file does not exist: {path}")
    if path.suffix == ".jsonl":
        out = []
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    stats.add("bad_json")
                    continue
                out.append(rec)
        return out
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); use .jsonl to skip bad lines instead") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: a LLaVA JSON must be a list of records, got {type(data).__name__}")
    return data


class LlavaDataset(Dataset):
    """Tokenized samples ``{input_ids, labels, image?}`` from LLaVA records or tar shards."""

    def __init__(self, sources: Sequence[str], image_root: str | None, tokenizer, template: str,
                 processor: Callable, max_length: int, num_image_tokens: int, stats: SkipStats | None = None,
                 shard_caption: str = "txt", features=None):
        self.tokenizer, self.template, self.processor = tokenizer, template, processor
        self.features = features  # a FeatureCache (llava_bridge.feature_cache): tower outputs instead of pixels
        self.max_length, self.num_image_tokens = max_length, num_image_tokens
        self.stats = stats if stats is not None else SkipStats()
        self.root = Path(image_root) if image_root else None
        self.items: list[tuple[str, object, list]] = []  # (id, image source or None, turns)
        self.tokens: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # pretokenize(): per item
        for src in sources:
            p = Path(src)
            if p.is_dir() or p.suffix == ".tar":
                shard_files = sorted(p.glob("*.tar")) if p.is_dir() else [p]
                for rec in index_shards(shard_files, self.stats, shard_caption):
                    self._add(rec, rec["image"])
            else:
                for i, rec in enumerate(load_records(p, self.stats)):
                    self._add(rec, None, f"{p.name}:{i}")
        if not self.items:
            raise ValueError(f"no usable samples in {list(sources)} (skipped: {self.stats.as_dict()['skipped']})")

    def _add(self, rec, image, fallback_id: str = "") -> None:
        if not isinstance(rec, dict):
            self.stats.add("bad_record")
            return
        sid = str(rec.get("id", fallback_id))
        if image is None and rec.get("image") is not None:
            if not isinstance(rec["image"], str) or self.root is None:
                self.stats.add("bad_record" if self.root is not None else "missing_image")
                return
            image = self.root / rec["image"]
            if not image.is_file():
                self.stats.add("missing_image")
                return
        try:
            turns = normalize_turns(rec.get("conversations"), image is not None)
        except BadRecord as e:
            self.stats.add(e.reason)
            return
        self.items.append((sid, image, turns))

    def __len__(self) -> int:
        return len(self.items)

    def _budget(self, image) -> int:
        return max(self.max_length - (self.num_image_tokens - 1 if image is not None else 0), 1)

    def pretokenize(self, chunk: int = 4096) -> None:
        """Tokenize every item now, in batched tokenizer calls, and keep the tensors: the same ids and labels as
        the per-step path, without tokenizing each record again every epoch (the toy world's stage 2 spent ~1/8 of
        its step time there). Memory: two int64 tensors per item, so for small datasets (the toy world's 41k
        records: ~60 MB); at LLaVA scale leave it off. Call after ``items`` is final (``data.max_samples``)."""
        tokens = []
        for i in range(0, len(self.items), chunk):
            part = self.items[i:i + chunk]
            rendered = [render(self.template, turns, self.tokenizer) for _, _, turns in part]
            encoded = tokenize_many(self.tokenizer, rendered, [sid for sid, _, _ in part],
                                    [self._budget(image) for _, image, _ in part])
            tokens += [(torch.tensor(ids), torch.tensor(labels)) for ids, labels in encoded]
        self.tokens = tokens

    @property
    def modality_lengths(self) -> list[int]:
        """Approximate token counts; positive for samples with an image, negative for text-only (LLaVA's rule)."""
        out = []
        for _, image, turns in self.items:
            n = sum(len(t.split()) for _, t in turns)
            out.append(n + self.num_image_tokens if image is not None else -n)
        return out

    def _read_image(self, image, local: SkipStats) -> torch.Tensor:
        if isinstance(image, TarImage):
            data = read_tar_member(image)
        else:
            try:
                data = Path(image).read_bytes()
            except FileNotFoundError as e:
                raise BadSample("missing_image", str(image)) from e
        return self.processor(decode_image(data, stats=local))

    def __getitem__(self, index: int) -> dict:
        local = SkipStats()  # counts of the item at `index` only: a fallback is counted when it is primary
        for k in range(MAX_FALLBACKS):
            j = (index + k) % len(self.items)
            sid, image, turns = self.items[j]
            pixels = feat = None
            if image is not None and self.features is not None:
                if image not in self.features:  # unreadable when the cache was built
                    if k == 0:
                        local.add(self.features.bad.get(str(image), "missing_features"))
                    continue
                feat = self.features[image]
            elif image is not None:
                try:
                    pixels = self._read_image(image, local if k == 0 else SkipStats())
                except BadSample as e:
                    if k == 0:
                        local.add(e.reason)
                    continue
            if self.tokens is not None:
                ids, labels = self.tokens[j]
            else:
                ids, labels = map(torch.tensor, tokenize_rendered(
                    self.tokenizer, render(self.template, turns, self.tokenizer), sid, self._budget(image)))
            return {"id": sid, "input_ids": ids, "labels": labels, "image": pixels,
                    "feat": feat, "skipped": dict(local.skipped), "converted": dict(local.converted)}
        raise RuntimeError(f"{MAX_FALLBACKS} consecutive samples from index {index} have unreadable images: "
                           "check the image root")


class Collator:
    """Right-pads ``input_ids`` (pad id), ``labels`` (−100) and builds ``attention_mask``; stacks the images (or
    the cached tower features, as ``image_features``)."""

    def __init__(self, pad_token_id: int):
        self.pad = int(pad_token_id)

    def __call__(self, samples: list[dict]) -> dict:
        n = max(len(s["input_ids"]) for s in samples)
        b = len(samples)
        ids = torch.full((b, n), self.pad, dtype=torch.long)
        labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, n), dtype=torch.long)
        for i, s in enumerate(samples):
            k = len(s["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = s["input_ids"], s["labels"], 1
        images = [s["image"] for s in samples if s["image"] is not None]
        skipped, converted = Counter(), Counter()
        for s in samples:
            skipped.update(s.get("skipped", {}))
            converted.update(s.get("converted", {}))
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask,
                 "_skip": {"skipped": dict(skipped), "converted": dict(converted)},
                 "_ids": [s["id"] for s in samples]}
        if images:
            batch["images"] = torch.stack(images)
        feats = [s["feat"] for s in samples if s.get("feat") is not None]
        if feats:
            batch["image_features"] = torch.stack(feats)
        return batch
