"""Checks of data files as files, before or after a read fails: does a file hold a row, where
is its first byte that is not UTF-8, does a header name a column twice. Each reads the file
alone (compressed ones too), so its message can name the file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError

#: where the next JSON value (or stray text) starts
_NON_SPACE = re.compile(r"\S")


def opener(path: Path) -> Any:
    """``open``, or the decompressor's for a .gz/.bz2/.xz file."""
    import bz2
    import gzip
    import lzma

    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix, open)


def has_rows(path: str, builder: str) -> bool | None:
    """Whether a data file holds a row (a csv line after the header, a non-blank jsonl line, a
    parquet row); None when it cannot be read (the reader's own message says why)."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows > 0
        with opener(Path(path))(path, "rt", encoding="utf-8-sig") as f:
            lines = (line for line in f if line.strip())
            if builder == "csv":
                next(lines, None)  # the header
            return next(lines, None) is not None
    except Exception:  # noqa: BLE001 - unreadable: the reader's own message says why
        return None


def not_utf8(files: dict[str, str]) -> tuple[str, int, str] | None:
    """(file, line, reason) of the first byte among ``files`` that is not UTF-8, or None."""
    import codecs

    for path in files.values():
        decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
        try:
            with opener(Path(path))(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as err:
                        return path, line + chunk[:max(err.start, 0)].count(b"\n"), err.reason
                    line += chunk.count(b"\n")
        except (OSError, EOFError):
            continue
    return None


def refuse_repeated_header(files: dict[str, str], suffix: Any,
                           delimiter: str | None = None) -> None:
    """A csv/tsv header that names a column twice: pandas renames the second (``text.1``)
    and a run would read the first silently; name the file and the column."""
    import csv

    for path in files.values():
        try:
            with opener(Path(path))(path, "rt", encoding="utf-8-sig", newline="") as f:
                sep = delimiter or ("\t" if suffix(path) == ".tsv" else ",")
                header = next(csv.reader(f, delimiter=sep), [])
        except (OSError, UnicodeDecodeError, EOFError, csv.Error):
            continue  # unreadable: the reader's own message says why
        twice = sorted({c for c in header if c and header.count(c) > 1})
        if twice:
            raise FtlabError(f"The header of {path} names the column(s) {twice} more than once.",
                             "give every column its own name (the reader would rename the "
                             f"second to '{twice[0]}.1').")


def refuse_repeated_columns(files: dict[str, str]) -> None:
    """A parquet file whose schema names a column twice (pyarrow writes such files; Arrow's
    reader then fails with "Multiple matches for FieldRef"): name the file and the column."""
    import pyarrow.parquet as pq

    for path in files.values():
        try:
            names = pq.read_schema(path).names
        except Exception:  # noqa: BLE001 - unreadable: the reader's own message says why
            continue
        twice = sorted({c for c in names if names.count(c) > 1})
        if twice:
            raise FtlabError(f"The parquet file {path} names the column(s) {twice} more than "
                             "once.", "give every column its own name (e.g. rename with "
                             "pyarrow's Table.rename_columns) and save the file again.")


def refuse_broken_rows(path: str, delimiter: str) -> None:
    """A csv/tsv row with more fields than its header: a separator inside an unquoted text
    (``good, not great``); pandas takes a first row's extra field as an index (the text read is
    the part after the separator, silently) and refuses a later one without naming the file.
    Or a quote that opens a field and never closes (the reader fails at the end of the file).
    Either: the file and the row named."""
    import csv

    n, row, header = 0, None, []
    try:
        with opener(Path(path))(path, "rt", encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            header = next(reader, [])
            for n, row in enumerate(reader, 1):  # noqa: B007 - n, row: where it stopped
                if len(row) > len(header):
                    break
            else:
                row = None
    except csv.Error as err:
        if "end of data" not in str(err) and "EOF" not in str(err):
            return  # strict mode's other complaints ("," after a quote) pandas reads
        raise FtlabError(f"Row {n + 1} of {path} opens a quoted field (a double quote) that "
                         "never closes: the reader takes the rest of the file into it.",
                         "remove the stray quote, or double it (\"\") inside a quoted field."
                         ) from None
    except (OSError, UnicodeDecodeError, EOFError):
        return  # unreadable: the reader's own message says why
    if len(header) == 1 and any(sep in header[0] for sep in ";|\t,"):
        return  # another separator: the missing columns' message names it
    if row is not None:
        shown = delimiter.join(row)
        raise FtlabError(
            f"Row {n} of {path} has {len(row)} fields, but its header has {len(header)} "
            f"({shown[:60]!r}{'...' if len(shown) > 60 else ''}): a separator inside an "
            "unquoted text splits it, so the text would be read cut short.",
            "quote texts that hold the separator (\"good, not great\"), or set data.delimiter "
            "to the file's separator.")


class KeyTwice(ValueError):
    """A JSON object naming a key twice (the key is the message)."""


def one_value_per_key(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a key given twice in one object (``json`` would keep
    the last value, and the first would go unread): raises :class:`KeyTwice`."""
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise KeyTwice(twice)
    return dict(pairs)


