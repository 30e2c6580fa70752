"""Performance paths keep the numbers: attention kernels agree, the frozen-VAE options, bench plumbing and
reports, torch.compile equals eager (slow), the RAE comparison is skipped without ``RAE_SRC``. No test asserts
seconds."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import ov3common.log as L
from encoder.models import LatentViT, residual_linear, vit_config
from encoder.train import train
from encoder.vae import FrozenVAE, build_random_vae, tiny_vae_config
from llava_bridge.config import LlavaTrainConfig, training_arguments
from ov3common.attention import attention, packed_attention, uses_explicit_path, uses_packed_cpu_path
from ov3common.bench import interleaved, machine, ratio, write_report
from ov3common.log import read_jsonl
from ov3common.optim import build_adamw
from rae_generation.bench import main
from rae_generation.models import DiTDH, apply_rope, dit_config, rope_2d
from tests.test_encoder_train import cfg_for, stages, toy_root  # noqa: F401 (session fixture)


def _qkv(dtype, b=2, h=3, n=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_(True) for _ in range(3)]


@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_explicit_attention_path_matches_sdpa_values_and_grads(mask):
    """The CPU bf16 training path (explicit matmul-softmax) against SDPA on the same bf16 inputs, fp32 reference."""
    q, k, v = _qkv(torch.bfloat16)
    assert uses_explicit_path(q)
    kw = {}
    if mask == "bool":
        keep = torch.rand(2, 1, 1, 7, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[..., 0] = True  # every query keeps one key
        kw["attn_mask"] = keep
    elif mask == "float":
        kw["attn_mask"] = torch.randn(1, 3, 7, 7, generator=torch.Generator().manual_seed(2))
    elif mask == "causal":
        kw["is_causal"] = True
    go = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(3))
    out = attention(q, k, v, **kw)
    out.float().mul(go).sum().backward()
    grads = [t.grad.float() for t in (q, k, v)]
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, **kw)
    ref.mul(go).sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for g, r in zip(grads, (q32.grad, k32.grad, v32.grad)):
        torch.testing.assert_close(g, r, atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_packed_attention_matches_sdpa_values_and_grads(dtype):
    """packed [B, N, 3, H, D] in, token-major [B, N, H*D] out: values and the packed gradient against SDPA in fp32
    (float64 for float64) (fp32 and bf16 take the hand-written CPU backward, float64 takes SDPA)."""
    b, n, h, d = 2, 7, 3, 8
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(dtype).requires_grad_(True)
    go = torch.randn(b, n, h * d, generator=g)
    assert uses_packed_cpu_path(qkv) == (dtype != torch.float64)
    out = packed_attention(qkv)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out.to(ref_dtype).mul(go.to(ref_dtype)).sum().backward()
    q32 = qkv.detach().to(ref_dtype).requires_grad_(True)
    q, k, v = q32.permute(2, 0, 3, 1, 4).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)
    ref.mul(go.to(ref_dtype)).sum().backward()
    assert out.shape == (b, n, h * d) and out.dtype == dtype and out.is_contiguous()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.to(ref_dtype), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(qkv.grad.to(ref_dtype), q32.grad, atol=2 * tol, rtol=2 * tol)
    assert not uses_packed_cpu_path(qkv, attn_mask=torch.ones(n, n, dtype=torch.bool))
    assert not uses_packed_cpu_path(qkv, is_causal=True)


def test_residual_linear_equals_linear_plus_residual():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(12, 6)
    x = torch.randn(2, 5, 6, generator=g).requires_grad_(True)
    h = torch.randn(2, 5, 12, generator=g).requires_grad_(True)
    out = residual_linear(x, h, lin)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (x, h, lin.weight, lin.bias)]
    for t in (x, h, lin.weight, lin.bias):
        t.grad = None
    ref = x + lin(h)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for got, t in zip(grads, (x, h, lin.weight, lin.bias)):
        torch.testing.assert_close(got, t.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes: the plain Linear + add
        assert residual_linear(x, h, lin).dtype == torch.float32


def test_attention_uses_sdpa_in_fp32_and_without_grad():
    q, k, v = _qkv(torch.float32)
    assert not uses_explicit_path(q)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=0, rtol=0)
    qb = q.detach().bfloat16()
    with torch.no_grad():
        assert not uses_explicit_path(qb)
        assert torch.equal(attention(qb, qb, qb), F.scaled_dot_product_attention(qb, qb, qb))


def test_models_train_in_bf16_on_the_explicit_path():
    """ViT and DiT-DH under CPU bf16 autocast: the explicit path runs and matches the fp32 model closely."""

    torch.manual_seed(0)
    vit = LatentViT(vit_config("tiny"))
    x = torch.randn(2, 16, 8, 8)
    ref = vit(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tok = vit(x)[0]
    assert ((tok.float() - ref).norm() / ref.norm()) < 0.05
    tok.float().sum().backward()
    assert vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    dit = DiTDH(dit_config("tiny", in_dim=12, grid=3, num_classes=5, class_dropout=0.0))
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    xt, t, y = torch.randn(2, 9, 12), torch.rand(2), torch.tensor([1, 3])
    ref = dit(xt, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dit(xt, t, y)
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05


def test_joint_qk_rope_equals_separate_rotations():
    rot = rope_2d(grid=3, head_dim=8)
    qkv = torch.randn(2, 9, 3, 4, 8)  # [B, N, 3, H, Dh] as the qkv projection gives it
    joint = apply_rope(qkv[:, :, :2], rot, token_dim=-4)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # [B, H, N, Dh]
    torch.testing.assert_close(joint[:, :, 0].transpose(1, 2), apply_rope(q, rot), atol=0, rtol=0)
    torch.testing.assert_close(joint[:, :, 1].transpose(1, 2), apply_rope(k, rot), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- frozen VAE
def test_vae_channels_last_and_bf16_options():
    base = FrozenVAE(build_random_vae(tiny_vae_config()), scaling_factor=1.0)
    cl = FrozenVAE(build_random_vae(tiny_vae_config()), scaling_factor=1.0, channels_last=True)
    bf = FrozenVAE(build_random_vae(tiny_vae_config()), scaling_factor=1.0, precision="bf16")
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    lat = base.encode(img)
    torch.testing.assert_close(cl.encode(img), lat, atol=1e-5, rtol=1e-5)
    lb = bf.encode(img)
    assert lb.dtype == torch.float32 and lb.is_contiguous()
    assert 0 < (lb - lat).abs().max() < 0.1 * lat.abs().max()  # bf16 changes the latents a little
    z = lat.clone().requires_grad_(True)
    out = cl.decode(z)
    assert out.is_contiguous() and out.shape == img.shape
    out.sum().backward()
    assert z.grad is not None and not any(p.grad is not None for p in cl.parameters())
    with pytest.raises(ValueError, match="precision 'fp16'"):
        FrozenVAE(build_random_vae(tiny_vae_config()), precision="fp16")


# ----------------------------------------------------------------------------------------------- bench plumbing
def test_interleaved_ratio_and_report(tmp_path):
    calls = []
    t = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then the order reversed every other round
    assert {k: len(v) for k, v in t.items()} == {"a": 3, "b": 3}
    r = ratio([2.0, 4.0, 3.0], [1.0, 2.0, 1.0])
    assert (r["median"], r["min"], r["max"], r["rounds"]) == (2.0, 2.0, 3.0, 3)
    m = machine("cpu")
    assert m["threads"] >= 1 and "load_avg_1m" in m
    part = tmp_path / "x.json"
    part.write_text(json.dumps({"markdown": "## X\n\nbody", "command": "python -m x", "machine": m}))
    out = write_report(tmp_path / "bench.md", [part])
    text = out.read_text()
    assert "## X" in text and "python -m x" in text and str(part) in text and m["torch"] in text


def test_matmul_peak_is_the_best_of_the_sweep(monkeypatch):
    rates = {256: 5.0, 512: 9.0, 1024: 7.0, 1536: 1.0, 2048: 2.0}
    # CPU float32: torch.mm and oneDNN's matmul both swept (here oneDNN is 1.5x at 1024 and 2048)
    monkeypatch.setattr(L, "matmul_rate", lambda n, dtype, device, seconds, onednn=False:
                        rates[n] * (1.5 if onednn and n >= 1024 else 1.0))
    assert L.measure_matmul_peak(torch.float32, "cpu") == 10.5
    assert L.measure_matmul_peak(torch.float32, "cpu", n=2048) == 3.0
    assert L.measure_matmul_peak(torch.bfloat16, "cpu") == 9.0  # bf16: torch.mm only
    assert L.matmul_rate.__name__ == "<lambda>"
    monkeypatch.undo()
    assert 0 < L.matmul_rate(64, torch.float32, "cpu", seconds=0.01) < math.inf


def test_rae_bench_without_rae_src_is_skipped_and_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("RAE_SRC", raising=False)
    threads = torch.get_num_threads()
    try:
        res = main(["compile=false", "diffusers=true", "size=tiny", "in_dim=8", "grid=2", "num_classes=3",
                    "batch_size=2", "iters=2", "warmup=1", "threads=1", f"out={tmp_path / 'r.json'}"])
    finally:
        torch.set_num_threads(threads)
    assert res["vs_rae"]["rows"] == [] and res["vs_rae"]["note"].startswith("skipped: RAE_SRC is not set")
    assert "skipped: RAE_SRC is not set" in res["markdown"]
    assert res["vs_diffusers"]["step_time_ratio_ditdh_over_diffusers"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["vs_rae"]["note"] == res["vs_rae"]["note"]


# ----------------------------------------------------------------------------------------------- torch.compile
def test_llava_compile_option_reaches_training_arguments():
    cfg = LlavaTrainConfig()
    cfg.train.output_dir = "/tmp/ov3_llava_args"
    assert not training_arguments(cfg, use_cpu=True).torch_compile
    cfg.train.compile = True
    assert training_arguments(cfg, use_cpu=True).torch_compile
    cfg.train.compile_scope = "lm"  # the trainer compiles the decoder itself; HF's whole-model compile stays off
    assert not training_arguments(cfg, use_cpu=True).torch_compile


@pytest.mark.slow
def test_rae_compiled_loss_equals_eager_over_5_steps():
    """DiT-DH (tiny) trained 5 steps eager and compiled (inductor) from the same init: same losses."""

    def run(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        m = DiTDH(dit_config("tiny", in_dim=12, grid=3, num_classes=5))
        for p in m.parameters():  # leave the zero init so every parameter learns from step 1
            torch.nn.init.normal_(p, std=0.05)
        if compiled:
            m.compile()
        opt = build_adamw(m, 1e-2)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(5):
            x, t, y = torch.randn(4, 9, 12, generator=g), torch.rand(4, generator=g), torch.randint(0, 5, (4,), generator=g)
            loss = (m(x, t, y) - x).pow(2).mean()  # class dropout draws from the global RNG, eagerly in both
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    eager, comp = run(False), run(True)
    assert eager[-1] < eager[0]
    assert comp == pytest.approx(eager, rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_encoder_trainer_compiled_loss_equals_eager_over_5_steps(toy_root, tmp_path):  # noqa: F811
    """``train.compile=true`` on the encoder trainer (tiny sizes): the 5 logged steps' losses match eager."""

    rows = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        train(cfg_for(toy_root, out, stages((16, 5, 8)), f"train.compile={str(compiled).lower()}",
                      "export_dir=none", "train.ckpt_every=1000"))
        rows[compiled] = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows[True]] == [1, 2, 3, 4, 5]
    for a, b in zip(rows[False], rows[True]):
        for k in ("loss", "caption", "contrastive", "latent_l1", "pixel_l1"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), (a["step"], k)
