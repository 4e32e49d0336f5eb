"""Reading split files with ``datasets``, past what one combined read allows: split files whose
extra columns differ (read one by one, cut to the columns the run reads), the error for a read
that failed, and the tsv check after a read (``ftlab/data/sources.py`` calls these).
"""

from __future__ import annotations

import re
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict

from ftlab.data.filechecks import refuse_bad_json, refuse_broken_rows
from ftlab.data.spec import DataSpec
from ftlab.data.typecheck import locate_type_error
from ftlab.errors import FtlabError, choices_text, closest


def needed_columns(spec: DataSpec) -> list[str]:
    """The columns of a split file that the run reads: text, label, ``split_by``."""
    return [*spec.text_columns, *([spec.label_column] if spec.label_column else []),
            *([spec.split_by] if spec.split_by else [])]


def read_apart(builder: str, files: dict[str, str], kwargs: dict[str, Any],
               spec: DataSpec) -> DatasetDict | None:
    """The splits read one file at a time when one combined read failed, each cut to the
    columns the run reads (text, label, ``split_by``) plus the other columns every file has
    with one type; None when a file cannot be read alone either, or a needed column's
    type differs (the combined read's error says why). A split without a needed column is an
    error naming the file and the column; one without the label column (a test file) gets
    empty labels, refused later as such."""
    try:
        parts = {s: datasets.load_dataset(builder, data_files={s: f}, **kwargs)[s]
                 for s, f in files.items()}
    except Exception:
        return None
    label, needed = spec.label_column, needed_columns(spec)
    ref_split = "train" if "train" in parts else next(iter(parts))
    ref = parts[ref_split]
    shared = [c for c in ref.column_names if c not in needed and all(
        c in p.column_names and p.features[c] == ref.features[c] for p in parts.values())]
    out = {}
    for split, ds in parts.items():
        if builder == "csv":  # before the columns: shifted fields read as missing ones
            _refuse_index_column(ds, files[split], kwargs.get("delimiter"))
        missing = [c for c in needed if c not in ds.column_names]
        if missing == [label] and split != ref_split and label in ref.column_names:
            ds = ds.add_column(label, [None] * len(ds))  # unlabelled rows: named later
            missing = []
        if missing:
            col = missing[0]
            which = ("data.label_column" if col == label else
                     "data.split_by" if col == spec.split_by else "data.text_columns")
            raise FtlabError(f"{files[split]} (split '{split}') has no column '{col}', which "
                             f"the run reads (it has: {choices_text(ds.column_names)})."
                             f"{closest(col, ds.column_names)}", f"add the column to the file, "
                             f"or set {which} to the name it has in every split's file.")
        for col in needed:  # the same type in every split (train's), else the combined
            if split != ref_split and col in ref.column_names \
                    and ds.features[col] != ref.features[col]:  # read's error names the row
                try:
                    ds = ds.cast_column(col, ref.features[col])
                except Exception:
                    return None
        out[split] = ds.select_columns([*needed, *shared])
    return DatasetDict(out)


def failed_read(err: Exception, builder: str, files: dict[str, str], kwargs: dict[str, Any],
                spec: DataSpec, implied: str | None) -> FtlabError:
    """The ``FtlabError`` for split files that ``datasets`` could not read (``implied``: the
    format their extensions say)."""
    empty = re.search(r'Instruction "(\w+)" corresponds to no data', str(err))
    rowless = empty[1] if empty else _rowless(files, builder)
    if rowless:  # a file with a header and no rows (or only blank lines)
        if rowless == "train" and "all" in (spec.files or {}):
            return FtlabError(f"The one data file {files['train']} (data.files.all) has no "
                              "rows.", "add rows to it (a header row, then one row per line).")
        other = (", or point data.files.train at a file that has them." if rowless == "train"
                 else f", or go without that split (~data.files.{rowless} "
                 f"data.splits.{rowless}=null).")
        return FtlabError(f"The {rowless} split is empty: its file {files[rowless]} has "
                          "no rows.", f"add rows to it{other}")
    if implied not in (None, builder):
        pass  # data.path says one format, the files' extension another: that is the error
    elif builder == "csv" and re.search("Expected|EOF inside", str(err.__cause__ or err)):
        for split in files:  # pandas' "Expected 2 fields in line 3, saw 3" names no file
            refuse_broken_rows(files[split], kwargs.get("delimiter", ","))
    elif builder == "json":  # Arrow's parse error names no file nor line
        for split in files:
            refuse_bad_json(files[split])
    if implied is None or implied == builder:
        return (locate_type_error(files, builder, kwargs, needed_columns(spec))
                or _read_error(err, builder, files))
    return FtlabError(  # data.path says one format, the files' extension another
        f"Could not read the files {sorted(files.values())} as {builder} (data.path="
        f"{spec.path}), but their extension says {implied}.",
        f"set data.path={implied}, or data.path=null to follow the file extension.")


