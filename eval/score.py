"""Scorers for POPE and SeedBench on plain prediction files (no model needed).

Input: a JSONL file, one record per question, as written by :func:`eval.benchmarks.write_predictions`::

    {"question_id": ..., "answer": <ground truth>, "prediction": <raw model text>, "category": ...}
    # SeedBench records may also carry choice_a..choice_d and data_type ("image" | "video")

CLI (JSON to stdout, and to ``--out`` if given)::

    python -m eval.score pope --predictions P.jsonl [--parser llava|lmms] [--out FILE]
    python -m eval.score seedbench --predictions P.jsonl [--out FILE]

POPE parsers
  * ``llava`` (default; LLaVA-1.5's ``eval_pope.py`` rule, used for headline numbers): strip the text (LLaVA strips
    generations when it writes them), keep the text before the first '.', drop commas, split on single spaces; if one of the words is exactly ``No``, ``no`` or ``not`` the
    prediction is "no", otherwise "yes" (so empty or garbage text counts as "yes", as in LLaVA).
  * ``lmms`` (lmms-eval's ``pope`` task): the prediction is the text lowercased and stripped, compared by exact
    match. Anything other than "yes"/"no" is wrong for accuracy and is left out of precision/recall counts,
    exactly as lmms-eval does. Unlike lmms-eval (whose ``pope_yes_ratio`` counts ground-truth answers), the
    yes-ratio reported here is always the fraction of *predictions* that are "yes".

SeedBench (lmms-eval's rule exactly): ``seed_process_result`` strips the prediction and, if it is longer than one
character, keeps its first character; ``seed_aggregation_result`` counts it right when it equals the answer after
lowercasing and stripping both (so ``b``, `` B``, ``B.`` and ``b) dog`` are right for B; ``(B)`` and ``The answer is B``
are not). Accuracy is reported for image questions, video questions, all, and per category (``category`` field, or
SEED-Bench's ``question_type_id`` mapped to its dimension name).

Intervals (:mod:`eval.intervals`, 95%): every accuracy by the Wilson score interval; every F1 (per category, pooled,
and the mean over categories) and the mean accuracy by a percentile bootstrap over questions (stratified by
category for the means). POPE's headline is LLaVA-1.5's: ``mean_f1`` / ``mean_accuracy`` = the mean over the three
categories; ``overall`` is lmms-eval's pooled number over all questions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from eval.intervals import bootstrap, wilson
from ov3common.checkpoint import atomic_write_json

POPE_CATEGORIES = ("adversarial", "popular", "random")

# SEED-Bench-1 evaluation dimensions by question_type_id (1-9 image, 10-12 video).
SEED_DIMENSIONS = {
    1: "scene_understanding",
    2: "instance_identity",
    3: "instance_attributes",
    4: "instance_location",
    5: "instances_counting",
    6: "spatial_relation",
    7: "instance_interaction",
    8: "visual_reasoning",
    9: "text_understanding",
    10: "action_recognition",
    11: "action_prediction",
    12: "procedure_understanding",
}


class PredictionFileError(ValueError):
    """A prediction file that cannot be scored; the message names the file and line."""


# ---------------------------------------------------------------------------------------------------- reading
def read_predictions(path: str | Path, required: Sequence[str]) -> list[dict]:
    """Read a JSONL prediction file; every record must have the ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise PredictionFileError(f"predictions: file does not exist: {path}")
    records, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PredictionFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise PredictionFileError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise PredictionFileError(f"{path}:{lineno}: missing key(s) {missing}")
            qid = rec["question_id"]
            if qid in seen:
                raise PredictionFileError(f"{path}:{lineno}: duplicate question_id {qid!r}")
            seen.add(qid)
            rec["_line"] = lineno
            records.append(rec)
    if not records:
        raise PredictionFileError(f"{path}: no records")
    return records


def _text(x: object) -> str:
    """Model output as text: None -> '', anything else -> str."""
    return "" if x is None else str(x)


# ---------------------------------------------------------------------------------------------------- POPE
def parse_pope_llava(text: object) -> str:
    """LLaVA-1.5's POPE rule: first sentence; a word 'No'/'no'/'not' -> 'no', else 'yes'. The text is stripped
    first, as LLaVA's ``model_vqa_loader`` strips generations before ``eval_pope.py`` reads them."""
    s = _text(text).strip()
    if "." in s:
        s = s.split(".")[0]
    words = s.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def parse_pope_lmms(text: object) -> str:
    """lmms-eval's POPE rule: lowercased and stripped text (compared by exact match)."""
    return _text(text).lower().strip()


