"""Checks of the columns a run reads, once the splits are loaded: the text and label columns
are there, distinct, and hold text (``ftlab/data/sources.py`` calls these)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc
from datasets import DatasetDict

from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError, choices_text, separator_hint

log = logging.getLogger(__name__)


def check_columns(dsd: DatasetDict, spec: DataSpec) -> None:
    wanted = list(spec.text_columns) + ([spec.label_column] if spec.label_column else [])
    if not 1 <= len(spec.text_columns) <= 2:
        raise FtlabError(f"data.text_columns must name one or two columns, got "
                         f"{list(spec.text_columns)}.", "e.g. data.text_columns=[text] or "
                         "data.text_columns=[premise,hypothesis].")
    if len(set(spec.text_columns)) < len(spec.text_columns):  # a pair of one text twice
        raise FtlabError(f"data.text_columns names '{spec.text_columns[0]}' twice.",
                         "name it once, or the two columns of a sentence pair.")
    if spec.label_column in spec.text_columns:  # the model would read the answer
        raise FtlabError(f"data.text_columns {list(spec.text_columns)} includes the label "
                         f"column '{spec.label_column}': the model would read its label.",
                         "set data.text_columns to the column(s) that hold the text, or "
                         "data.label_column to the one that holds the labels.")
    if spec.label_column not in (None, "label") and "label" in spec.text_columns:
        raise FtlabError(  # the class ids are written as 'label': the model would read them
            f"data.text_columns names a column 'label', but the labels are in "
            f"'{spec.label_column}': ftlab writes the class ids into a column 'label', so the "
            "model would read its label ids as the text.",
            "rename the text column in the file (e.g. to text), or set data.label_column=label "
            "if that column holds the labels.")
    for split, ds in dsd.items():
        missing = [c for c in wanted if c not in ds.column_names]
        if missing:
            which = ("data.label_column" if missing == [spec.label_column] else
                     "data.text_columns" if spec.label_column not in missing else
                     "data.text_columns and data.label_column")
            hint = separator_hint(ds.column_names, wanted, "set data.delimiter")
            fix = (f"set {which} to the right column name(s)" + (
                " or data.delimiter to the file's separator." if hint else "."))
            spaced = [repr(c) for c in ds.column_names if c != c.strip() and c.strip() in missing]
            if spaced:  # "text, label": the names read are ' label'
                hint = f" The header names {', '.join(spaced)}, with spaces around the name."
                fix = ("remove the spaces around the names in the file's header "
                       "(text,label), or name the columns with their spaces.")
            if {"tokens", "tags"} <= set(ds.column_names):  # CoNLL files load as these
                fix = ("for word/tag rows (CoNLL files, stage=tokens) set "
                       "data.text_columns=[tokens] data.label_column=tags.")
            raise FtlabError(
                f"Column(s) {missing} not found in the {split} split; columns found: "
                f"{choices_text(ds.column_names)}.{hint}", fix)


def check_texts(dsd: DatasetDict, spec: DataSpec) -> None:
    for split, ds in dsd.items():
        if len(ds) == 0:
            raise FtlabError(f"The {split} split is empty.", "check data.files / data.splits, "
                             "data.drop_labels and data.split_fractions.")
        head = ds.select(range(min(len(ds), 1000)))
        for column in spec.text_columns:  # both of a pair: an empty second text is no pair
            if all(t is None or not str(t).strip() for t in head[column]):
                raise FtlabError(f"All texts in column '{column}' of the {split} split are "
                                 "empty.", "set data.text_columns to the column(s) that hold "
                                 "the text.")
            values = ds.with_format("arrow")[column]  # labelled rows only: unlabelled text
            if spec.label_column is not None and (  # (MLM, CLM) just skips an empty one
                    pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                empty = pc.sum(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""),
                                            True)).as_py() or 0
                if empty:  # a row without text: the task reads "", silently
                    log.warning("%d of %d rows of the %s split have no text in column '%s' "
                                "(null, empty or spaces): they are read as empty texts. Remove "
                                "them from the file if they are not meant as such.", empty,
                                len(ds), split, column)
