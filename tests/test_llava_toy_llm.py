"""The toy LLM (make toy-llm): LM pretraining then short-answer SFT with the scene's caption in the user turn."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, AutoTokenizer

from llava_bridge import IGNORE_INDEX
from llava_bridge.conversation import encode_chunks, render, tokenize_rendered
from llava_bridge.toy_llm import main, mc_samples, sft_samples
from ov3common.toyworld.text import recaption, short_caption
from ov3common.toyworld.tokenizer import save_tokenizer
from ov3common.toyworld.world import sample_scene
from tests.llava_fixtures import *  # noqa: F403 (pytest fixtures)


def test_sft_samples_put_the_caption_in_context_and_learn_only_the_answer(llava_world, word_tokenizer, tmp_path):
    w = llava_world
    caps = tmp_path / "caps.json"  # captions are looked up by the instruct record's id
    caps.write_text(json.dumps([{"id": "q0", "conversations": [{"from": "human", "value": "<image>"},
                                                               {"from": "gpt", "value": "A red circle."}]}]))
    samples = sft_samples([str(w["instruct"])], word_tokenizer, str(caps), max_answer_words=1)
    ids = [s["id"] for s in samples]
    assert ids.count("q0") == 1 and "q1" not in ids  # q1 has no caption; "It is red." is 3 words: dropped
    assert "t0" in ids  # text-only records keep their short answers, without a caption
    s = samples[ids.index("q0")]
    text = word_tokenizer.decode(s["input_ids"])
    assert "a red circle" in text and "<image>" not in text
    learned = [t for t in s["labels"].tolist() if t != IGNORE_INDEX]
    assert word_tokenizer.decode(learned) == "yes </s>"


def test_toy_llm_pretrain_then_sft_writes_a_loadable_model(llava_world, tmp_path):
    w = llava_world
    out = tmp_path / "llm"
    assert main([f"tokenizer={w['tok']}", f"data=[{w['instruct']}]", f"captions={w['pretrain']}", f"out_dir={out}",
                 "size=tiny", "steps=2", "block=32", "batch_size=2", "warmup=1", "sft_steps=3",
                 "sft_batch_size=4", "threads=1"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 64
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("sft_loss" in r and torch.isfinite(torch.tensor(r["sft_loss"])) for r in rows)


def test_toy_llm_compiled_loss_equals_eager_over_5_steps(llava_world, tmp_path):
    """`compile: true` (torch.compile in place): the same losses as eager over 5 LM + 5 SFT steps, same weight names."""
    w = llava_world
    losses, keys, graphs = {}, {}, {}
    for c in ("false", "true"):
        out = tmp_path / c
        counters.clear()
        assert main([f"tokenizer={w['tok']}", f"data=[{w['instruct']}]", f"captions={w['pretrain']}", f"out_dir={out}",
                     "size=tiny", "steps=5", "block=32", "batch_size=2", "warmup=1", "sft_steps=5",
                     "sft_batch_size=4", "threads=1", f"compile={c}"]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[c] = [r[k] for r in rows for k in ("loss", "sft_loss") if k in r]
        graphs[c] = counters["stats"]["unique_graphs"]
        keys[c] = sorted(AutoModelForCausalLM.from_pretrained(out).state_dict())
    assert graphs == {"false": 0, "true": graphs["true"]} and graphs["true"] >= 1  # compiled only when asked
    assert len(losses["true"]) == 2 and keys["true"] == keys["false"]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3)


def test_batched_chunk_encoding_equals_one_by_one(word_tokenizer):

    convs = [render("vicuna_v1", [("human", "<image>\nis it red ?"), ("gpt", "yes")], word_tokenizer),
             render("vicuna_v1", [("human", "what color ?"), ("gpt", "red")], word_tokenizer)]
    for r, enc in zip(convs, encode_chunks(word_tokenizer, convs)):
        assert tokenize_rendered(word_tokenizer, r, "s", encoded=enc) == tokenize_rendered(word_tokenizer, r, "s")


def _scene_shard(folder, n: int = 4):
    """A webdataset folder with n toy scenes (json members: key, scene, short_caption, recaption)."""



    rng = np.random.default_rng(0)
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w") as tf:
        for i in range(n):
            scene = sample_scene(rng)
            meta = json.dumps({"key": f"k{i}", "scene": scene, "short_caption": short_caption(scene),
                               "recaption": recaption(scene, rng)}).encode()
            info = tarfile.TarInfo(f"k{i}.json")
            info.size = len(meta)
            tf.addfile(info, io.BytesIO(meta))
    return folder


def test_mc_samples_ask_the_toy_worlds_questions_about_a_described_scene(tmp_path):


    shards = _scene_shard(tmp_path / "wds")
    save_tokenizer(str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    samples = mc_samples(str(shards), tok, 40, "recaption")
    assert len(samples) == 40 and {s["id"] for s in samples} <= {f"k{i}" for i in range(4)}
    answers = []
    for s in samples:
        text = tok.decode(s["input_ids"])
        assert "the image shows" in text and "answer with the option" in text and tok.unk_token not in text
        learned = tok.decode([t for t in s["labels"].tolist() if t != IGNORE_INDEX])
        assert learned.split()[0] in "ABCD" and learned.endswith("</s>")
        answers.append(learned.split()[0])
    assert len(set(answers)) == 4  # the right letter is uniform over A-D


def test_toy_llm_four_choice_phase_runs_after_the_sft(llava_world, tmp_path):
    w = llava_world
    shards = _scene_shard(tmp_path / "wds")
    common = [f"tokenizer={w['tok']}", f"data=[{w['instruct']}]", f"captions={w['pretrain']}", "size=tiny",
              "steps=2", "block=32", "batch_size=2", "warmup=1", "sft_batch_size=4", "threads=1",
              f"sft_mc_scenes={shards}", "sft_mc_samples=8", "mc_samples=8"]
    out = tmp_path / "llm"
    assert main(common + [f"out_dir={out}", "sft_steps=2", "mc_steps=3"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "mc_loss" in r] == [7]  # logged at its last step, after pretrain + SFT
    with pytest.raises(ValueError, match="mc_steps"):
        main(common + [f"out_dir={tmp_path / 'x'}", "sft_steps=0", "mc_steps=3"])
