"""Load raw splits from the Hub or local files into a checked ``DatasetDict``.

The result has the spec's text columns and, for labelled data, an integer ``label`` column;
``labels`` gives the names in id order (regression: a float ``label`` column, no names).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import DatasetDict, Value

from ftlab.data.columns import check_columns, check_texts
from ftlab.data.conll import load_conll
from ftlab.data.filechecks import refuse_repeated_columns, refuse_repeated_header
from ftlab.data.labels import encode_labels
from ftlab.data.numeric import numeric_labels
from ftlab.data.reading import check_read, failed_read, read_apart
from ftlab.data.spec import DataSpec
from ftlab.data.splits import (
    grouped_split,
    pick_splits,
    refuse_split_mapping_with_one_file,
    refuse_training_file_in_evaluation,
)
from ftlab.data.typecheck import check_column_types
from ftlab.errors import FtlabError, choices_text
from ftlab.resolve import resolve

log = logging.getLogger(__name__)

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
            ".conll": "conll", ".txt": "conll"}  # CoNLL: word<TAB>tag lines (ftlab/data/conll.py)
#: training rows a transform set aside as text without labels (``few_shot``), when there are
#: any: not tokenised for training (``TextDataModule.unlabelled``); distillation/iPET label them
UNLABELLED = "unlabelled"


@dataclass
class RawData:
    splits: DatasetDict
    labels: list[str] | None  # None for unlabelled text and numeric (regression) labels
    #: what each of ``data.transforms`` did (rows added/removed/changed...), in order
    transforms: list[dict[str, Any]] = field(default_factory=list)
    #: rows per label id in the whole training split, before ``max_train_samples`` and the
    #: transforms: ``monitor: auto`` reads these, so every seed of a sweep monitors the same
    #: metric (a seed's subset alone could tip the imbalance rule either way)
    train_counts: list[int] | None = None
    #: the inferred labels are integers whose ids follow their numbers where an older ftlab's
    #: text order gave others (10 after 1, before 2): its checkpoints trained other ids
    renumbered: bool = False


def load_raw(spec: DataSpec, seed: int = 0, numeric: bool = False) -> RawData:
    """Load, split, check and label-encode the data described by ``spec``; ``numeric``: the
    labels are numbers (regression: a float ``label`` column and no label set, ``labels`` None).
    """
    dsd = _load(spec)
    check_column_types(dsd, [*spec.text_columns, *([spec.label_column] if spec.label_column
                                                   else [])], spec.files)
    if spec.files and set(spec.files) == {"all"}:
        refuse_split_mapping_with_one_file(spec.splits)
        dropped = tuple(k for k, v in (spec.splits or {}).items() if v is None)
        dsd = grouped_split(dsd["train"], spec.split_by, spec.split_fractions, dropped)
    else:
        dsd = pick_splits(dsd, spec)
    check_columns(dsd, spec)
    labels, renumbered = None, False
    if spec.label_column is not None and numeric:
        dsd = numeric_labels(dsd, spec)
    elif spec.label_column is not None:
        dsd, labels, renumbered = encode_labels(dsd, spec)
    counts = None
    if labels is not None and "train" in dsd and dsd["train"].features["label"] == Value("int64"):
        ids = dsd["train"].with_format("numpy")["label"]
        counts = [int(n) for n in np.bincount(ids, minlength=len(labels))]
    dsd = _cap(dsd, spec, seed)
    if counts is not None and len(dsd["train"]) < sum(counts):  # a subset without a class
        kept = np.bincount(dsd["train"].with_format("numpy")["label"], minlength=len(labels))
        lost = [name for name, n, k in zip(labels, counts, kept, strict=True) if n and not k]
        if lost:
            log.warning("data.max_train_samples=%d leaves no training row of %s (the split has "
                        "them): the model cannot learn %s. Raise the cap, or draw rows per "
                        "class with data.transforms=[{few_shot: {k: ...}}].",
                        spec.max_train_samples, lost, "it" if len(lost) == 1 else "them")
    check_texts(dsd, spec)
    return RawData(dsd, labels, train_counts=counts, renumbered=renumbered)


def _builder_for(spec: DataSpec, files: dict[str, str]) -> str:
    """The format: ``data.path`` when it names one (csv, json, parquet, conll, text: one row
    per line), else the files' extension."""
    if spec.path in {*BUILDERS.values(), "text"}:  # text: one row per line (a plain corpus)
        return spec.path
    implied = _implied(files)
    if implied is None and spec.path is None and all(BUILDERS.get(_suffix(f))
                                                     for f in files.values()):
        names = ", ".join(f"{split}: {Path(f).name}" for split, f in files.items())
        raise FtlabError(f"The split files are in different formats ({names}); the splits are "
                         "read as one dataset, from one format.",
                         "save every split in one format (e.g. all .jsonl or all .csv).")
    if implied is None:
        raise FtlabError(
            f"Cannot tell the file format of {sorted(files.values())}.",
            f"use files ending in {choices_text(BUILDERS)} (optionally .bz2/.gz), "
            "or set data.path=csv|json|parquet|conll|text.",
        )
    return implied


