"""Cross-seed summaries of a sweep: JSON, Markdown and a PNG of per-seed scores.

Written automatically when a multirun ends (Hydra callback ``SweepReport``) and on demand with
``ftlab-report outputs/multirun/<time>`` (``ftlab/report_cli.py``).
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ftlab.report_jobs import STOPPED, collect, dedupe
from ftlab.report_markdown import markdown
from ftlab.report_plot import plot
from ftlab.seedstats import expected_max, finite, holm, mean_ci, permutation_test, selected_run
from ftlab.store import atomic_write, write_json

#: metrics where smaller is better (everything else: larger)
LOWER_IS_BETTER = {"loss", "ppl", "perplexity", "mse"}


def swept_keys(records: list[dict[str, Any]]) -> dict[int, str]:
    """Each record's configuration: the overrides that vary across the sweep, except seed."""
    parsed = [dict(o.split("=", 1) for o in r.get("overrides", []) if "=" in o)
              for r in records]
    names = {k for p in parsed for k in p if k.lstrip("+~") != "seed"}
    varying = sorted(k for k in names if len({p.get(k) for p in parsed}) > 1)
    return {i: ",".join(f"{k}={p.get(k)}" for k in varying) or "default"
            for i, p in enumerate(parsed)}


def stats(values: list[float], larger_is_better: bool = True) -> dict[str, Any]:
    """Mean with its 95% interval (Student t), spread, and best of the N runs. One run has
    no spread: its ``ci95`` and ``std`` are None (not a zero-width interval and a std of 0,
    which read as a perfectly stable recipe)."""
    lo, hi = mean_ci(values)
    return {"n": len(values), "mean": statistics.fmean(values),
            "ci95": [lo, hi] if len(values) > 1 else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "median": statistics.median(values), "min": min(values), "max": max(values),
            "best": max(values) if larger_is_better else min(values)}


