"""Statistics over seeds: what the sweep report says about "which recipe works".

- When a run failed: :func:`failure` (the task's trivial-predictor baselines define it).
- Confidence intervals of a mean over seeds: :func:`mean_ci` (Student t).
- Whether two configurations differ: :func:`permutation_test` (paired over shared seeds,
  otherwise unpaired), several such tests adjusted with :func:`holm`.
- Expected validation performance as a function of the number of trials: :func:`expected_max`
  (Dodge et al., 2019, "Show your work").
- The run to keep, chosen on validation: :func:`selected_run`.

Pure Python + numpy, seeded: the same records give the same report.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: how much a score must exceed a trivial predictor's to count as learnt something. Scores
#: are float32 (torchmetrics), baselines float64: always predicting the majority of 18/21
#: labels scores 0.85714287 against 0.857142857, so the margin must exceed float32 rounding
#: (~1e-7) while staying below one validation row's worth (1/n, n < 10^6)
MARGIN = 1e-6
#: permutation draws (exact enumeration is used when it is smaller)
RESAMPLES = 10_000


def failure(metrics: Mapping[str, float], judged_by: Sequence[str] | None = None) -> str | None:
    """Why a finished run counts as failed, or None.

    The task defines failure through the trivial predictors it records as
    ``val/baseline_<metric>`` (classification: accuracy of the majority class and the macro-F1
    of chance, see :meth:`ftlab.tasks.classify.Classify.baseline`): a run whose validation
    score is at or below any of them learnt nothing. ``judged_by`` (the task's ``failed_by``)
    limits the rule to those metrics' baselines. A run without a validation split is judged on
    its test split (``test/baseline_<metric>``), rather than passing unjudged. A diverged loss
    stops the run earlier (:class:`ftlab.errors.Diverged`) and is recorded as
    ``failure: diverged``.
    """
    split = "val" if any(k.startswith("val/baseline_") for k in metrics) else "test"
    for key, base in sorted(metrics.items()):
        if not key.startswith(f"{split}/baseline_"):
            continue
        name = key.removeprefix(f"{split}/baseline_")
        if judged_by is not None and name not in judged_by:
            continue
        value = metrics.get(f"{split}/{name}")
        if isinstance(value, float) and not finite(value) and finite(base):
            return f"{split}/{name} is {value} (no usable score)"  # e.g. NaN predictions
        if finite(value) and finite(base) and value <= base + MARGIN:
            return f"{split}/{name} {value:.4f} <= baseline {base:.4f}"
    return None


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean: ``mean +- t(level, n-1) * s / sqrt(n)``.

    Not a percentile bootstrap: with the 3-5 seeds a sweep usually has, the bootstrap's
    "95%" interval cannot reach past the values seen and covers the true mean far less often
    (simulated with normal scores, 2,000 trials: 0.76 at n=3, 0.85 at n=5, 0.91 at n=10; the
    t interval 0.95 at each). No interval is right for scores with failed seeds among them (a
    20% share of failures: both ~0.47 at n=3); the report counts failures apart. One value
    has no spread to estimate: no interval (NaN), not a zero-width one.
    """
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return (math.nan, math.nan)
    mean = float(x.mean())
    half = t_quantile((1 + level) / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return (mean - half, mean + half)


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom, by
    bisection on its CDF (no scipy in ftlab's dependencies)."""
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for t >= 0: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
    return 1 - 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz;
    Numerical Recipes 6.4), on the side of x where it converges fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1)


def permutation_test(a: Mapping[str, float], b: Mapping[str, float],
                     seed: int = 0) -> dict[str, float | str | int]:
    """Two-sided test of "mean(a) == mean(b)" over runs keyed by seed.

    Where the two configurations share at least two seeds, the test is paired on those seeds
    (sign flips of the per-seed differences: the same seed gives both the same data order and
    head initialisation); otherwise it is an unpaired permutation test of the pooled runs.
    Exact when the number of permutations is at most ``RESAMPLES``; otherwise ``RESAMPLES``
    random ones and p = (b + 1) / (RESAMPLES + 1), b of them at least as extreme (Phipson &
    Smyth 2010: the observed arrangement counts, so a sampled p is never 0). ``p_min``: the
    smallest p these runs could give, however far apart (paired over 3 seeds: 2/8 = 0.25;
    6 paired seeds are the fewest that can reach p < 0.05: 2/64).
    """
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        d = np.array([a[s] - b[s] for s in shared], dtype=float)
        observed = abs(d.mean())
        exact = 2 ** d.size <= RESAMPLES
        if exact:
            signs = np.array([[1 - 2 * ((i >> j) & 1) for j in range(d.size)]
                              for i in range(2 ** d.size)], dtype=float)
        else:
            signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(RESAMPLES, d.size))
        stats = np.abs((signs * d).mean(axis=1))
        return {"test": "paired", "n": int(d.size), "diff": float(d.mean()),
                "p": _p_value(stats, observed, exact),
                "p_min": 2 / 2 ** d.size if exact else 1 / (RESAMPLES + 1)}
    xa, xb = np.array(list(a.values()), float), np.array(list(b.values()), float)
    if xa.size == 0 or xb.size == 0:
        return {"test": "none", "n": 0, "diff": math.nan, "p": math.nan}
    pooled, na = np.concatenate([xa, xb]), xa.size
    observed = abs(xa.mean() - xb.mean())
    exact = math.comb(pooled.size, na) <= RESAMPLES
    if exact:
        from itertools import combinations

        splits = [np.isin(np.arange(pooled.size), c) for c in combinations(range(pooled.size), na)]
    else:
        rng = np.random.default_rng(seed)
        splits = [np.isin(np.arange(pooled.size), rng.permutation(pooled.size)[:na])
                  for _ in range(RESAMPLES)]
    stats = np.array([abs(pooled[m].mean() - pooled[~m].mean()) for m in splits])
    return {"test": "unpaired", "n": int(pooled.size), "diff": float(xa.mean() - xb.mean()),
            "p": _p_value(stats, observed, exact),  # p_min: equal groups count either way round
            "p_min": (1 + (na == xb.size)) / len(splits) if exact else 1 / (RESAMPLES + 1)}


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values (Holm 1979): with several configurations
    each tested against the best, the chance that any "significant" difference is a fluke
    stays at the level; NaN p-values pass through."""
    order = sorted((i for i, p in enumerate(ps) if finite(p)), key=lambda i: ps[i])
    out, running = [math.nan if not finite(p) else p for p in ps], 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * ps[i]))
        out[i] = running
    return out


def _p_value(stats: np.ndarray, observed: float, exact: bool) -> float:
    """The share of arrangements at least as extreme as the observed one; sampled: (b + 1) /
    (m + 1), the observed arrangement counted once (Phipson & Smyth 2010)."""
    extreme = int(np.sum(stats >= observed - 1e-12))
    return extreme / stats.size if exact else (extreme + 1) / (stats.size + 1)


def expected_max(values: Sequence[float], larger_is_better: bool = True) -> list[float]:
    """Expected best score of n runs drawn (with replacement) from these, n = 1..len(values).

    Dodge et al. (2019), eq. 1: with the empirical CDF of the N observed scores
    v_(1) <= ... <= v_(N), E[max of n] = sum_i v_(i) * ((i/N)^n - ((i-1)/N)^n).
    n = 1 is the mean; n = N approaches the best seen. For "smaller is better" metrics
    (perplexity) the expected minimum.
    """
    v = np.sort(np.asarray(values, dtype=float))
    if not larger_is_better:
        v = v[::-1]
    big_n = v.size
    i = np.arange(1, big_n + 1)
    out = []
    for n in range(1, big_n + 1):
        w = (i / big_n) ** n - ((i - 1) / big_n) ** n
        out.append(float((v * w).sum()))
    return out


def finite(x: object) -> bool:
    """A real, finite number (not None, NaN, inf, or a string)."""
    return isinstance(x, int | float) and math.isfinite(x)


def selected_run(finals: Mapping[str, Mapping[str, Any]],
                 monitor: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run a practitioner would keep, chosen by the monitored validation score (the first
    on a tie), with its test scores: unlike "best of n" of a test metric, not picked on the
    test set. ``finals``: each run's final metrics by its seed."""
    metric, big = monitor["metric"], monitor.get("mode", "max") == "max"
    scored = [(seed, f) for seed, f in finals.items() if finite(f.get(metric))]
    if len(scored) < 2:
        return None
    seed, best = max(scored, key=lambda sf: sf[1][metric] if big else -sf[1][metric])
    return {"seed": seed, "by": metric, "value": best[metric],
            "test": {m: v for m, v in best.items()
                     if m.startswith("test/") and "/baseline_" not in m and finite(v)}}
