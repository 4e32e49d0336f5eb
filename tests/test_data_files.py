"""Data files a user wrote by hand: broken csv rows and JSON lines are named by file and line,
never read silently wrong."""

from __future__ import annotations

import pytest

from ftlab.data.sources import load_raw
from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError


def _load(file, **kw):
    return load_raw(DataSpec(files={"train": str(file)}, splits={"train": "train"}, **kw))


@pytest.mark.parametrize(("suffix", "sep"), [(".csv", ","), (".tsv", "\t")])
def test_a_csv_row_with_more_fields_than_its_header_is_named(tmp_path, suffix, sep):
    """pandas took a first row's extra field as an index column: every text was read as the
    part after its first unquoted comma, silently ('hello, world' trained as ' world'); a later
    row's stopped the run with a parser error naming no file."""
    path = tmp_path / f"train{suffix}"
    rows = ["hello", "world", "pos"], ["bye", "all", "neg"], ["so", "so", "pos"]
    path.write_text(f"text{sep}label\n" + "".join(sep.join(r) + "\n" for r in rows))
    with pytest.raises(FtlabError, match=r"(?s)Row 1 of .*train.* has 3 fields, but its header "
                                         r"has 2.*quote texts"):
        _load(path)
    path.write_text(f"text{sep}label\nfine{sep}neg\nalso fine{sep}pos\n"
                    + "".join(sep.join(r) + "\n" for r in rows))
    with pytest.raises(FtlabError, match=r"Row 3 of .*train.* has 3 fields"):
        _load(path)
    path.write_text('text,label\n"hello, world",pos\nbye,neg\n' if sep == "," else
                    'text\tlabel\nhello, world\tpos\nbye\tneg\n')
    assert list(_load(path).splits["train"]["text"]) == ["hello, world", "bye"]


def test_a_csv_quote_that_never_closes_is_named(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\nfine,pos\n"opens and never closes,neg\nbye,neg\n')
    with pytest.raises(FtlabError, match=r"(?s)Row 2 of .*train.csv opens a quoted field.*"
                                         r"never closes.*stray quote"):
        _load(path)


@pytest.mark.parametrize(("content", "said"), [
    ('{"text": "a", "label": "pos"}\n{"text": "b", "label": \n{"text": "c", "label": "neg"}\n',
     r"Line 2 of .*train.jsonl is not valid JSON \(Expecting value"),
    ('{"text": "a", "label": "pos"},\n{"text": "c", "label": "neg"}\n',
     r"Line 1 of .*train.jsonl is not valid JSON"),
    ("{'text': 'a', 'label': 'pos'}\n", r"Line 1 of .*train.jsonl is not valid JSON"),
    ('{"text": "a", "label": "pos"}\n{"text": "b", "text": "c", "label": "neg"}\n',
     r"object at line 2 of .*train.jsonl names the key 'text' more than once")])
def test_a_jsonl_line_that_is_not_json_is_named_by_file_and_line(tmp_path, content, said):
    """Arrow's "JSON parse error: Missing a comma ... in row 1" named neither the file nor the
    line (its row counts within a block)."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "label": "neg"}\n' * 3000 + content if "Line 2" in said
                    else content)
    if "Line 2" in said:
        said = said.replace("Line 2", "Line 3002")
    with pytest.raises(FtlabError, match=said):
        _load(path)


def test_a_pretty_printed_json_file_still_reads(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{\n  "text": "a",\n  "label": "pos"\n}\n'
                    '{\n  "text": "b",\n  "label": "neg"\n}\n')
    assert list(_load(path).splits["train"]["text"]) == ["a", "b"]


def test_a_header_name_with_spaces_around_it_is_named(tmp_path):
    """'text, label' (a space after the comma) read the column ' label': the message listed
    'columns found:  label, text', where the space cannot be seen."""
    path = tmp_path / "train.csv"
    path.write_text("text, label\ngood,pos\nbad,neg\n")
    with pytest.raises(FtlabError, match=r"(?s)The header names ' label', with spaces.*"
                                         r"remove the spaces"):
        _load(path)


def test_a_text_column_named_label_beside_another_label_column_is_refused(tmp_path):
    """The class ids of data.label_column=sentiment were written over the text column 'label':
    the model trained on its own label ids as the text, silently (a perfect score)."""
    path = tmp_path / "train.csv"
    path.write_text("label,sentiment\nwhat a great film,pos\nawful and dull,neg\n")
    with pytest.raises(FtlabError, match=r"(?s)names a column 'label', but the labels are in "
                                         r"'sentiment'.*rename the text column"):
        _load(path, text_columns=["label"], label_column="sentiment")
    path.write_text("text,sentiment,label\nwhat a great film,pos,x\nawful and dull,neg,y\n")
    raw = _load(path, label_column="sentiment")  # another 'label' column, not read: replaced
    assert list(raw.splits["train"]["text"]) == ["what a great film", "awful and dull"]
    assert raw.labels == ["neg", "pos"] and list(raw.splits["train"]["label"]) == [1, 0]


def test_a_zip_replaced_by_a_new_version_is_read_anew(tmp_path):
    """A zip's data file was extracted once beside it and reused: a zip replaced by a new
    version (a new stage key, by its size and time) trained on the old version's rows."""
    import zipfile

    path = tmp_path / "data.zip"
    for word, n in (("old", 10), ("new", 12)):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("train.csv", "text,label\n" + "".join(f"{word} {i},{'ab'[i % 2]}\n"
                                                              for i in range(n)))
        texts = _load(path).splits["train"]["text"]
        assert len(texts) == n and texts[0] == f"{word} 0"


@pytest.mark.parametrize(("name", "content", "kw"), [
    ("train.jsonl", '{"text": "a", "label": "pos"}\n'.encode("utf-16"), {}),  # Arrow: "Invalid
    ("corpus.txt", "caf\xe9 au lait\n".encode("latin-1"),  # value"; data.path=text: "their
     {"path": "text", "label_column": None})])  # extension says conll", for a documented use
def test_a_file_that_is_not_utf8_says_so(tmp_path, name, content, kw):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(FtlabError, match=r"(?s)Data file .*" + name + r" is not valid UTF-8.*"
                                         r"re-save the file as UTF-8") as err:
        _load(path, **kw)
    assert ("it is UTF-16" in str(err.value)) == name.endswith(".jsonl")


def test_a_forced_format_the_extension_contradicts_is_named_before_the_file_is_parsed(
        tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\ngood,pos\nbad,neg\n")
    with pytest.raises(FtlabError, match=r"as json \(data.path=json\), but their extension says "
                                         r"csv"):
        _load(path, path="json")


def test_a_training_cap_that_leaves_out_a_class_is_warned_about(tmp_path, caplog):
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"row {i},common\n" for i in range(60))
                    + "the one,rare\n")
    with caplog.at_level("WARNING", logger="ftlab.data.sources"):
        raw = _load(path, max_train_samples=5)
    assert raw.labels == ["common", "rare"] and len(raw.splits["train"]) == 5
    assert "max_train_samples=5 leaves no training row of ['rare']" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ftlab.data.sources"):
        _load(path, max_train_samples=61)
    assert "leaves no training row" not in caplog.text


