"""Type errors in data files, named by file, column and row.

``datasets`` reports a value of the wrong type as an Arrow error about a whole dataset ("do not
share the same columns and types", "changed from number to string"). These helpers run only
once a read has failed (or a text column turned out not to hold text) and find where: which
file, which column, which row (rows count from 1, the header not included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Value

from ftlab.data.filechecks import opener
from ftlab.errors import FtlabError, with_article

#: JSON value kinds; int and float are both "number"
KIND = {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
        dict: "object", type(None): "null"}


def _kind(value: Any) -> str:
    return KIND.get(type(value), type(value).__name__)


def _jsonl_change(path: Path) -> tuple[str, int, str, str, Any] | None:
    """(column, row, first kind, new kind, value) of the first row whose value for a column
    changes kind (nulls ignored) in a JSON-lines file, or None."""
    try:
        return _first_change(path)
    except (OSError, UnicodeDecodeError, EOFError, ValueError):  # unreadable: the reader's
        return None  # own message says why


def _first_change(path: Path) -> tuple[str, int, str, str, Any] | None:
    seen: dict[str, str] = {}
    with opener(path)(path, "rt", encoding="utf-8") as f:
        row = 0
        for line in f:
            if not line.strip():
                continue
            row += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return None  # malformed JSON: the reader's own message says so
            for col, value in obj.items() if isinstance(obj, dict) else ():
                kind = _kind(value)
                if kind == "null":
                    continue
                first = seen.setdefault(col, kind)
                if kind != first:
                    return col, row, first, kind, value
    return None


def _frame(path: str, builder: str, kwargs: dict[str, Any]) -> Any:
    """The file as a pandas frame (each file alone), or None if it cannot be read."""
    import pandas as pd

    try:
        if builder == "csv":
            return pd.read_csv(path, sep=kwargs.get("delimiter", ","), dtype=None,
                               keep_default_na=kwargs.get("keep_default_na", True),
                               na_values=kwargs.get("na_values"),
                               converters=kwargs.get("converters"))
        if builder == "json":
            return pd.read_json(path, lines=True)
        return pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - no better message than the reader's
        return None


def _series_kind(series: Any) -> str:
    """A column's kind: number/boolean from its dtype, else the kind of its first value."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(series.dtype):
        return "boolean"
    if pd.api.types.is_numeric_dtype(series.dtype):
        return "number"
    first = next((v for v in _values(series) if v is not None and v == v), None)
    return _kind(first)


def _values(series: Any) -> list[Any]:
    """A column's values as plain Python: pandas gives a parquet list cell as a numpy array
    (whose ``==`` is element-wise), here a list."""
    return [v.tolist() if hasattr(v, "tolist") and not isinstance(v, str | bytes) else v
            for v in series.tolist()]


def _first_unlike(values: list[Any], kind: str) -> tuple[int, Any] | None:
    """(row, value) of the first value that is not of ``kind`` (a text that reads as a number
    counts as a number: csv files hold text)."""
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and value != value):
            continue
        got = _kind(value)
        if got == kind:
            continue
        if kind == "number" and got == "string":
            try:
                float(value)
                continue
            except ValueError:
                pass
        return i + 1, value
    return None


