"""A small-scale Gururangan et al. (2020) comparison on Rotten Tomatoes with few labels:
no adaptation vs TAPT vs DAPT (news) + TAPT, then the classifier, over several seeds; and the
wall time of a tiny pipeline sweep with the stage cache vs without. ``*_hw`` configurations
run the same with LP-FT head warm-up (Kumar et al. 2022) on every fresh head (the pipelines'
``head_warmup_steps``); the others turn it off. Prints figures, and last one JSON line of all.

    python benchmarks/adaptive.py [--seeds 1,2,3] [--labels 500] [--dapt-steps 100]
        [--tapt-steps 150] [--task-epochs 4] [--configs none,tapt,dapt_tapt]   # ~70 min
    python benchmarks/adaptive.py --configs tapt,tapt_hw,dapt_tapt,dapt_tapt_hw  # LP-FT off/on
    python benchmarks/adaptive.py --sweep-timing --seeds 1,2,3,4,5  # tiny model, cache vs none

DAPT/TAPT have a fixed seed, so they are trained once per configuration (stage cache in
``--cache-dir``) and reused by every seed of the classifier. Full scale (Gururangan et al.):
12.5k DAPT steps and 100 TAPT epochs with RoBERTa on a GPU; the defaults here are CPU-sized.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from ftlab.cli import CONFIG_DIR, quiet
from ftlab.run import run

os.environ.setdefault("WANDB_MODE", "offline")
QUIET = ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false"]


def run_job(overrides: list[str], out: Path) -> dict:
    """Compose conf/ with ``overrides`` (as the CLI would) and run it into ``out``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        del cfg["hydra"]
    return run(cfg)


def run_seeds(configs: dict[str, list[str]], common: list[str], args: argparse.Namespace,
              extra: Callable[[dict], dict],
              grid: Callable[[str, float], list[str]] | None = None) -> dict[str, list[dict]]:
    """Run each configuration of ``args.configs`` for every seed of ``args.seeds`` into
    ``args.out``; a JSON line per job (test/val accuracy, seconds, lineage, ``extra(record)``).

    With ``grid`` and ``args.lr_grid`` (LRs), the first seed runs at each LR (``grid(name, lr)``:
    the overrides that set the classifier's LR) and the LR with the best validation accuracy is
    used for the other seeds: each configuration gets the same grid budget. A job that ends no
    better than the majority class is a result (its row says ``status``), not an error."""
    results: dict[str, list[dict]] = {}
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in str(getattr(args, "lr_grid", "") or "").split(",") if x]
    for name in args.configs.split(","):
        def job(seed: int, lr: float | None, name: str = name) -> dict:
            start = time.perf_counter()
            sub = f"lr{lr:g}/seed{seed}" if lr is not None else f"seed{seed}"
            over = [*common, *configs[name], *(grid(name, lr) if lr is not None else []),
                    f"seed={seed}"]
            rec = run_job(over, Path(args.out) / name / sub)
            if "final" not in rec:
                raise SystemExit(f"{name} seed {seed} failed: {rec.get('error')}")
            row = {"seed": seed, "lr": lr, "status": rec["status"],
                   "test_acc": rec["final"]["test/acc"], "val_acc": rec["final"]["val/acc"],
                   "seconds": time.perf_counter() - start,
                   "lineage": [(x["stage"], x["cache_hit"]) for x in rec["lineage"]],
                   **extra(rec)}
            print(json.dumps({"config": name, **row}), flush=True)
            return row

        if grid is not None and lrs:
            tried = [job(seeds[0], lr) for lr in lrs]
            best = max(tried, key=lambda r: r["val_acc"])
            results[name] = [best] + [job(seed, best["lr"]) for seed in seeds[1:]]
            results[name][0]["grid"] = {f"{r['lr']:g}": r["val_acc"] for r in tried}
        else:
            results[name] = [job(seed, None) for seed in seeds]
    return results


