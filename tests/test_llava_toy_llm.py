"""The toy LLM (make toy-llm): LM pretraining then short-answer SFT with the scene's caption in the user turn."""

import json

import torch
from transformers import AutoModelForCausalLM

from llava_bridge import IGNORE_INDEX
from llava_bridge.toy_llm import main, sft_samples
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
