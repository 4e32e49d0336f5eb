"""PEFT methods side by side on Rotten Tomatoes with MiniLM, each at a learning rate chosen on
validation data from the same small grid, through ftlab's own run path (one ``python -m ftlab``
process per method x LR x seed; figures read from its metrics.json and CSV log).

    python benchmarks/peft_table.py --methods full,bitfit,lora --seeds 1,2,3 \\
        --lr-grid 0.3,1,3 --max-train-samples 1000 --epochs 8 --jobs 2 [--extra k=v ...]

1. Grid: every method runs on the first seed at each multiple of its own ``peft.lr``
   (conf/peft/<method>.yaml: 5e-5 for full, 1e-3 for adapters...): the same number of runs,
   steps and evaluations for every method. The LR with the best validation accuracy (of the
   best epoch, which ftlab keeps) wins; ties go to the multiple nearest 1.
2. Seeds: the other seeds run at the chosen LR; the grid run is the first seed's result.

Prints per method: chosen LR, trainable %, artefact KB and its ratio to the full fp32
checkpoint, peak RSS, seconds per optimiser step (validation included), test accuracy
mean +- std over seeds and the gap to full fine-tuning, and the validation accuracy after each
epoch (mean over seeds: the plateau), then the whole result as one JSON line
(``--json`` also writes it to a file). ``--resume`` reuses finished jobs in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full,last_layer,bitfit,adapter_houlsby,adapter_pfeiffer,lora,prefix_tuning,"
           "prompt_tuning,ia3,diff_pruning,intrinsic,movement_pruning")


def method_lr(method: str) -> float:
    """The method's own peak LR (its YAML's ``lr``)."""
    return float(OmegaConf.load(ROOT / "conf" / "peft" / f"{method}.yaml")["lr"])


def val_curve(out: Path) -> list[float]:
    """Validation accuracy after each epoch, from the stage's CSV log."""
    files = sorted(out.glob("classify/csv/*/metrics.csv"))
    if not files:
        return []
    with files[-1].open() as f:
        return [round(float(r["val/acc"]), 4) for r in csv.DictReader(f) if r.get("val/acc")]


def _result(method: str, seed: int, lr: float, record: dict, rss_mb: float | None,
            out: Path) -> dict:
    """One finished job's figures, also written to ``<out>/bench.json``."""
    result = {"method": method, "seed": seed, "lr": lr, "status": record.get("status"),
              **{k: record["stages"]["classify"].get(k) for k in (
                  "params_trainable_pct", "params_total", "artefact_kb", "fit_seconds",
                  "global_steps")},
              **record["final"], "rss_mb": rss_mb, "val_curve": val_curve(out)}
    (out / "bench.json").write_text(json.dumps(result, default=str))
    return result


