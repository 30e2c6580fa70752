"""``LlavaTrainer``: the HF Trainer with LLaVA's saving rules, a modality-grouped sampler, a separate projector
LR, non-finite-loss guarding, skip counting and safetensors/JSON checkpoints (no pickles on the plain path).

Checkpoint folder ``output_dir/checkpoint-N/`` (plain / DDP path):
  weights    ``mm_projector.safetensors`` (stage 1) | ``model.safetensors`` (stage 2) | ``adapter_model.safetensors``
             + ``mm_projector.safetensors`` (LoRA); ``config.json`` with the ``mm_*`` fields; tokenizer files
  optimizer  ``optimizer.safetensors`` + ``optimizer.json`` (optimizer + LR scheduler, via ov3common.checkpoint)
  RNG        ``rng_state[_RANK].safetensors`` + ``.json``
  state      ``trainer_state.json`` (HF: step, epoch, log history) — written last, so its presence marks a
             complete checkpoint; ``skip_stats.json``.
Under DeepSpeed the optimizer and RNG go to DeepSpeed's own ``global_stepN/`` files (torch pickles, see llava_bridge/README.md).
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import Trainer

from llava_bridge.projector import FILENAME as PROJECTOR_FILE
from llava_bridge.projector import PREFIX, load_projector_state, save_projector
from llava_bridge.sampler import ModalityLengthGroupedSampler
from ov3common.checkpoint import (
    atomic_write_json,
    capture_rng,
    flatten_state,
    load_safetensors,
    restore_rng,
    save_safetensors,
    unflatten_state,
)
from ov3common.guard import NonFiniteGuard
from ov3common.images import SkipStats
from ov3common.log import get_logger

log = get_logger(__name__)
OPTIM_FILE, OPTIM_TREE = "optimizer.safetensors", "optimizer.json"


class _BadLoss(Exception):
    pass


class LlavaTrainer(Trainer):
    def __init__(self, *args, tune: str = "full", mm_projector_lr: float = 0.0, max_bad_steps: int = 5,
                 modality_lengths: list[int] | None = None, length_group: int = 1,
                 skip_stats: SkipStats | None = None,
                 extra_config: dict | None = None, sample_log: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tune, self.mm_projector_lr = tune, mm_projector_lr
        self.modality_lengths = modality_lengths
        self.length_group = length_group
        self.data_stats = skip_stats or SkipStats()  # counted while building the dataset
        self.run_stats = SkipStats()  # counted while reading samples (restored on resume)
        self.extra_config = extra_config or {}
        self.guard = NonFiniteGuard(max_bad_steps)  # raises TrainingDiverged after K bad steps in a row
        self._bad_in_window = False
        self.sample_log = sample_log

    # ------------------------------------------------------------------------------------------- data
    def _get_train_sampler(self, train_dataset=None):
        if self.modality_lengths is None:
            return super()._get_train_sampler(train_dataset)
        return ModalityLengthGroupedSampler(self.modality_lengths, self.args.train_batch_size,
                                            self.args.world_size, self.args.seed, self.length_group)

    # ------------------------------------------------------------------------------------------- optimiser
    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            proj_lr = self.mm_projector_lr or self.args.learning_rate
            groups: dict[tuple[bool, bool], list] = {}
            for n, p in opt_model.named_parameters():
                if p.requires_grad:
                    groups.setdefault(("mm_projector" in n, n in decay), []).append(p)
            param_groups = []
            for (is_proj, is_decay), params in sorted(groups.items()):
                g = {"params": params, "weight_decay": self.args.weight_decay if is_decay else 0.0}
                if is_proj and self.mm_projector_lr:
                    g["lr"] = proj_lr
                param_groups.append(g)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls(param_groups, **kwargs)
            self._guard_optimizer_step(self.optimizer)
        return self.optimizer

    def _guard_optimizer_step(self, opt) -> None:
        """A window that had a non-finite loss does not update the weights (nor the Adam moments)."""
        step = opt.step

        def guarded(_opt, *args, **kwargs):
            if self._bad_in_window:
                self._bad_in_window = False
                return None
            return step(*args, **kwargs)

        # a bound method, as torch's LR scheduler expects when it wraps optimizer.step (it reads step.__func__)
        opt.step = types.MethodType(guarded, opt)

    # ------------------------------------------------------------------------------------------- steps
    def training_step(self, model, inputs, num_items_in_batch=None):
        skip = inputs.pop("_skip", None)
        ids = inputs.pop("_ids", None)
        if skip:
            self.run_stats.skipped.update(skip.get("skipped", {}))
            self.run_stats.converted.update(skip.get("converted", {}))
        if self.sample_log:
            with open(self.sample_log, "a") as f:
                f.write(json.dumps({"step": self.state.global_step + 1, "rank": self.args.process_index,
                                    "ids": ids}) + "\n")
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except _BadLoss:
            self._bad_in_window = True  # no backward was run; the optimizer step of this window is skipped
            log.warning("step %d: the batch with samples %s had a non-finite loss", self.state.global_step, ids)
            return torch.zeros((), device=self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        # checked on every rank (all-reduced), so all ranks skip together; TrainingDiverged after K in a row
        if model.training and self.guard.bad(loss, self.state.global_step):
            raise _BadLoss
        return out

    def log(self, logs: dict, start_time=None) -> None:
        if self.guard.skipped_total:
            logs["nonfinite_skipped"] = self.guard.skipped_total
        if self.run_stats.total() or self.data_stats.total():
            logs["samples_skipped"] = self.run_stats.total() + self.data_stats.total()
        super().log(logs, start_time)

    def skip_report(self) -> dict:
        total = SkipStats()
        total.update(self.data_stats)
        total.update(self.run_stats.reduce())
        return {**total.as_dict(), "nonfinite_loss_steps": self.guard.skipped_total}

    # ------------------------------------------------------------------------------------------- saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state_dict = model.state_dict()
        config = model.get_base_model().config if self.tune == "lora" else model.config
        if self.tune in ("projector", "lora"):
            proj = {PREFIX + k.split("mm_projector.", 1)[1]: v for k, v in state_dict.items() if "mm_projector." in k}
            save_projector(Path(output_dir) / PROJECTOR_FILE, proj, {"format": "llava-mm-projector"})
            cfg = {**config.to_dict(), **self.extra_config}
            atomic_write_json(Path(output_dir) / "config.json", cfg)
        if self.tune == "lora":
            model.save_pretrained(output_dir, state_dict={k: v for k, v in state_dict.items()
                                                          if "mm_projector." not in k})
        elif self.tune == "full":
            for k, v in self.extra_config.items():
                setattr(model.config, k, v)
            model.save_pretrained(output_dir, state_dict=state_dict)
        if self.tune != "projector" and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        if self.tune != "projector":
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.tune in ("projector", "lora"):
            base = self.accelerator.unwrap_model(model)
            base = base.get_base_model() if self.tune == "lora" else base
            load_projector_state(Path(resume_from_checkpoint) / PROJECTOR_FILE, base.model.mm_projector)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        run_stats = self.run_stats.reduce()  # a collective: every rank calls it
        if self.args.should_save:
            tree, tensors = flatten_state({"optimizer": self.optimizer.state_dict(),
                                           "scheduler": self.lr_scheduler.state_dict()})
            save_safetensors(Path(output_dir) / OPTIM_FILE, tensors)
            atomic_write_json(Path(output_dir) / OPTIM_TREE, tree)
            stats = {"run_stats": run_stats.state_dict(), "guard": self.guard.state_dict()}
            atomic_write_json(Path(output_dir) / "skip_stats.json", stats)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not (Path(checkpoint) / OPTIM_TREE).is_file():
            return super()._load_optimizer_and_scheduler(checkpoint)
        tree = json.loads((Path(checkpoint) / OPTIM_TREE).read_text())
        state = unflatten_state(tree, load_safetensors(Path(checkpoint) / OPTIM_FILE))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        stats_file = Path(checkpoint) / "skip_stats.json"
        if stats_file.is_file() and self.args.process_index == 0:
            d = json.loads(stats_file.read_text())
            self.run_stats.load_state_dict(d.get("run_stats", {}))
        if stats_file.is_file():
            self.guard.load_state_dict(json.loads(stats_file.read_text())["guard"])

    def _rng_paths(self, folder: str) -> tuple[Path, Path]:
        name = "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"
        return Path(folder) / f"{name}.safetensors", Path(folder) / f"{name}.json"

    def _save_rng_state(self, output_dir: str) -> None:
        tensors_path, tree_path = self._rng_paths(output_dir)
        tree, tensors = flatten_state(capture_rng())
        save_safetensors(tensors_path, tensors)
        atomic_write_json(tree_path, tree)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        tensors_path, tree_path = self._rng_paths(checkpoint)
        if not tree_path.is_file():
            return super()._load_rng_state(checkpoint)
        restore_rng(unflatten_state(json.loads(tree_path.read_text()), load_safetensors(tensors_path)))


# ------------------------------------------------------------------------------------------------ resuming
def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (None if it is complete)."""

    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json (the save did not finish)"
    try:
        step = int(json.loads(state_file.read_text())["global_step"])
    except (ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json is unreadable ({e})"
    if folder.name != f"checkpoint-{step}":
        return f"trainer_state.json says step {step}"
    weights = [folder / n for n in (PROJECTOR_FILE, "model.safetensors", "adapter_model.safetensors")]
    weights = [w for w in weights if w.is_file()] + sorted(folder.glob("model-*-of-*.safetensors"))
    if not weights and not any(folder.glob("global_step*")):
        return "no weights file"
    for w in weights:
        try:
            with safe_open(str(w), "pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            return f"{w.name} is corrupt ({type(e).__name__}: {e})"
    if (folder / OPTIM_TREE).is_file():
        try:
            json.loads((folder / OPTIM_TREE).read_text())
            with safe_open(str(folder / OPTIM_FILE), "pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as e:
            return f"optimizer state is corrupt ({type(e).__name__}: {e})"
    elif not any(folder.glob("global_step*")) and not (folder / "optimizer.pt").is_file():
        return "no optimizer state"
    return None


def find_resumable_checkpoint(output_dir: str | os.PathLike, quarantine: bool = False) -> str | None:
    """The newest complete ``checkpoint-N`` under ``output_dir``; newer partial/corrupt ones are reported (and,
    with ``quarantine``, renamed to ``.bad-checkpoint-N`` so the Trainer's rotation and later saves ignore them)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for d in root.glob("checkpoint-*"):
        suffix = d.name.split("-", 1)[1]
        if d.is_dir() and suffix.isdigit():
            found.append((int(suffix), d))
    for _, d in sorted(found, reverse=True):
        problem = checkpoint_problem(d)
        if problem is None:
            return str(d)
        log.warning("checkpoint %s is not usable: %s; falling back to the previous one", d, problem)
        if quarantine:
            d.rename(d.with_name(f".bad-{d.name}"))
    return None
