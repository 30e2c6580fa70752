"""Dependency drift: the HF ``Trainer`` methods ``LlavaTrainer`` overrides (or calls) still exist with the
signatures it was written against, and the Trainer still calls them; the transformers pin in pyproject.toml, the
versions ``make test-compat`` tests and llava_bridge/README.md agree. (LLaVA issues 876, 1103: a new transformers release
broke training.) ``make test-compat`` runs the LLaVA tests under the lowest and the highest transformers the
pin allows, each in its own venv."""

import inspect
import re

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import Trainer, TrainingArguments

from llava_bridge.trainer import LlavaTrainer
from tests.helpers import REPO

# name -> the parameters (name, default; "-" = required) of LlavaTrainer's override = what it accepts, self first;
# transformers' own signature must be one LlavaTrainer was written against (SEEN) -- a new one fails this test
OVERRIDDEN = {
    "_get_train_sampler": [("self", "-"), ("train_dataset", None)],
    "create_optimizer": [("self", "-"), ("model", None)],
    "training_step": [("self", "-"), ("model", "-"), ("inputs", "-"), ("num_items_in_batch", None)],
    "compute_loss": [("self", "-"), ("model", "-"), ("inputs", "-"), ("return_outputs", False),
                     ("num_items_in_batch", None)],
    "log": [("self", "-"), ("logs", "-"), ("start_time", None)],
    "_save": [("self", "-"), ("output_dir", None), ("state_dict", None)],
    "_load_from_checkpoint": [("self", "-"), ("resume_from_checkpoint", "-"), ("model", None)],
    "_save_optimizer_and_scheduler": [("self", "-"), ("output_dir", "-")],
    "_load_optimizer_and_scheduler": [("self", "-"), ("checkpoint", "-")],
    "_save_rng_state": [("self", "-"), ("output_dir", "-")],
    "_load_rng_state": [("self", "-"), ("checkpoint", "-")],
}
SEEN = {name: [sig] for name, sig in OVERRIDDEN.items()}
SEEN["create_optimizer"].append([("self", "-")])  # transformers 5.0: create_optimizer(self)
# Trainer methods / attributes LlavaTrainer calls
CALLED = {
    "get_decay_parameter_names": [("self", "-"), ("model", "-")],
    "get_optimizer_cls_and_kwargs": [("args", "-"), ("model", None)],
}
INIT_KWARGS = ("model", "args", "data_collator", "train_dataset", "processing_class", "callbacks")


def params(fn) -> list[tuple]:
    return [(p.name, "-" if p.default is inspect.Parameter.empty else p.default)
            for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_overridden_trainer_methods_keep_their_signatures(name):
    assert hasattr(Trainer, name), f"transformers' Trainer no longer has {name}: LlavaTrainer.{name} is dead code"
    hf, mine = params(getattr(Trainer, name)), params(getattr(LlavaTrainer, name))
    assert hf in SEEN[name], f"Trainer.{name} has a new signature {hf}: check LlavaTrainer.{name} against it"
    assert mine == OVERRIDDEN[name]
    # every call HF makes fits the override: HF's parameters first, then only optional extras
    assert mine[:len(hf)] == hf and all(d != "-" for _, d in mine[len(hf):])
    # and the Trainer still calls it (an override nobody calls fails silently)
    src = inspect.getsource(Trainer)
    uses = [m for m in re.finditer(rf"self\.{name}\b", src)]
    assert uses, f"Trainer never calls self.{name}"


def test_every_override_is_listed():
    mine = {n for n, v in vars(LlavaTrainer).items() if callable(v) and hasattr(Trainer, n) and n != "__init__"}
    assert mine == set(OVERRIDDEN), "add new Trainer overrides to OVERRIDDEN (their HF signature)"


@pytest.mark.parametrize("name", sorted(CALLED))
def test_called_trainer_methods_keep_their_signatures(name):
    assert params(getattr(Trainer, name)) == CALLED[name]


def test_trainer_init_and_arguments_take_what_we_pass():
    init = {n for n, _ in params(Trainer.__init__)}
    assert set(INIT_KWARGS) <= init
    fields = TrainingArguments.__dataclass_fields__
    for f in ("output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size",
              "gradient_accumulation_steps", "learning_rate", "weight_decay", "warmup_steps", "lr_scheduler_type",
              "max_grad_norm", "bf16", "deepspeed", "save_strategy", "save_steps", "save_total_limit",
              "logging_steps", "logging_first_step", "seed", "data_seed", "use_cpu", "report_to",
              "remove_unused_columns", "dataloader_num_workers", "tf32"):
        assert f in fields, f"TrainingArguments.{f} is gone"
    assert "activation_checkpointing" in fields or "gradient_checkpointing" in fields


def transformers_pin() -> Requirement:
    m = re.search(r'^\s*"(transformers[^"]*)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert m, "pyproject.toml: no transformers dependency"
    return Requirement(m.group(1))


def compat_versions() -> tuple[str, str]:
    text = (REPO / "Makefile").read_text()
    low = re.search(r"^TRANSFORMERS_LOW\s*\?=\s*(\S+)", text, re.M)
    high = re.search(r"^TRANSFORMERS_HIGH\s*\?=\s*(\S+)", text, re.M)
    assert low and high, "Makefile: TRANSFORMERS_LOW / TRANSFORMERS_HIGH (make test-compat) not found"
    return low.group(1), high.group(1)


def test_pin_compat_versions_and_readme_agree():
    spec = transformers_pin().specifier
    low, high = compat_versions()
    assert spec.contains(transformers.__version__), f"installed transformers {transformers.__version__} vs {spec}"
    assert spec.contains(low) and spec.contains(high)
    lower = [s for s in spec if s.operator == ">="]
    upper = [s for s in spec if s.operator == "<"]
    assert lower and upper, f"pin transformers to a minor range (>=X,<Y), got {spec}"
    assert Version(low) == Version(lower[0].version), "TRANSFORMERS_LOW must be the pin's lower bound"
    top = Version(upper[0].version)
    assert Version(high) < top and (Version(high).major, Version(high).minor + 1) == (top.major, top.minor), \
        "TRANSFORMERS_HIGH must be in the pin's highest minor"
    readme = (REPO / "llava_bridge" / "README.md").read_text()
    assert f"transformers {low}" in readme and f"transformers {high}" in readme
