"""Does the default run converge? The DEFAULT ftlab run (only data overrides) vs TF-IDF +
logistic regression (scikit-learn) on the same train/test rows, read through ftlab's own data
code (``StageBuilder.raw`` -> ``ftlab.data.sources.load_raw``), so both see identical splits.

    OMP_NUM_THREADS=1 python benchmarks/defaults.py [--sets rt_full,rt_1000,vitaminc,rt_imb]
        [--out outputs/bench_defaults]

Sets: ``rt_full`` (Rotten Tomatoes, all 10k training snippets), ``rt_1000`` (1,000 of them),
``vitaminc`` (4,000 VitaminC pairs, 3 classes; needs ../shared/data/vitaminc; 500 eval rows),
``rt_imb`` (Rotten Tomatoes at 1 rotten : 5 fresh, 1,200 training rows; validation and test
subsampled to the same ratio; written as jsonl and read with ``data=local``). Prints a JSON line
per set and a Markdown table (accuracy, macro-F1, wall seconds of each side) of every line in
``<out>/results.jsonl``. Needs scikit-learn (``pip install -e ".[bench]"``). Not a test; each
default run takes minutes on a CPU (the adaptive budget trains small sets for several epochs).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

try:
    from benchmarks.adaptive import QUIET, run_job
except ImportError:  # run as `python benchmarks/defaults.py` without the repo on sys.path
    from adaptive import QUIET, run_job

#: keys that change nothing a run learns: no logs, checkpoints or full-size artefact on disk
COSMETIC = [*QUIET, "checkpoint.enabled=false", "save_artefact=none"]


def sets(out: Path) -> dict[str, list[str]]:
    """Each set's data overrides (the only non-cosmetic keys the default run gets)."""
    return {
        "rt_full": [],
        "rt_1000": ["data.max_train_samples=1000"],
        "vitaminc": ["data=vitaminc", "data.max_train_samples=4000",
                     "data.max_eval_samples=500"],
        "rt_imb": ["data=local", "data.path=json", "data.labels=[rotten,fresh]",
                   *[f"data.files.{s}={out / 'rt_imb' / f'{s}.jsonl'}"
                     for s in ("train", "validation", "test")]],
    }


def splits(overrides: list[str]) -> dict:
    """The stage's raw splits as the default run reads them (ftlab's data code)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ftlab.build import StageBuilder
    from ftlab.cli import CONFIG_DIR
    from ftlab.overrides import explicit_keys
    from ftlab.pipeline import build_pipeline

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    stage = build_pipeline(cfg, explicit_keys(overrides))[0]
    raw = StageBuilder().raw(stage)
    return {"raw": raw, "columns": list(stage.data.text_columns)}


def write_imbalanced(folder: Path, ratio: int = 5, fresh_train: int = 1000) -> None:
    """Rotten Tomatoes at 1 rotten : ``ratio`` fresh (train: ``fresh_train`` fresh rows)."""
    if (folder / "test.jsonl").is_file():
        return
    raw = splits([])["raw"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, ds in raw.splits.items():
        rows = [{"text": r["text"], "label": raw.labels[r["label"]]} for r in ds]
        fresh = [r for r in rows if r["label"] == "fresh"]
        rotten = [r for r in rows if r["label"] == "rotten"]
        if split == "train":
            fresh = rng.sample(fresh, fresh_train)
        picked = fresh + rng.sample(rotten, len(fresh) // ratio)
        rng.shuffle(picked)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))


def tfidf_lr(overrides: list[str]) -> dict:
    """TF-IDF (1-2 grams, sublinear tf) + logistic regression on the run's train split, scored
    on its test split; a sentence pair is joined into one text."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    start = time.perf_counter()
    got = splits(overrides)
    raw, cols = got["raw"], got["columns"]

    def texts(ds) -> list[str]:
        return [" ||| ".join(str(r[c] or "") for c in cols) for r in ds]

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vec.fit_transform(texts(raw.splits["train"]))
    clf = LogisticRegression(max_iter=2000).fit(x_train, raw.splits["train"]["label"])
    pred = clf.predict(vec.transform(texts(raw.splits["test"])))
    gold = raw.splits["test"]["label"]
    return {"acc": accuracy_score(gold, pred),
            "f1": f1_score(gold, pred, average="macro", labels=list(range(len(raw.labels)))),
            "seconds": time.perf_counter() - start, "train_rows": len(raw.splits["train"]),
            "test_rows": len(gold)}


def default_run(overrides: list[str], out: Path) -> dict:
    start = time.perf_counter()
    rec = run_job([*COSMETIC, *overrides], out)
    if rec["status"] != "ok":
        raise SystemExit(f"default run failed: {rec.get('error')}")
    final, info = rec["final"], rec["stages"]["classify"]
    return {"acc": final["test/acc"], "f1": final["test/f1"],
            "seconds": time.perf_counter() - start, "steps": info["global_steps"],
            "best_epoch": info["best_epoch"], "budget": info.get("budget"),
            "monitor": rec["monitor"]["metric"]}


def table(lines: list[dict]) -> None:
    print("| set | train rows | test rows | ftlab acc | ftlab F1 | ftlab s (steps) | "
          "TF-IDF+LR acc | TF-IDF+LR F1 | TF-IDF+LR s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in lines:
        f, b = r["ftlab"], r["tfidf_lr"]
        print(f"| {r['set']} (seed {r.get('seed', 1)}) | {b['train_rows']} | "
              f"{b['test_rows']} | {f['acc']:.3f} | "
              f"{f['f1']:.3f} | {f['seconds']:.0f} ({f['steps']}) | {b['acc']:.3f} | "
              f"{b['f1']:.3f} | {b['seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="rt_full,rt_1000,vitaminc,rt_imb")
    parser.add_argument("--out", default="outputs/bench_defaults")
    parser.add_argument("--seeds", default="1", help="seeds of the default run (the config's "
                        "default is 1), e.g. 1,2,3; TF-IDF + LR is deterministic")
    args = parser.parse_args()
    from ftlab.cli import quiet

    quiet()
    out = Path(args.out).resolve()
    catalogue = sets(out)
    for name in args.sets.split(","):
        if name == "rt_imb":
            write_imbalanced(out / "rt_imb")
        baseline = tfidf_lr(catalogue[name])
        for seed in [int(x) for x in args.seeds.split(",")]:
            extra, folder = ([], out / name) if seed == 1 else ([f"seed={seed}"],
                                                                 out / f"{name}_seed{seed}")
            line = {"set": name, "seed": seed, "overrides": catalogue[name] + extra,
                    "tfidf_lr": baseline, "ftlab": default_run(catalogue[name] + extra, folder)}
            print(json.dumps(line), flush=True)
            with (out / "results.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")
    table([json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()])


if __name__ == "__main__":
    main()
