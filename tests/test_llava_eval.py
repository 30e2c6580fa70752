"""Numbers that reproduce: POPE / SeedBench predictions do not depend on the batch size (left padding, masks,
positions), and the in-training evaluation equals the offline ``eval.adapters`` + ``eval.score`` on the
checkpoint saved at that step."""

import json

import pytest
import torch

from eval import eval_all
from eval.adapters import main as predict_main
from eval.adapters import predict_answers, rank_answers
from eval.benchmarks import load_image
from eval.llava_live import load_subsets
from eval.llava_predict import main as predict_all
from eval.score import main as score_main
from llava_bridge.config import LiveEvalConfig
from llava_bridge.conversation import generation_prompt
from llava_bridge.generate import generate_ids, left_pad, rank_choices, score_continuations, tokenize_prompt
from llava_bridge.model import MMSettings, attach_vision, load_llava, load_lm, load_tokenizer
from llava_bridge.train import main
from llava_bridge.vision import build_vision_tower
from ov3common.config import ConfigError, load_config
from ov3common.log import read_jsonl
from tests.llava_fixtures import *  # noqa: F403 (pytest fixtures)
from tests.test_llava_model import overrides

EVAL_EVERY, STEPS = 2, 4


def eval_overrides(w, **kw):
    return {"train.eval_every": EVAL_EVERY, "eval.pope": w["pope"], "eval.seedbench": w["seed"],
            "eval.image_root": w["images"], "eval.limit_per_category": 3, "eval.batch_size": 8,
            "eval.max_new_tokens": 6, **kw}


@pytest.fixture(scope="module")
def live_run(llava_world, tmp_path_factory):
    """Stage 2 (LLM + projector) for 4 steps with checkpoints and in-training eval at steps 2 and 4."""
    out = tmp_path_factory.mktemp("live_eval")
    assert main(overrides(llava_world, out, **{
        "model.template": "vicuna_v1", "data.train": f"[{llava_world['instruct']}]", "train.tune": "full",
        "train.lr": 3e-3, "train.max_steps": STEPS, "train.ckpt_every": EVAL_EVERY, "train.keep_last": 3,
        **eval_overrides(llava_world)})) == 0
    return out


