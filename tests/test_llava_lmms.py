"""The lmms-eval plugin: its logic with request stand-ins (always), and against lmms-eval's real API with a tiny
local task (only where lmms-eval is installed: `make test-lmms` builds .venv-lmms for that)."""

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from llava_bridge.conversation import Rendered, generation_prompt, tokenize_rendered
from llava_bridge.generate import answer, rank_choices, score_continuations
from llava_bridge.lmms_plugin import OpenVision3Llava
from llava_bridge.train import main
from tests.llava_fixtures import *  # noqa: F403 (pytest fixtures)
from tests.lmms_task import run_tiny_task
from tests.test_llava_model import overrides

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None


@pytest.fixture(scope="module")
def trained(llava_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms_stage2")
    assert main(overrides(llava_world, out, **{"model.template": "vicuna_v1", "train.tune": "full",
                                               "data.train": f"[{llava_world['instruct']}]", "train.max_steps": 2})) == 0
    return out


@pytest.fixture(scope="module")
def plugin(trained, llava_world):
    p = OpenVision3Llava(pretrained=str(trained), device="cpu")
    img = Image.open(llava_world["images"] / "img0.png").convert("RGB")
    p.task_dict = {"toy": {"test": {0: {"img": img, "q": "What color is it?"}, 1: {"img": None, "q": "Hello"}}}}
    return p, img


def req(*args):
    return SimpleNamespace(args=args)


def test_generate_until_matches_generate_and_cuts(plugin):
    p, img = plugin
    vis = lambda d: [d["img"]] if d["img"] is not None else []
    got = p.generate_until([req("What color is it?", {"max_new_tokens": 5}, vis, 0, "toy", "test"),
                            req("Hello", {"max_new_tokens": 5}, vis, 1, "toy", "test")])
    ref = answer(p.model, p.tokenizer, [img, None], ["What color is it?", "Hello"], 5, 1)
    assert got == ref
    first_word = ref[0].split()[0] if ref[0] else ""
    if first_word and len(ref[0].split()) > 1:
        cut = p.generate_until([req("What color is it?", {"max_new_tokens": 5, "until": [" " + ref[0].split()[1]]},
                                    vis, 0, "toy", "test")])
        assert cut == [ref[0].split(" " + ref[0].split()[1])[0].strip()]


def test_loglikelihood_is_the_sum_of_token_logprobs(plugin):
    p, img = plugin
    greedy = answer(p.model, p.tokenizer, [img], ["What color is it?"], 4, 1)[0]
    vis = lambda d: [d["img"]]
    (lp_g, is_g), (lp_x, is_x) = p.loglikelihood([
        req("What color is it?", greedy, vis, 0, "toy", "test"),
        req("What color is it?", "square square square", vis, 0, "toy", "test")])
    assert is_g and not is_x and lp_g <= 0 and lp_x < lp_g
    # the same number from the model's own mean loss × the number of scored tokens

    prompt = generation_prompt("vicuna_v1", "What color is it?", True, p.tokenizer)
    text = prompt + " square square square"
    ids, labels = tokenize_rendered(p.tokenizer, Rendered(text, ((len(prompt), len(text)),), (False,)), "x")
    out = p.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]),
                  images=p.model.vision_tower.processor(img)[None])
    n = sum(label != -100 for label in labels)
    assert abs(-out.loss.item() * n - lp_x) < 1e-3 * n


def test_batched_scores_equal_one_by_one_and_ranking_picks_the_likeliest(plugin):
    p, img = plugin
    greedy = answer(p.model, p.tokenizer, [img], ["What shape is it?"], 3, 1)[0]
    items = [(img, "What color is it?", "red"), (None, "Hello", "square square square"),
             (img, "What shape is it?", greedy), (img, "What shape is it?", "circle red circle red")]
    ims, ctx, cont = zip(*items)
    one = [score_continuations(p.model, p.tokenizer, [i], [c], [t], 1)[0] for i, c, t in items]
    batched = score_continuations(p.model, p.tokenizer, ims, ctx, cont, batch_size=4)
    for (a, ga), (b, gb) in zip(one, batched):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)) and ga == gb
    assert batched[2][1] and not batched[3][1]  # the greedy answer is greedy; the made-up one is not
    choices = ["circle red circle red", greedy, "square square square"]
    (best, scores), = rank_choices(p.model, p.tokenizer, [img], ["What shape is it?"], [choices], batch_size=2)
    assert best == 1 and scores[1] == max(scores) and len(scores) == 3
    with pytest.raises(ValueError, match="2 images, 1 contexts"):
        score_continuations(p.model, p.tokenizer, [img, img], ["q"], ["a", "b"])


def test_generate_until_multi_round(plugin):
    p, img = plugin

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        assert len(previous_output) == round_idx
        return [doc["img"]], "What shape is it?", round_idx >= 2, None, None

    out = p.generate_until_multi_round([req("What color is it?", {"max_new_tokens": 3}, lambda d: [d["img"]],
                                            doc_to_text, 0, "toy", "test")])
    first = answer(p.model, p.tokenizer, [img], ["What color is it?"], 3, 1)[0]
    second = answer(p.model, p.tokenizer, [img], ["What shape is it?"], 3, 1,
                    histories=[[("What color is it?", first)]])[0]
    assert out == [(first, second)]


@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed here: run `make test-lmms`")
def test_against_real_lmms_eval(trained, llava_world, tmp_path):
    result = run_tiny_task(str(trained), llava_world, tmp_path)
    assert result["n"] == 4 and result["n_choice"] == 4
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["choice_accuracy"] <= 1.0
    print("lmms-eval tiny task:", result)


def test_lmms_env_flag_means_lmms_is_installed():
    if os.environ.get("OV3_LMMS") == "1":  # make test-lmms must not silently skip the real test
        assert HAS_LMMS, "OV3_LMMS=1 but lmms_eval cannot be imported in this interpreter"