def lower_is_better(metric: str, monitor: dict[str, Any] | None = None) -> bool:
    """By the metric's name; the monitored metric (on either split) goes the way of the
    task's ``mode`` (a multi-task ``mean`` of losses or MSEs is monitored with ``mode: min``)."""
    name = metric.split("/", 1)[-1]
    if monitor and name == str(monitor.get("metric", "")).split("/", 1)[-1]:
        return monitor.get("mode", "max") == "min"
    return metric.split("/")[-1] in LOWER_IS_BETTER


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration (swept overrides other than the seed): statistics over seeds, the
    trivial-predictor baselines and each metric's delta to them, failures, expected validation
    performance, and a ranking with a test of each configuration against the best."""
    groups: dict[str, list[dict[str, Any]]] = {}
    keys = swept_keys(records)
    for i, rec in enumerate(records):
        groups.setdefault(keys[i], []).append(rec)
    summary = {key: _config_summary(recs) for key, recs in sorted(groups.items())}
    _rank(summary)
    return summary


def _config_summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in recs if r.get("status") == "ok"]
    dropped = [r for r in recs if r.get("status") in STOPPED]
    running = [r for r in recs if r.get("status") == "running"]  # (ftlab-report mid-sweep)
    trouble = [r for r in recs if r.get("status") not in ("ok", "running", *STOPPED)]
    monitor = next((r["monitor"] for r in recs if r.get("monitor")), None) \
        or {"metric": "val/acc", "mode": "max"}
    names = sorted({m for r in done for m in r.get("final", {}) if "/baseline_" not in m})
    metrics = {m: stats([r["final"][m] for r in done if finite(r["final"].get(m))],
                        not lower_is_better(m, monitor))
               for m in names if any(finite(r["final"].get(m)) for r in done)}
    baselines = {}  # metric -> the trivial predictor's score on the same split (mean over runs)
    for m in metrics:  # val/<metric> <-> val/baseline_<metric> (multi-task: <task>/acc)
        split, _, name = m.partition("/")
        vals = [r["final"][f"{split}/baseline_{name}"] for r in done
                if finite(r["final"].get(f"{split}/baseline_{name}"))]
        if vals:
            baselines[m] = statistics.fmean(vals)
    failed = sum(bool(r.get("failed")) for r in recs)
    counted = len(recs) - len(dropped) - len(running)
    seeds = {str(r.get("seed")): r.get("final", {}) for r in done}
    val = [r["final"][monitor["metric"]] for r in done
           if finite(r.get("final", {}).get(monitor["metric"]))]
    return {
        "runs": len(recs),
        "errored": len(trouble),
        "running": len(running),
        "failed": failed,
        "failed_rate": failed / counted if counted else math.nan,
        # finished, but at or below a trivial baseline (a single run exits 3 for it)
        "degenerate": sum(r.get("status") == "ok" and bool(r.get("failed")) for r in recs),
        # stopped by a signal, or killed (a 'running' job whose process is gone)
        "interrupted": sum(r.get("status") == "interrupted" for r in recs),
        # finished before a re-launch of the sweep: reused, not trained again
        "reused": sum(bool(r.get("reused")) for r in recs),
        "all_failed": counted > 0 and failed == counted,
        "failures": {str(r.get("seed", r.get("job"))): r.get("failure") or r.get("status")
                     for r in recs if r.get("failed")},
        # stopped early by callbacks=early_discard (neither errored nor failed); their
        # partial metrics stay out of the statistics below
        "discarded": sum(r.get("status") == "discarded" for r in recs),
        "pruned": sum(r.get("status") == "pruned" for r in recs),  # by hydra/sweeper=ftlab_optuna
        "discarded_steps": {"trained": sum(r["discarded"]["steps"] for r in dropped),
                            "planned": sum(r["discarded"]["planned_steps"] for r in dropped)},
        "seeds": seeds,
        "failed_seeds": sorted(str(r.get("seed")) for r in done if r.get("failed")),
        "errors": {str(r["seed"] if "seed" in r else r.get("job")): r.get("error")
                   for r in trouble},
        "metrics": metrics,
        "earlier_stages": earlier_stages(done),
        "baseline": baselines,
        "delta": {m: metrics[m]["mean"] - b for m, b in baselines.items()},
        "monitor": monitor,
        # Dodge et al. (2019): expected best validation score of n = 1..N runs
        "expected_validation": expected_max(val, monitor["mode"] == "max") if val else [],
        "selected": selected_run(seeds, monitor),
    }


def earlier_stages(done: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A pipeline's stages before its last (TAPT, an intermediate task, PET's teachers), by
    name in pipeline order: each metric's statistics over the finished jobs (``metrics`` holds
    the last stage's). A stage that several jobs share (a fixed ``seed``: one training, reused
    from the stage cache) counts once, by its stage key, so n is the number of trainings.
    Empty for single-stage runs."""
    values: dict[str, dict[str, list[float]]] = {}
    seen: set[str] = set()
    for rec in done:
        keys = {line.get("stage"): line.get("key") for line in rec.get("lineage") or []
                if isinstance(line, dict)}
        stages = list((rec.get("stages") or {}).items())
        for name, stage in stages[:-1]:
            key = keys.get(name)
            if key is not None and key in seen:
                continue
            seen.add(key)
            for metric, value in ((stage or {}).get("metrics") or {}).items():
                if "/baseline_" not in metric and finite(value):
                    values.setdefault(name, {}).setdefault(metric, []).append(value)
    return {name: {m: stats(v, not lower_is_better(m)) for m, v in sorted(found.items())}
            for name, found in values.items()}


def primary_metric(summary: dict[str, Any]) -> str | None:
    """What configurations are ranked by: the test score of the monitored metric (the
    validation score where there is no test split)."""
    for s in summary.values():
        name = s["monitor"]["metric"].split("/", 1)[-1]
        for m in (f"test/{name}", f"val/{name}"):
            if m in s["metrics"]:
                return m
    return None


