"""Peak memory of ftlab's data path on a large corpus: 1M short texts by default.

Generates ``--rows`` short labelled texts as jsonl in a temp folder, then runs what a stage runs
on them: ``load_raw`` (checks, label encoding), the task's tokenisation into the Arrow cache
(``TextDataModule``), length-grouped batching and ``--steps`` training steps of a tiny BERT.
Prints the peak RSS after each phase and the size of the tokenised Arrow cache. Tokenised data
should stay memory-mapped: peak RSS must not grow with the row count beyond the sampler's
per-row length array (8 bytes a row).

    python benchmarks/memory_1m.py [--rows 1000000] [--steps 20] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

WORDS = ("the film movie plot actors story was is a and this really quite long ending music "
         "scenes director great superb awful boring dull funny moving").split()


def peak_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            text = " ".join(rng.choices(WORDS, k=rng.randint(4, 16)))
            f.write(json.dumps({"text": text, "label": "pos" if i % 2 else "neg"}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-mem-"))
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-cache")  # before importing datasets
    import lightning as L

    from ftlab.cli import quiet
    from ftlab.data.datamodule import TextDataModule
    from ftlab.data.sources import load_raw
    from ftlab.data.spec import DataSpec
    from ftlab.model.backbone import ModelSpec, load_tokenizer
    from ftlab.module import FineTuneModule
    from ftlab.optim import OptimSpec
    from ftlab.regularizers.none import NoRegularizer
    from ftlab.tasks.classify import Classify

    quiet()
    report = {"rows": args.rows}
    try:
        start = time.perf_counter()
        generate(tmp / "train.jsonl", args.rows)
        generate(tmp / "validation.jsonl", 2000, seed=1)
        report |= {"file_mb": round(folder_mb(tmp), 1), "imports_peak_mb": round(peak_mb())}
        spec = DataSpec(path="json", files={"train": str(tmp / "train.jsonl"),
                                            "validation": str(tmp / "validation.jsonl")},
                        labels=["neg", "pos"],
                        splits={"train": "train", "validation": "validation"})
        raw = load_raw(spec)
        report["load_raw_peak_mb"] = round(peak_mb())
        model_spec = ModelSpec(tokenizer="pkg://ftlab/assets/tiny_tokenizer", config={
            "model_type": "bert", "vocab_size": 2000, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64})
        tokenizer = load_tokenizer(model_spec)
        task = Classify(max_length=64)
        task.bind(raw, tokenizer, spec.text_columns)
        dm = TextDataModule(raw.splits, task, tokenizer.pad_token_id, batch_size=32)
        report |= {"tokenise_peak_mb": round(peak_mb()),
                   "arrow_cache_mb": round(folder_mb(tmp / "hf-cache"), 1),
                   "tokenised_in_memory": [ds.cache_files == [] for ds in dm.splits.values()]}
        module = FineTuneModule(task.build_model(model_spec), task, NoRegularizer(), OptimSpec())
        trainer = L.Trainer(max_steps=args.steps, limit_val_batches=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(tmp))
        trainer.fit(module, dm)
        report |= {"train_steps": trainer.global_step, "fit_peak_mb": round(peak_mb()),
                   "rss_now_mb": round(now_mb()), "seconds": round(time.perf_counter() - start)}
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    for key, value in report.items():
        print(f"{key:>22}: {value}")
    print(json.dumps({"benchmark": "memory_1m", **report}))


if __name__ == "__main__":
    main()
