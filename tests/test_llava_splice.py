"""The −200 splice (positions, lengths, labels, padding sides, truncation) and the projector's keys/shapes."""

import pytest
import torch

from llava_bridge import IGNORE_INDEX as IG
from llava_bridge import IMAGE_TOKEN_INDEX as IM
from llava_bridge.projector import build_projector, load_projector_state, projector_state, save_projector
from llava_bridge.splice import splice

H = 2


def embed(ids):  # text token t -> [t, 1]; images are marked by negative values
    return torch.stack([ids.float(), torch.ones_like(ids, dtype=torch.float)], -1)


def img(k, n):  # image k -> rows [-(10k + j), 0]
    return torch.stack([-(10.0 * k + torch.arange(n).float()), torch.zeros(n)], -1)


def batch():
    input_ids = torch.tensor([[1, IM, 5, 6, 0], [1, 7, 8, 9, 10], [1, IM, 3, IM, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[IG, IG, 5, 6, IG], [IG, 7, 8, 9, 10], [IG, IG, 3, IG, 4]])
    return input_ids, mask, labels, [img(1, 3), img(2, 3), img(3, 3)]


def test_splice_right_padding_hand_checked():
    sp = splice(*batch()[:3], embed, batch()[3])
    first = sp.inputs_embeds[..., 0]
    assert first.shape == (3, 9)  # row 2: 1 + 3 + 1 + 3 + 1
    assert first[0].tolist() == [1, -10, -11, -12, 5, 6, 0, 0, 0]
    assert first[1].tolist() == [1, 7, 8, 9, 10, 0, 0, 0, 0]
    assert first[2].tolist() == [1, -20, -21, -22, 3, -30, -31, -32, 4]
    assert sp.attention_mask.tolist() == [[1] * 6 + [0] * 3, [1] * 5 + [0] * 4, [1] * 9]
    assert sp.labels.tolist() == [[IG, IG, IG, IG, 5, 6, IG, IG, IG], [IG, 7, 8, 9, 10, IG, IG, IG, IG],
                                  [IG, IG, IG, IG, 3, IG, IG, IG, 4]]
    assert sp.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 1, 1, 1]


def test_splice_left_padding_and_truncation():
    ids, mask, labels, feats = batch()
    sp = splice(ids, mask, labels, embed, feats, padding_side="left")
    assert sp.inputs_embeds[0, :, 0].tolist() == [0, 0, 0, 1, -10, -11, -12, 5, 6]
    assert sp.attention_mask[1].tolist() == [0] * 4 + [1] * 5
    assert sp.position_ids[1].tolist() == [1, 1, 1, 1, 0, 1, 2, 3, 4]
    sp = splice(ids, mask, labels, embed, feats, max_length=5)
    assert sp.inputs_embeds[..., 0].tolist() == [[1, -10, -11, -12, 5], [1, 7, 8, 9, 10], [1, -20, -21, -22, 3]]
    assert sp.labels[0].tolist() == [IG, IG, IG, IG, 5]


def test_splice_text_only_and_gradients():
    ids = torch.tensor([[1, 2, 3]])
    sp = splice(ids, None, ids.clone(), embed, None)
    assert torch.equal(sp.inputs_embeds, embed(ids)) and torch.equal(sp.labels, ids)
    f = img(1, 2).requires_grad_(True)
    out = splice(torch.tensor([[1, IM, 2]]), None, None, embed, [f])
    out.inputs_embeds.sum().backward()
    assert torch.equal(f.grad, torch.ones_like(f))


def test_splice_count_mismatch_raises():
    ids, mask, labels, feats = batch()
    with pytest.raises(ValueError, match="3 image placeholders but 2 images"):
        splice(ids, mask, labels, embed, feats[:2])


@pytest.mark.parametrize("kind,keys", [
    ("mlp2x_gelu", {"model.mm_projector.0.weight": (24, 16), "model.mm_projector.0.bias": (24,),
                    "model.mm_projector.2.weight": (24, 24), "model.mm_projector.2.bias": (24,)}),
    ("linear", {"model.mm_projector.weight": (24, 16), "model.mm_projector.bias": (24,)}),
])
def test_projector_keys_and_shapes(kind, keys, tmp_path):
    proj = build_projector(kind, 16, 24)
    sd = projector_state(proj)
    assert {k: tuple(v.shape) for k, v in sd.items()} == keys
    save_projector(tmp_path / "p.safetensors", sd)
    fresh = build_projector(kind, 16, 24)
    load_projector_state(tmp_path / "p.safetensors", fresh)
    assert all(torch.equal(a, b) for a, b in zip(proj.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ValueError, match="mm_hidden_size"):
        load_projector_state(tmp_path / "p.safetensors", build_projector(kind, 8, 24))
    if kind == "mlp2x_gelu":
        assert isinstance(proj[1], torch.nn.GELU)
        with pytest.raises(KeyError, match="mm_projector_type"):
            load_projector_state(tmp_path / "p.safetensors", build_projector("linear", 16, 24))