POPE_PARSERS: dict[str, Callable[[object], str]] = {"llava": parse_pope_llava, "lmms": parse_pope_lmms}


def pope_metrics(preds: Sequence[str], gts: Sequence[str]) -> dict:
    """Confusion counts and metrics for parsed predictions vs 'yes'/'no' ground truth.

    A prediction that is neither 'yes' nor 'no' is wrong for accuracy and absent from TP/FP/TN/FN.
    Precision/recall/F1 with an empty denominator are 0.0 (lmms-eval's convention).
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions vs {len(gts)} answers")
    n = len(preds)
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, gts))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gts))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, gts))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gts))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in preds) / n if n else 0.0,
        "unparsed": n - (tp + fp + tn + fn),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 with lmms-eval's convention (an empty precision/recall denominator gives 0), vectorised."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        return np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)


def pope_intervals(preds: Sequence[str], gts: Sequence[str], cats: Sequence[str], n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """95% intervals: accuracy (Wilson) and F1 (bootstrap) per category and pooled; the mean over categories of
    F1 and of accuracy (bootstrap stratified by category)."""
    p, g, c = np.asarray(preds), np.asarray(gts), np.asarray(cats)
    tp_i, fp_i = (p == "yes") & (g == "yes"), (p == "yes") & (g == "no")
    fn_i, ok_i = (p == "no") & (g == "yes"), ((p == "yes") & (g == "yes")) | ((p == "no") & (g == "no"))
    names = sorted(set(c.tolist()))
    masks = [c == name for name in names]

    def f1(idx: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        w = np.ones_like(idx, dtype=bool) if mask is None else mask[idx]
        return _f1_from_counts(*((arr[idx] & w).sum(-1).astype(np.float64) for arr in (tp_i, fp_i, fn_i)))

    def mean_over(metric) -> Callable[[np.ndarray], np.ndarray]:
        def stat(idx: np.ndarray) -> np.ndarray:
            return np.mean([metric(idx, m) for m in masks], axis=0)
        return stat

    def acc(idx: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return (ok_i[idx] & mask[idx]).sum(-1) / np.maximum(mask[idx].sum(-1), 1)

    out: dict = {"categories": {}}
    for name, m in zip(names, masks):
        sub = np.flatnonzero(m)
        out["categories"][name] = {
            "accuracy": wilson(int(ok_i[sub].sum()), len(sub)).to_dict(),
            "f1": bootstrap(lambda idx, s=sub: f1(s[idx]), len(sub), n_boot=n_boot, seed=seed).to_dict()}
    n = len(p)
    out["overall_accuracy"] = wilson(int(ok_i.sum()), n).to_dict()
    out["overall_f1"] = bootstrap(f1, n, n_boot=n_boot, seed=seed).to_dict()
    out["mean_f1"] = bootstrap(mean_over(f1), n, n_boot=n_boot, seed=seed, strata=c).to_dict()
    out["mean_accuracy"] = bootstrap(mean_over(acc), n, n_boot=n_boot, seed=seed, strata=c).to_dict()
    return out


def score_pope(records: Iterable[dict], parser: str = "llava") -> dict:
    """Per-category and overall POPE metrics plus the mean F1 (and accuracy) over categories."""
    if parser not in POPE_PARSERS:
        raise ValueError(f"parser: expected one of {sorted(POPE_PARSERS)}, got {parser!r}")
    parse = POPE_PARSERS[parser]
    by_cat: dict[str, tuple[list[str], list[str]]] = {}
    all_p, all_g = [], []
    for rec in records:
        gt = _text(rec["answer"]).lower().strip()
        if gt not in ("yes", "no"):
            raise PredictionFileError(
                f"line {rec.get('_line', '?')} (question_id {rec['question_id']!r}): answer must be yes/no, "
                f"got {rec['answer']!r}")
        pred = parse(rec["prediction"])
        cat = str(rec.get("category") or "all")
        by_cat.setdefault(cat, ([], []))
        by_cat[cat][0].append(pred)
        by_cat[cat][1].append(gt)
        all_p.append(pred)
        all_g.append(gt)
    cats = {c: pope_metrics(p, g) for c, (p, g) in sorted(by_cat.items())}
    all_c = [c for c, (p, _) in sorted(by_cat.items()) for _ in p]
    ordered = [(p, g) for _, (ps, gs) in sorted(by_cat.items()) for p, g in zip(ps, gs)]
    return {
        "benchmark": "pope",
        "parser": parser,
        "overall": pope_metrics(all_p, all_g),
        "categories": cats,
        "mean_f1": sum(m["f1"] for m in cats.values()) / len(cats),
        "mean_accuracy": sum(m["accuracy"] for m in cats.values()) / len(cats),
        "headline": "mean over categories of F1 / accuracy (LLaVA-1.5's eval_pope.py per split, averaged); "
                    "'overall' is lmms-eval's pooled number",
        "missing_categories": [c for c in POPE_CATEGORIES if c not in cats],
        "intervals": pope_intervals([p for p, _ in ordered], [g for _, g in ordered], all_c),
    }


# ---------------------------------------------------------------------------------------------------- SeedBench
def parse_seed_letter(text: object) -> str:
    """lmms-eval's ``seed_process_result``: strip, then keep the first character if longer than one."""
    s = _text(text).strip()
    return s[0] if len(s) > 1 else s


