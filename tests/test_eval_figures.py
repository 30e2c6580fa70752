"""eval-all's training-curve figure: which panels, smoothing, stage boundaries."""

import math

import pytest

from eval.report import curve_keys, plot_curves, smooth, stage_boundaries


def encoder_rows():
    rows = [{"step": 0, "untrained/psnr": 9.0}]  # a one-off value: no panel
    for s in range(1, 41):
        rows.append({"step": s, "loss": 5 - s / 10, "rec": 2 - s / 40, "und": 3 - s / 20, "contrastive": 1.0,
                     "caption": 2.0, "pixel_l1": 0.5, "latent_l1": 0.4, "lpips": 0.3, "lr": 1e-4,
                     "samples_per_s": 100.0 + s, "grad_norm": 1.0, "eta_s": 40 - s,
                     "resolution": 128 if s <= 30 else 256})
    rows.append({"step": 40, "val/psnr": 20.0})
    return rows


def test_panels_keep_branch_losses_lr_and_throughput_and_drop_one_point_keys():
    keys = curve_keys([("OV3", encoder_rows())])
    assert keys[:3] == ["loss", "rec", "und"]
    assert {"contrastive", "caption", "pixel_l1", "latent_l1", "lpips", "lr", "samples_per_s"} <= set(keys)
    assert not {"untrained/psnr", "val/psnr", "eta_s", "resolution", "step"} & set(keys)


def test_stage_boundary_is_where_the_resolution_changes():
    assert stage_boundaries(encoder_rows()) == [31]
    assert stage_boundaries([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]) == []


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])
    ys = [(-1) ** i for i in range(200)]
    assert max(abs(v) for v in smooth(ys)[50:]) < 0.2 and math.isclose(smooth([2.0], 0.5)[0], 2.0)


def test_plot_writes_a_png(tmp_path):
    out = plot_curves([("OV3", encoder_rows()), ("baseline", encoder_rows()[:20])], tmp_path / "c.png", "encoder")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves([("x", [{"step": 1, "once": 1.0}])], tmp_path / "n.png", "t") is None
