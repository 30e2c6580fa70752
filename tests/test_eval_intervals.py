"""Confidence intervals: Wilson against its closed form and coverage, bootstrap against the normal approximation,
stratification, the overlap rule, and the intervals the scorers attach."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from eval import intervals as I
from eval.score import score_pope, score_seedbench


@pytest.mark.parametrize("k, n", [(8, 10), (0, 20), (20, 20), (1, 3), (431, 1000)])
def test_wilson_equals_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    iv = I.wilson(k, n)
    assert iv.value == k / n and iv.low == pytest.approx(ref.low, abs=1e-12) and iv.high == pytest.approx(ref.high, abs=1e-12)


def test_wilson_edges():
    assert I.wilson(0, 20).low == pytest.approx(0.0, abs=1e-15) and I.wilson(0, 20).high > 0
    assert math.isnan(I.wilson(0, 0).value)
    with pytest.raises(ValueError):
        I.wilson(3, 2)


def test_wilson_covers_the_true_proportion():
    rng = np.random.default_rng(0)
    p, n = 0.3, 200
    hits = sum(I.wilson(int(k), n).low <= p <= I.wilson(int(k), n).high for k in rng.binomial(n, p, 2000))
    assert 0.93 <= hits / 2000 <= 0.97


def test_bootstrap_mean_matches_normal_theory_and_is_reproducible():
    x = np.random.default_rng(1).normal(5.0, 2.0, 400)
    iv = I.mean_interval(x, n_boot=2000, seed=3)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert iv.value == pytest.approx(x.mean())
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.1)
    assert I.mean_interval(x, n_boot=2000, seed=3) == iv
    unbatched = I.bootstrap(lambda idx: x[idx].mean(), len(x), n_boot=200, seed=3, batched=False)
    assert unbatched == I.bootstrap(lambda idx: x[idx].mean(-1), len(x), n_boot=200, seed=3)


def test_stratified_resampling_keeps_strata_sizes():
    strata = ["a"] * 3 + ["b"] * 7
    idx = I.resample_indices(10, 50, np.random.default_rng(0), strata)
    assert (idx[:, :3] < 3).all() and (idx[:, 3:] >= 3).all()


def test_compare_never_from_points():
    a, b = I.Interval(0.50, 0.40, 0.60, "x", 10), I.Interval(0.58, 0.45, 0.70, "x", 10)
    assert I.compare(a, b) == I.NO_DIFFERENCE  # different points, overlapping intervals
    c = I.Interval(0.9, 0.85, 0.95, "x", 10)
    assert I.compare(c, a) == "first better" and I.compare(a, c) == "second better"
    assert I.compare(c, a, higher_is_better=False) == "second better"  # e.g. FID
    assert I.compare(a, None) == ""
    assert I.Interval.from_dict(a.to_dict()) == a and a.fmt(1, 100) == "50.0 [40.0, 60.0]"


def test_scorers_attach_intervals():
    recs = [dict(question_id=i, answer="yes" if i % 2 else "no", prediction="yes" if i % 3 else "no",
                 category=["random", "popular", "adversarial"][i % 3]) for i in range(90)]
    r = score_pope(recs)
    iv = r["intervals"]
    for key, point in (("mean_f1", r["mean_f1"]), ("mean_accuracy", r["mean_accuracy"]),
                       ("overall_f1", r["overall"]["f1"]), ("overall_accuracy", r["overall"]["accuracy"])):
        assert iv[key]["value"] == pytest.approx(point) and iv[key]["low"] <= point <= iv[key]["high"], key
    assert iv["categories"]["random"]["f1"]["value"] == pytest.approx(r["categories"]["random"]["f1"])
    s = score_seedbench([dict(question_id=i, answer="A", prediction="A" if i % 4 else "B") for i in range(40)])
    assert s["intervals"]["image"]["value"] == pytest.approx(0.75) and s["intervals"]["image"]["method"] == "wilson"