def refuse_bad_json(path: str) -> None:
    """A JSON (lines) file that is not JSON values one after another: Arrow's error names the
    row of its block, not the file or line. Name both (a key given twice in one object too:
    Arrow refuses it, ``json.loads`` would keep the last)."""
    import json

    try:
        with opener(Path(path))(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:  # UTF-16 (a BOM of its own), latin-1: Arrow says "Invalid value"
        found = not_utf8({"": path})
        with opener(Path(path))(path, "rb") as f:
            utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")  # its byte-order mark
        raise FtlabError(f"Data file {path} is not valid UTF-8"
                         + (f" ({found[2]} on line {found[1]})" if found else "")
                         + ("; it is UTF-16 (it starts with UTF-16's byte-order mark)." if utf16
                            else "."), "re-save the file as UTF-8 (e.g. `iconv -f "
                         f"{'utf-16' if utf16 else 'latin1'} -t utf-8`).") from None
    except (OSError, EOFError):
        return  # unreadable: the reader's own message says why
    decoder = json.JSONDecoder(object_pairs_hook=one_value_per_key)
    lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    try:  # JSON Lines when its first line is one object: then each line is a row
        whole = not lines or not isinstance(decoder.decode(lines[0][1]), dict)
    except ValueError:  # (a pretty-printed file, or an array: its values one after another)
        whole = True
    pos, line = 0, 1
    try:
        if not whole:
            for line, row in lines:  # noqa: B007 - line: where it stopped
                if not isinstance(value := decoder.decode(row), dict | None):  # Arrow says
                    from ftlab.data.typecheck import KIND  # only "changed from object to"

                    raise FtlabError(f"Line {line} of {path} is a JSON {KIND[type(value)]}, "
                                     "not an object: each line of a JSON Lines file is a row.",
                                     'write the row as an object ({"text": "...", "label": '
                                     '"..."}), or remove the line.')
        else:  # value after value, in place (a copy of the rest per value was quadratic)
            while (found := _NON_SPACE.search(text, pos)) is not None:
                pos = found.start()
                _, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as err:
        at = err.lineno if whole else line
        raise FtlabError(f"Line {at} of {path} is not valid JSON ({err.msg}, column "
                         f"{err.colno}).", "write one JSON object per line ({\"text\": "
                         '"...", "label": "..."}), with double quotes around keys and texts '
                         "and no comma between lines.") from None
    except KeyTwice as err:
        line = text.count("\n", 0, pos) + 1 if whole else line
        raise FtlabError(f"The JSON object at line {line} of {path} names the key '{err}' "
                         "more than once.", "give each field of a row its own name.") from None
