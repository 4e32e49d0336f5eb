"""Word-level tagged data (NER): CoNLL files and BIO tag sequences.

A CoNLL file has one word per line, its tag in the last column (tab- or space-separated:
``token<TAB>tag``; CoNLL-2003's extra columns are ignored), and a blank (or whitespace-only)
line between sentences; ``-DOCSTART-`` lines are skipped. It loads as two list columns,
``tokens`` and ``tags``. Tags must follow the BIO scheme: ``O``, ``B-<type>``, ``I-<type>``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Sequence, Value

from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError

#: a BIO tag: outside, or the beginning / inside of an entity of some type
BIO = re.compile(r"^(O|[BI]-\S+)$")


def read_conll(path: str | Path) -> dict[str, list[list[str]]]:
    """``{"tokens": [[word, ...], ...], "tags": [[tag, ...], ...]}``, one row per sentence."""
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM (Windows editors) is no text
        for number, line in enumerate(f, 1):
            if not line.strip():
                if words:
                    tokens.append(words)
                    tags.append(labels)
                words, labels = [], []
                continue
            if line.startswith("-DOCSTART-"):
                continue
            fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            fields = [x for x in fields if x.strip()]
            if len(fields) < 2:
                raise FtlabError(
                    f"{path}, line {number}: expected a word and its tag separated by a tab, "
                    f"got {line.rstrip()!r}.",
                    "write one `word<TAB>tag` per line and a blank line between sentences "
                    "(CoNLL format).")
            tag = fields[-1].strip()
            if not BIO.match(tag):
                raise not_bio(tag, f"{path}, line {number}")
            words.append(fields[0].strip())
            labels.append(tag)
    if words:
        tokens.append(words)
        tags.append(labels)
    return {"tokens": tokens, "tags": tags}


def load_conll(files: dict[str, str]) -> DatasetDict:
    """Each split's CoNLL file as a ``Dataset`` of ``tokens`` and ``tags`` lists."""
    features = Features({"tokens": List(Value("string")), "tags": List(Value("string"))})
    out = {}
    for split, f in files.items():
        rows = read_conll(f)
        if not rows["tokens"]:  # blank lines and -DOCSTART- only
            raise FtlabError(f"The CoNLL file {f} (split '{split}') holds no sentence (no "
                             "`word<TAB>tag` line).", "add sentences to it" + (
                                 "" if split == "train" else f", or go without that split "
                                 f"(~data.files.{split} data.splits.{split}=null)") + ".")
        out[split] = Dataset.from_dict(rows, features=features)
    return DatasetDict(out)


def not_bio(tag: str, where: str) -> FtlabError:
    return FtlabError(f"{where}: the tag {tag!r} is not a BIO tag (O, B-<type> or I-<type>).",
                      "convert the tags to BIO (IOBES/IO schemes are not read), or fix the "
                      "line.")


def is_list_feature(feature: object) -> bool:
    """Whether a ``datasets`` feature holds a list per row (a tag sequence)."""
    return isinstance(feature, List | Sequence | list)


def is_tag_ids(feature: object) -> bool:
    """Whether a ``label`` feature holds tag ids per word (what :func:`encode_tags` writes)."""
    return is_list_feature(feature) and getattr(feature, "feature", None) == Value("int64")


def tag_set(values: set[str]) -> list[str]:
    """The label set in id order: ``O`` first, then the other tags sorted (deterministic)."""
    return (["O"] if "O" in values else []) + sorted(values - {"O"})


def encode_tags(dsd: DatasetDict, spec: DataSpec) -> tuple[DatasetDict, list[str]]:
    """Tag sequences -> a ``label`` column of tag-id lists, and the tag names in id order
    (``spec.labels`` when given, else :func:`tag_set` of the training split)."""
    col = spec.label_column
    _check_words(dsd, col, spec.text_columns[0])
    # a Hugging Face tagging dataset (conll2003, wnut_17) stores tag ids of a ClassLabel
    inner = getattr(dsd["train"].features[col], "feature", None)
    names = list(inner.names) if isinstance(inner, ClassLabel) else None
    name = (lambda t: names[t]) if names else str  # noqa: E731
    seen = {split: {name(t) for row in ds[col] for t in row} for split, ds in dsd.items()}
    labels = [str(x) for x in spec.labels] if spec.labels is not None else (
        names or tag_set(seen["train"]))
    for split, values in seen.items():
        bad = sorted(t for t in values if not BIO.match(t))
        if bad:
            raise not_bio(bad[0], f"The {split} split's column '{col}'")
        unknown = sorted(values - set(labels))
        if unknown:
            raise FtlabError(f"The {split} split has tag(s) {unknown[:10]} outside the tag set "
                             f"{labels}.", "add them to data.labels, or fix the data.")
    index = {name: i for i, name in enumerate(labels)}
    dsd = dsd.map(lambda b: {"__ftlab_tags": [[index[name(t)] for t in row] for row in b[col]]},
                  batched=True)
    dsd = DatasetDict({s: ds.remove_columns([c for c in ("label",) if c in ds.column_names])
                       for s, ds in dsd.items()})
    return dsd.rename_column("__ftlab_tags", "label"), labels


def _check_words(dsd: DatasetDict, col: str, words: str) -> None:
    """Tags are read one per word: the text column must hold word lists (not text: a list of
    labels per text is multi-label data, which ftlab does not train), each as long as its
    row's tag list."""
    for split, ds in dsd.items():
        if words not in ds.column_names:
            continue  # the missing column is named by the column check
        if not is_list_feature(ds.features[words]):
            raise FtlabError(
                f"Column '{col}' holds a list per row, but the text column '{words}' holds "
                "text, not a list of words: ftlab reads a list of labels as a tag per word "
                "(stage=tokens); several labels per text (multi-label) are not supported.",
                f"for tagging, set data.text_columns to the column of word lists (CoNLL: "
                f"tokens); for classification, give one label per row in '{col}'.")
        lengths = ds.with_format("arrow").select_columns([words, col])
        for name in (words, col):  # a null list: no words, or no tags, for that row
            null = pc.is_null(lengths[name]).to_numpy(zero_copy_only=False).nonzero()[0]
            if len(null):
                raise FtlabError(f"The {split} split has {len(null)} row(s) with no '{name}' "
                                 f"list (null; the first is row {int(null[0]) + 1}).",
                                 "give every row its words and a tag per word, or remove "
                                 "those rows.")
        n_words = pc.list_value_length(lengths[words]).to_numpy(zero_copy_only=False)
        n_tags = pc.list_value_length(lengths[col]).to_numpy(zero_copy_only=False)
        bad = (n_words != n_tags).nonzero()[0]
        if len(bad):
            row = int(bad[0])
            raise FtlabError(
                f"The {split} split has {len(bad)} row(s) whose '{col}' list is not as long as "
                f"its '{words}' list (the first is row {row + 1}: {int(n_words[row])} words, "
                f"{int(n_tags[row])} tags).", "give every word exactly one tag.")
