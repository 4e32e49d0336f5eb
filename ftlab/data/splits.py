"""Which rows form each split: named splits with optional slices (``validation[:50%]``), or a
deterministic grouped train/validation/test split of one file (rows sharing a group stay
together; a row's split depends only on its group's hash, not on row order)."""

from __future__ import annotations

import hashlib
import logging
import re

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError, choices_text

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


#: a split name with an optional Hugging Face-style slice: ``validation[:50%]``, ``train[10:]``
SLICE = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<lo>-?\d+%?)?:(?P<hi>-?\d+%?)?\])?$")


def pick_splits(dsd: DatasetDict, spec: DataSpec) -> DatasetDict:
    out = {}
    taken: dict[str, tuple[str, range]] = {}  # our split -> (their split, its rows)
    splits = spec.splits if spec.splits is not None else {s: s for s in SPLITS}
    for ours, theirs in splits.items():
        if theirs is None:
            continue
        match = SLICE.match(str(theirs))
        if match is None:
            raise FtlabError(f"data.splits.{ours}='{theirs}' is not a split name or a slice "
                             "of one.", f"e.g. data.splits.{ours}=validation or "
                             f"data.splits.{ours}='validation[50%:]'.")
        name = match["name"]
        if name not in dsd:
            raise FtlabError(
                f"The dataset has no split '{name}' (for {ours}); it has: "
                f"{choices_text(dsd.keys())}.",
                f"set data.splits.{ours}=<one of those>, or data.splits.{ours}=null to go "
                "without it.",
            )
        rows = _rows(len(dsd[name]), match["lo"], match["hi"])
        taken[ours] = (name, rows)
        out[ours] = dsd[name] if rows == range(len(dsd[name])) else dsd[name].select(rows)
    _refuse_training_rows_in_evaluation(taken, splits)
    if "train" not in out:
        raise FtlabError("The data has no training split.", "set data.splits.train or "
                         "data.files.train.")
    return DatasetDict(out)


def refuse_training_file_in_evaluation(spec: DataSpec, files: dict[str, str]) -> None:
    """The training file given again as a validation or test file (``files``: resolved paths
    by the dataset's split names): the model would be scored on the rows it trained on."""
    splits = spec.splits if spec.splits is not None else {s: s for s in SPLITS}
    used = {ours: match["name"] for ours, theirs in splits.items() if theirs is not None
            and (match := SLICE.match(str(theirs))) is not None}
    train = files.get(used.get("train", ""))
    for ours in ("validation", "test"):
        name = used.get(ours)
        if train is None or name in (None, used["train"]) or files.get(name) != train:
            continue  # a slice of the training split is checked by pick_splits
        raise FtlabError(
            f"data.files.{name} is the training file ({train}): the model would be scored on "
            "the rows it trained on.", f"give the {ours} split its own file, or give one file "
            "to split 80/10/10: data.files={all: FILE}.")
    val, test = used.get("validation"), used.get("test")
    if val is not None and test not in (None, val) and files.get(val) is not None \
            and files.get(val) == files.get(test):
        log.warning("data.files.%s and data.files.%s are one file (%s): the best epoch is chosen "
                    "on the rows the test then scores, so test scores are optimistic. Give the "
                    "test split its own file (or data.splits.test=null).", val, test,
                    files.get(val))


def _rows(n: int, lo: str | None, hi: str | None) -> range:
    """Positions ``[lo:hi]`` of ``n`` rows; a bound ending in % is a share of the rows."""
    def bound(b: str | None) -> int | None:
        if b is None:
            return None
        return round(n * int(b[:-1]) / 100) if b.endswith("%") else int(b)

    return range(n)[bound(lo):bound(hi)]


def _refuse_training_rows_in_evaluation(taken: dict[str, tuple[str, range]],
                                        splits: dict[str, str | None]) -> None:
    """A validation or test split carved from the training split's rows must not share rows
    with training (``train: train`` beside ``validation: 'train[90%:]'``): it would score the
    model on what it trained on."""
    if "train" not in taken:
        return
    source, train = taken["train"]
    for ours in ("validation", "test"):
        name, rows = taken.get(ours, (None, range(0)))
        shared = len(range(max(train.start, rows.start), min(train.stop, rows.stop)))
        if name == source and shared:
            raise FtlabError(
                f"data.splits.{ours}='{splits[ours]}' shares {shared} row(s) with "
                f"data.splits.train='{splits['train']}': the model would be scored on rows it "
                "trained on.", f"carve them apart, e.g. data.splits.train='{source}[:90%]' "
                f"data.splits.{ours}='{source}[90%:]'.")


