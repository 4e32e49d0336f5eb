"""``ftlab-predict``: read a csv/tsv, jsonl, parquet or txt file of texts, predict with
``ftlab.load`` (ftlab/inference.py), write one JSON line per row."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from ftlab.cli import quiet_loading, run_parser
from ftlab.data.filechecks import KeyTwice, one_value_per_key
from ftlab.errors import FtlabError, choices_text, closest, separator_hint, with_article
from ftlab.inference import load
from ftlab.run_folder import labelled_stages, stage_card
from ftlab.store import atomic_write
from ftlab.writable import check_output

#: compressed text inputs, by suffix (``reviews.csv.gz``), as training reads them
COMPRESSED = (".gz", ".bz2", ".xz")


def _read_bytes(path: Path, packed: str | None) -> bytes:
    """The file's bytes, decompressed for a ``.gz``/``.bz2``/``.xz`` file."""
    if packed is None:
        return path.read_bytes()
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[packed]
    try:
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, lzma.LZMAError) as err:  # not that format, or cut short
        raise FtlabError(f"{path} does not decompress as {packed} ({err}).",
                         "pass the file whole, or with the suffix of its real format.") from None


def read_rows(path: Path, text_columns: list[str] | None,
              delimiter: str | None = None) -> tuple[list[Any], list[str]]:
    """Rows of a ``.csv``/``.tsv``, ``.jsonl`` (or a ``.json`` array), ``.parquet`` or ``.txt``
    (one text per line; every line is a row, an empty one too, so the output lines up with the
    input) file, as dicts (or strings for ``.txt``), and the columns found."""
    if not path.is_file():
        raise FtlabError(f"{path} is a folder, not a file." if path.is_dir() else
                         f"There is no input file {path}.",
                         "pass --input FILE.{csv,jsonl,parquet,txt}.")
    packed = path.suffix.lower() if path.suffix.lower() in COMPRESSED else None
    suffix = Path(path.stem).suffix.lower() if packed else path.suffix.lower()
    if suffix not in (".txt", ".csv", ".tsv", ".jsonl", ".json", ".parquet") or (
            packed and suffix == ".parquet"):
        raise FtlabError(f"Cannot read {path.name}: unknown suffix '{suffix}{packed or ''}'.",
                         "use a .csv, .tsv, .jsonl, .parquet or .txt file (the text ones also "
                         "compressed: .gz, .bz2, .xz).")
    if suffix == ".parquet":
        return _parquet(path)
    try:
        text = _read_bytes(path, packed).decode("utf-8-sig")  # -sig: a BOM (Excel) is not text
    except UnicodeDecodeError as err:
        raise FtlabError(f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}).",
                         "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") from None
    if suffix == ".txt":
        return _lines(text), ["text"]
    if suffix == ".json" and text.lstrip().startswith("["):  # one JSON array, as training reads
        return _json_array(text, path.name)
    if suffix in (".csv", ".tsv"):
        import csv

        sep, start = delimiter or ("\t" if suffix == ".tsv" else ","), 1
        strict = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
        try:  # a quote that never closes: the non-strict reader takes the rest into one text
            for _ in strict:
                start = strict.line_num + 1
        except csv.Error as err:  # (strict's other complaints, '"hi" there', read as before)
            if "end of data" in str(err):
                raise FtlabError(f"{path.name} line {start} opens a quoted field (a double "
                                 "quote) that never closes: the lines after it would be read "
                                 "as one text.", "remove the stray quote, or double it (\"\") "
                                 "inside a quoted field.") from None
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep)
        header = reader.fieldnames or []
        twice = sorted({c for c in header if c and header.count(c) > 1})
        if twice:  # the reader keeps the last column of a name: the first would go unread
            raise FtlabError(f"The header of {path.name} names the column(s) {twice} more than "
                             "once.", "give every column its own name.")
        rows = list(reader)
        extra = next((n for n, row in enumerate(rows, 1) if None in row), None)
        if extra is not None:  # a text would be read cut at its first separator
            raise FtlabError(f"{path.name} row {extra} has more fields than its header "
                             f"({len(header)}): a separator inside an unquoted text splits it, "
                             "so the text read would be cut short.", "quote texts that hold "
                             'the separator ("good, not great"), or pass it with --delimiter.')
        for n, row in enumerate(rows, 1) if suffix == ".tsv" else ():
            merged = next((c for c, v in row.items() if isinstance(v, str) and "\t" in v), None)
            if merged is not None:  # a field opening with a quote swallowed the rows after it
                raise FtlabError(f"{path.name} row {n} has a tab inside its '{merged}' value: a "
                                 "double quote at the start of a field made the reader take "
                                 "the following tabs and lines into it, merging rows.",
                                 "remove or double the stray quote, or use a .jsonl file.")
    else:
        rows = []
        for n, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=one_value_per_key)
            except json.JSONDecodeError as err:
                raise FtlabError(f"{path.name} line {n} is not valid JSON ({err.msg}).",
                                 "write one JSON object per line (JSON Lines).") from None
            except KeyTwice as err:  # json keeps the last value: the first would go unread
                raise FtlabError(f"{path.name} line {n} names the key '{err}' more than once.",
                                 "give each field of a row its own name.") from None
            if not isinstance(row, dict):
                raise FtlabError(f"{path.name} line {n} is a JSON {type(row).__name__}, not an "
                                 "object.", 'write one object per line: {"text": "..."}.')
            rows.append(row)
    return rows, list(rows[0]) if rows else []


