"""Cross-seed summaries of a sweep: JSON, Markdown and a PNG of per-seed scores.

Written automatically when a multirun ends (Hydra callback ``SweepReport``) and on demand with
``ftlab-report outputs/multirun/<time>``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ftlab.store import atomic_write, write_json

PLOT_METRICS = ("test/acc", "val/acc", "test/perplexity", "val/perplexity")


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per job folder; a job that died without writing results shows as 'missing'."""
    records = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        path = job / "metrics.json"
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            rec = {"status": "missing", "failed": True, "error": f"no readable {path.name}"}
        rec.setdefault("overrides", _overrides_from_hydra(job))
        rec["job"] = job.name
        records.append(rec)
    return dedupe(records)


def dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per job identity (``ftlab.resume.job_identity``): a re-launched sweep whose
    jobs changed folders may hold a finished job twice (the second one reused the first)."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for rec in records:
        keys = tuple(rec.get("job_identity") or ())
        if keys and rec.get("status") in ("ok", "discarded"):
            if keys in seen:
                continue
            seen.add(keys)
        out.append(rec)
    return out


def _overrides_from_hydra(job: Path) -> list[str]:
    from omegaconf import OmegaConf

    try:
        return [str(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")]
    except Exception:
        return []


def swept_keys(records: list[dict[str, Any]]) -> dict[int, str]:
    """Each record's configuration: the overrides that vary across the sweep, except seed."""
    parsed = [dict(o.split("=", 1) for o in r.get("overrides", []) if "=" in o)
              for r in records]
    names = {k for p in parsed for k in p if k.lstrip("+~") != "seed"}
    varying = sorted(k for k in names if len({p.get(k) for p in parsed}) > 1)
    return {i: ",".join(f"{k}={p.get(k)}" for k in varying) or "default"
            for i, p in enumerate(parsed)}


def stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration (swept overrides other than the seed): statistics over seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    keys = swept_keys(records)
    for i, rec in enumerate(records):
        groups.setdefault(keys[i], []).append(rec)
    summary = {}
    for key, recs in sorted(groups.items()):
        done = [r for r in recs if r.get("status") == "ok"]
        names = sorted({m for r in done for m in r.get("final", {})})
        dropped = [r for r in recs if r.get("status") == "discarded"]
        trouble = [r for r in recs if r.get("status") not in ("ok", "discarded")]
        summary[key] = {
            "runs": len(recs),
            # finished before a re-launch of the sweep: reused, not trained again
            "reused": sum(bool(r.get("reused")) for r in recs),
            "errored": len(trouble),
            "failed": sum(bool(r.get("failed")) for r in recs),
            # stopped early by callbacks=early_discard (neither errored nor failed); their
            # partial metrics stay out of the statistics below
            "discarded": len(dropped),
            "discarded_steps": {"trained": sum(r["discarded"]["steps"] for r in dropped),
                                "planned": sum(r["discarded"]["planned_steps"]
                                               for r in dropped)},
            "seeds": {str(r.get("seed")): r.get("final", {}) for r in done},
            "errors": {str(r["seed"] if "seed" in r else r.get("job")): r.get("error")
                       for r in trouble},
            "metrics": {m: stats([r["final"][m] for r in done if _finite(r["final"].get(m))])
                        for m in names if any(_finite(r["final"].get(m)) for r in done)},
        }
    return summary


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# Cross-seed summary", ""]
    for key, s in summary.items():
        lines += [f"## {key}", "",
                  f"runs: {s['runs']} · errored: {s['errored']} · failed (errored, or "
                  f"validation accuracy at or below the majority baseline): {s['failed']}"
                  + (f" · reused from before a re-launch: {s['reused']}" if s.get("reused")
                     else "")
                  + (f" · discarded early: {s['discarded']} (trained "
                     f"{s['discarded_steps']['trained']} of their "
                     f"{s['discarded_steps']['planned']} planned steps)"
                     if s.get("discarded") else ""), "",
                  "| metric | n | mean | std | median | min | max |",
                  "|---|---|---|---|---|---|---|"]
        for m, st in s["metrics"].items():
            lines.append(f"| {m} | {st['n']} | {st['mean']:.4f} | {st['std']:.4f} | "
                         f"{st['median']:.4f} | {st['min']:.4f} | {st['max']:.4f} |")
        for seed, err in s["errors"].items():
            lines.append(f"\n- seed {seed}: {str(err).splitlines()[0] if err else 'error'}")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Per-seed scores (dots) with mean ± std (bar) for each configuration."""
    metric = next((m for m in PLOT_METRICS if any(m in s["metrics"] for s in summary.values())),
                  None)
    if metric is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(keys)), 3.6))
    for i, key in enumerate(keys):
        vals = [v[metric] for v in summary[key]["seeds"].values() if _finite(v.get(metric))]
        if vals:
            st = stats(vals)
            ax.errorbar(i, st["mean"], yerr=st["std"], fmt="_", ms=20, capsize=6, color="k")
            ax.scatter([i + 0.08 * (j - len(vals) / 2) for j in range(len(vals))], vals,
                       alpha=0.7, zorder=3)
    ax.set_xlim(-0.5, len(keys) - 0.5)
    ax.set_xticks(range(len(keys)), [k if len(k) < 28 else k[:25] + "..." for k in keys],
                  rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per seed (bar: mean ± std)")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path


def write_report(sweep_dir: str | Path, save_artefact: str = "all") -> dict[str, Any]:
    """Write ``summary.{json,md,png}``; with ``save_artefact="best"`` first delete the full-size
    artefacts of all jobs but the best (``ftlab.artefact.keep_best_full_artefacts``)."""
    from ftlab.artefact import keep_best_full_artefacts

    sweep_dir = Path(sweep_dir)
    records = collect(sweep_dir)
    if save_artefact == "best":
        keep_best_full_artefacts(records, sweep_dir)
    summary = summarize(records)
    write_json(sweep_dir / "summary.json", summary)
    text = markdown(summary)
    atomic_write(sweep_dir / "summary.md", lambda p: p.write_text(text))
    plot(summary, sweep_dir / "summary.png")
    return summary


class SweepReport(Callback):
    """Hydra callback: write the cross-seed report when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import os

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        summary = write_report(sweep_dir, str(config.get("save_artefact", "all")))
        print((sweep_dir / "summary.md").read_text())
        print(f"Report: {sweep_dir}/summary.{{md,json,png}}")
        status = os.environ.get("FTLAB_SWEEP_STATUS")  # set by the ftlab command (cli.main)
        if status:
            write_json(status, {"sweep_dir": str(sweep_dir),
                                "jobs": sum(s["runs"] for s in summary.values()),
                                "errored": sum(s["errored"] for s in summary.values())})


def main(argv: list[str] | None = None) -> None:
    """``ftlab-report SWEEP_DIR``: (re)write the cross-seed report of a multirun folder."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/multirun/2026-11-25_12-00-00")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir() or not any(args.sweep_dir.glob("*/.hydra")):
        sys.exit(f"ftlab-report: {args.sweep_dir} is not a multirun folder (no */.hydra inside).\n"
                 "Fix: pass the folder a `ftlab -m ...` sweep wrote, under outputs/multirun/.")
    write_report(args.sweep_dir)
    print((args.sweep_dir / "summary.md").read_text())
