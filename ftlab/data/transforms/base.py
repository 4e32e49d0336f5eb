"""What a data transform is, and how a stage applies its list of them.

A transform changes the TRAINING rows only, after the train/validation/test split (so a copy of
a training row can never land in validation or test). It sees the training split (and, read
only, the validation split and the label set), and returns the new training split, plus
optionally rows set aside as unlabelled text and the validation rows to keep (a subset: a
transform can drop validation rows, never add or change them). Test rows are never shown to it.

``apply_transforms`` runs a stage's list in order, logs and records what each did
(``RawData.transforms``, which the stage writes into ``metrics.json`` and its card). Rows set
aside become the ``unlabelled`` split (``sources.UNLABELLED``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from datasets import Dataset, concatenate_datasets

from ftlab.data.sources import UNLABELLED
from ftlab.errors import FtlabError

log = logging.getLogger(__name__)

#: the integer label column every labelled split has after loading (``sources.load_raw``)
LABEL = "label"
#: how a row rewrite enters the training split (``rowwise``)
MODES = ("add", "replace")


@dataclass(frozen=True)
class Rows:
    """What a transform is given.

    Attributes:
        train: the training split (text columns, ``label`` ids when labelled, other columns).
        validation: the validation split, to read (e.g. to subsample it); None when absent.
        text_columns: the task's text columns (one, or two for sentence pairs).
        labels: the label names in id order; None for unlabelled data.
        seed: the stage's seed: a random transform draws from it, so a run is reproducible.
    """

    train: Dataset
    validation: Dataset | None
    text_columns: tuple[str, ...]
    labels: list[str] | None
    seed: int


@dataclass
class Applied:
    """What a transform returns.

    Attributes:
        train: the new training split (same columns and types as the one given).
        changed: training rows whose text was rewritten in place (``mode: replace``).
        unlabelled: rows set aside as unlabelled text (no ``label`` column), if any.
        keep_validation: positions of the validation rows to keep; None keeps them all.
        info: anything else worth recording (``k``, ``validation: k_shot``...).
    """

    train: Dataset
    changed: int = 0
    unlabelled: Dataset | None = None
    keep_validation: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Transform(Protocol):
    """A data transform: a ``_target_`` node under ``data.transforms`` (``conf/transform/``)."""

    def __call__(self, rows: Rows) -> Applied:
        """The training rows after this transform."""


@dataclass
class Transformed:
    """The splits after every transform, and the record of what each did."""

    splits: dict[str, Dataset]
    unlabelled: Dataset | None
    report: list[dict[str, Any]]


def apply_transforms(transforms: list[tuple[str, Transform]], splits: dict[str, Dataset],
                     text_columns: list[str], labels: list[str] | None, seed: int,
                     where: str = "data.transforms") -> Transformed:
    """Apply ``(name, transform)`` pairs in order to ``splits['train']``.

    Validation rows may only be dropped (``keep_validation``); test rows are never touched.
    """
    out = {k: v for k, v in splits.items() if k != UNLABELLED}
    unlabelled: list[Dataset] = [splits[UNLABELLED]] if UNLABELLED in splits else []
    report = []
    for i, (name, transform) in enumerate(transforms):
        before = out["train"]
        rows = Rows(before, out.get("validation"), tuple(text_columns), labels, seed)
        applied = transform(rows)
        if not isinstance(applied, Applied):
            raise FtlabError(f"{where}[{i}] ({name}) returned {type(applied).__name__}, not "
                             "an Applied.", "return ftlab.data.transforms.base.Applied(...).")
        _check_same_columns(before, applied.train, f"{where}[{i}] ({name})")
        out["train"] = applied.train
        entry: dict[str, Any] = {
            "transform": name, "train_rows_before": len(before),
            "train_rows_after": len(applied.train),
            "added": max(0, len(applied.train) - len(before)),
            "removed": max(0, len(before) - len(applied.train)), "changed": applied.changed}
        if applied.keep_validation is not None and "validation" in out:
            keep = applied.keep_validation
            if len(set(keep)) != len(keep) or not all(0 <= j < len(out["validation"])
                                                      for j in keep):
                raise FtlabError(f"{where}[{i}] ({name}) kept validation rows {keep[:10]}... "
                                 "that are not distinct positions of the validation split.",
                                 "a transform may drop validation rows, never repeat them.")
            entry["validation_rows_before"] = len(out["validation"])
            out["validation"] = out["validation"].select(applied.keep_validation)
            entry["validation_rows_after"] = len(out["validation"])
        if applied.unlabelled is not None:
            unlabelled.append(applied.unlabelled)
            entry["unlabelled_rows"] = len(applied.unlabelled)
        entry |= applied.info
        log.info("Data transform %s: %d -> %d training rows (%d added, %d removed, %d changed)%s",
                 name, entry["train_rows_before"], entry["train_rows_after"], entry["added"],
                 entry["removed"], entry["changed"],
                 "".join(f", {k}={v}" for k, v in applied.info.items()))
        report.append(entry)
    if len(out["train"]) == 0:
        raise FtlabError(f"{where} left no training rows.", "check the transforms' settings.")
    pool = concatenate_datasets(unlabelled) if len(unlabelled) > 1 else (
        unlabelled[0] if unlabelled else None)
    return Transformed(out, pool, report)


def _check_same_columns(before: Dataset, after: Dataset, where: str) -> None:
    if after.column_names != before.column_names:
        raise FtlabError(f"{where} changed the training columns from {before.column_names} to "
                         f"{after.column_names}.", "a transform must keep the columns as they "
                         "are (it may rewrite their values).")


def rowwise(train: Dataset, rewrite: Callable[[dict[str, Any]], dict[str, Any] | None],
            mode: str) -> Applied:
    """Apply a row rewrite to every training row: ``rewrite(row)`` returns the new values of
    the columns it changed, or None when the row stays as it is.

    ``mode``: ``add`` appends a rewritten copy of each row that changed (the originals stay:
    counterfactual augmentation adds copies of the rows that have something to swap, never
    exact duplicates); ``replace`` rewrites those rows in place.
    """
    if mode not in MODES:
        raise FtlabError(f"mode '{mode}' is not a transform mode.",
                         f"use one of: {', '.join(MODES)}.")
    flag = "__ftlab_changed"

    def batch(b: dict[str, list]) -> dict[str, list]:
        n = len(next(iter(b.values())))
        out = {k: list(v) for k, v in b.items()}
        out[flag] = [False] * n
        for i in range(n):
            new = rewrite({k: v[i] for k, v in b.items()})
            if new:
                for k, v in new.items():
                    out[k][i] = v
                out[flag][i] = True
        return out

    mapped = train.map(batch, batched=True, features=None, desc="Transforming")
    changed = mapped.with_format("arrow")[flag].to_pylist().count(True)
    if mode == "replace":
        return Applied(mapped.remove_columns(flag).cast(train.features), changed=changed)
    copies = mapped.filter(lambda b: b[flag], batched=True).remove_columns(flag)
    return Applied(concatenate_datasets([train, copies.cast(train.features)]))

