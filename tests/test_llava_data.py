"""Data: the modality-grouped sampler, truncation that counts image tokens, the collator."""

import json

import pytest
import torch

from llava_bridge import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_bridge.data import Collator, LlavaDataset
from llava_bridge.sampler import ModalityLengthGroupedSampler
from llava_bridge.vision import build_processor
from tests.llava_fixtures import *  # noqa: F403 (pytest fixtures)


def test_modality_grouped_sampler():
    lengths = [10 + i if i % 3 else -(5 + i) for i in range(50)]  # 1/3 text-only
    s = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=3)
    order = list(s)
    assert sorted(order) == list(range(50))  # every sample once per epoch
    full = len(order) - len(order) % 8
    megabatches = [order[i:i + 8] for i in range(0, full, 8)]
    for mb in megabatches[:-1]:  # the last one may hold the leftovers of both modalities
        signs = {lengths[i] > 0 for i in mb}
        assert len(signs) == 1
        assert [abs(lengths[i]) for i in mb] == sorted((abs(lengths[i]) for i in mb), reverse=True)
    assert list(s) == order  # a function of (seed, epoch)
    s.set_epoch(1)
    assert list(s) != order and sorted(s) == list(range(50))


def test_length_group_sorts_several_megabatches_together_and_pads_less():
    g = torch.Generator().manual_seed(0)
    lengths = (torch.randint(20, 240, (400,), generator=g) * torch.where(torch.rand(400, generator=g) < 0.2, -1, 1))
    lengths = lengths.tolist()

    def padding(order, batch=4):
        full = len(order) - len(order) % batch
        return sum(max(abs(lengths[i]) for i in order[k:k + batch]) * batch - sum(abs(lengths[i])
                   for i in order[k:k + batch]) for k in range(0, full, batch))

    llava = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=1, seed=1)
    grouped = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=1, seed=1, group=50)
    order = list(grouped)
    assert sorted(order) == list(range(400)) and list(grouped) == order
    for k in range(0, 400 - 400 % 4 - 4, 4):  # every full batch holds one modality (the leftovers come last)
        assert len({lengths[i] > 0 for i in order[k:k + 4]}) == 1
    assert padding(order) < 0.2 * padding(list(llava))  # similar lengths in a batch
    assert list(ModalityLengthGroupedSampler(lengths, 4, 1, 1, group=1)) == list(llava)  # group=1: LLaVA's rule
    starts = [abs(lengths[order[k]]) for k in range(0, 200, 4)]
    assert starts != sorted(starts, reverse=True)  # the batches themselves are shuffled, not long to short
    with pytest.raises(ValueError, match="group must be >= 1"):
        ModalityLengthGroupedSampler(lengths, 4, group=0)


def test_truncation_counts_image_tokens(llava_world, word_tokenizer, tmp_path):
    rec = [{"id": "long", "image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": " ".join(["red circle"] * 40)}]}]
    (tmp_path / "d.json").write_text(json.dumps(rec))
    ds = LlavaDataset([str(tmp_path / "d.json")], str(llava_world["images"]), word_tokenizer, "vicuna_v1",
                      build_processor(llava_world["enc"]), max_length=64, num_image_tokens=4)
    item = ds[0]
    assert len(item["input_ids"]) == 64 - 3  # + 4 image positions - 1 placeholder = 64 after the splice
    assert (item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
    assert item["image"].shape == (3, 32, 32) and item["image"].min() >= -1 and item["image"].max() <= 1


def test_collator_pads_and_stacks():
    samples = [{"id": "a", "input_ids": torch.tensor([1, IMAGE_TOKEN_INDEX, 5]), "labels": torch.tensor([-100, -100, 5]),
                "image": torch.zeros(3, 4, 4), "skipped": {"truncated": 1}, "converted": {}},
               {"id": "b", "input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7]), "image": None,
                "skipped": {}, "converted": {"cmyk": 1}}]
    b = Collator(pad_token_id=0)(samples)
    assert b["input_ids"].tolist() == [[1, IMAGE_TOKEN_INDEX, 5], [1, 7, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 5], [IGNORE_INDEX, 7, IGNORE_INDEX]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["images"].shape == (1, 3, 4, 4)
    assert b["_skip"] == {"skipped": {"truncated": 1}, "converted": {"cmyk": 1}} and b["_ids"] == ["a", "b"]


@pytest.mark.parametrize("tokenizer", ["word_tokenizer", "llama_sp_tokenizer"])
def test_pretokenize_gives_the_per_step_ids_and_labels(tokenizer, llava_world, tmp_path, request):
    """data.pretokenize: every item tokenized once, in batched calls, equals what __getitem__ tokenizes per step
    (text-only and image records, answers cut at max_length included)."""
    tok = request.getfixturevalue(tokenizer)
    instruct = json.loads(llava_world["instruct"].read_text())[:12]
    for i, r in enumerate(instruct[::3]):  # some long answers: the max_length cut is exercised
        r["conversations"][-1]["value"] = " ".join(["red circle"] * (10 + 5 * i))
    (tmp_path / "d.json").write_text(json.dumps(instruct))
    proc = build_processor(llava_world["enc"])
    per_step, pre = (LlavaDataset([str(tmp_path / "d.json")], str(llava_world["images"]), tok, "vicuna_v1", proc,
                                  max_length=48, num_image_tokens=4) for _ in range(2))
    pre.pretokenize(chunk=5)
    lengths = []
    for i in range(len(instruct)):
        a, b = per_step[i], pre[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"]), i
        lengths.append(len(a["input_ids"]))
    assert max(lengths) >= 48 - 3 and any(a["image"] is not None for a in (per_step[0], per_step[1]))
