"""Fine-tuning stability on small data, over many seeds: plain fine-tuning vs each regulariser vs
the Mosbach et al. (2021) preset; and early discard of unpromising seeds across a sweep against
the full sweep. Runs real `ftlab -m` sweeps (the command a user types) and reads their reports.

    python benchmarks/stability.py [--seeds 10] [--labels 300] [--epochs 3]
        [--configs none,r3f,smart,freelb,mixout,mosbach] [--discard] [--jobs N] [--out DIR]
        [--extra trainer=gpu ...]

Per configuration: failed-run rate (the report's rule: errored, diverged, or validation
accuracy/macro-F1 at or below the trivial predictor), mean ± std and 95% CI (Student t) of test
accuracy, and wall time. With --discard, a `callbacks=early_discard` sweep of the `none`
configuration: optimiser steps trained relative to the full `none` sweep, and its best seed's
test accuracy against the full sweep's best (the issue's target: <= 60% of the compute, best
within 0.5 points). Prints a table and writes ``<out>/stability.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: each configuration's overrides on top of the common small-data setting
CONFIGS = {
    "none": [],
    "r3f": ["regularizer=r3f"],
    "smart": ["regularizer=smart"],
    "freelb": ["regularizer=freelb"],
    "mixout": ["regularizer=mixout"],
    # lr 2e-5, bias-corrected AdamW, 10% warmup, batch 16, 20 epochs (conf/experiment/mosbach.yaml)
    "mosbach": ["experiment=mosbach"],
}


def sweep(name: str, overrides: list[str], args: argparse.Namespace, out: Path) -> float:
    """Run one `ftlab -m` sweep over the seeds into ``out``; its wall seconds."""
    seeds = ",".join(str(s) for s in range(1, args.seeds + 1))
    cmd = [sys.executable, "-m", "ftlab", "-m", f"seed={seeds}",
           f"data.max_train_samples={args.labels}", f"data.max_eval_samples={args.eval_rows}",
           "stage.batch_size=16", f"trainer.max_epochs={args.epochs}", "logger=none",
           "trainer.enable_progress_bar=false", f"hydra.sweep.dir={out}", *args.extra,
           *overrides]
    if not any(o.startswith("callbacks") for o in overrides):
        cmd.append("callbacks=none")
    if args.jobs > 1:  # parallel jobs (a GPU machine): joblib, one torch thread each
        cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {
        "WANDB_MODE": "offline"})
    wall = time.perf_counter() - start
    if not (out / "summary.json").is_file():
        sys.exit(f"{name}: the sweep wrote no report (exit {proc.returncode}):\n"
                 f"{proc.stderr[-3000:]}")
    return wall


def jobs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/metrics.json"))]


def steps(rec: dict) -> tuple[int, int]:
    """(optimiser steps trained, steps it would have trained in full) of one job."""
    stage = next(iter(rec.get("stages", {}).values()), {})
    trained = stage.get("global_steps", 0)
    if rec.get("status") == "discarded":
        return rec["discarded"]["steps"], rec["discarded"]["planned_steps"]
    return trained, trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--labels", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-rows", type=int, default=500)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--discard", action="store_true")
    parser.add_argument("--discard-keep", default="top_k", choices=["top_k", "above_median"])
    parser.add_argument("--jobs", type=int, default=1,
                        help="jobs at once per sweep (joblib launcher); early discard then "
                             "compares jobs in the order they reach their check")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/stability"))
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every sweep")
    args = parser.parse_args()
    results = {}
    names = args.configs.split(",")
    runs = [(n, CONFIGS[n]) for n in names]
    if args.discard:
        runs.append(("none+discard", ["callbacks=early_discard",
                                      f"callbacks.early_discard.keep={args.discard_keep}"]))
    for name, overrides in runs:
        out = args.out / name
        wall = sweep(name, overrides, args, out)
        summary = json.loads((out / "summary.json").read_text())["default"]
        acc = summary["metrics"].get("test/acc", {})
        trained = [steps(r) for r in jobs(out)]
        results[name] = {
            "overrides": overrides, "runs": summary["runs"], "failed": summary["failed"],
            "failed_rate": summary["failed_rate"], "errored": summary["errored"],
            "discarded": summary["discarded"], "test_acc": acc,
            "test_acc_per_seed": {s: v.get("test/acc") for s, v in summary["seeds"].items()},
            "steps_trained": sum(t for t, _ in trained), "steps_full": sum(f for _, f in trained),
            "wall_s": round(wall, 1)}
        print(f"{name}: {json.dumps(results[name]['test_acc'])}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)  # partial results survive a timeout
        (args.out / "stability.json").write_text(json.dumps(results, indent=1))
    print(f"\nRotten Tomatoes, {args.labels} labels, batch 16, {args.epochs} epochs "
          f"(mosbach: its own 20), {args.seeds} seeds, val/test capped at {args.eval_rows} rows\n")
    print("| configuration | failed | test acc mean ± std | 95% CI | min | max | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        a = r["test_acc"]
        if not a:
            print(f"| {name} | {r['failed']}/{r['runs']} | – | – | – | – | {r['wall_s']} |")
            continue
        spread, ci = ((f" ± {a['std']:.3f}", f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]")
                      if a["ci95"] else ("", "– (n=1)"))  # one seed: no spread
        print(f"| {name} | {r['failed']}/{r['runs']} | {a['mean']:.3f}{spread} | "
              f"{ci} | {a['min']:.3f} | {a['max']:.3f} | "
              f"{r['wall_s']} |")
    if args.discard and "none" in results:
        full, cut = results["none"], results["none+discard"]
        # discarded jobs' partial scores are not finished results: the best of the survivors
        best_cut = max((v for s, v in cut["test_acc_per_seed"].items() if v is not None),
                       default=float("nan"))
        best_full = max(v for v in full["test_acc_per_seed"].values() if v is not None)
        results["discard_vs_full"] = {
            "compute_ratio": cut["steps_trained"] / full["steps_trained"],
            "best_full": best_full, "best_with_discard": best_cut,
            "best_gap_points": 100 * (best_full - best_cut), "discarded": cut["discarded"]}
        d = results["discard_vs_full"]
        print(f"\nEarly discard (at 25%, keep {args.discard_keep}): {d['discarded']} of "
              f"{cut['runs']} jobs "
              f"discarded; compute {d['compute_ratio']:.0%} of the full sweep; best test acc "
              f"{best_cut:.3f} vs {best_full:.3f} ({d['best_gap_points']:+.1f} points)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stability.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