def run_job(method: str, seed: int, lr: float, args: argparse.Namespace) -> dict:
    """One ftlab job; its classify-stage info + final metrics + peak RSS (MB) + val curve."""
    out = Path(args.out) / f"{method}_lr{lr:.2g}_seed{seed}"
    done = out / "bench.json"
    if args.resume and done.exists():
        return json.loads(done.read_text())
    if args.resume and (out / "metrics.json").exists():  # finished, but its runner was stopped
        record = json.loads((out / "metrics.json").read_text())
        if "final" in record and "classify" in record.get("stages", {}):
            return _result(method, seed, lr, record, None, out)
    overrides = [f"peft={method}", f"seed={seed}", f"stage.optim.lr={lr}",
                 f"stage.trainer.max_epochs={args.epochs}", f"stage.batch_size={args.batch_size}",
                 f"data.max_train_samples={args.max_train_samples}",
                 f"data.max_eval_samples={args.eval_samples}",
                 "logger=csv", "callbacks=none", "trainer.enable_progress_bar=false",
                 f"hydra.run.dir={out}", *args.extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen([sys.executable, "-m", "ftlab", *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    record = json.loads((out / "metrics.json").read_text()) \
        if (out / "metrics.json").exists() else {}
    # exit status 3 (no better than the majority class) still has a full metrics.json
    if "final" not in record or "classify" not in record.get("stages", {}):
        err = proc.stderr.read()[-500:]
        print(f"  {method} lr {lr:.2g} seed {seed}: failed ({err.strip()[-300:]})", flush=True)
        return {}
    result = _result(method, seed, lr, record, usage.ru_maxrss / 1024, out)
    print(f"  {method} lr {lr:.2g} seed {seed}: val {result.get('val/acc', 0):.3f} test "
          f"{result.get('test/acc', 0):.3f} ({result['fit_seconds']:.0f} s fit)", flush=True)
    return result


def run_method(method: str, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The method's grid on the first seed, then its other seeds at the chosen LR: (grid runs,
    runs at the chosen LR). Methods run side by side (``--jobs``), each one's jobs in turn, so
    methods finish one after another rather than all grids first."""
    grid = [run_job(method, args.seeds[0], x * method_lr(method), args) for x in args.multiples]
    lr = choose_lr(method, grid)
    if lr is None:
        return grid, []
    chosen = [r for r in grid if r and r["lr"] == lr]
    return grid, chosen + [r for r in (run_job(method, s, lr, args) for s in args.seeds[1:]) if r]


def choose_lr(method: str, grid: list[dict]) -> float | None:
    """The grid LR with the best validation accuracy; ties: the multiple nearest 1."""
    ok = [r for r in grid if r and r["method"] == method]
    if not ok:
        return None
    base = method_lr(method)
    return max(ok, key=lambda r: (round(r["val/acc"], 4),
                                  -abs(math.log(r["lr"] / base))))["lr"]


def summarise(results: dict[str, list[dict]], grid: list[dict], args: argparse.Namespace) -> dict:
    rows = {}
    for method, rs in results.items():
        if not rs:
            rows[method] = None
            continue
        accs = [r["test/acc"] for r in rs]
        curves = [r["val_curve"] for r in rs if r["val_curve"]]
        width = min((len(c) for c in curves), default=0)
        rows[method] = {
            "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs], "test_acc": accs,
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "test_f1_mean": statistics.fmean(r["test/f1"] for r in rs),
            "majority": rs[0].get("test/baseline_acc"),
            "trainable_pct": rs[0]["params_trainable_pct"],
            "artefact_kb": statistics.fmean(r["artefact_kb"] for r in rs),
            "s_per_step": statistics.fmean(r["fit_seconds"] / max(1, r["global_steps"])
                                           for r in rs),
            "steps": rs[0]["global_steps"],
            "rss_mb": max((r["rss_mb"] for r in rs if r["rss_mb"]), default=float("nan")),
            "val_curve_mean": [round(statistics.fmean(c[i] for c in curves), 4)
                               for i in range(width)],
            "grid": {f"{r['lr']:.2g}": r["val/acc"] for r in grid if r and r["method"] == method},
        }
    model_kb = 4 * min(r["params_total"] for rs in results.values() for r in rs) / 1024
    full = rows.get("full")
    print(f"\n{'method':<18} {'lr':>7} {'train %':>8} {'artefact KB':>12} {'vs full':>8} "
          f"{'RSS MB':>7} {'s/step':>7} {'test acc':>15} {'gap':>7} val acc by epoch")
    for method, row in rows.items():
        if row is None:
            print(f"{method:<18} (all runs failed)")
            continue
        gap = f"{row['test_acc_mean'] - full['test_acc_mean']:+.3f}" if full else "n/a"
        print(f"{method:<18} {row['lr']:>7.1e} {row['trainable_pct']:>8.3f} "
              f"{row['artefact_kb']:>12.1f} {row['artefact_kb'] / model_kb:>8.4f} "
              f"{row['rss_mb']:>7.0f} {row['s_per_step']:>7.2f} {row['test_acc_mean']:>7.3f} +- "
              f"{row['test_acc_std']:.3f} {gap:>7} "
              + " ".join(f"{v:.3f}" for v in row["val_curve_mean"]))
    print(f"(full fp32 checkpoint: {model_kb:.0f} KB; grid LRs per method: "
          f"{args.lr_grid} x its peft.lr; majority-class test accuracy "
          f"{next(iter(r for r in rows.values() if r), {}).get('majority')})")
    return {"benchmark": "peft_table", "budget": {
        "max_train_samples": args.max_train_samples, "epochs": args.epochs,
        "batch_size": args.batch_size, "eval_samples": args.eval_samples,
        "lr_grid": args.lr_grid, "grid_seed": args.seeds[0], "extra": args.extra},
        "methods": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--lr-grid", default="0.3,1,3",
                        help="multiples of each method's own peft.lr tried on the first seed")
    parser.add_argument("--max-train-samples", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=1, help="ftlab processes at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_peft"))
    parser.add_argument("--json", default=None, help="also write the result JSON here")
    parser.add_argument("--extra", nargs="*", default=[], help="more ftlab overrides")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished jobs in --out (an interrupted benchmark goes on)")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.multiples = [float(m) for m in args.lr_grid.split(",")]
    methods = args.methods.split(",")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = dict(zip(methods, pool.map(lambda m: run_method(m, args), methods), strict=True))
    grid = [r for g, _ in done.values() for r in g if r]
    results = {m: runs for m, (_, runs) in done.items()}
    summary = summarise(results, grid, args)
    line = json.dumps(summary)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
