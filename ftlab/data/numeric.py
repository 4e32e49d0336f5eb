"""Regression targets of raw splits: the label column's values as a float32 ``label`` column,
no label set (class labels: ``ftlab.data.labels``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, DatasetDict, Value

from ftlab.data.conll import is_list_feature
from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError


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
    if spec.labels is not None or spec.drop_labels or spec.label_names:
        raise FtlabError("data.labels / data.drop_labels / data.label_names name classes, but "
                         "stage=regression reads a number per row (there is no label set).",
                         "remove them (~data.labels data.drop_labels=[] ~data.label_names).")
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
