"""The cross-seed summary as Markdown (``summary.md``): a table per configuration, each
seed's scores, and a ranking with permutation tests against the best."""

from __future__ import annotations

from typing import Any

from ftlab.seedstats import finite


def _ci(st: dict[str, Any]) -> str:
    if not st.get("ci95"):  # one run: no spread, so no interval
        return "– (n=1)"
    return f"[{st['ci95'][0]:.4f}, {st['ci95'][1]:.4f}]"


def _std(st: dict[str, Any]) -> str:
    return "–" if st.get("std") is None else f"{st['std']:.4f}"


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# Cross-seed summary", "",
             "Failed: errored, diverged, or validation scores at or below a trivial predictor's "
             "(classification: accuracy of the majority class, macro-F1 of chance). 95% CI: "
             "Student-t interval of the mean over seeds.", ""]
    for key, s in summary.items():
        lines += [f"## {key}", ""]
        if s.get("all_failed"):
            lines += [f"**WARNING: every run of `{key}` failed: its scores say nothing about the "
                      "recipe.**", ""]
        lines += [f"runs: {s['runs']} · errored: {s['errored']} · failed: {s['failed']}"
                  + (f" ({s['failed_rate']:.0%})" if finite(s.get("failed_rate")) else "")
                  + (f" · pruned by the search: {s['pruned']}" if s.get("pruned") else "")
                  + (f" · reused from before a re-launch: {s['reused']}" if s.get("reused")
                     else "")
                  + (f" · discarded early: {s['discarded']} (trained "
                     f"{s['discarded_steps']['trained']} of their "
                     f"{s['discarded_steps']['planned']} planned steps)"
                     if s.get("discarded") else "")
                  + (f" · interrupted (stopped or killed): {s['interrupted']}"
                     if s.get("interrupted") else "")
                  + (f" · still running: {s['running']}" if s.get("running") else ""), "",
                  "| metric | n | mean | 95% CI | std | best of n | baseline | Δ baseline |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, st in s["metrics"].items():
            base = s["baseline"].get(m)
            lines.append(f"| {m} | {st['n']} | {st['mean']:.4f} | {_ci(st)} | {_std(st)} | "
                         f"{st['best']:.4f} | " + (f"{base:.4f} | {s['delta'][m]:+.4f} |"
                                                   if base is not None else "– | – |"))
        lines += _earlier(s) + _seed_table(s) + _selected(s)
        evp = s.get("expected_validation") or []
        if len(evp) > 1:
            lines += ["", f"Expected best {s['monitor']['metric']} of n runs (Dodge et al. 2019): "
                      + ", ".join(f"n={i}: {v:.4f}" for i, v in enumerate(evp, 1))]
        for seed, err in s["errors"].items():
            lines.append(f"\n- seed {seed}: {str(err).splitlines()[0] if err else 'error'}")
        lines.append("")
    return "\n".join(lines + _ranking(summary))


def _earlier(s: dict[str, Any]) -> list[str]:
    """The pipeline's earlier stages (the table above is its last stage's)."""
    stages = s.get("earlier_stages") or {}
    if not stages:
        return []
    rows = ["", "Earlier stages of the pipeline (the table above is the last stage's):", "",
            "| stage | metric | n | mean | 95% CI | std |", "|---|---|---|---|---|---|"]
    for name, metrics in stages.items():
        rows += [f"| {name} | {m} | {st['n']} | {st['mean']:.4f} | {_ci(st)} | {_std(st)} |"
                 for m, st in metrics.items()]
    return rows


def _selected(s: dict[str, Any]) -> list[str]:
    chosen = s.get("selected")
    if not chosen or not chosen["test"]:
        return []
    shown = ", ".join(f"{m} {v:.4f}" for m, v in list(chosen["test"].items())[:4])
    return ["", f"Chosen by {chosen['by']} (the run you would keep): seed {chosen['seed']} "
            f"({chosen['value']:.4f}), {shown}. \"Best of n\" of a test metric is picked on "
            "the test set itself: an upper bound, not a result."]


def _seed_table(s: dict[str, Any]) -> list[str]:
    shown = [m for m in s["metrics"] if m.endswith(("/acc", "/f1", "/ppl", "/perplexity",
                                                     "/pearson", "/spearman"))][:4]
    if not shown or not s["seeds"]:
        return []
    rows = ["", "| seed | " + " | ".join(shown) + " | run |",
            "|---|" + "---|" * (len(shown) + 1)]
    for seed, final in sorted(s["seeds"].items(), key=lambda kv: _seed_order(kv[0])):
        vals = " | ".join(f"{final[m]:.4f}" if finite(final.get(m)) else "–" for m in shown)
        rows.append(f"| {seed} | {vals} | {s['failures'].get(seed, 'ok')} |")
    return rows


def _seed_order(seed: str) -> tuple[int, float | str]:
    try:
        return (0, float(seed))
    except ValueError:
        return (1, seed)


def _ranking(summary: dict[str, Any]) -> list[str]:
    ranked = sorted((s["rank"]["rank"], k) for k, s in summary.items() if "rank" in s)
    if len(ranked) < 2:
        return []
    metric = summary[ranked[0][1]]["rank"]["metric"]
    lines = ["## Ranking", "", f"By mean {metric}; each configuration against the best with a "
             "two-sided permutation test (paired over shared seeds); p (Holm): adjusted for "
             "testing every configuration against the best.", "",
             "| rank | configuration | mean | difference to best | p | p (Holm) | test |",
             "|---|---|---|---|---|---|---|"]
    for rank, key in ranked:
        s, vs = summary[key], summary[key]["rank"].get("vs_best")
        mean = s["metrics"][metric]["mean"]
        lines.append(f"| {rank} | {key} | {mean:.4f} | " + (
            f"{vs['diff']:+.4f} | {vs['p']:.3f} | {vs.get('p_holm', vs['p']):.3f} | "
            f"{vs['test']} (n={vs['n']}) |" if vs else "– | – | – | – |"))
    floors = [vs for _, k in ranked if (vs := summary[k]["rank"].get("vs_best"))
              and vs.get("p_min", 0) > 0.05]
    if floors:
        worst = max(floors, key=lambda vs: vs["p_min"])
        lines += ["", f"With so few seeds no difference can reach p < 0.05 here: the smallest "
                  f"p the test can give is {worst['p_min']:.3f} ({worst['test']}, "
                  f"n={worst['n']}), however far apart the scores. Run more seeds (paired: "
                  f"6 shared seeds are the fewest that can reach 0.05)."]
    return lines + [""]