def _rank(summary: dict[str, Any]) -> None:
    metric = primary_metric(summary)
    if metric is None:
        return
    scored = [k for k, s in summary.items() if metric in s["metrics"]]
    big = not lower_is_better(metric, summary[scored[0]]["monitor"])
    order = sorted(scored, key=lambda k: summary[k]["metrics"][metric]["mean"], reverse=big)
    best = order[0] if order else None
    for rank, key in enumerate(order, 1):
        s = summary[key]
        s["rank"] = {"metric": metric, "rank": rank}
        if key != best:
            per_seed = {seed: v[metric] for seed, v in s["seeds"].items() if finite(v.get(metric))}
            top = {seed: v[metric] for seed, v in summary[best]["seeds"].items()
                   if finite(v.get(metric))}
            s["rank"]["vs_best"] = permutation_test(per_seed, top)
    tests = [summary[k]["rank"]["vs_best"] for k in order if "vs_best" in summary[k]["rank"]]
    for test, adjusted in zip(tests, holm([t["p"] for t in tests]), strict=True):
        test["p_holm"] = adjusted  # one test per configuration: the family's error rate



def write_report(sweep_dir: str | Path, save_artefact: str = "all",
                 ended: bool = True) -> dict[str, Any]:
    """Write ``summary.{json,md,png}``; with ``save_artefact="best"`` first delete the full-size
    artefacts of all jobs but the best (``ftlab.artefact.keep_best_full_artefacts``).
    ``ended``: as :func:`collect`."""
    from ftlab.artefact import keep_best_full_artefacts

    sweep_dir = Path(sweep_dir)
    records = collect(sweep_dir, ended, unique=False)
    if save_artefact == "best":  # every folder's own artefacts (a reused job has none)
        keep_best_full_artefacts(records, sweep_dir)
    summary = summarize(dedupe(records))
    write_json(sweep_dir / "summary.json", summary)
    text = markdown(summary)
    atomic_write(sweep_dir / "summary.md", lambda p: p.write_text(text))
    plot(summary, sweep_dir / "summary.png")
    return summary


class SweepReport(Callback):
    """Hydra callback: write the cross-seed report when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import os

        from ftlab.store import is_rank_zero

        sweep_dir = Path(config.hydra.sweep.dir)
        # under DDP Lightning starts the other ranks with the same `ftlab -m` command, so they
        # run the sweep too: only rank zero reports (a second set of W&B summary runs else)
        if not sweep_dir.is_dir() or not is_rank_zero():
            return
        summary = write_report(sweep_dir, str(config.get("save_artefact", "all")))
        print((sweep_dir / "summary.md").read_text())
        _log_to_wandb(config, sweep_dir, summary)
        print(f"Report: {sweep_dir}/summary.{{md,json,png}}")
        status = os.environ.get("FTLAB_SWEEP_STATUS")  # set by the ftlab command (cli.main)
        if status:
            write_json(status, {"sweep_dir": str(sweep_dir),
                                **outcome(summary, is_search(config))})


def outcome(summary: dict[str, Any], search: bool) -> dict[str, int]:
    """The sweep's job count, errored jobs and degenerate (failed-by-rule) jobs, which set
    the exit status (README: exit statuses)."""
    degenerate = sum(s["degenerate"] for s in summary.values())
    if search and any(  # a search expects failing trials: it fails only when none learnt
            len(s["seeds"]) > len(s["failed_seeds"]) for s in summary.values()):
        degenerate = 0
    return {"jobs": sum(s["runs"] for s in summary.values()),
            "errored": sum(s["errored"] for s in summary.values()), "degenerate": degenerate}


def is_search(config: DictConfig) -> bool:
    """The multirun was a hyper-parameter search (``hydra/sweeper=ftlab_optuna``)."""
    from ftlab.search import SWEEPER

    return str(config.hydra.sweeper.get("_target_", "")) == SWEEPER


def _log_to_wandb(config: DictConfig, sweep_dir: Path, summary: dict[str, Any]) -> None:
    """logger=wandb: the cross-seed tables on a summary run per configuration (dashboards)."""
    from ftlab.dashboards import log_sweep_summary

    try:
        log_sweep_summary(config, sweep_dir, summary)
    except Exception as err:  # noqa: BLE001 - the files above are the report; W&B is extra
        print(f"ftlab: the W&B summary runs were not logged ({type(err).__name__}: {err})",
              file=sys.stderr)