def _implied(files: dict[str, str]) -> str | None:
    """The one format the files' extensions say, or None."""
    suffixes = {BUILDERS.get(_suffix(f)) for f in files.values()}
    return suffixes.pop() if len(suffixes) == 1 and None not in suffixes else None


def _suffix(path: str) -> str:
    p = Path(path)
    suffixes = [s for s in p.suffixes if s not in (".bz2", ".gz", ".xz", ".zst")]
    return suffixes[-1] if suffixes else ""


def _load(spec: DataSpec) -> DatasetDict:
    if not spec.files:
        if not spec.path:
            raise FtlabError("data.path is not set and data.files is empty: there is no data.",
                             "give files (data=local data.files.train=train.csv ...) or a "
                             "dataset name (data=hf data.path=glue data.name=sst2).")
        try:
            return datasets.load_dataset(spec.path, spec.name, revision=spec.revision)
        except Exception as err:  # the hub raises many types; all mean the same to a user
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(err).lower()
            raise FtlabError(
                f"Could not load the dataset '{spec.path}'"
                f"{f' ({spec.name})' if spec.name else ''}: {type(err).__name__}: {err}",
                "check the name on huggingface.co/datasets"
                + (", and connect to a network (nothing is cached)" if offline else "")
                + ", or use local files: data=local data.files.train=path/to/train.csv",
            ) from None
    # datasets reserves the split name "all": a single file to be split is loaded as "train"
    files = {("train" if s == "all" else s): resolve(str(f)) for s, f in spec.files.items()}
    for split, f in files.items():
        path = Path(f).expanduser()
        if path.is_dir():
            inside = sorted(p.name for p in path.iterdir() if BUILDERS.get(_suffix(p.name)))
            raise FtlabError(
                f"Data file for split '{split}' is a folder, not a file: {path}"
                + (f" (it holds {', '.join(inside[:5])})." if inside else "."),
                f"point data.files.{split} at a csv/tsv/jsonl/parquet file"
                + (f", e.g. {path / inside[0]}." if inside else "."))
        if not path.is_file():
            raise FtlabError(
                f"Data file for split '{split}' not found: {path}"
                + (f" (expected in {path.parent.resolve()})." if path.is_absolute() else "."),
                f"fix the path in data.files.{split} (relative paths are from the directory "
                "you ran ftlab in)"
                + ("" if split == "train" else  # data=local names all three splits by default
                   f", or go without a {split} split: '~data.files.{split}' "
                   f"data.splits.{split}=null (or give one file: data.files={{all: FILE}} is "
                   "split 80/10/10)")
                + "; for the shipped configs that read the shared data folder "
                "(data=vitaminc), put the files there or set FTLAB_DATA (paths.data_dir) to "
                "the folder that holds them.",
            )
        if path.stat().st_size == 0:
            raise FtlabError(f"Data file for split '{split}' is empty: {path}.",
                             "point data.files at a file with a header and rows.")
        files[split] = str(unzip_single(path.resolve()))
    refuse_training_file_in_evaluation(spec, files)
    builder = _builder_for(spec, files)
    if builder == "conll":  # word-level tagged text: tokens and tags list columns
        try:
            return load_conll(files)
        except FtlabError as err:
            if spec.path is None and any(_suffix(f) == ".txt" for f in files.values()):
                raise FtlabError(f"{err.problem} (a .txt file is read as CoNLL: a word and its "
                                 "tag per line).", f"for plain text, one text per line (an "
                                 f"MLM/CLM corpus), set data.path=text; for tagged data: "
                                 f"{err.fix}") from None
            raise
    kwargs: dict[str, Any] = {}
    if builder == "csv":  # pandas reads "NA", "null", "None", "N/A", "nan"... as missing: in
        # a text or label column they are words; only an empty cell is missing
        kwargs = {"keep_default_na": False, "na_values": [""],
                  # a text column is read as written: "007" or "1.50" stay texts, and a
                  # column of numbers in one file and words in another is one text column
                  "converters": {col: str for col in spec.text_columns}}
        if spec.delimiter is not None and len(spec.delimiter) != 1:
            raise FtlabError(f"data.delimiter={spec.delimiter!r} is not one character.",
                             "set data.delimiter to the file's field separator, e.g. "
                             "data.delimiter=';' (null: ',' for .csv, a tab for .tsv).")
        if spec.delimiter is not None:
            kwargs["delimiter"] = spec.delimiter
        elif any(_suffix(f) == ".tsv" for f in files.values()):
            kwargs["delimiter"] = "\t"
        refuse_repeated_header(files, _suffix, kwargs.get("delimiter"))
    if builder == "parquet":
        refuse_repeated_columns(files)
    try:
        dsd = datasets.load_dataset(builder, data_files=files, **kwargs)
    except Exception as err:
        # a format the extension contradicts: that is the error (any file reads as text)
        implied = None if builder == "text" else _implied(files)
        dsd = read_apart(builder, files, kwargs, spec) if implied in (None, builder) else None
        if dsd is None:  # (read_apart: split files whose extra columns differ)
            raise failed_read(err, builder, files, kwargs, spec, implied) from None
    check_read(dsd, files, builder, kwargs.get("delimiter"))
    return dsd


