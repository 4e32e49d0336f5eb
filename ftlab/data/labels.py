"""Class labels of raw splits: names in id order (``data.labels``, or inferred from the
training split), rows without a label refused, an int64 ``label`` column written; or, for
regression, a float32 ``label`` column of numbers (``numeric_labels``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Value

from ftlab.data.conll import encode_tags, is_list_feature
from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError

log = logging.getLogger(__name__)


def encode_labels(dsd: DatasetDict, spec: DataSpec) -> tuple[DatasetDict, list[str]]:
    """Map label values to ids in ``spec.labels`` order (inferred from train when unset)."""
    col = spec.label_column
    feature = dsd["train"].features[col]
    if is_list_feature(feature):  # a tag per word (stage=tokens): BIO tags, O first
        return encode_tags(dsd, spec)
    names = feature.names if isinstance(feature, ClassLabel) else None
    as_str = (lambda v: names[v]) if names else str  # noqa: E731
    drop = {str(v) for v in spec.drop_labels}
    if drop:  # by name: a ClassLabel's ids are dropped by their names (drop_labels: [neutral])
        _warn_unmatched(dsd, col, drop, as_str, names is not None)

        def kept(v: Any) -> bool:
            return (as_str(v) if names and isinstance(v, int) and v >= 0 else str(v)) not in drop

        dsd = dsd.filter(lambda b: [kept(v) for v in b[col]], batched=True)
    # a Hugging Face ClassLabel marks a row without a label as -1 (GLUE's test splits)
    no_label = (lambda v: _missing(v) or v < 0) if isinstance(feature, ClassLabel) else _missing
    _refuse_missing(dsd, col, no_label)
    declared = spec.labels
    if isinstance(feature, ClassLabel) and declared is None:
        if not drop:
            return _label_ids(dsd, col, lambda values: values), list(names)
        declared = [n for n in names if n not in drop]  # the dataset's order, less the dropped
    distinct = {split: _distinct(ds, col) for split, ds in dsd.items()}
    if declared is not None:
        labels = [str(x) for x in declared]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise FtlabError(f"data.labels lists {twice} more than once ({labels}): each label "
                             "needs one id.", "list every label once in data.labels.")
    else:
        _refuse_fractions(distinct["train"], col)
        labels = sorted({as_str(v) for v in distinct["train"]})
        _refuse_near_duplicates(sorted({as_str(v) for values in distinct.values()
                                        for v in values}), col)
    if len(labels) < 2:
        dropped = f" after data.drop_labels={sorted(drop)}" if drop else ""
        raise FtlabError(f"Found {len(labels)} label value(s) {labels} in column '{col}'"
                         f"{dropped}; classification needs at least two.",
                         "drop fewer labels in data.drop_labels, or check data.label_column."
                         if drop else "check data.label_column, or data.labels.")
    index = {name: i for i, name in enumerate(labels)}
    unseen = [x for x in labels if x not in {as_str(v) for v in distinct["train"]}]
    if declared is not None and unseen:  # a class the model can only learn to never predict
        log.warning("data.labels lists %s, which no training row has: the model gets %s it "
                    "never sees in training (its F1 counts only if predicted). Remove %s from "
                    "data.labels unless the ids must match another label set.", _some(unseen),
                    "a class" if len(unseen) == 1 else "classes",
                    "it" if len(unseen) == 1 else "them")
    for split, values in distinct.items():
        unknown = sorted({as_str(v) for v in values} - set(index), key=str)
        if unknown:
            raise FtlabError(
                f"The {split} split has {len(unknown)} label value(s) {_some(unknown)} outside "
                f"the label set {_some(labels)}.",
                "add them to data.labels, drop them with data.drop_labels, or fix the data.",
            )
    return _label_ids(dsd, col, lambda values: [index[as_str(v)] for v in values]), labels


def _refuse_missing(dsd: DatasetDict, col: str, missing: Callable[[Any], bool]) -> None:
    """Rows without a label (null, an empty csv cell, NaN: not a class "nan") are refused,
    naming the first; a whole split without labels is named as one to go without."""
    for split, ds in dsd.items():
        if not any(missing(v) for v in _distinct(ds, col)):
            continue
        rows = ds.with_format("arrow")[col].to_pylist()
        first = next(i for i, v in enumerate(rows) if missing(v))
        count = sum(1 for v in rows if missing(v))
        whole = count == len(rows) and split != "train"  # an unlabelled test file
        raise FtlabError(f"The {split} split has {count} row(s) without a label in column "
                         f"'{col}' (null, empty, NaN, or a ClassLabel's -1; the first is row "
                         f"{first + 1}).",
                         f"go without that split (data.splits.{split}=null): unlabelled "
                         "rows cannot be scored; predict on them after training with "
                         "ftlab-predict." if whole else
                         "give every row a label, or remove those rows.")


def _warn_unmatched(dsd: DatasetDict, col: str, drop: set[str], as_str: Callable[[Any], str],
                    class_ids: bool) -> None:
    """A ``data.drop_labels`` entry that no row has (a typo, or ``1`` for a number column's
    ``1.0``) drops nothing: said, with the labels the data has."""
    seen = {as_str(v) for ds in dsd.values() for v in _distinct(ds, col)
            if not _missing(v) and not (class_ids and isinstance(v, int) and v < 0)}
    unmatched = sorted(drop - seen)
    if unmatched:
        log.warning("data.drop_labels lists %s, which no row has in column '%s' (its labels: %s): "
                    "nothing is dropped for %s. Write labels as the data has them (a number "
                    "column's labels read as 1.0, not 1).", _some(unmatched), col,
                    _some(sorted(seen)), "it" if len(unmatched) == 1 else "them")


def _refuse_near_duplicates(labels: list[str], col: str) -> None:
    """Inferred labels that differ only in case, surrounding spaces ("pos" and "pos ", an
    untrimmed csv cell) or Unicode form ("café" composed, or as "e" + a combining accent, as
    macOS writes it) would train as separate classes: refused, naming them."""
    import unicodedata

    seen: dict[str, str] = {}
    for name in labels:
        key = unicodedata.normalize("NFKC", name).strip().casefold()
        if key in seen:
            raise FtlabError(f"Column '{col}' has labels {seen[key]!r} and {name!r}, which differ "
                             "only in case, spaces or Unicode form: they would train as two "
                             "classes.",
                             "clean the label column, or list the classes in data.labels and "
                             "drop the variants with data.drop_labels.")
        seen[key] = name


#: distinct class labels with fractions beyond which a label column is a numeric target
MAX_FRACTION_CLASSES = 20


def _refuse_fractions(distinct: list, col: str) -> None:
    """Class labels (``distinct``: the training split's, each once) that are numbers with
    fractions (an STS-B score: 3.8): many would make each value its own class, so they are
    refused as a numeric target; a few (0.5, 2.0) may be class codes, taken with a warning."""
    fractions = sorted(v for v in distinct if isinstance(v, float) and not v.is_integer())
    if not fractions:
        return
    shown = _some([str(v) for v in fractions])
    if len(distinct) > MAX_FRACTION_CLASSES:
        raise FtlabError(f"The label column '{col}' holds {len(distinct)} distinct numbers, "
                         f"with fractions ({shown}): as class labels each value would be its "
                         "own class.", "use stage=regression for a numeric target, or list "
                         "the classes in data.labels.")
    log.warning("The label column '%s' holds numbers with fractions (%s); they are taken as "
                "%d class labels. For a numeric target use stage=regression.", col, shown,
                len(distinct))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _some(values: list[str], n: int = 10) -> str:
    """At most ``n`` of ``values``, each cut to 40 characters (a label column of free text
    has thousands of long values)."""
    cut = [v if len(v) <= 40 else v[:39] + "…" for v in values[:n]]
    return str(cut) if len(values) <= n else f"{cut} ... ({len(values)} in all)"


def _label_ids(dsd: DatasetDict, col: str, ids: Callable[[list], list[int]]) -> DatasetDict:
    """Write ``ids(values of col)`` as a new int64 ``label`` column.

    Never written over the source column in place: the csv builder fixes a ``label`` column's
    type (string), and ``map`` would cast the ids back to strings ("0", "1"), which fail at the
    first batch. A fresh column takes the ids' own type whatever the file format.
    """
    tmp = "__ftlab_label_id"
    dsd = dsd.map(lambda b: {tmp: ids(b[col])}, batched=True)
    dsd = DatasetDict({split: ds.remove_columns([c for c in ("label",) if c in ds.column_names])
                       for split, ds in dsd.items()})
    return dsd.rename_column(tmp, "label").cast_column("label", Value("int64"))


def _distinct(ds: Dataset, column: str) -> list:
    """The distinct values of a column, computed in Arrow (no Python list of every row)."""
    return pc.unique(ds.with_format("arrow")[column]).to_pylist()


def numeric_labels(dsd: DatasetDict, spec: DataSpec) -> DatasetDict:
    """Regression targets (``stage=regression``): the label column's values as a float32
    ``label`` column, no label set. A row whose label is not a finite number (text, an empty
    cell, NaN, inf, a boolean, a list) is refused, naming the split, file, row and column; a
    numeric string ("3.8", as some jsonl files write numbers) is read as its number. A split
    whose labels are all the same cannot be scored by correlation (GLUE's unlabelled STS-B
    test split is -1 throughout): refused too."""
    col = spec.label_column
    feature = dsd["train"].features[col]
    if isinstance(feature, ClassLabel) or is_list_feature(feature):
        kind = "a tag per word" if is_list_feature(feature) else f"classes {feature.names[:5]}"
        raise FtlabError(f"Label column '{col}' holds {kind}, not numbers: stage=regression "
                         "predicts one number per row.", "use stage=classify (stage=tokens for "
                         "tags) with this data, or point data.label_column at a numeric column.")
    if spec.labels is not None or spec.drop_labels:
        raise FtlabError("data.labels / data.drop_labels name classes, but stage=regression "
                         "reads a number per row (there is no label set).",
                         "remove them (~data.labels data.drop_labels=[]).")
    out = {}
    for split, ds in dsd.items():
        column = ds.with_format("arrow")[col]
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            nums = column.to_numpy(zero_copy_only=False).astype("float64")  # null -> NaN
        else:  # text (a csv column with one non-number), booleans...: row by row
            nums = np.array([_number(v) for v in column.to_pylist()], dtype="float64")
        bad = np.flatnonzero(~np.isfinite(nums))
        where = f" ({spec.files[split]})" if spec.files and split in spec.files else ""
        if len(bad):
            first = int(bad[0])
            value = column[first].as_py()
            whole = len(bad) == len(nums) and split != "train"
            raise FtlabError(
                f"Row {first + 1} of the {split} split{where} has {value!r} in label column "
                f"'{col}', not a finite number ({len(bad)} such row(s) in the split): "
                "stage=regression needs a number in every row.",
                f"go without that split (data.splits.{split}=null): unlabelled rows cannot be "
                "scored; predict on them after training with ftlab-predict." if whole else
                "fix or remove those rows, or point data.label_column at the numeric column.")
        if len(nums) and nums.min() == nums.max():
            raise FtlabError(
                f"Every row of the {split} split{where} has the label {nums[0]:g} in column "
                f"'{col}': " + ("there is nothing to learn." if split == "train" else
                                "correlation with a constant is undefined, so the split cannot "
                                "be scored (an unlabelled test split often holds -1)."),
                "check data.label_column" + ("." if split == "train" else
                                             f", or go without the split "
                                             f"(data.splits.{split}=null)."))
        ds = ds.remove_columns([c for c in ("label",) if c in ds.column_names])
        out[split] = ds.add_column("label", nums.astype("float32").tolist()).cast_column(
            "label", Value("float32"))
    return DatasetDict(out)


def _number(value: Any) -> float:
    """A label as a float (NaN when it is not a number: text, bool, None, a list)."""
    if isinstance(value, bool) or value is None:
        return float("nan")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return float("nan")
    return float("nan")