def refuse_split_mapping_with_one_file(splits: dict[str, str | None] | None) -> None:
    """With one file to split (``data.files.all``) the splits come from ``split_fractions``:
    a ``data.splits`` entry other than ``<name>: <name>`` or null (a slice, another name) was
    ignored without a word ('train[:100]' trained on every training row)."""
    odd = {k: v for k, v in (splits or {}).items() if v is not None and (
        k not in SPLITS or v != k)}
    if odd:
        ours, theirs = next(iter(odd.items()))
        raise FtlabError(
            f"data.splits.{ours}='{theirs}' cannot apply with one data file (data.files.all): "
            "it is split into train, validation and test by data.split_fractions, and each "
            "split takes its own share.", "leave data.splits as {train: train, validation: "
            "validation, test: test} (null goes without one); for fewer training rows use "
            "data.max_train_samples, for other shares data.split_fractions.")


def grouped_split(ds: Dataset, group_column: str | None, fractions: list[float],
                  drop: tuple[str, ...] = ()) -> DatasetDict:
    """Deterministic train/validation/test split; rows sharing ``group_column`` stay together.
    A split with a share of 0, or named in ``drop`` (``data.splits.<name>=null``), is left out;
    one that gets no rows stops with the fix."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise FtlabError(f"data.split_fractions must be three numbers summing to 1, "
                         f"got {list(fractions)}.", "e.g. data.split_fractions=[0.8,0.1,0.1].")
    if fractions[0] == 0 or "train" in drop:
        raise FtlabError("One data file (data.files={all: ...}) is split, but the train split "
                         "gets no share of it.", "give train a share, e.g. "
                         "data.split_fractions=[0.8,0.1,0.1].")
    if group_column is not None and group_column not in ds.column_names:
        raise FtlabError(f"data.split_by column '{group_column}' is not in the data; columns "
                         f"found: {choices_text(ds.column_names)}.", "set data.split_by to one "
                         "of those, or null to split row by row.")
    if group_column:  # hash each distinct value once (Arrow), not one Python object per row
        column = ds.with_format("arrow")[group_column]
        encoded = pc.dictionary_encode(column).combine_chunks()
        if encoded.indices.null_count:  # a row with no group cannot be kept with its group
            first = pc.index(pc.is_null(encoded.indices), True).as_py()
            raise FtlabError(f"data.split_by column '{group_column}' is empty (null) in "
                             f"{encoded.indices.null_count} row(s); the first is row {first + 1}.",
                             f"give every row a '{group_column}' value, or set "
                             "data.split_by=null to split row by row.")
        values = encoded.dictionary.to_pylist()
        codes = encoded.indices.to_numpy(zero_copy_only=False)
    else:
        values, codes = range(len(ds)), None
    u = np.fromiter((_unit(v) for v in values), dtype=np.float64, count=len(values))
    u = u[codes] if codes is not None else u
    split_of = np.searchsorted([fractions[0], fractions[0] + fractions[1]], u, side="right")
    out = {}
    for i, split in enumerate(SPLITS):
        rows = np.flatnonzero(split_of == i)
        if fractions[i] == 0 or split in drop:
            continue
        if not len(rows):
            unit = f"{len(values)} '{group_column}' groups" if group_column else f"{len(ds)} rows"
            raise FtlabError(f"Splitting the {unit} of one data file by data.split_fractions="
                             f"{list(fractions)} leaves the {split} split empty.",
                             f"add rows, give {split} a larger share, or a share of 0 to go "
                             f"without it (e.g. data.split_fractions=[0.9,0.1,0.0]).")
        out[split] = ds.select(rows)
    return DatasetDict(out)


def _unit(key: object) -> float:
    """A stable number in [0, 1) for ``key`` (its split does not depend on row order)."""
    digest = hashlib.md5(str(key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
