import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ov3common.attention import _PackedCPUAttention
from ov3common.images import (
    BadSample,
    SkipStats,
    center_crop_resize,
    decode_image,
    decode_json,
    decode_text,
    pad_to_square,
    save_image_grid,
    to_tensor_pm1,
    to_uint8,
)
from ov3common.log import MetricLogger, Throughput, count_flops, read_jsonl


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(w=16, h=16):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("make,conversion", [
    (lambda: encode(rgb().convert("CMYK"), "JPEG"), "cmyk"),
    (lambda: encode(Image.fromarray(np.full((16, 16), 65535, np.uint16))), "16bit"),
    (lambda: encode(rgb().convert("RGBA")), "alpha"),
    (lambda: encode(rgb().convert("P")), "palette"),
    (lambda: encode(rgb().convert("L")), "grayscale"),
    (lambda: encode(rgb().convert("1")), "grayscale"),
    (lambda: encode(rgb(), "JPEG"), None),
])
def test_odd_modes_become_rgb(make, conversion):
    stats = SkipStats()
    img = decode_image(make(), stats=stats)
    assert img.mode == "RGB" and img.size == (16, 16)
    assert dict(stats.converted) == ({conversion: 1} if conversion else {})


def test_16bit_scaled_not_clipped():
    img = decode_image(encode(Image.fromarray(np.full((16, 16), 32896, np.uint16))))
    assert abs(int(np.asarray(img)[0, 0, 0]) - 128) <= 1


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (None, "missing_image"),
    (b"this is not an image at all", "not_an_image"),
    (encode(rgb(64, 64), "JPEG")[:200], "truncated"),
    (encode(rgb(1, 1)), "too_small"),
    (encode(Image.new("RGB", (20000, 1))), "bad_aspect"),
])
def test_bad_images_raise_reason(data, reason):
    with pytest.raises(BadSample) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_text_and_json():
    assert decode_text(b"  a red circle \n") == "a red circle"
    for data, reason in [(None, "missing_caption"), (b"   ", "empty_caption"), (b"\xff\xfe\xfa", "bad_utf8")]:
        with pytest.raises(BadSample) as e:
            decode_text(data)
        assert e.value.reason == reason
    assert decode_json(b'{"a": 1}') == {"a": 1}
    for data in (b"{bad", b"[1, 2]", b"\xff", None):
        with pytest.raises(BadSample, match="bad_json"):
            decode_json(data)


def test_skipstats_counts():
    s = SkipStats()
    for r in ("truncated", "truncated", "bad_json"):
        s.add(r)
    s.converted["cmyk"] += 1
    t = SkipStats()
    t.update(s)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.as_dict() == {"skipped": {"bad_json": 1, "truncated": 2}, "converted": {"cmyk": 1}, "skipped_total": 3}
    assert s.reduce().total() == 3


def test_transforms_and_grid(tmp_path):
    img = rgb(40, 20)
    assert center_crop_resize(img, 16).size == (16, 16)
    sq = pad_to_square(img, fill=(1, 2, 3))
    assert sq.size == (40, 40) and sq.getpixel((0, 0)) == (1, 2, 3)
    x = to_tensor_pm1(img)
    assert x.shape == (3, 20, 40) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x[None])[0], np.asarray(img))
    save_image_grid(torch.stack([x[:, :, :20]] * 5), tmp_path / "g.png", nrow=3, labels=list("abcde"), min_tile=0)
    g = Image.open(tmp_path / "g.png")
    assert g.width == 3 * 22 + 2 and g.height > 2 * 22
    # small tiles are enlarged to min_tile (x5 for 20 px); row labels add a left margin, tile labels a line per row
    save_image_grid(torch.stack([x[:, :, :20]] * 6), tmp_path / "r.png", nrow=3, labels=list("abcdef"),
                    row_labels=["original", "reconstruction"])
    r = Image.open(tmp_path / "r.png")
    assert r.width > 3 * 102 + 2 + 40 and r.height > 2 * 102
    left = np.asarray(r.convert("L"))[:, :30]
    assert left.min() < 128  # text drawn in the margin


def test_metric_logger_and_throughput(tmp_path):
    ml = MetricLogger(tmp_path)
    ml.log(1, {"loss": torch.tensor(2.0), "bad": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a torn line from a crash
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0]["loss"] == 2.0 and rows[0]["bad"] == "nan" and len(rows) == 1
    tp = Throughput(flops_per_sample=1e9, peak_flops=1e12)
    out = tp.update(10, 2.0)
    assert out["samples_per_s"] == 5 and out["mfu"] == pytest.approx(5e9 / 1e12)


def test_count_flops_cpu_attention_like_its_bmm_form():
    """SDPA's CPU kernel counts (torch's registry has none for it: 0) as the same attention done with bmm does:
    forward q kᵀ and p v, backward four products."""
    b, n, h, d = 2, 16, 3, 8
    qkv = torch.randn(b, n, 3, h, d, requires_grad=True)

    def sdpa():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    def packed():
        _PackedCPUAttention.apply(qkv).sum().backward()

    assert count_flops(sdpa) == count_flops(packed) == 6 * 2 * b * h * n * n * d


def test_count_flops_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(torch.matmul, a, b) == 2 * 8 * 16 * 4
