"""Prompt-based vs head fine-tuning with few labels (Schick & Schuetze 2021, PET; Zhao et al.
2021, calibration): Rotten Tomatoes with k labelled rows per class, over seeds.

    python benchmarks/prompting.py [--k 16,64] [--seeds 1,2,3]
        [--configs head,pet1,pet3,zeroshot,t2t] [--eval-rows 300] [--out DIR]

- head: MiniLM with a classification head (the default model), fine-tuned on the k-shot rows.
- pet1: SmolLM2 + LoRA, cloze '{text} It was {mask}.' with great/terrible.
- pet3: PET's 3-pattern ensemble distilled into a SmolLM2 + LoRA classifier (pipeline=pet) on
  the unlabelled rest of the training split (capped at --unlabelled rows).
- zeroshot: SmolLM2 cloze with no training, with and without contextual calibration (one run
  reports both; it does not depend on k or the seed, so it runs once).
- t2t: SmolLM2 + LoRA text-to-text ("Review: {text} Sentiment:" -> great/terrible).

Every run is a real ``ftlab`` job (``benchmarks/adaptive.py``'s ``run_job``); each finished run
is appended to ``<out>/prompting.jsonl`` (test accuracy, macro-F1, calibrated metrics where
there are, wall seconds), and the table of mean ± std per (configuration, k) is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.adaptive import QUIET, run_job

SMOL = ["model=smollm2", "peft=lora", "stage.batch_size=8", "stage.eval_batch_size=32"]
VERB = "{fresh: great, rotten: terrible}"


def configs(k: int, epochs: int, unlabelled: int, val_every: int = 1) -> dict[str, list[str]]:
    few = f"data.transforms=[{{few_shot: {{k: {k}}}}}]"
    train = [few, f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={val_every}"]
    return {
        "head": [*train, "stage.batch_size=8"],
        "pet1": [*SMOL, *train, "stage=cloze", f"stage.task.verbalizer={VERB}"],
        "pet3": [*SMOL, *train, "pipeline=pet",
                 f"data.transforms=[{{few_shot: {{k: {k}, unlabelled: {unlabelled}}}}}]"],
        "zeroshot": [*SMOL, "stage=cloze", f"stage.task.verbalizer={VERB}",
                     "stage.task.calibrate=true", "trainer.max_steps=0"],
        "t2t": [*SMOL, *train, "stage=text2text", "stage.task.source='Review: {text} Sentiment:'",
                f"stage.task.targets={VERB}", "stage.task.generate=false"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", default="16,64")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--configs", default="head,pet1,zeroshot,t2t,pet3")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--unlabelled", type=int, default=500)
    parser.add_argument("--val-every", type=int, default=1,
                        help="validate every N epochs (SmolLM2 evaluation dominates on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/prompting"))
    parser.add_argument("--extra", nargs="*", default=[], help="more ftlab overrides for every "
                        "run, e.g. trainer.accelerator=gpu (benchmarks/prompting_gpu.sh)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "prompting.jsonl"
    done = {(r["config"], r["k"], r["seed"]) for r in map(json.loads, log.open())} \
        if log.is_file() else set()
    for k in [int(x) for x in args.k.split(",")]:
        for name in args.configs.split(","):
            seeds = [0] if name == "zeroshot" else [int(s) for s in args.seeds.split(",")]
            if name == "zeroshot" and k != int(args.k.split(",")[0]):
                continue  # no training: the same run for every k
            for seed in seeds:
                if (name, k, seed) in done:
                    continue
                chosen = configs(k, args.epochs, args.unlabelled, args.val_every)[name]
                over = [*QUIET, *chosen, f"seed={seed}", f"data.max_eval_samples={args.eval_rows}",
                        *args.extra]
                start = time.perf_counter()
                rec = run_job(over, args.out / f"{name}_k{k}_s{seed}")
                row = {"config": name, "k": k, "seed": seed, "status": rec["status"],
                       "wall_s": round(time.perf_counter() - start, 1),
                       **{m: rec.get("final", {}).get(m) for m in (
                           "test/acc", "test/f1", "test/acc_cal", "test/f1_cal",
                           "test/baseline_acc")}}
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in log.open()]
    print(f"\nRotten Tomatoes, k labelled rows per class, val/test capped at {args.eval_rows}\n")
    print("| configuration | k | n | test acc mean ± std | macro-F1 | calibrated acc | wall s |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted({(r["config"], r["k"]) for r in rows}):
        rs = [r for r in rows if (r["config"], r["k"]) == key and r["test/acc"] is not None]
        if not rs:
            continue
        acc = [r["test/acc"] for r in rs]
        cal = [r["test/acc_cal"] for r in rs if r["test/acc_cal"] is not None]
        print(f"| {key[0]} | {key[1] if key[0] != 'zeroshot' else '-'} | {len(rs)} | "
              f"{statistics.fmean(acc):.3f} ± {statistics.stdev(acc) if len(acc) > 1 else 0:.3f}"
              f" | {statistics.fmean(r['test/f1'] for r in rs):.3f} | "
              f"{f'{statistics.fmean(cal):.3f}' if cal else '-'} | "
              f"{statistics.fmean(r['wall_s'] for r in rs):.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