def seed_hit(prediction: object, answer: object) -> bool:
    """lmms-eval's ``seed_aggregation_result`` on a processed prediction: equal after lower() and strip() of both."""
    return parse_seed_letter(prediction).lower().strip() == _text(answer).lower().strip()


def seed_category(rec: dict) -> str:
    """The record's category: ``category`` if present, else SEED-Bench's dimension from question_type_id."""
    if rec.get("category") not in (None, ""):
        return str(rec["category"])
    qt = rec.get("question_type_id")
    if qt in (None, ""):
        return "unknown"
    try:
        return SEED_DIMENSIONS.get(int(qt), f"type_{qt}")
    except (TypeError, ValueError):
        return f"type_{qt}"


def _acc(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def score_seedbench(records: Iterable[dict]) -> dict:
    """Accuracy for image questions, video questions, all, and per category."""
    hits: dict[str, list[bool]] = {"image": [], "video": [], "all": []}
    by_cat: dict[str, list[bool]] = {}
    unparsed = 0
    for rec in records:
        answer = _text(rec["answer"]).strip()
        if answer not in ("A", "B", "C", "D"):
            raise PredictionFileError(
                f"line {rec.get('_line', '?')} (question_id {rec['question_id']!r}): answer must be A-D, "
                f"got {rec['answer']!r}")
        pred = parse_seed_letter(rec["prediction"])
        unparsed += pred.lower().strip() not in ("a", "b", "c", "d")
        hit = seed_hit(rec["prediction"], answer)
        data_type = str(rec.get("data_type") or "image")
        if data_type not in ("image", "video"):
            raise PredictionFileError(
                f"line {rec.get('_line', '?')}: data_type must be image/video, got {data_type!r}")
        hits[data_type].append(hit)
        hits["all"].append(hit)
        by_cat.setdefault(seed_category(rec), []).append(hit)
    return {
        "benchmark": "seedbench",
        "image": _acc(hits["image"]),
        "video": _acc(hits["video"]),
        "all": _acc(hits["all"]),
        "n": {k: len(v) for k, v in hits.items()},
        "unparsed": unparsed,
        "rule": "lmms-eval seed_process_result + seed_aggregation_result (first character, case-insensitive)",
        "categories": {c: {"accuracy": _acc(h), "n": len(h), "interval": wilson(sum(h), len(h)).to_dict()}
                       for c, h in sorted(by_cat.items())},
        "intervals": {k: wilson(sum(v), len(v)).to_dict() for k, v in hits.items() if v},
    }


# ---------------------------------------------------------------------------------------------------- CLI
def score_file(benchmark: str, predictions: str | Path, parser: str = "llava") -> dict:
    """Score one prediction file; ``benchmark`` is 'pope' or 'seedbench'."""
    if benchmark == "pope":
        out = score_pope(read_predictions(predictions, ("question_id", "answer", "prediction")), parser)
    elif benchmark == "seedbench":
        out = score_seedbench(read_predictions(predictions, ("question_id", "answer", "prediction")))
    else:
        raise ValueError(f"benchmark: expected 'pope' or 'seedbench', got {benchmark!r}")
    out["predictions"] = str(predictions)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__.split("\n")[0])
    ap.add_argument("benchmark", choices=("pope", "seedbench"))
    ap.add_argument("--predictions", required=True, help="JSONL: question_id, answer, prediction, category")
    ap.add_argument("--parser", choices=sorted(POPE_PARSERS), default="llava", help="POPE answer parser")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    try:
        result = score_file(args.benchmark, args.predictions, args.parser)
    except PredictionFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
