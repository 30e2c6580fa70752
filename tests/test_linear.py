"""ov3common.linear: oneDNN float32 linear = nn.Linear (values and gradients, against float64), where it applies and
where it steps aside; use_onednn_linear swaps modules in place without touching parameters or state_dict names."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

from ov3common import linear as L
from ov3common.log import count_flops, matmul_rate

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built in")


def _grads(fn, x, w, b, loss):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    y = fn(x, w, b)
    loss(y).backward()
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("case", ["3d", "transposed_input", "no_bias", "mean_loss"])
def test_onednn_linear_matches_float64(case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 24, generator=g)
    if case == "transposed_input":
        x = x.transpose(0, 1)  # a non-contiguous input
    w, b = torch.randn(56, 24, generator=g), torch.randn(56, generator=g)
    b = None if case == "no_bias" else b
    gy = torch.randn(*x.shape[:-1], 56, generator=g)
    loss = (lambda y: y.mean()) if case == "mean_loss" else (lambda y: (y * gy).sum())
    got = _grads(L._onednn_linear, x, w, b, loss)
    ref = _grads(F.linear, x.double(), w.double(), b.double() if b is not None else None, loss)
    for a, r in zip(got, ref):
        if r is None:
            assert a is None
            continue
        assert a.dtype == torch.float32 and a.shape == r.shape
        assert (a.double() - r).abs().max() <= 1e-5 * r.abs().max()


def test_only_the_needed_gradients_and_where_it_steps_aside():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(5, 4)  # no gradient for the input
    L.linear(x, w).sum().backward()
    assert w.grad is not None and torch.allclose(w.grad, torch.ones(5, 8).t() @ x)
    assert L.onednn_applies(x, w)
    assert not L.onednn_applies(x.double(), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not L.onednn_applies(x, w)
        assert L.linear(x, w).dtype == torch.bfloat16  # F.linear under autocast
    y = L.linear(x.double(), w.double().detach())
    assert torch.equal(y, F.linear(x.double(), w.double().detach()))


def test_use_onednn_linear_swaps_in_place_and_trains_the_same():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    model.load_state_dict(ref.state_dict())
    params = [id(p) for p in model.parameters()]
    assert L.use_onednn_linear(model, "aten") == 0 and type(model[0]) is nn.Linear
    assert L.use_onednn_linear(model, "onednn") == 2
    assert all(type(m) is L.OneDNNLinear for m in (model[0], model[2]))
    assert [id(p) for p in model.parameters()] == params and model.state_dict().keys() == ref.state_dict().keys()
    x, t = torch.randn(64, 16), torch.randn(64, 4)
    losses = {}
    for name, m in (("ref", ref), ("onednn", model)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(20):
            loss = F.mse_loss(m(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["onednn"][-1] < 0.7 * losses["onednn"][0]
    assert max(abs(a - b) for a, b in zip(losses["ref"], losses["onednn"])) < 1e-4
    with pytest.raises(ValueError, match="cpu_linear"):
        L.use_onednn_linear(model, "mkl")


def test_auto_mode_measures_once():
    s = L.onednn_speedup(torch.get_num_threads())
    assert s > 0 and L.onednn_speedup(torch.get_num_threads()) == s  # cached per process
    model = nn.Sequential(nn.Linear(4, 4))
    n = L.use_onednn_linear(model, "auto")
    assert n == (1 if s >= 1.05 else 0)


def test_flops_of_onednn_products_are_counted_like_addmm():
    """ov3common.log.count_flops sees the oneDNN products (forward and both gradients) as aten's linear ones."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    ours = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    L.use_onednn_linear(ours, "onednn")
    x = torch.randn(3, 10, 32)

    def step(m):
        return lambda: m(x).square().mean().backward()

    assert count_flops(step(ours)) == count_flops(step(ref)) == 3 * 2 * 30 * (32 * 48 + 48 * 8) - 2 * 30 * 32 * 48
    assert matmul_rate(64, onednn=True, seconds=0.01) > 0
    # the custom op (the path inside torch.compile) counts the same three products
    xr = x.reshape(30, 32).requires_grad_()
    w = ours[0].weight
    assert count_flops(lambda: L.onednn_mm(xr, w, ours[0].bias).sum().backward()) == 3 * 2 * 30 * 32 * 48


def test_models_off_the_cpu_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4, device="meta"))
    assert L.use_onednn_linear(model, "onednn") == 0 and not L.uses_onednn_linear(model)


def test_onednn_mm_passes_torch_opcheck():
    """The custom op's schema, fake (meta) kernel and autograd registration are consistent (torch.library.opcheck)."""
    g = torch.Generator().manual_seed(0)
    a, w, b = torch.randn(6, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    torch.library.opcheck(L.onednn_mm, (a, w, b))
    torch.library.opcheck(L.onednn_mm, (a.requires_grad_(), w.t().contiguous().t().requires_grad_(), None))


def test_compiled_model_keeps_the_onednn_products():
    """Under torch.compile (one graph, no break) the products stay the oneDNN custom op in the generated code, and
    the compiled forward and gradients equal the eager ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    L.use_onednn_linear(model, "onednn")
    x = torch.randn(4, 5, 16)

    def loss(m):
        return m(x).square().mean()

    ref = loss(model)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)

    def run():
        out = loss(compiled)
        return out, torch.autograd.grad(out, list(model.parameters()))

    (out, grads), code = run_and_get_code(run)
    assert any("ov3.onednn_mm" in c for c in code)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
