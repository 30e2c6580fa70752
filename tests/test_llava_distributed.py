"""LLaVA under DeepSpeed ZeRO-2 / ZeRO-3 with 2 CPU processes (torchrun, gloo), through the HF Trainer: the real
recipes (LoRA and full stage 2) save what they trained and load back; a killed ZeRO-2 run resumes bitwise."""

import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llava_bridge.merge_lora import merge
from llava_bridge.model import load_llava
from llava_bridge.projector import build_projector, projector_state, save_projector
from tests.helpers import REPO, run_tree, run_with_kills
from tests.llava_fixtures import *  # noqa: F403 (pytest fixtures)
from tests.test_llava_model import eval_batch, logits, overrides

RECIPES = {"lora": "configs/llava/real_lora.yaml", "full": "configs/llava/real_stage2.yaml"}
CKPT, STEPS = 3, 4


def real_recipe_overrides(w, out, zero: int, stage1_projector) -> list[str]:
    """The real recipe at tiny sizes: the tiny world's LM / tower / data, 4 steps, LoRA r 8. The LR is raised
    (1e-2) so that 3 bf16 steps move every trainable tensor, RMSNorm gains at 1.0 included."""
    kw = {"model.llm": w["llm"], "model.vision_tower": w["enc"], "model.pretrain_projector": stage1_projector,
          "data.train": f"[{w['instruct']}]", "data.image_root": w["images"], "data.num_workers": 0,
          "out_dir": out, "model.model_max_length": 256, "train.max_steps": STEPS, "train.batch_size": 2,
          "train.ckpt_every": CKPT, "train.keep_last": 2, "train.log_every": 1, "train.lr": 1e-2,
          "train.mm_projector_lr": 1e-2, "train.lora_r": 8, "train.lora_alpha": 16,
          "train.deepspeed": REPO / f"configs/llava/zero{zero}.json"}
    return [f"{k}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def stage1_projector(llava_world, tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("stage1") / "mm_projector.safetensors"
    return save_projector(path, projector_state(build_projector("mlp2x_gelu", 64, 32).to(torch.bfloat16)))


def trainable_kinds(names) -> set[str]:
    """What each trainable tensor is: projector, LoRA A / B, or the part of the LM it belongs to."""
    kinds = ("mm_projector", "lora_A", "lora_B", "embed_tokens", "lm_head", "norm", "self_attn", "mlp")
    return {next(k for k in kinds if k in n) for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("tune", ["lora", "full"])
def test_real_recipe_under_zero_saves_what_it_trained(llava_world, stage1_projector, tmp_path, tune, zero):
    """configs/llava/real_{lora,stage2}.yaml (bf16 weights, bf16, gradient checkpointing) under DeepSpeed ZeRO-2 /
    ZeRO-3 on 2 processes: every trainable tensor (projector, LoRA A/B, unfrozen LM) has moved from its initial
    value, and what is saved -- the intermediate checkpoint and the final folder -- loads back equal to the
    in-memory (gathered) copy at that step (LLaVA issue 1734: ZeRO-3 saving partitions / initial values)."""
    out, mem = tmp_path / "run", tmp_path / "mem"
    args = ["--config", str(REPO / RECIPES[tune]), *real_recipe_overrides(llava_world, out, zero, stage1_projector)]
    if (tune, zero) == ("lora", 3):  # in-training eval under ZeRO-3 (every rank runs the same forwards)
        args += ["train.eval_every=2", f"eval.pope={llava_world['pope']}",
                 f"eval.seedbench={llava_world['seed']}", f"eval.image_root={llava_world['images']}",
                 "eval.limit_per_category=1", "eval.max_new_tokens=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests/scripts/llava_zero_worker.py"), str(mem), *args]
    r = run_tree(cmd, timeout=500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    init, mid, final = (load_file(mem / f"{n}.safetensors") for n in ("init", f"step{CKPT}", "final"))
    want = {"lora": {"mm_projector", "lora_A", "lora_B"},
            "full": {"mm_projector", "embed_tokens", "lm_head", "norm", "self_attn", "mlp"}}[tune]
    assert trainable_kinds(init) == want and init.keys() == mid.keys() == final.keys()
    assert {v.dtype for v in final.values()} == {torch.bfloat16}  # one dtype (ZeRO-3 refuses a mix)
    assert init["base_model.model.model.mm_projector.0.weight" if tune == "lora" else
                "model.mm_projector.0.weight"].shape == (32, 64)
    for name in init:
        assert not torch.equal(mid[name], init[name]), f"{name} did not move by step {CKPT}"
        assert not torch.equal(final[name], mid[name]), f"{name} did not move after step {CKPT}"
    for folder, mem_copy in ((out / f"checkpoint-{CKPT}", mid), (out, final)):
        files = {p.name for p in folder.iterdir()}
        if tune == "lora":  # the projector is in every checkpoint, beside the adapter
            assert {"mm_projector.safetensors", "adapter_model.safetensors", "config.json"} <= files
        else:
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                assert {f"model.mm_projector.{i}.weight" for i in (0, 2)} <= set(f.keys())
        model, _ = load_llava(folder, merge_lora=False, dtype=torch.bfloat16)
        loaded = dict(model.named_parameters())
        bad = [n for n in mem_copy if not torch.equal(loaded[n], mem_copy[n])]
        assert not bad, f"{folder.name}: {len(bad)} tensors differ from memory, e.g. {bad[:3]}"
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == list(range(1, STEPS + 1))
    if (tune, zero) == ("lora", 3):
        assert [s["step"] for s in steps if "eval/pope_f1" in s] == [2, 4]
        assert (out / "eval" / "step-2" / "seedbench_rank_scores.json").is_file()
        # the merged model is a plain HF checkpoint whose logits match the adapter model's (fp32)
        merged = merge(str(out), str(tmp_path / "merged"))
        assert not (merged / "adapter_config.json").exists()
        adapter, tok = load_llava(out, merge_lora=False)
        again, _ = load_llava(merged)
        batch = eval_batch(again, tok, llava_world)
        torch.testing.assert_close(logits(again, batch), logits(adapter, batch), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_zero2_two_processes_resume_after_sigkill_is_bitwise(llava_world, tmp_path):
    """DeepSpeed ZeRO-2 through the HF Trainer, 2 processes: killed once and resumed from its DeepSpeed checkpoint
    (partitioned optimizer states + data position), the final weights equal those of an uninterrupted run."""

    def cmd(out):
        args = overrides(llava_world, out, **{
            "model.template": "vicuna_v1", "data.train": f"[{llava_world['instruct']}]", "train.tune": "full",
            "train.max_steps": 5, "train.batch_size": 2, "train.lr": 1e-3, "train.ckpt_every": 1,
            "train.deepspeed": REPO / "configs/llava/zero2.json"})
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "llava_bridge.train", *args]

    ref, resumed = tmp_path / "ref", tmp_path / "run"
    r = run_tree(cmd(ref), timeout=500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    killed = run_with_kills(cmd(resumed), resumed / "metrics.jsonl", kills=1, min_step=2, max_step=3, seed=0, timeout=600)
    assert len(killed) == 1 and killed[0] < 5
    # it resumed (step 1 was trained once) from a DeepSpeed checkpoint (partitioned optimizer states)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r].count(1) == 1
    assert len(list((resumed / "checkpoint-5").glob("global_step5/*optim_states.pt"))) == 2  # one partition per rank
    a, b = load_file(ref / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
