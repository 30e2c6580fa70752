"""POPE and SeedBench loaders (local files only) with LLaVA-1.5's evaluation prompts.

API (what a batch predictor such as llava_bridge calls)::

    from eval.benchmarks import load_pope, load_seedbench, load_image, write_predictions
    recs = load_pope("data/toy/pope/pope.jsonl")          # or a parquet file / folder, or a save_to_disk folder
    for r in recs:
        text = my_model(load_image(r["image"]), r["prompt"])   # prompt has no image token: add your own
        ...
    write_predictions(recs, predictions, "runs/x/pope_predictions.jsonl")   # -> python -m eval.score pope ...

Each record is a dict with
  * ``question_id`` (str), ``question``, ``prompt`` (LLaVA-1.5's evaluation prompt), ``answer`` (POPE: "yes"/"no";
    SeedBench: "A".."D"), ``category`` (POPE: adversarial | popular | random; SeedBench: dimension name),
  * ``image``: a path (str) for JSONL + image-folder sets, or a lazily opened ``PIL.Image`` for images embedded
    in parquet / arrow files. Use :func:`load_image` to get an RGB image from either.
  * SeedBench also: ``answer_prompt`` (answer ranking, see below), ``choices`` {"A": ..., "D": ...},
    ``data_type`` ("image" | "video"), ``question_type_id``, ``images`` (all images of the question; video
    questions have several frames).

Accepted layouts (lmms-eval's columns: POPE ``question_id, question, answer, image, category``; SEED-Bench
``question_id, question, choice_a..choice_d, answer, image (list), data_type, question_type_id``):
  * ``*.jsonl`` / ``*.json`` with ``image`` a path relative to ``image_root`` (default: the ``image_root`` of a
    toy world's ``meta.json`` found next to or above the file, else the file's folder),
  * a parquet file or a folder of parquet files (HF hub layout, e.g. ``data/test-00000-of-00003.parquet``;
    files whose name starts with ``<split>-`` are preferred when present),
  * an HF ``save_to_disk`` folder (``state.json`` + ``*.arrow``; a ``DatasetDict`` folder picks ``split``), read
    with pyarrow (the ``datasets`` package is not needed).

Prompts: POPE ``question\\nAnswer the question using a single word or phrase.``; SeedBench ``question\\nA. ..\\n
B. ..\\nC. ..\\nD. ..\\nAnswer with the option's letter from the given choices directly.`` (``prompt``: LLaVA-1.5's
protocol, the model writes a letter) and ``question\\nAnswer the question using a single word or phrase.``
(``answer_prompt``: likelihood ranking (ours, close to but not exactly SEED-Bench's or lmms-eval's seedbench_ppl), where each choice's text is scored as the answer and
the most likely one is the prediction, so a model that cannot map contents to letters is still measured).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from eval.score import seed_category
from ov3common.checkpoint import atomic_write_text
from ov3common.images import BadSample, decode_image

POPE_SUFFIX = "Answer the question using a single word or phrase."
SEED_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = ("A", "B", "C", "D")


class BenchmarkError(ValueError):
    """A benchmark file that cannot be loaded; the message names the file (and row / column)."""


# ---------------------------------------------------------------------------------------------------- prompts
def pope_prompt(question: str) -> str:
    """LLaVA-1.5 / lmms-eval POPE prompt."""
    return f"{question.strip()}\n{POPE_SUFFIX}"


def seed_answer_prompt(question: str) -> str:
    """The question alone, for likelihood ranking (ours: each choice's text is scored as the answer)."""
    return pope_prompt(question)


def seed_prompt(question: str, choices: Sequence[str]) -> str:
    """LLaVA-1.5 / lmms-eval SeedBench prompt (lettered choices)."""
    lines = [question] + [f"{letter}. {c}" for letter, c in zip(LETTERS, choices)] + [SEED_SUFFIX]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- images
def load_image(image: str | Path | bytes | Image.Image) -> Image.Image:
    """An RGB PIL image from a path, raw bytes or a (lazily opened) PIL image; raises BenchmarkError."""

    if isinstance(image, Image.Image):
        fp = getattr(image, "fp", None)
        if isinstance(fp, io.BytesIO):  # opened lazily by a loader: decode its bytes robustly
            image = fp.getvalue()
        else:
            try:
                image.load()
            except OSError as e:
                raise BenchmarkError(f"cannot decode image: {e}") from e
            return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise BenchmarkError(f"image file does not exist: {image}")
        image = Path(image).read_bytes()
    try:
        return decode_image(image, min_side=1, max_aspect=1e9)
    except BadSample as e:
        raise BenchmarkError(f"cannot decode image ({e})") from e


class _ImageCache:
    """Embedded image bytes, de-duplicated (POPE repeats each image many times), opened lazily."""

    def __init__(self):
        self._by_hash: dict[str, bytes] = {}

    def open(self, cell: object, where: str) -> Image.Image | str | None:
        if cell is None:
            return None
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
            if data is None:
                return path
        elif isinstance(cell, (bytes, bytearray)):
            data = bytes(cell)
        elif isinstance(cell, str):
            return cell
        else:
            raise BenchmarkError(f"{where}: unsupported image cell of type {type(cell).__name__}")
        data = self._by_hash.setdefault(hashlib.sha1(data).hexdigest(), data)
        try:
            return Image.open(io.BytesIO(data))  # reads the header only; pixels are decoded by load_image
        except OSError as e:
            raise BenchmarkError(f"{where}: embedded image cannot be opened ({e})") from e


# ---------------------------------------------------------------------------------------------------- rows
def _read_json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{path}:{i}: not valid JSON ({e.msg})") from e
    return rows


def _toy_image_root(path: Path) -> Path:
    for d in (path.parent, path.parent.parent, path.parent.parent.parent):
        meta = d / "meta.json"
        if meta.is_file():
            root = json.loads(meta.read_text(encoding="utf-8")).get("image_root")
            if root:
                return d / root
    return path.parent


def _arrow_files(folder: Path, split: str) -> list[Path]:
    if (folder / "dataset_dict.json").is_file():
        if not (folder / split).is_dir():
            splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits")
            raise BenchmarkError(f"{folder}: DatasetDict has no split {split!r} (splits: {splits})")
        folder = folder / split
    state = folder / "state.json"
    names = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    files = [folder / n for n in names] or sorted(folder.glob("*.arrow"))
    if not files:
        raise BenchmarkError(f"{folder}: save_to_disk folder without arrow files")
    return files


def _read_table_rows(files: list[Path], columns: Sequence[str]) -> Iterable[tuple[str, dict]]:
    for f in files:
        if f.suffix == ".parquet":
            table = pq.read_table(f)
        else:
            with pa.memory_map(str(f)) as src:
                try:
                    table = pa.ipc.open_stream(src).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(src).read_all()
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise BenchmarkError(f"{f}: missing column(s) {missing}; has {table.column_names}")
        i = 0
        for batch in table.to_batches(max_chunksize=256):
            for row in batch.to_pylist():
                yield f"{f} row {i}", row
                i += 1


def read_rows(path: str | Path, columns: Sequence[str], split: str = "test") -> tuple[list[tuple[str, dict]], Path]:
    """(where, row) pairs from any accepted layout, and the folder that relative image paths start from."""
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"benchmark path does not exist: {path}")
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        rows = _read_json_rows(path)
        for i, r in enumerate(rows, 1):
            missing = [c for c in columns if c not in r]
            if missing:
                raise BenchmarkError(f"{path}:{i}: missing key(s) {missing}")
        return [(f"{path}:{i}", r) for i, r in enumerate(rows, 1)], _toy_image_root(path)
    if path.is_file() and path.suffix == ".parquet":
        return list(_read_table_rows([path], columns)), path.parent
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return list(_read_table_rows(_arrow_files(path, split), columns)), path
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise BenchmarkError(f"{path}: no *.jsonl, *.parquet or save_to_disk data found")
        preferred = [f for f in files if f.name.startswith(f"{split}-") or f.stem == split]
        return list(_read_table_rows(preferred or files, columns)), path
    raise BenchmarkError(f"{path}: unsupported benchmark file (want .jsonl, .json, .parquet or a folder)")


