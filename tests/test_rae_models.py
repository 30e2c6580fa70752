"""DiT-DH: size registry, shapes, adaLN-Zero init, class dropout, RoPE, position and class awareness."""

import pytest
import torch

from rae_generation.models import DIT_SIZES, DiTDH, DiTDHConfig, apply_rope, dit_config, rope_2d


def tiny(**kw) -> DiTDH:
    torch.manual_seed(0)
    return DiTDH(dit_config("tiny", in_dim=12, grid=3, num_classes=5, **kw))


@pytest.mark.parametrize("size,trunk,head", [("S", (12, 384), (2, 2048)), ("B", (12, 768), (2, 2048)),
                                              ("L", (24, 1024), (2, 2048)), ("XL", (28, 1152), (2, 2048))])
def test_registry_sizes(size, trunk, head):
    c = dit_config(size, in_dim=768, grid=16)
    assert (c.depth, c.width) == trunk and (c.head_depth, c.head_width) == head
    assert c.width % c.heads == 0 and (c.width // c.heads) % 4 == 0 and (c.head_width // c.head_heads) % 4 == 0
    with pytest.raises(ValueError, match="unknown DiT-DH size"):
        dit_config("XXL")


def test_all_sizes_are_buildable_configs():
    for size in DIT_SIZES:
        cfg = dit_config(size, in_dim=8, grid=2, num_classes=3)
        assert DiTDHConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        DiTDHConfig.from_dict({"widht": 3})


def test_forward_shape_zero_init_and_grads():
    m = tiny()
    x, t, y = torch.randn(4, 9, 12), torch.rand(4), torch.tensor([0, 1, 4, 5])  # 5 = the null class
    out = m(x, t, y)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero + zero output layer: the model starts at v = 0
    out2 = m(x, t, y)
    (out2 - torch.randn_like(out2)).pow(2).mean().backward()
    assert m.final.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expects x"):
        m(torch.randn(4, 8, 12), t, y)


def test_class_dropout_only_in_training():
    m = tiny(class_dropout=0.5)
    y = torch.zeros(2000, dtype=torch.long)
    m.train()
    frac = (m.drop_labels(y) == m.null_class).float().mean()
    assert 0.45 < frac < 0.55
    m.eval()
    assert torch.equal(m.drop_labels(y), y)


def test_rope_is_a_relative_rotation():
    rot = rope_2d(grid=4, head_dim=8)
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)
    rq, rk = apply_rope(q, rot), apply_rope(k, rot)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation
    dots = (rq[0, 0] @ rk[0, 0].T).reshape(4, 4, 4, 4)  # [r1, c1, r2, c2]
    torch.testing.assert_close(dots[0, 0, 1, 2], dots[2, 1, 3, 3])  # same (dr, dc) offset, same score
    assert not torch.allclose(dots[0, 0, 1, 2], dots[0, 0, 2, 1])
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(4, 6)


def test_model_is_position_aware_and_class_aware():
    m = tiny()
    for p in m.parameters():  # leave the zero init so the output depends on the inputs
        torch.nn.init.normal_(p, std=0.1)
    m.eval()
    x, t = torch.randn(1, 9, 12), torch.rand(1)
    a, b = m(x, t, torch.tensor([1])), m(x, t, torch.tensor([2]))
    assert not torch.allclose(a, b)
    perm = torch.randperm(9)
    assert not torch.allclose(m(x[:, perm], t, torch.tensor([1])), a[:, perm], atol=1e-4)
