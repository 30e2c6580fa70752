"""95% confidence intervals for report cells, and the one rule that compares two of them.

* :func:`wilson` — a binomial proportion (accuracy: k right of n) by the Wilson score interval.
* :func:`bootstrap` — any statistic of n items by the percentile bootstrap: resample the items with replacement
  (within strata when given, e.g. POPE's three categories), recompute, take the 2.5 / 97.5 percentiles. The
  statistic is called with an index matrix ``[n_boot, n]`` when ``batched`` (fast: numpy over all replicates at once)
  or once per replicate with an index vector ``[n]`` (e.g. FID, which needs a covariance per replicate).
* :func:`compare` — "no measurable difference" when two intervals overlap; otherwise which one is higher. A
  difference is never asserted from point values.

An :class:`Interval` keeps the point value, the bounds, the method and n; ``fmt`` renders ``12.3 [10.1, 14.5]``.
Seeds are fixed, so a report is reproducible. Used by :mod:`eval.score` (POPE / SeedBench), :mod:`eval.fid` (FID over
samples) and :mod:`eval.report`; issue 16's report reuses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
from tqdm.auto import tqdm

LEVEL = 0.95
NO_DIFFERENCE = "no measurable difference"


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    method: str
    n: int
    level: float = LEVEL

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Interval | None:
        if not isinstance(d, dict) or not {"value", "low", "high"} <= set(d):
            return None
        return cls(float(d["value"]), float(d["low"]), float(d["high"]), str(d.get("method", "")),
                   int(d.get("n", 0)), float(d.get("level", LEVEL)))

    def fmt(self, digits: int = 1, scale: float = 1.0) -> str:
        return f"{self.value * scale:.{digits}f} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(k: int, n: int, level: float = LEVEL) -> Interval:
    """Wilson score interval of the proportion k / n (n = 0: an interval of NaNs)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, "wilson", 0, level)
    z, p = _z(level), k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), "wilson", n, level)


def resample_indices(n: int, n_boot: int, rng: np.random.Generator, strata: Sequence | None = None) -> np.ndarray:
    """``[n_boot, n]`` indices drawn with replacement (within each stratum when ``strata`` labels are given)."""
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    labels = np.asarray(strata)
    if len(labels) != n:
        raise ValueError(f"strata: {len(labels)} labels for {n} items")
    out = np.empty((n_boot, n), dtype=np.int64)
    for s in sorted(set(labels.tolist()), key=str):
        members = np.flatnonzero(labels == s)
        out[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    return out


def bootstrap(stat: Callable[[np.ndarray], np.ndarray | float], n: int, *, n_boot: int = 1000, seed: int = 0,
              level: float = LEVEL, strata: Sequence | None = None, batched: bool = True,
              point: float | None = None, method: str = "bootstrap", progress: bool = False) -> Interval:
    """Percentile bootstrap of ``stat`` over n items (see the module docstring). ``point`` defaults to the
    statistic on the items as they are. ``progress``: a progress bar over the resamples (``batched=False``)."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap: need n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    idx = resample_indices(n, n_boot, rng, strata)
    if batched:
        values = np.asarray(stat(idx), dtype=np.float64).reshape(-1)
        value = float(np.asarray(stat(np.arange(n)[None]), dtype=np.float64).reshape(-1)[0]) if point is None else point
    else:
        rows = tqdm(idx, desc=method, unit="resample", disable=not progress, leave=False)
        values = np.array([float(stat(row)) for row in rows])
        value = float(stat(np.arange(n))) if point is None else point
    a = (1 - level) / 2
    lo, hi = np.nanpercentile(values, [100 * a, 100 * (1 - a)])
    return Interval(float(value), float(lo), float(hi), f"{method} ({n_boot} resamples, seed {seed})", n, level)


def mean_interval(values: Sequence[float], **kw) -> Interval:
    """Bootstrap interval of the mean of per-item values (e.g. per-image PSNR)."""
    v = np.asarray(values, dtype=np.float64)
    return bootstrap(lambda idx: v[idx].mean(axis=-1), len(v), **kw)


def compare(a: Interval | None, b: Interval | None, higher_is_better: bool = True) -> str:
    """"no measurable difference" if the intervals overlap, else which is better; "" when one is missing."""
    if a is None or b is None or any(math.isnan(x) for x in (a.low, a.high, b.low, b.high)):
        return ""
    if a.overlaps(b):
        return NO_DIFFERENCE
    a_higher = a.low > b.high
    return "first better" if a_higher == higher_is_better else "second better"