@pytest.mark.parametrize("splits", [
    {"train": "train[:10]", "validation": "validation", "test": "test"},
    {"train": "train", "validation": "test", "test": "validation"},
    {"train": "train", "validation": "dev", "test": None}])
def test_a_split_mapping_that_one_split_file_cannot_apply_is_refused(tmp_path, splits):
    """With data.files={all: ...} a slice or another name in data.splits was ignored without
    a word: 'train[:10]' trained on every training row."""
    path = tmp_path / "all.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(100)))
    spec = {"files": {"all": str(path)}}
    with pytest.raises(FtlabError, match=r"(?s)cannot apply with one data file.*"
                                         r"data.max_train_samples"):
        load_raw(DataSpec(**spec, splits=splits))
    raw = load_raw(DataSpec(**spec, splits={"train": "train", "validation": "validation",
                                            "test": None}))
    assert set(raw.splits) == {"train", "validation"}


def test_a_json_file_of_columns_names_the_records_layout(tmp_path):
    """pandas' DataFrame.to_json() writes {"text": {"0": ..., "1": ...}, ...}: one row whose
    cells are objects, refused as 'holds a object at row 1' with a fix about lists."""
    import pandas as pd

    path = tmp_path / "train.json"
    pd.DataFrame({"text": ["good", "bad"], "label": ["pos", "neg"]}).to_json(path)
    with pytest.raises(FtlabError, match=r"(?s)holds an object at row 1.*rows by column.*"
                                         r"orient='records', lines=True"):
        _load(path)


def test_a_csv_row_with_more_fields_is_named_when_split_files_are_read_one_by_one(tmp_path):
    """Split files whose other columns differ are read one at a time and cut to the columns
    the run reads: the index column pandas made of a first row's extra field was cut away and
    every field shifted ('id' read as the label), silently."""
    train, val = tmp_path / "train.csv", tmp_path / "validation.csv"
    train.write_text("text,label,id\nhello, world,pos,1\nbad,neg,2\nfine,pos,3\n")
    val.write_text("text,label,id\ngood,pos,x\nbad,neg,y\n")
    with pytest.raises(FtlabError, match=r"Row 1 of .*train.csv has 4 fields, but its header "
                                         r"has 3"):
        load_raw(DataSpec(files={"train": str(train), "validation": str(val)},
                          splits={"train": "train", "validation": "validation"}))


def test_a_large_jsonl_file_arrow_cannot_read_is_checked_in_linear_time(tmp_path):
    """A JSON Lines file Arrow refuses is checked line by line to name the line. The check then
    decoded the whole text again value by value, copying the rest of the text for each: 20,000
    lines took 7 s, 200,000 about 12 minutes, before any message. A line holding valid JSON
    that is no object (Arrow: only 'changed from object to string in row 0') is named too."""
    import json
    import time

    from ftlab.data.filechecks import refuse_bad_json

    path = tmp_path / "train.jsonl"
    rows = (json.dumps({"text": "word " * 15, "label": "neg"}) + "\n") * 40_000
    path.write_text(rows)
    start = time.perf_counter()
    refuse_bad_json(str(path))  # every line is a row: nothing to name
    assert time.perf_counter() - start < 10
    path.write_text(rows + "[1, 2]\n")
    with pytest.raises(FtlabError, match=r"Line 40001 of .*train.jsonl is a JSON list, not an "
                                         r"object"):
        _load(path)


def test_a_json_array_on_one_line_is_not_taken_for_json_lines(tmp_path):
    """A .json file holding one array of objects on one line reads as its rows (it is not a
    JSON Lines file whose first row is a list)."""
    import json

    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "a b", "label": "pos"}, {"text": "c", "label": "neg"}]))
    from ftlab.data.filechecks import refuse_bad_json

    refuse_bad_json(str(path))  # nothing to refuse
    assert list(_load(path).splits["train"]["text"]) == ["a b", "c"]