def _json_array(text: str, name: str) -> tuple[list[dict], list[str]]:
    """The rows of a ``.json`` file holding one array of objects."""
    try:
        rows = json.loads(text, object_pairs_hook=one_value_per_key)
    except json.JSONDecodeError as err:
        raise FtlabError(f"{name} is not valid JSON ({err.msg}, line {err.lineno}).",
                         "write one array of objects, or one JSON object per line.") from None
    except KeyTwice as err:
        raise FtlabError(f"{name} has an object naming the key '{err}' more than once.",
                         "give each field of a row its own name.") from None
    bad = next((n for n, row in enumerate(rows, 1) if not isinstance(row, dict)), None)
    if bad is not None:
        raise FtlabError(f"{name} item {bad} is a JSON {type(rows[bad - 1]).__name__}, not an "
                         "object.", 'write one object per row: [{"text": "..."}, ...].')
    return rows, list(rows[0]) if rows else []


def _parquet(path: Path) -> tuple[list[dict], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        if len(set(names)) < len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise FtlabError(f"{path.name} names the column(s) {twice} more than once.",
                             "give each column its own name.")
        return file.read().to_pylist(), names
    except (pa.ArrowException, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FtlabError(f"{path} is not a readable parquet file ({first}).",
                         "write it again with pandas/pyarrow, or pass a .csv or .jsonl.") from None


def _lines(text: str) -> list[str]:
    """The lines of a file's text, split at line ends only (\\n, \\r\\n, \\r): not at the
    form feeds, U+2028 and other separators ``str.splitlines`` also splits at, which a text
    may hold (a row would become two and the output would no longer line up)."""
    return [line.removesuffix("\n") for line in io.StringIO(text, newline=None)]


def _texts(rows: list[dict], wanted: list[str], name: str) -> list[tuple[Any, ...]]:
    """One tuple of texts per row; a row without a text column or with something other than
    a string (or a list of words) in one stops with the row's number (1 = the first row)."""
    out = []
    for n, row in enumerate(rows, 1):
        for c in wanted:
            value = row.get(c)
            words = isinstance(value, list) and all(isinstance(w, str) for w in value)
            if not (isinstance(value, str) or words):  # words: a token-tagging stage's input
                what = (f"has no text column '{c}'" if c not in row else
                        f"has no text in column '{c}'" if value is None else
                        f"has {with_article(type(value).__name__)} ({value!r}) in text "
                        f"column '{c}'")
                raise FtlabError(f"{name}: row {n} {what}.",
                                 f"give every row a string '{c}' (or drop the row).")
        out.append(tuple(row[c] for c in wanted))
    return out


def _one_char(value: str) -> str:
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not one character (e.g. ';')")
    return value


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of 1 or more")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    """``ftlab-predict RUN_DIR --input FILE --output preds.jsonl``: labels and probabilities."""
    parser = run_parser("ftlab-predict", main.__doc__)
    parser.add_argument("--input", type=Path, required=True,
                        help="a .csv/.tsv, .jsonl, .parquet or .txt")
    parser.add_argument("--output", type=Path, required=True, help="where to write .jsonl")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output file (default: refuse)")
    parser.add_argument("--text-column", action="append", dest="text_columns",
                        help="the input's text column(s), in the stage's order (default: the "
                             "stage's own data.text_columns); repeat for pairs")
    parser.add_argument("--delimiter", type=_one_char,
                        help="a .csv's field separator (default: ',' for .csv, a tab for .tsv)")
    parser.add_argument("--batch-size", type=_positive, default=64,
                        help="rows per batch, length-bucketed (default: 64)")
    args = parser.parse_args(argv)
    # --input=~/x.csv: no shell expands a ~ after '='
    args.input, args.output = args.input.expanduser(), args.output.expanduser()
    quiet_loading()
    try:
        check_output(args.output.parent)  # before the work, not in a traceback after it
        if args.output.exists() and args.input.exists() and args.output.samefile(args.input):
            raise FtlabError(f"--output {args.output} is the input file: the predictions would "
                             "replace the texts.", f"name another file: --output "
                             f"{args.output.with_name(args.output.stem + '.preds.jsonl')}.")
        if args.output.is_file() and not args.overwrite:  # earlier predictions are results too
            raise FtlabError(f"--output {args.output} already exists.",
                             "name another file, or pass --overwrite to replace it.")
        name, _, labels = stage_card(args.run_dir.expanduser(), args.stage)
        if not labels:  # a language-model stage (TAPT/DAPT): said before building the model
            labelled = labelled_stages(args.run_dir, but=name)
            raise FtlabError(f"Stage '{name}' trains a language model and predicts no classes.",
                             (f"pick a stage that does with --stage: {choices_text(labelled)}"
                              if labelled else "predict with a run that trained a classifier")
                             + f"; for the adapted LM itself: ftlab-export {args.run_dir} "
                             f"--stage {name} --to hf --output DIR.")
        predictor = load(args.run_dir, args.stage, args.allow_targets)
        rows, found = read_rows(args.input, args.text_columns, args.delimiter)
        if rows and isinstance(rows[0], str) and len(predictor.text_columns) != 1:
            raise FtlabError(f"{args.input.name} holds one text per line, but the stage reads "
                             f"{len(predictor.text_columns)} per row {predictor.text_columns}.",
                             "use a .csv or .jsonl file with a column for each.")
        if rows and isinstance(rows[0], dict):
            wanted = args.text_columns or predictor.text_columns
            missing = [c for c in wanted if c not in found]
            if missing:
                hint = separator_hint(found, wanted, "pass --delimiter")
                raise FtlabError(f"{args.input.name} has no column '{missing[0]}' (it has: "
                                 f"{choices_text(found)}).{hint or closest(missing[0], found)}",
                                 "name the text column(s) with --text-column" + (
                                     ", or give the file's separator with --delimiter."
                                     if hint else "."))
            if len(wanted) != len(predictor.text_columns):
                raise FtlabError(f"The stage reads {len(predictor.text_columns)} text column(s) "
                                 f"({predictor.text_columns}); got {len(wanted)}.",
                                 "give --text-column once per text.")
            rows = _texts(rows, wanted, args.input.name)
        if not rows:
            raise FtlabError(f"{args.input} has no rows to predict.", "pass a file with rows.")
        if args.output.is_dir():
            raise FtlabError(f"--output {args.output} is a folder.",
                             f"name a file: --output {args.output / 'preds.jsonl'}.")
        preds = predictor.predict(rows, batch_size=args.batch_size)
        text = "".join(json.dumps(p) + "\n" for p in preds)
        atomic_write(args.output, lambda p: p.write_text(text))
    except FtlabError as err:
        sys.exit(f"ftlab-predict: {err}")
    rows = f"{len(preds)} row" + ("" if len(preds) == 1 else "s")
    print(f"ftlab-predict: {rows} -> {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
