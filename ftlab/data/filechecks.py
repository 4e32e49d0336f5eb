"""Checks of data files as files, before or after a read fails: does a file hold a row, where
is its first byte that is not UTF-8, does a header name a column twice. Each reads the file
alone (compressed ones too), so its message can name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError


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
