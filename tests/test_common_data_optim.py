import pytest
import torch

from ov3common.data import ResumableSampler
from ov3common.guard import NonFiniteGuard, TrainingDiverged
from ov3common.optim import build_adamw, clip_grad_norm, param_groups, warmup_cosine


def test_sampler_epoch_order_is_deterministic_and_resumable():
    s = ResumableSampler(20, seed=1)
    s.set_epoch(3)
    full = list(s)
    assert sorted(full) == list(range(20)) and full != list(range(20))
    s2 = ResumableSampler(20, seed=1)
    s2.load_state_dict({"epoch": 3, "start": 7, "seed": 1, "length": 20})
    assert list(s2) == full[7:] and len(s2) == 13
    s.set_epoch(4)
    assert list(s) != full


def test_sampler_ranks_partition_and_state_mismatch():
    parts = [list(ResumableSampler(11, seed=0, rank=r, world_size=3)) for r in range(3)]
    flat = [i for p in parts for i in p]
    assert len(flat) == 9 and len(set(flat)) == 9
    with pytest.raises(ValueError, match="length"):
        ResumableSampler(11, seed=0).load_state_dict({"epoch": 0, "start": 0, "seed": 0, "length": 12})
    with pytest.raises(ValueError, match="outside"):
        ResumableSampler(11, seed=0).set_epoch(0, start=12)


def test_weight_decay_only_on_matrices():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    m.register_parameter("logit_scale", torch.nn.Parameter(torch.zeros(())))
    groups = param_groups(m, 0.2)
    assert [len(g["params"]) for g in groups] == [1, 4]
    assert groups[0]["params"][0] is m[0].weight and groups[0]["weight_decay"] == 0.2
    opt = build_adamw(m, lr=1.0, weight_decay=0.2)
    assert opt.defaults["fused"] is True


def test_warmup_cosine_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_nonfinite_guard_skips_then_stops():
    g = NonFiniteGuard(max_consecutive=3)
    assert not g.bad(torch.tensor(1.0), 0)
    assert g.bad(torch.tensor(float("nan")), 1) and g.bad(float("inf"), 2)
    assert not g.bad(torch.tensor(0.5), 3) and g.consecutive == 0
    m = torch.nn.Linear(2, 1)
    m.weight.grad = torch.full_like(m.weight, float("inf"))
    assert g.bad(torch.tensor(0.5), 4, grads_of=m)
    g.bad(torch.tensor(float("nan")), 5)
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        g.bad(torch.tensor(float("-inf")), 6)
    assert g.skipped_total == 5


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4, float("nan"), float("inf")])
def test_clip_grad_norm_is_torchs_clip_bitwise(scale):
    """Below, at and above the limit, and with non-finite gradients: the same norm and the same gradients, bit for
    bit, as torch.nn.utils.clip_grad_norm_ (which always multiplies; ours skips the multiply by 1)."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (7, 3, 5)]
    grads = [torch.randn(s) * 0.01 for s in shapes]  # norm ~0.5
    grads[1][3] *= scale
    a = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    b = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for pa, pb, g in zip(a, b, grads):
        pa.grad, pb.grad = g.clone(), g.clone()
    b.append(torch.nn.Parameter(torch.zeros(2)))  # a parameter without a gradient is passed over
    want = torch.nn.utils.clip_grad_norm_(a, 1.0)
    got = clip_grad_norm(b, 1.0)
    assert torch.equal(want, got) or (want.isnan() and got.isnan())
    for pa, pb in zip(a, b):
        assert torch.equal(pa.grad, pb.grad) or torch.equal(pa.grad.isnan(), pb.grad.isnan())
    if scale <= 1.0:  # below the limit: the gradients are untouched
        assert all(torch.equal(pb.grad, g) for pb, g in zip(b, grads))