@pytest.fixture(scope="module")
def random_llava(llava_world, tmp_path_factory):
    """The tiny random LM + a random projector, saved as a stage-2 folder: untrained, so its answers vary from
    question to question (a trained toy model answers everything alike, which would make a comparison vacuous)."""

    out = tmp_path_factory.mktemp("random_llava")
    torch.manual_seed(0)
    model = load_lm(llava_world["llm"])
    attach_vision(model, build_vision_tower(str(llava_world["enc"])), MMSettings(str(llava_world["enc"])))
    model.save_pretrained(out)
    load_tokenizer(llava_world["llm"]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def subsets(llava_world):
    return load_subsets(LiveEvalConfig(pope=str(llava_world["pope"]), seedbench=str(llava_world["seed"]),
                                       image_root=str(llava_world["images"])))


def test_in_training_eval_equals_offline_predict_and_score(live_run, llava_world, tmp_path):
    logged = [r for r in read_jsonl(live_run / "metrics.jsonl") if "eval/pope_f1" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for row in logged:
        step = row["step"]
        live, ckpt = live_run / "eval" / f"step-{step}", live_run / f"checkpoint-{step}"
        assert ckpt.is_dir()
        protocols = (("pope", "pope", []), ("seedbench", "seedbench", []),
                     ("seedbench_rank", "seedbench", ["--protocol", "rank"]))
        for name, bench, extra in protocols if step == EVAL_EVERY else protocols[:1]:
            data = llava_world["pope" if bench == "pope" else "seed"]
            pred, scores = tmp_path / f"{step}_{name}.jsonl", tmp_path / f"{step}_{name}.json"
            assert predict_main(["--model", str(ckpt), "--benchmark", bench, "--data", str(data), "--image-root",
                                 str(llava_world["images"]), "--limit-per-category", "3", "--batch-size", "8",
                                 "--max-new-tokens", "6", "--out", str(pred), *extra]) == 0
            assert score_main([bench, "--predictions", str(pred), "--out", str(scores)]) == 0
            assert pred.read_text() == (live / f"{name}_predictions.jsonl").read_text()
            offline = json.loads(scores.read_text())
            in_training = json.loads((live / f"{name}_scores.json").read_text())
            offline.pop("predictions"), in_training.pop("predictions")
            assert offline == in_training
            key = {"pope": "eval/pope_f1", "seedbench": "eval/seedbench_acc",
                   "seedbench_rank": "eval/seedbench_rank_acc"}[name]
            assert row[key] == (offline["mean_f1"] if bench == "pope" else offline["all"])
        assert row["eval/pope_acc"] == json.loads((live / "pope_scores.json").read_text())["overall"]["accuracy"]
    # the subset: the first 3 questions of each category; both steps see the same questions
    qids = [json.loads(x)["question_id"] for x in (live_run / "eval/step-2/pope_predictions.jsonl").open()]
    assert len(qids) == 9 and qids == [json.loads(x)["question_id"]
                                       for x in (live_run / "eval/step-4/pope_predictions.jsonl").open()]


def test_eval_every_needs_a_benchmark(llava_world, tmp_path):
    with pytest.raises(ConfigError, match="eval.pope"):
        main(overrides(llava_world, tmp_path, **{"train.eval_every": 2}))
    with pytest.raises(ConfigError, match="eval.seedbench: path does not exist"):
        main(overrides(llava_world, tmp_path, **eval_overrides(llava_world, **{"eval.seedbench": tmp_path / "x"})))


def generation_scores(model, tok, images, prompts, batch_size, steps=3):
    """Greedy generation's per-step scores ``[n, steps, vocab]``, batched as ``generate_ids`` batches."""

    out = []
    for s in range(0, len(prompts), batch_size):
        seqs = [tokenize_prompt(tok, generation_prompt("vicuna_v1", p, True, tok)) for p in prompts[s:s + batch_size]]
        ids, mask = left_pad(seqs, tok.pad_token_id)
        pixels = torch.stack([model.vision_tower.processor(i) for i in images[s:s + batch_size]])
        g = model.generate(input_ids=ids, attention_mask=mask, images=pixels, max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True,
                           pad_token_id=tok.pad_token_id)
        out.append(torch.stack(g.scores, 1))
    return torch.cat(out)


def test_predictions_do_not_depend_on_batch_size(random_llava, subsets):
    """Batch 1 vs 8, left padding: POPE and SeedBench answers (generated letters) and answer ranking agree, and
    so do the numbers behind them (generation scores, choice log-likelihoods), which differ between questions."""

    model, tok = load_llava(random_llava)
    pope, seed = subsets["pope"][:8], subsets["seedbench"][:4]  # 4 questions x 4 choices = 16 continuations
    assert len({len(tokenize_prompt(tok, r["prompt"])) for r in pope[:8]}) > 1  # a batch of 8 is padded
    for records in (pope, seed):
        assert predict_answers(model, tok, records, batch_size=8, max_new_tokens=6) == \
            predict_answers(model, tok, records, batch_size=1, max_new_tokens=6)
    assert rank_answers(model, tok, seed, batch_size=8) == rank_answers(model, tok, seed, batch_size=1)
    # generation: token ids and per-step scores
    images, prompts = [load_image(r["image"]) for r in pope], [r["prompt"] for r in pope]
    assert generate_ids(model, tok, images, prompts, 6, 8) == generate_ids(model, tok, images, prompts, 6, 1)
    g8, g1 = generation_scores(model, tok, images, prompts, 8), generation_scores(model, tok, images, prompts, 1)
    torch.testing.assert_close(g8, g1, atol=1e-4, rtol=1e-4)
    first = g1[:, 0].clamp(min=-1e4)  # (min_new_tokens sets EOS to -inf)
    assert float((first - first[:1]).abs().amax(-1)[1:].min()) > 1e-3  # each question's scores are its own
    # answer ranking: choice log-likelihoods, also when a batch spans questions
    simg = [load_image(r["image"]) for r in seed]
    qs, cs = [r["answer_prompt"] for r in seed], [list(r["choices"].values()) for r in seed]
    r8, r1 = rank_choices(model, tok, simg, qs, cs, 8), rank_choices(model, tok, simg, qs, cs, 1)
    assert [b for b, _ in r8] == [b for b, _ in r1]
    s1 = torch.tensor([s for _, s in r1])
    torch.testing.assert_close(torch.tensor([s for _, s in r8]), s1, atol=1e-5, rtol=1e-5)
    assert float((s1.max(1).values - s1.min(1).values).min()) > 1e-3  # the choices are told apart
    flat = [(im, q, c) for im, q, ch in zip(simg, qs, cs) for c in ch]
    s7 = score_continuations(model, tok, *map(list, zip(*flat)), batch_size=7)
    torch.testing.assert_close(torch.tensor([x for x, _ in s7]), s1.flatten(), atol=1e-5, rtol=1e-5)


def test_eval_all_scores_a_trained_run_through_the_real_adapters(live_run, llava_world, tmp_path):
    """`make eval-all`'s default predictor and ranker (eval.adapters, not a fake) on a trained run's checkpoint
    give the scores the in-training evaluation logged for that step."""
    ev = load_config(eval_all.EvalAllConfig, None, [
        f"out_dir={tmp_path / 'report'}", "pieces=[pope, seedbench, seedbench_rank]", "device=cpu",
        f"pope.path={llava_world['pope']}", f"pope.image_root={llava_world['images']}", "pope.limit_per_category=3",
        f"seedbench.path={llava_world['seed']}", f"seedbench.image_root={llava_world['images']}",
        "seedbench.limit_per_category=3", "llava.batch_size=8", "llava.max_new_tokens=6",
        f"rows=[{{name: r, llava: {live_run / f'checkpoint-{EVAL_EVERY}'}}}]"])
    got = eval_all.evaluate(ev)["rows"][0]["results"]
    live = live_run / "eval" / f"step-{EVAL_EVERY}"
    for name in ("pope", "seedbench", "seedbench_rank"):
        assert list((tmp_path / "report").rglob(f"{name}_predictions.jsonl")), name  # predicted, not found
        want = json.loads((live / f"{name}_scores.json").read_text())
        for k in ("mean_f1", "overall") if name == "pope" else ("all",):
            assert got[name][k] == want[k], (name, k)


def test_llava_predict_writes_what_the_per_protocol_cli_writes(random_llava, llava_world, tmp_path):
    """make llava-predict (one process, the model loaded once) = eval.adapters + eval.score run per protocol."""
    w = llava_world
    common = ["--model", str(random_llava), "--image-root", str(w["images"]), "--limit-per-category", "3",
              "--batch-size", "8", "--max-new-tokens", "6"]
    assert predict_all([*common, "--pope", str(w["pope"]), "--seedbench", str(w["seed"]),
                        "--out-dir", str(tmp_path / "all")]) == 0
    for name, bench, extra in (("pope", "pope", []), ("seedbench", "seedbench", []),
                               ("seedbench_rank", "seedbench", ["--protocol", "rank"]),
                               ("seedbench_blind", "seedbench", ["--blank-image"])):
        pred, scores = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.json"
        assert predict_main([*common, "--benchmark", bench, "--data", str(w["pope" if bench == "pope" else "seed"]),
                             "--out", str(pred), *extra]) == 0
        assert score_main([bench, "--predictions", str(pred), "--out", str(scores)]) == 0
        assert (tmp_path / "all" / f"{name}_predictions.jsonl").read_text() == pred.read_text(), name
        one, per = (json.loads(p.read_text()) for p in (tmp_path / "all" / f"{name}_scores.json", scores))
        one.pop("predictions"), per.pop("predictions")
        assert one == per, name