def _rowless(files: dict[str, str], builder: str) -> str | None:
    """The split (train first) whose file has no rows: a csv header alone, a jsonl of blank
    lines, a parquet of no rows. Its columns read as nulls, so the combined read fails on
    their type, which would blame the other files."""
    from ftlab.data.filechecks import has_rows

    for split in sorted(files, key=lambda s: s != "train"):
        if has_rows(files[split], builder) is False:
            return split
    return None


def check_read(dsd: DatasetDict, files: dict[str, str], builder: str,
               delimiter: str | None) -> None:
    """What a read that did not fail may still have got wrong: bytes that are not UTF-8 (Arrow's
    json reader keeps them as text), a csv row with more fields than its header (pandas takes
    the first field as an index column), a tsv quote that swallowed rows."""
    for split, ds in dsd.items():
        path = files.get(split, split)
        try:
            ds.data.table.validate(full=True)
        except pa.ArrowInvalid as err:
            raise FtlabError(f"Data file {path} is not valid UTF-8 ({err}).",
                             "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") \
                from None
        if builder == "csv":
            _refuse_index_column(ds, path, delimiter)
        if delimiter == "\t":
            refuse_swallowed_rows(ds, path)


def refuse_swallowed_rows(ds: datasets.Dataset, path: str) -> None:
    """A tsv field that starts with a double quote (a text opening with a quotation) is read as
    quoted until the next quote, swallowing the tabs and lines between: rows silently merge.
    A tab inside a value is the sign (a tsv value cannot hold its own separator)."""
    table = ds.data.table
    for name in table.column_names:
        column = table.column(name)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            continue
        hits = pc.match_substring(column, "\t").to_numpy(zero_copy_only=False)
        found = np.flatnonzero(hits == True)  # noqa: E712 - nulls are None, not False
        if len(found):
            value = str(column[int(found[0])])
            raise FtlabError(
                f"Row {int(found[0]) + 1} of {path} has a tab inside its '{name}' value "
                f"({value[:60]!r}{'...' if len(value) > 60 else ''}): a double quote at the "
                "start of a field made the reader take the following tabs and lines into it, "
                "merging rows.",
                "remove or double the stray quote (\"\" inside a quoted field), or save the "
                "file as .jsonl.")


def _read_error(err: Exception, builder: str, files: dict[str, str]) -> FtlabError:
    """The ``FtlabError`` for data files that ``datasets`` could not read."""
    cause = err if isinstance(err, UnicodeDecodeError) else (
        err.__cause__ or err.__context__ or err)
    if isinstance(cause, UnicodeDecodeError):
        from ftlab.data.filechecks import not_utf8

        found = not_utf8(files)  # the error itself names no file
        where = (f"Data file {found[0]} is not valid UTF-8 ({found[2]} on line {found[1]})"
                 if found else f"A data file is not valid UTF-8 ({cause.reason} at byte "
                 f"{cause.start}; one of {sorted(files.values())})")
        return FtlabError(f"{where}.",
                          "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).")
    if "Cast" in type(cause).__name__ or "Cast" in type(err).__name__:
        return FtlabError(
            f"The {builder} files {sorted(files.values())} do not share the same columns "
            "and types, so they cannot be read as splits of one dataset.",
            "give every split's file the same columns (names and types); extra columns "
            "may be dropped beforehand.")
    said = (str(cause).strip().splitlines() or [""])[0]  # Arrow appends its schema, line by line
    return FtlabError(f"Could not read {builder} files {sorted(files.values())}: "
                      f"{type(cause).__name__}: {said}",
                      "check the file is well-formed (one JSON object per line for .jsonl, "
                      "a header row for .csv).")


def _refuse_index_column(ds: Dataset, path: str, delimiter: str | None) -> None:
    """pandas took a csv row's extra field as an index column (``__index_level_0__``): name the
    file and row (``refuse_broken_rows``)."""
    if any(c.startswith("__index_level_") for c in ds.column_names):
        refuse_broken_rows(path, delimiter or ",")
