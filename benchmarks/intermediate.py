"""Intermediate-task training (Phang et al. 2018, STILTs) on a CPU: Rotten Tomatoes with few
labels, (a) MiniLM fine-tuned directly vs (b) after a VitaminC classifier (``pipeline=
intermediate_task``) vs (c) after multi-task VitaminC + the same Rotten Tomatoes labels
(``pipeline=multitask_task``, Aghajanyan et al. 2021), over several seeds. Prints mean +- std
test accuracy.

    python benchmarks/intermediate.py [--seeds 1,2,3] [--labels 500] [--inter-rows 4000]
        [--inter-epochs 1] [--task-epochs 4] [--configs none,vitaminc,multitask]

VitaminC (../shared/data/vitaminc, or $FTLAB_DATA) is trained once with a fixed seed (stage
cache in ``--cache-dir``) and reused by every seed of the target classifier. Not run as part
of any test; with the defaults, expect the VitaminC stage (4,000 pairs, 1 epoch) to take
several minutes on 2 CPU cores and each classifier run a minute or two. (c)'s multi-task stage
(VitaminC pairs + the target's own labelled rows, one epoch = 125 + 16 batches, temperature
sampling T=2) takes the run's seed, so it trains once per seed.
Phang et al.'s setting: BERT-large, the whole intermediate set (MNLI, 393k pairs), 3 epochs.
"""

from __future__ import annotations

import argparse
import json

from ftlab.cli import quiet

try:
    from benchmarks.adaptive import QUIET, print_table, run_seeds
except ImportError:  # run as `python benchmarks/intermediate.py` without the repo on sys.path
    from adaptive import QUIET, print_table, run_seeds


def configs(args: argparse.Namespace) -> dict[str, list[str]]:
    """The override list of each compared configuration (both: the same classifier budget)."""
    task, multi = "pipeline.stages.task", "pipeline.stages.multi"
    return {
        "none": [f"data.max_train_samples={args.labels}",
                 f"stage.trainer.max_epochs={args.task_epochs}", f"stage.optim.lr={args.lr}"],
        "vitaminc": [
            "pipeline=intermediate_task",
            f"pipeline.stages.inter.data_overrides.max_train_samples={args.inter_rows}",
            f"pipeline.stages.inter.data.max_eval_samples={args.eval_samples}",
            f"pipeline.stages.inter.trainer.max_epochs={args.inter_epochs}",
            f"pipeline.stages.inter.optim.lr={args.inter_lr}",
            f"{task}.data_overrides.max_train_samples={args.labels}",
            f"{task}.trainer.max_epochs={args.task_epochs}", f"{task}.optim.lr={args.lr}"],
        "multitask": [
            "pipeline=multitask_task",
            f"{multi}.tasks.vitaminc.data_overrides.max_train_samples={args.inter_rows}",
            f"{multi}.tasks.vitaminc.data.max_eval_samples={args.eval_samples}",
            f"{multi}.tasks.task.data_overrides.max_train_samples={args.labels}",
            f"{multi}.trainer.max_epochs={args.inter_epochs}",
            f"{multi}.optim.lr={args.inter_lr}",
            f"{task}.data_overrides.max_train_samples={args.labels}",
            f"{task}.trainer.max_epochs={args.task_epochs}", f"{task}.optim.lr={args.lr}"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--labels", type=int, default=500, help="labelled Rotten Tomatoes rows")
    p.add_argument("--eval-samples", type=int, default=1000, help="cap on val/test rows")
    p.add_argument("--inter-rows", type=int, default=4000, help="VitaminC training pairs")
    p.add_argument("--inter-epochs", type=int, default=1)
    p.add_argument("--inter-lr", type=float, default=5e-5, help="VitaminC classifier LR")
    p.add_argument("--task-epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4, help="target classifier LR (few steps)")
    p.add_argument("--configs", default="none,vitaminc,multitask")
    p.add_argument("--cache-dir", default="outputs/bench_stage_cache")
    p.add_argument("--out", default="outputs/bench/intermediate")
    args = p.parse_args()
    quiet()
    common = [*QUIET, f"data.max_eval_samples={args.eval_samples}",
              f"cache.dir={args.cache_dir}"]
    results = run_seeds(configs(args), common, args, lambda rec: {
        "inter_test_acc": rec["stages"].get("inter", {}).get("metrics", {}).get("test/acc"),
        "multi_test": {k: v for k, v in rec["stages"].get("multi", {}).get("metrics", {}).items()
                       if k.startswith("test/") and k.endswith("acc")} or None})
    print(f"\nRotten Tomatoes, {args.labels} labels, seeds {args.seeds}; VitaminC "
          f"{args.inter_rows} pairs x {args.inter_epochs} epoch(s) at lr {args.inter_lr}; "
          f"classifier {args.task_epochs} epochs at lr {args.lr}")
    print_table(results)
    print(json.dumps({"benchmark": "intermediate", "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
