"""``model.attn: sdpa | flash``: the kernel switch of the encoder (ViT, decoder, text towers) and DiT-DH."""

import importlib.util

import pytest
import torch

from encoder.ov3 import ModelConfig as EncoderModelConfig
from ov3common.attention import attention, check_attn_impl, set_attention_impl
from ov3common.config import ConfigError, load_config
from rae_generation.config import RAETrainConfig
from rae_generation.models import build_model

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def test_unknown_impl_is_refused_at_load_naming_the_key():
    with pytest.raises(ConfigError, match="model.attn"):
        load_config(RAETrainConfig, overrides=["model.attn=xformers"])
    assert EncoderModelConfig().attn == "sdpa"


@pytest.mark.skipif(HAS_FLASH, reason="flash-attn imports here")
def test_flash_without_flash_attn_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^model\.attn: flash needs flash-attn.*--no-build-isolation"):
        check_attn_impl("flash", "model.attn")
    with pytest.raises(ConfigError, match="model.attn"):
        set_attention_impl(build_model("tiny"), "flash")


def test_set_attention_impl_reaches_every_attention_module():
    model = build_model("tiny")
    n = set_attention_impl(model, "sdpa")
    blocks = [m for m in model.modules() if type(m).__name__ == "Attention"]
    assert n == len(blocks) > 0 and all(m.attn_impl == "sdpa" for m in blocks)


def test_flash_request_falls_back_to_sdpa_where_flash_does_not_apply():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))  # CPU fp32: SDPA whatever impl says
    torch.testing.assert_close(attention(q, k, v, impl="flash"), attention(q, k, v), rtol=0, atol=0)


@pytest.mark.skipif(not (HAS_FLASH and torch.cuda.is_available()), reason="flash-attn needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_flash_matches_sdpa_on_gpu(causal):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    out_f = attention(q, k, v, is_causal=causal, impl="flash")
    grads_f = torch.autograd.grad(out_f.float().sum(), (q, k, v))
    out_s = attention(q, k, v, is_causal=causal, impl="sdpa")
    grads_s = torch.autograd.grad(out_s.float().sum(), (q, k, v))
    torch.testing.assert_close(out_f, out_s, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads_f, grads_s):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