def locate_type_error(files: dict[str, str], builder: str, kwargs: dict[str, Any],
                      columns: list[str] | None = None) -> FtlabError | None:
    """An ``FtlabError`` naming the file, column and row whose type breaks the read, or None
    when it cannot be found; ``columns``: compare only these across files (the run reads
    only these: other columns may differ)."""
    if builder == "json":
        for split, f in files.items():
            change = _jsonl_change(Path(f))
            if change:
                return _changes_type(f, change, split)
    frames = {split: _frame(f, builder, kwargs) for split, f in files.items()}
    if not frames or any(df is None for df in frames.values()):
        return None
    ref_split = "train" if "train" in frames else next(iter(frames))
    if columns is not None:
        frames = {k: df[[c for c in df.columns if c in columns]] for k, df in frames.items()}
    ref = frames[ref_split]
    for split, df in frames.items():
        extra, missing = (sorted(map(str, set(a.columns) - set(b.columns)))
                          for a, b in ((df, ref), (ref, df)))
        if extra or missing:
            return FtlabError(
                f"{files[split]} (split '{split}') has other columns than {files[ref_split]} "
                f"(split '{ref_split}'): " + "; ".join(
                    f"{what} {cols}" for what, cols in (("it also has", extra),
                                                        ("it lacks", missing)) if cols)
                + ", so the splits cannot be read as one dataset.",
                "give every split's file the same columns: drop the extra ones or add the "
                "missing ones (only data.text_columns and data.label_column are read).")
    for col in ref.columns:
        kinds = {split: _series_kind(df[col]) for split, df in frames.items()
                 if col in df.columns}
        # the kind most files hold is the rule, the file that differs the odd one (a tie: the
        # reference file's): a nested training file beside flat validation/test files is
        # the one to fix
        held = [*kinds.values()]
        want = max(dict.fromkeys([kinds[ref_split], *held]), key=held.count)
        for split, got in kinds.items():
            if got == want:
                continue
            bad = _first_unlike(_values(frames[split][col]), want)
            odd_split, kind = split, want
            if bad is None:  # a file of the rule's kind holds the odd value
                holder = next(s for s, k in kinds.items() if k == want)
                bad = _first_unlike(_values(frames[holder][col]), got)
                odd_split, kind = holder, got
            if bad is None:
                continue
            row, value = bad
            odd = files[odd_split]
            return FtlabError(
                f"Column '{col}' holds {kind}s in the other files, but {odd} (split "
                f"'{odd_split}') has {_show(value)} at row {row}, so the splits cannot be read "
                "as one dataset.", f"give column '{col}' one type in every file (fix row {row} "
                f"of {Path(odd).name}" + (")." if builder == "csv" else  # csv: no quoting
                                          ", or make every value of the column a text)."))
    return None


def _changes_type(path: str, change: tuple[str, int, str, str, Any],
                  split: str | None = None) -> FtlabError:
    """A jsonl column whose type changes at a row: the file, the column, the row."""
    col, row, first, kind, value = change
    return FtlabError(
        f"Column '{col}' in {path}{f' (split {split!r})' if split else ''} changes type at row "
        f"{row}: {kind} {_show(value)} where the rows above hold {first}s.",
        f"give column '{col}' one type in every row (fix row {row} of {Path(path).name}"
        f"{', e.g. join a list into one text' if kind == 'list' else ''}).")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _single(feature: Any) -> bool:
    """A feature of one plain value per row: a ``Value`` other than JSON, or a Hugging Face
    ``ClassLabel`` (a Hub dataset's class or tag ids)."""
    return isinstance(feature, ClassLabel) or (isinstance(feature, Value)
                                               and feature.dtype != "json")


def check_column_types(dsd: Any, columns: list[str], files: dict[str, str] | None) -> None:
    """Text and label columns hold single values (text, numbers, booleans) or, in every row,
    a list of them (word-tagged data: words and their tags), not objects or a mix of types:
    name the file, the column and the first bad row."""
    for split, ds in dsd.items():
        where = (files or {}).get(split) or (files or {}).get("all") or ""
        for col in columns:
            feature = ds.features.get(col)
            if feature is None or _single(feature):
                continue
            inner = getattr(feature, "feature", None)  # a list of plain values in every row:
            if _single(inner):  # words/tags (stage=tokens)
                continue
            change = _jsonl_change(Path(where)) if where.endswith((".jsonl", ".json")) \
                and Path(where).is_file() else None
            if change and change[0] == col:
                raise _changes_type(where, change)
            values = ds[col]
            if all(isinstance(v, list) for v in values if v is not None):  # word/tag lists
                row = next((i + 1 for i, v in enumerate(values) if v is not None and not all(
                    isinstance(x, str) for x in v)), 1)
                odd = next((x for x in values[row - 1] or [] if not isinstance(x, str)), None)
                raise FtlabError(
                    f"Column '{col}' in {where or f'the {split} split'} holds lists of mixed "
                    f"items: row {row} ({_show(values[row - 1])}) has {_show(odd)} among its "
                    "texts.", f"make every item of the '{col}' lists a text (write numbers as "
                    "\"5\", no nulls), or fix row " + f"{row}.")
            row = next((i + 1 for i, v in enumerate(values) if isinstance(v, list | dict)), 1)
            kind = _kind(values[row - 1])
            by_column = len(values) == 1 and kind == "object"  # {"text": {"0": ..., "1": ...}}
            raise FtlabError(
                f"Column '{col}' in {where or f'the {split} split'} holds "
                f"{with_article(kind)} at row {row} ({_show(values[row - 1])}), not a single "
                "text, number or boolean" + (": the file holds its rows by column (pandas' "
                                            "DataFrame.to_json default)." if by_column else "."),
                "write one JSON object per row: df.to_json(path, orient='records', lines=True)."
                if by_column else f"give each row of '{col}' one value (join lists into one "
                "text), or point data.text_columns / data.label_column at the right column.")