def print_table(results: dict[str, list[dict]]) -> None:
    """Mean/std test accuracy per configuration, as a Markdown table."""
    print("| config | lr | test acc mean | std | val acc mean | n | wall s (all seeds) |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        acc = [r["test_acc"] for r in rows]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        val = statistics.mean(r["val_acc"] for r in rows)
        lr = f"{rows[0]['lr']:g}" if rows[0].get("lr") is not None else "-"
        print(f"| {name} | {lr} | {statistics.mean(acc):.4f} | {std:.4f} | {val:.4f} | "
              f"{len(rows)} | {sum(r['seconds'] for r in rows):.0f} |")


#: the stages of each pipeline whose head starts fresh (LP-FT head warm-up applies there)
FRESH_HEADS = {"none": ["stage"], "tapt": ["pipeline.stages.tapt", "pipeline.stages.task"],
               "dapt_tapt": ["pipeline.stages.dapt", "pipeline.stages.task"]}


def head_warmup(name: str, value: str | None) -> list[str]:
    """``<config>``: head warm-up off on every fresh-head stage; ``<config>_hw``: on, at the
    pipeline YAML's own value (``--head-warmup`` unset; single-stage ``none_hw``: 0.1) or at
    ``--head-warmup`` (steps, or a share below 1)."""
    base, on = name.removesuffix("_hw"), name.endswith("_hw")
    if not on:
        return [f"{s}.head_warmup_steps=0" for s in FRESH_HEADS[base]]
    if value is None and base != "none":
        return []
    return [f"{s}.head_warmup_steps={value or 0.1}" for s in FRESH_HEADS[base]]


def adaptive(args: argparse.Namespace) -> dict:
    common = [*QUIET, f"data.max_train_samples={args.labels}",
              f"data.max_eval_samples={args.eval_samples}", f"cache.dir={args.cache_dir}",
              f"trainer.precision={args.precision}", *args.extra]
    task = "pipeline.stages.task"

    def lr_key(name: str) -> str:  # where a configuration's classifier takes its LR
        return "stage.optim.lr" if name.removesuffix("_hw") == "none" else f"{task}.optim.lr"

    configs = {
        "none": [f"stage.trainer.max_epochs={args.task_epochs}"],
        "tapt": ["pipeline=tapt_task", f"pipeline.stages.tapt.trainer.max_steps={args.tapt_steps}",
                 f"{task}.trainer.max_epochs={args.task_epochs}"],
        "dapt_tapt": [
            "pipeline=dapt_tapt_task", f"pipeline.stages.dapt.trainer.max_steps={args.dapt_steps}",
            f"pipeline.stages.dapt.data.max_train_samples={args.dapt_articles}",
            f"pipeline.stages.tapt.trainer.max_steps={args.tapt_steps}",
            f"{task}.trainer.max_epochs={args.task_epochs}"],
    }
    configs |= {f"{k}_hw": v for k, v in configs.items()}  # the same, head warm-up on
    unknown = [c for c in args.configs.split(",") if c not in configs]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {sorted(configs)}")
    configs = {k: v + head_warmup(k, args.head_warmup)
               + ([] if args.lr_grid else [f"{lr_key(k)}={args.lr}"]) for k, v in configs.items()}
    results = run_seeds(configs, common, args, lambda rec: {"mlm": {
        s: v["metrics"].get("test/ppl") for s, v in rec["stages"].items()
        if "test/ppl" in v["metrics"]}}, grid=lambda name, lr: [f"{lr_key(name)}={lr}"])
    print(f"\n{args.labels} labels, seeds {args.seeds}, DAPT {args.dapt_steps} steps on "
          f"{args.dapt_articles} news articles, TAPT {args.tapt_steps} steps, classifier "
          f"{args.task_epochs} epochs at lr {args.lr_grid or args.lr}, precision {args.precision}, "
          "head warm-up "
          f"(*_hw) {args.head_warmup or 'as the pipeline YAML'}")
    print_table(results)
    return {"table": summary(results), "runs": results}


def summary(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per configuration: mean and std of test accuracy, mean val accuracy, n, seconds."""
    out = {}
    for name, rows in results.items():
        acc = [r["test_acc"] for r in rows]
        out[name] = {"test_acc_mean": statistics.mean(acc),
                     "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "val_acc_mean": statistics.mean(r["val_acc"] for r in rows),
                     "n": len(rows), "seconds": sum(r["seconds"] for r in rows)}
    return out


def sweep_timing(args: argparse.Namespace) -> dict:
    """A seed sweep of the tiny two-stage pipeline, with the stage cache and without."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import synthetic_rows, tiny_overrides, write_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="ftlab-sweep-"))
    for split, n, seed in (("train", 2000, 0), ("validation", 200, 1), ("test", 200, 2)):
        write_jsonl(tmp / f"{split}.jsonl", synthetic_rows(n, seed))
    base = [*tiny_overrides(tmp), "pipeline=tiny", f"cache.dir={tmp / 'cache'}",
            "pipeline.stages.tapt.trainer.max_steps=150",
            "pipeline.stages.task.trainer.max_steps=30"]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = {}
    for mode in ("off", "upstream"):
        start = time.perf_counter()
        hits = []
        for seed in seeds:
            rec = run_job([*base, f"cache.stages={mode}", f"seed={seed}"], tmp / mode / str(seed))
            hits.append(rec["lineage"][0]["cache_hit"])
        seconds = time.perf_counter() - start
        print(f"cache.stages={mode}: {len(seeds)} seeds in {seconds:.1f} s; "
              f"TAPT cache hits per seed: {hits}")
        out[mode] = {"seeds": len(seeds), "seconds": round(seconds, 1), "tapt_cache_hits": hits}
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--labels", type=int, default=500, help="labelled training rows")
    p.add_argument("--eval-samples", type=int, default=1000, help="cap on val/test rows")
    p.add_argument("--dapt-steps", type=int, default=100, help="~6 s/step on 2 CPU cores")
    p.add_argument("--dapt-articles", type=int, default=1000, help="news articles for DAPT")
    p.add_argument("--tapt-steps", type=int, default=150, help="~2.7 epochs of RT text")
    p.add_argument("--task-epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4, help="classifier LR (few steps: high)")
    p.add_argument("--lr-grid", default="", help="classifier LRs tried on the first seed, e.g. "
                   "5e-5,1e-4,2e-4: the best on validation runs the other seeds (replaces --lr)")
    p.add_argument("--precision", default="32-true", help="bf16-mixed needs AVX512-BF16")
    p.add_argument("--configs", default="none,tapt,dapt_tapt",
                   help="of none, tapt, dapt_tapt (head warm-up off) and the same with _hw "
                   "(LP-FT head warm-up on every fresh head), e.g. tapt,tapt_hw")
    p.add_argument("--head-warmup", default=None, help="head_warmup_steps of the *_hw configs: "
                   "steps, or a share below 1; unset: the pipeline YAML's (0.1)")
    p.add_argument("--cache-dir", default="outputs/bench_stage_cache")
    p.add_argument("--out", default="outputs/bench/adaptive")
    p.add_argument("--sweep-timing", action="store_true", help="only the cache timing")
    p.add_argument("--extra", nargs="*", default=[], help="more ftlab overrides for every job, "
                   "e.g. trainer.accelerator=gpu")
    args = p.parse_args()
    quiet()
    results = sweep_timing(args) if args.sweep_timing else adaptive(args)
    # every figure, as one JSON line (the last line printed), for the report or a notebook
    print(json.dumps({"benchmark": "adaptive", "mode": "sweep_timing" if args.sweep_timing
                      else "adaptive", "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
