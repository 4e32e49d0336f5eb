"""Class labels of raw splits: names in id order (``data.labels``, or inferred from the
training split: numbers in number order, else text in text order; renamed by
``data.label_names``), rows without a label refused, an int64 ``label`` column written
(regression's numbers: ``ftlab.data.numeric``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Value

from ftlab.data.conll import encode_tags, is_list_feature
from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError

log = logging.getLogger(__name__)


def encode_labels(dsd: DatasetDict, spec: DataSpec) -> tuple[DatasetDict, list[str], bool]:
    """Map label values to ids in ``spec.labels`` order (inferred from train when unset).
    Returns the splits, the label names in id order, and whether inferred labels are in
    number order where text order (ftlab's before, which gave 10 the id after 1) differs."""
    col = spec.label_column
    feature = dsd["train"].features[col]
    if is_list_feature(feature):  # a tag per word (stage=tokens): BIO tags, O first
        if spec.label_names:
            raise FtlabError("data.label_names renames class labels, but the label column "
                             f"'{col}' holds a tag per word (BIO tags: their names say where "
                             "an entity begins).", "remove data.label_names; rename the tags "
                             "in the data.")
        return (*encode_tags(dsd, spec), False)
    dsd, labels = _encode_classes(dsd, spec, feature)
    inferred = spec.labels is None and not isinstance(feature, ClassLabel)
    renumbered = inferred and labels != sorted(labels)
    return dsd, rename_labels(labels, spec.label_names, _dropped(spec)), renumbered


def inferred_order(values: list) -> list[str]:
    """Distinct label values as names in id order: by number where every one is a number (an
    integer or float column) or an integer as text ("-1", "10": a JSON or csv column read as
    text), so label ``i`` of ``0..N`` gets id ``i`` (2 before 10); else in text order."""
    def number(value: Any) -> float | int | None:
        if isinstance(value, bool):  # True/False: names, in text order
            return None
        if isinstance(value, int | float):
            return value
        return int(value) if isinstance(value, str) and INTEGER.fullmatch(value) else None

    names = {str(v): number(v) for v in values}
    if names and all(n is not None for n in names.values()):
        return sorted(names, key=lambda name: (names[name], name))  # "01" and "1": by text
    return sorted(names)


#: a label that is an integer written as text (no spaces: " 3" stays text)
INTEGER = re.compile(r"[+-]?[0-9]+")


def _dropped(spec: DataSpec) -> set[str]:
    """``data.drop_labels`` as the data's labels: an entry that is a ``data.label_names`` name
    (and no label's own value) is that label."""
    named = {str(v): str(k) for k, v in (spec.label_names or {}).items()}
    return {d if d in named.values() else named.get(d, d) for d in map(str, spec.drop_labels)}


def rename_labels(labels: list[str], names: dict[Any, str] | None,
                  dropped: set[str] = frozenset()) -> list[str]:
    """``data.label_names`` applied to ``labels`` (in id order): each label's new name. Every
    label must be named, once, by a key that is one of them (a number column's labels read as
    ``1.0``, not ``1``; a ``dropped`` one may be named too), and no two may get one name."""
    if not names:
        return labels
    given = {str(k): v for k, v in names.items() if str(k) not in dropped}
    unknown, unnamed = [k for k in given if k not in labels], [x for x in labels if x not in given]
    if unknown or unnamed:
        raise FtlabError(
            "data.label_names " + " and ".join(part for part in (
                f"names {_some(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not "
                "among the labels" if unknown else "",
                f"leaves {_some(unnamed)} unnamed" if unnamed else "") if part)
            + f"; the data's labels are {_some(labels)}.",
            "give every label a name, with the label as the data writes it as the key, e.g. "
            f"'data.label_names={{{', '.join(f'{x}: name{i}' for i, x in enumerate(labels[:3]))}"
            f"{', ...' if len(labels) > 3 else ''}}}'.")
    out = [given[x] for x in labels]
    twice = sorted({str(v) for v in out if out.count(v) > 1})
    if twice or not all(isinstance(v, str) and v.strip() for v in out):
        said = f"gives {twice} to more than one label" if twice else "has an empty name"
        raise FtlabError(f"data.label_names {said} ({dict(zip(labels, out, strict=True))}).",
                         "give every label a name of its own.")
    return out


def _encode_classes(dsd: DatasetDict, spec: DataSpec,
                    feature: Any) -> tuple[DatasetDict, list[str]]:
    """Class ids by label value (``spec.labels`` order, or sorted); the labels as named in
    the data."""
    col = spec.label_column
    names = feature.names if isinstance(feature, ClassLabel) else None
    as_str = (lambda v: names[v]) if names else str  # noqa: E731
    drop = _dropped(spec)
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
        labels = inferred_order(distinct["train"])  # (as_str is str: no ClassLabel here)
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
            renamed = declared is not None and not set(index) & {as_str(v) for v in values}
            raise FtlabError(
                f"The {split} split has {len(unknown)} label value(s) {_some(unknown)} outside "
                f"the label set {_some(labels)}.",
                "add them to data.labels, drop them with data.drop_labels, or fix the data"
                + ("; to give the data's labels other names, list the data's labels in "
                   "data.labels (or leave it null) and name them with data.label_names, e.g. "
                   f"'data.label_names={{{unknown[0]}: {labels[0]}, ...}}'." if renamed else "."),
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
