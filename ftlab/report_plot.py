"""The sweep report's picture: per-seed scores per configuration, against the trivial baseline.

One panel per metric (accuracy and macro-F1 where the task has them, perplexity for language
modelling, Pearson and Spearman correlation for regression): every seed's score as a dot
(failed runs as red crosses), the mean with its 95% interval (Student t), the trivial
predictor's score as a dashed line, and the y-axis starting at the baseline (not auto-zoomed
onto the runs), so a configuration whose runs all sit on the baseline looks like what it is.
Configurations where every run failed are labelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftlab.seedstats import finite
from ftlab.store import atomic_write

#: panels, by preference: the first split that has the metric is drawn
PANELS = (("test/acc", "val/acc"), ("test/f1", "val/f1"),
          ("test/ppl", "val/ppl", "test/perplexity", "val/perplexity"),
          ("test/pearson", "val/pearson"), ("test/spearman", "val/spearman"))  # regression


def panels(summary: dict[str, Any]) -> list[str]:
    chosen = []
    for options in PANELS:
        metric = next((m for m in options if any(m in s["metrics"] for s in summary.values())),
                      None)
        if metric:
            chosen.append(metric)
    return chosen


def y_limits(values: list[float], baselines: list[float]) -> tuple[float, float]:
    """Always spanning the baseline and every run: runs sitting on the baseline show as such."""
    lo, hi = min(values + baselines), max(values + baselines)
    pad = max(0.03 * (hi - lo), 1e-3)
    return lo - pad, hi + pad


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    metrics = panels(summary)
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4, 1.6 * len(keys)) * len(metrics),
                                                       3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        _panel(ax, summary, keys, metric)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path


def _panel(ax: Any, summary: dict[str, Any], keys: list[str], metric: str) -> None:
    values, baselines = [], []
    for i, key in enumerate(keys):
        s = summary[key]
        seeds = [(seed, v[metric]) for seed, v in s["seeds"].items() if finite(v.get(metric))]
        failed = set(s.get("failed_seeds", []))
        for j, (seed, v) in enumerate(seeds):
            x = i + 0.08 * (j - len(seeds) / 2)
            if seed in failed:
                ax.scatter([x], [v], marker="x", color="tab:red", zorder=4)
            else:
                ax.scatter([x], [v], alpha=0.7, color="tab:blue", zorder=3)
        values += [v for _, v in seeds]
        st = s["metrics"].get(metric)
        if st:
            lo, hi = st["ci95"] or (st["mean"], st["mean"])  # one run: its mean, no interval
            values += [v for v in (lo, hi) if finite(v)]  # a wide interval shows whole
            ax.errorbar(i, st["mean"], yerr=[[st["mean"] - lo], [hi - st["mean"]]], fmt="_",
                        ms=20, capsize=6 if st["ci95"] else 0, color="k", zorder=5)
        base = s.get("baseline", {}).get(metric)
        if base is not None:
            baselines.append(base)
            ax.hlines(base, i - 0.4, i + 0.4, colors="tab:gray", linestyles="--", zorder=2)
        if s.get("all_failed"):
            ax.annotate("every run failed", (i, 0.97), xycoords=("data", "axes fraction"),
                        ha="center", va="top", color="tab:red", fontsize=8)
    if values:
        ax.set_ylim(*y_limits(values, baselines))
    ax.set_xlim(-0.5, len(keys) - 0.5)
    ax.set_xticks(range(len(keys)), [k if len(k) < 28 else k[:25] + "..." for k in keys],
                  rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: seeds (x failed), mean ± 95% CI, -- baseline", fontsize=9)

