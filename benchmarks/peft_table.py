"""PEFT methods side by side on Rotten Tomatoes with MiniLM, through ftlab's own run path
(one ``python -m ftlab`` process per method x seed; figures read from its metrics.json).

    python benchmarks/peft_table.py --methods full,bitfit,lora,adapter_pfeiffer --seeds 1,2,3 \\
        --max-train-samples 2000 --epochs 1 [--extra stage.optim.lr=1e-3 ...]

Prints per method: trainable %, artefact KB and its ratio to the full checkpoint (fp32 model
size), peak RSS of the job, seconds per optimiser step (fit time / steps, validation
included), test accuracy mean +- std over seeds, and the gap to full fine-tuning.
Per-method learning rates: ``--lr bitfit=1e-3,lora=5e-4`` (as ``stage.optim.lr``;
default: each method's own ``peft.lr`` from its YAML).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(method: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One ftlab job; returns its classify-stage info + final metrics + peak RSS (MB).

    With ``--resume``, a job whose folder already holds a finished run is read, not re-run."""
    done = out / "bench.json"
    if args.resume and done.exists():
        return json.loads(done.read_text())
    overrides = [f"peft={method}", f"seed={seed}", f"stage.trainer.max_epochs={args.epochs}",
                 "logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
                 f"hydra.run.dir={out}", *args.extra]
    if args.max_train_samples:
        overrides.append(f"data.max_train_samples={args.max_train_samples}")
    if method in args.lr:
        overrides.append(f"stage.optim.lr={args.lr[method]}")
    proc = subprocess.Popen([sys.executable, "-m", "ftlab", *overrides], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    record = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() \
        else {"status": "error", "error": proc.stderr.read()[-500:]}
    if record.get("status") != "ok":
        print(f"  {method} seed {seed}: {record.get('error', record.get('status'))}")
        return {}
    info = record["stages"]["classify"]
    result = info | record["final"] | {"rss_mb": usage.ru_maxrss / 1024}
    done.write_text(json.dumps(result, default=str))
    return result


def summarise(results: dict[str, list[dict]]) -> None:
    model_kb = 4 * min(r["params_total"] for rs in results.values() for r in rs) / 1024
    full = results.get("full")
    full_acc = statistics.mean(r["test/acc"] for r in full) if full else None
    print(f"\n{'method':<18} {'train %':>8} {'artefact KB':>12} {'vs full':>8} {'RSS MB':>7} "
          f"{'s/step':>7} {'test acc':>15} {'gap':>7} seeds")
    for method, rs in results.items():
        if not rs:
            print(f"{method:<18} (all runs failed)")
            continue
        accs = [r["test/acc"] for r in rs]
        mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        kb = statistics.mean(r["artefact_kb"] for r in rs)
        step = statistics.mean(r["fit_seconds"] / max(1, r["global_steps"]) for r in rs)
        gap = f"{mean - full_acc:+.3f}" if full_acc is not None else "n/a"
        rss = max((round(r["rss_mb"]) for r in rs if "rss_mb" in r), default="n/a")
        print(f"{method:<18} {rs[0]['params_trainable_pct']:>8.3f} {kb:>12.1f} "
              f"{kb / model_kb:>8.4f} {rss:>7} {step:>7.2f} "
              f"{mean:>7.3f} +- {std:.3f} {gap:>7} {len(rs)}")
    print(f"(full fp32 checkpoint: {model_kb:.0f} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="full,last_layer,bitfit,adapter_houlsby,"
                        "adapter_pfeiffer,lora,prefix_tuning,prompt_tuning,ia3,diff_pruning,"
                        "intrinsic,movement_pruning")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", default="", help="per-method LR: method=lr,method=lr")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_peft"))
    parser.add_argument("--extra", nargs="*", default=[], help="more ftlab overrides")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished jobs in --out (an interrupted benchmark goes on)")
    args = parser.parse_args()
    args.lr = dict(kv.split("=", 1) for kv in args.lr.split(",") if kv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict]] = {}
    for method in args.methods.split(","):
        results[method] = []
        for seed in seeds:
            out = Path(args.out) / f"{method}_seed{seed}"
            r = run_job(method, seed, args, out)
            if r:
                results[method].append(r)
                print(f"  {method} seed {seed}: test acc {r['test/acc']:.3f}, "
                      f"{r['fit_seconds']:.0f} s fit", flush=True)
    summarise(results)


if __name__ == "__main__":
    main()