def unzip_single(path: Path) -> Path:
    """A ``.zip`` holding one data file (csv/jsonl/parquet) -> that file, extracted beside the
    archive (``<name>.zip.d/``) once per version of it (its CRC and size, kept beside it: a
    zip replaced by a new one is extracted again); any other path is returned unchanged."""
    if path.suffix != ".zip":
        return path
    import zipfile

    from filelock import FileLock

    with zipfile.ZipFile(path) as zf:
        members = [n for n in zf.namelist() if BUILDERS.get(_suffix(n))]
        if len(members) != 1:
            raise FtlabError(f"{path} holds {len(members)} data files ({members[:5]}); ftlab "
                             "reads a zip holding exactly one csv/tsv/jsonl/parquet file.",
                             "unzip it and point data.files at the file you want.")
        out = path.with_name(path.name + ".d") / members[0]
        info = zf.getinfo(members[0])
        version, mark = f"{info.CRC} {info.file_size}", out.with_name(out.name + ".version")
        with FileLock(str(path) + ".lock"):
            if not out.is_file() or not mark.is_file() or mark.read_text() != version:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(out.name + ".tmp")
                tmp.write_bytes(zf.read(members[0]))
                os.replace(tmp, out)  # atomic: a reader never sees half a file
                mark.write_text(version)
    return out


def _cap(dsd: DatasetDict, spec: DataSpec, seed: int) -> DatasetDict:
    out = dict(dsd)
    if spec.max_train_samples and len(out["train"]) > spec.max_train_samples:
        out["train"] = out["train"].shuffle(seed=seed).select(range(spec.max_train_samples))
    for split in ("validation", "test"):
        if spec.max_eval_samples and split in out and len(out[split]) > spec.max_eval_samples:
            out[split] = out[split].shuffle(seed=0).select(range(spec.max_eval_samples))
    return DatasetDict(out)