def _resolve_image(cell: object, root: Path, cache: _ImageCache, where: str) -> Image.Image | str:
    img = cache.open(cell, where)
    if img is None:
        raise BenchmarkError(f"{where}: no image")
    if isinstance(img, str):
        p = Path(img) if Path(img).is_absolute() else root / img
        if not p.is_file():
            raise BenchmarkError(f"{where}: image file does not exist: {p}")
        return str(p)
    return img


def limit_records(records: list[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` records of every category (all when ``limit`` is 0 / None)."""
    if not limit:
        return records
    seen: dict[str, int] = {}
    out = []
    for r in records:
        if seen.get(r["category"], 0) < limit:
            seen[r["category"]] = seen.get(r["category"], 0) + 1
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------- loaders
def load_pope(path: str | Path, *, image_root: str | Path | None = None, split: str = "test",
              categories: Sequence[str] | None = None, limit_per_category: int | None = None) -> list[dict]:
    """POPE records (see the module docstring); ``categories`` filters, ``limit_per_category`` truncates."""
    rows, root = read_rows(path, ("question_id", "question", "answer", "image", "category"), split)
    root = Path(image_root) if image_root else root
    cache, out = _ImageCache(), []
    for where, r in rows:
        if categories and r["category"] not in categories:
            continue
        answer = str(r["answer"]).lower().strip()
        if answer not in ("yes", "no"):
            raise BenchmarkError(f"{where}: answer must be yes/no, got {r['answer']!r}")
        out.append({"question_id": str(r["question_id"]), "question": r["question"],
                    "prompt": pope_prompt(r["question"]), "answer": answer, "category": str(r["category"]),
                    "image": _resolve_image(r["image"], root, cache, where)})
    return limit_records(out, limit_per_category)


def load_seedbench(path: str | Path, *, image_root: str | Path | None = None, split: str = "test",
                   data_type: str | None = "image", limit_per_category: int | None = None) -> list[dict]:
    """SeedBench records; ``data_type`` "image" (LLaVA-1.5's setting), "video", or None for all."""

    cols = ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "image")
    rows, root = read_rows(path, cols, split)
    root = Path(image_root) if image_root else root
    cache, out = _ImageCache(), []
    for where, r in rows:
        dt = str(r.get("data_type") or "image")
        if data_type and dt != data_type:
            continue
        if r["answer"] not in LETTERS:
            raise BenchmarkError(f"{where}: answer must be A-D, got {r['answer']!r}")
        cells = r["image"] if isinstance(r["image"], list) else [r["image"]]
        images = [_resolve_image(c, root, cache, where) for c in cells]
        if not images:
            raise BenchmarkError(f"{where}: empty image list")
        choices = [str(r[f"choice_{x}"]) for x in "abcd"]
        out.append({"question_id": str(r["question_id"]), "question": r["question"],
                    "prompt": seed_prompt(r["question"], choices), "answer": r["answer"],
                    "answer_prompt": seed_answer_prompt(r["question"]),
                    "choices": dict(zip(LETTERS, choices)), "category": seed_category(r), "data_type": dt,
                    "question_type_id": r.get("question_type_id"), "image": images[0], "images": images})
    return limit_records(out, limit_per_category)


def write_predictions(records: Sequence[dict], predictions: Sequence[str], path: str | Path) -> Path:
    """The JSONL that :mod:`eval.score` reads: one line per record with the model's raw text."""

    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    keep = ("question_id", "question", "answer", "category", "data_type", "question_type_id", "choices")
    lines = [json.dumps({**{k: r[k] for k in keep if k in r}, "prediction": p}) for r, p in zip(records, predictions)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return Path(path)
