"""The LLaVA trainer's in-training evaluation: every ``train.eval_every`` steps, POPE / SeedBench on a fixed subset,
on the live model. ``llava_bridge.train`` adds :func:`callback` by name (its config's ``eval.hook``), so the bridge
imports nothing of ``eval``.

The subset is the first ``eval.limit_per_category`` questions of each category (``eval.benchmarks``' own rule, as
``python -m eval.adapters --limit-per-category K``), and the predictions come from the same functions the
offline path runs (``eval.adapters.predict_answers`` / ``rank_answers``, greedy), written and scored by the
same code (``eval.benchmarks.write_predictions``, ``eval.score.score_file``). So the number logged at step N equals
``python -m eval.adapters --model out_dir/checkpoint-N ...`` + ``python -m eval.score`` on the checkpoint
saved at that step (tests/test_llava_eval.py), when the offline run loads the weights in the training dtype
(``--dtype``; the default float32 for fp32 runs). A LoRA model is evaluated with its adapter unmerged; offline
loading merges it, which moves logits by float rounding only.

Outputs: ``out_dir/eval/step-N/{pope,seedbench,seedbench_rank}_{predictions.jsonl,scores.json}``; the headline
numbers (``eval/pope_f1`` = mean F1 over the categories, ``eval/pope_acc``, ``eval/seedbench_acc``,
``eval/seedbench_rank_acc``) go to the Trainer's log (and metrics.jsonl) at step N.

Every rank evaluates the whole subset (a small one is the point): no rank waits at a barrier, and under ZeRO-3,
whose forward gathers parameters collectively, every rank runs the same forwards (``generate`` syncs the ranks).
Rank 0 writes the files.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from eval.adapters import predict_answers, rank_answers
from eval.benchmarks import BenchmarkError, load_pope, load_seedbench, write_predictions
from eval.score import score_file
from llava_bridge.config import LiveEvalConfig
from ov3common.checkpoint import atomic_write_json
from ov3common.config import ConfigError
from ov3common.log import get_logger

log = get_logger(__name__)


def load_subsets(cfg: LiveEvalConfig) -> dict[str, list[dict]]:
    """``{"pope": records, "seedbench": records}`` for the configured files (a config error names a bad one)."""
    out = {}
    for name, path, loader in (("pope", cfg.pope, load_pope), ("seedbench", cfg.seedbench, load_seedbench)):
        if not path:
            continue
        if not Path(path).exists():
            raise ConfigError(f"eval.{name}: path does not exist: {path}")
        try:
            out[name] = loader(path, image_root=cfg.image_root or None,
                               limit_per_category=cfg.limit_per_category or None)
        except (BenchmarkError, OSError, ValueError) as e:
            raise ConfigError(f"eval.{name}: cannot read {path}: {e}") from e
        if not out[name]:
            raise ConfigError(f"eval.{name}: no questions in {path}")
    return out


def evaluate(model, tokenizer, subsets: dict[str, list[dict]], cfg: LiveEvalConfig, out: Path | None) -> dict:
    """Predict and score every subset with ``model`` as it is (switched to eval mode and back); writes the
    prediction and score files under ``out`` (None: nothing written). Returns ``{"eval/...": number}``."""
    runs = []
    if "pope" in subsets:
        runs.append(("pope", "pope", "generate"))
    if "seedbench" in subsets:
        if cfg.seedbench_protocol in ("generate", "both"):
            runs.append(("seedbench", "seedbench", "generate"))
        if cfg.seedbench_protocol in ("rank", "both"):
            runs.append(("seedbench_rank", "seedbench", "rank"))
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        for name, bench, protocol in runs:
            records = subsets[bench]
            if protocol == "rank":
                preds = rank_answers(model, tokenizer, records, cfg.batch_size)
            else:
                preds = predict_answers(model, tokenizer, records, cfg.batch_size, cfg.max_new_tokens)
            if out is None:
                continue
            out.mkdir(parents=True, exist_ok=True)
            path = write_predictions(records, preds, out / f"{name}_predictions.jsonl")
            scores = score_file(bench, path)
            atomic_write_json(out / f"{name}_scores.json", scores)
            if bench == "pope":
                metrics["eval/pope_f1"] = scores["mean_f1"]
                metrics["eval/pope_acc"] = scores["overall"]["accuracy"]
            else:
                metrics[f"eval/{name}_acc"] = scores["all"]
    finally:
        model.train(was_training)
    return metrics


def callback(trainer, cfg: LiveEvalConfig, every: int):
    """A TrainerCallback running :func:`evaluate` on ``trainer.model`` after every ``every``-th optimizer step
    (before that step's checkpoint is written, so ``checkpoint-N`` holds the weights evaluated at step N). The
    subsets are read now (a bad benchmark file is a :class:`ConfigError` before training starts)."""
    subsets = load_subsets(cfg)

    class LiveEval(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if every <= 0 or state.global_step % every:
                return
            step = state.global_step
            out = Path(args.output_dir) / "eval" / f"step-{step}" if args.process_index == 0 else None
            metrics = evaluate(trainer.model, trainer.processing_class, subsets, cfg, out)
            if args.process_index == 0:
                log.info("step %d: in-training eval %s", step, {k: round(v, 4) for k, v in metrics.items()})
                # Trainer.log clears control.should_log; restored, so this step's own log (a collective over
                # the ranks' losses) still runs on rank 0 as on the others
                should_log = control.should_log
                trainer.log(metrics)
                control.should_log = should_log

    return LiveEval()
