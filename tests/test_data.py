"""Loading, splitting and checking data: the rules users rely on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftlab.data.sources import load_raw
from ftlab.data.spec import DataSpec
from ftlab.data.splits import grouped_split
from ftlab.errors import FtlabError
from tests.conftest import POS, shared_file, synthetic_rows, write_jsonl


def spec_for(tmp_path, rows=None, **kw) -> DataSpec:
    rows = rows if rows is not None else synthetic_rows(300, 0)
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    return DataSpec(path="json", files={"all": str(path)}, **kw)


def test_grouped_split_keeps_groups_together_and_is_deterministic(tmp_path):
    raw = load_raw(spec_for(tmp_path, split_by="group"))
    groups = {s: set(ds["group"]) for s, ds in raw.splits.items()}
    assert not groups["train"] & groups["test"]
    assert not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]
    again = load_raw(spec_for(tmp_path, split_by="group"))
    assert list(again.splits["test"]["text"]) == list(raw.splits["test"]["text"])


def test_row_split_fractions(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"x": list(range(10_000))})
    sizes = {k: len(v) for k, v in grouped_split(ds, None, [0.8, 0.1, 0.1]).items()}
    assert sum(sizes.values()) == 10_000
    assert 7700 < sizes["train"] < 8300 and 800 < sizes["test"] < 1200


def test_one_file_split_with_a_zero_share_or_a_null_split_goes_without_it(tmp_path):
    """data.files={all: ...}: a share of 0 (data.split_fractions=[0.9,0.1,0]) or
    data.splits.test=null leaves that split out (a crash and an ignored setting before); a
    split that gets no rows, or a train split with no share, stops with the fix."""
    raw = load_raw(spec_for(tmp_path, split_fractions=[0.9, 0.1, 0.0]))
    assert set(raw.splits) == {"train", "validation"} and len(raw.splits["train"]) > 240
    nulled = load_raw(spec_for(tmp_path, splits={"train": "train", "validation": "validation",
                                                 "test": None}))
    assert set(nulled.splits) == {"train", "validation"}
    rows = synthetic_rows(300, 0)
    few = [dict(r, group=f"g{i % 3}") for i, r in enumerate(rows)]  # 3 groups for 3 splits
    with pytest.raises(FtlabError, match=r"(?s)Splitting the 3 'group' groups .* leaves the "
                                         r"(validation|test) split empty.*Fix: add rows"):
        load_raw(spec_for(tmp_path, few, split_by="group", split_fractions=[0.8, 0.1, 0.1]))
    with pytest.raises(FtlabError, match=r"the train split gets no share"):
        load_raw(spec_for(tmp_path, split_fractions=[0.0, 0.5, 0.5]))


def test_labels_follow_declared_order_and_drop(tmp_path):
    rows = synthetic_rows(200, 0) + [{"text": "synopsis", "label": "plot", "group": "p"}] * 30
    raw = load_raw(spec_for(tmp_path, rows, labels=["pos", "neg"], drop_labels=["plot"]))
    assert raw.labels == ["pos", "neg"]
    for ds in raw.splits.values():
        for text, label in zip(list(ds["text"]), list(ds["label"]), strict=True):
            assert text != "synopsis"
            assert label == (0 if set(text.split()) & set(POS) else 1)


def test_a_declared_label_no_training_row_has_is_warned_about(tmp_path, caplog):
    """data.labels=[neg, pos, neutral] on data without 'neutral' trains a class no row shows:
    a warning names it; the labels keep their declared ids."""
    with caplog.at_level("WARNING", logger="ftlab.data.labels"):
        raw = load_raw(spec_for(tmp_path, labels=["neg", "pos", "neutral"]))
    assert raw.labels == ["neg", "pos", "neutral"]
    assert raw.train_counts is not None and raw.train_counts[2] == 0
    assert re.search(r"data.labels lists \['neutral'\], which no training row has.*Remove it "
                     r"from data.labels", caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ftlab.data.labels"):
        load_raw(spec_for(tmp_path, labels=["neg", "pos"]))
    assert "no training row" not in caplog.text


def test_a_drop_label_no_row_has_is_warned_about(tmp_path, caplog):
    """data.drop_labels=[1] on a number column (labels read '0.0', '1.0') or a misspelt label
    dropped nothing without a word; the warning names it and the labels the data has."""
    rows = [{**r, "label": 1.0 if r["label"] == "pos" else 0.0} for r in synthetic_rows(300, 0)]
    with caplog.at_level("WARNING", logger="ftlab.data.labels"):
        raw = load_raw(spec_for(tmp_path, rows, drop_labels=[1, "Plot"]))
    assert raw.labels == ["0.0", "1.0"]
    assert re.search(r"data.drop_labels lists \['1', 'Plot'\], which no row has in column "
                     r"'label' \(its labels: \['0.0', '1.0'\]\): nothing is dropped for them",
                     caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ftlab.data.labels"):
        load_raw(spec_for(tmp_path, synthetic_rows(200, 0) + [
            {"text": "synopsis", "label": "plot", "group": "p"}] * 30, drop_labels=["plot"]))
    assert "drop_labels" not in caplog.text


def test_text_columns_naming_the_label_or_one_column_twice_are_refused(tmp_path):
    """data.text_columns=[label] trained on the labels themselves (a perfect score that means
    nothing) and [text, text] on pairs of one text, without a word."""
    with pytest.raises(FtlabError, match=r"(?s)includes the label column 'label': the model "
                                         r"would read its label.*Fix: set data.text_columns"):
        load_raw(spec_for(tmp_path, text_columns=["label"]))
    with pytest.raises(FtlabError, match=r"(?s)names 'text' twice.*Fix: name it once"):
        load_raw(spec_for(tmp_path, text_columns=["text", "text"]))


def test_labelled_rows_without_text_are_counted_in_a_warning(tmp_path, caplog):
    """A labelled row whose text is null, empty or spaces trained (and was scored) as an empty
    text without a word; unlabelled text (MLM, CLM) is not warned about."""
    rows = synthetic_rows(300, 0)
    rows[1], rows[2] = {**rows[1], "text": None}, {**rows[2], "text": "  "}
    with caplog.at_level("WARNING", logger="ftlab.data.columns"):
        raw = load_raw(spec_for(tmp_path, rows, split_fractions=[1.0, 0.0, 0.0],
                                splits={"train": "train"}))
    assert len(raw.splits["train"]) == 300  # kept, as said
    assert "2 of 300 rows of the train split have no text in column 'text' (null, empty or " \
           "spaces)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ftlab.data.columns"):
        load_raw(spec_for(tmp_path, rows, label_column=None))
        load_raw(spec_for(tmp_path))
    assert "no text" not in caplog.text


def test_label_outside_declared_set_is_named(tmp_path):
    with pytest.raises(FtlabError, match=r"(?s)outside the label set.*Fix: add them to data.lab"):
        load_raw(spec_for(tmp_path, labels=["pos", "negative"]))


def test_labels_differing_only_in_spaces_or_case_are_refused(tmp_path):
    rows = synthetic_rows(200, 0)
    rows[3] = {**rows[3], "label": rows[3]["label"] + " "}  # an untrimmed csv cell
    with pytest.raises(FtlabError,
                       match=r"(?s)differ only in case, spaces or Unicode form.*Fix: clean the"):
        load_raw(spec_for(tmp_path, rows))
    rows[3] = {**rows[3], "label": rows[3]["label"].strip().upper()}
    with pytest.raises(FtlabError, match=r"differ only in case, spaces"):
        load_raw(spec_for(tmp_path, rows))


def test_labels_differing_only_in_unicode_form_are_refused(tmp_path):
    """'café' composed and 'cafe' + a combining accent (macOS's form) look alike and trained
    as two classes without a word."""
    rows = [{**r, "label": "caf\u00e9" if r["label"] == "pos" else "bad"}
            for r in synthetic_rows(200, 0)]
    rows[3] = {**rows[3], "label": "cafe\u0301"}
    with pytest.raises(FtlabError, match=r"(?s)'caf.+' and 'caf.+', which differ only in case, "
                                         r"spaces or Unicode form"):
        load_raw(spec_for(tmp_path, rows))


def test_missing_column_lists_found_columns(tmp_path):
    with pytest.raises(FtlabError, match=r"(?s)\['review'\] not found.*columns found: group, "
                                         r"label, text.*data.text_columns"):
        load_raw(spec_for(tmp_path, text_columns=["review"]))
    with pytest.raises(FtlabError, match=r"(?s)data.label_column"):
        load_raw(spec_for(tmp_path, label_column="sentiment"))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FtlabError, match="(?s)not found"):
        load_raw(DataSpec(path="json", files={"train": str(tmp_path / "nope.jsonl")}))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(FtlabError, match="(?s)is empty"):
        load_raw(DataSpec(files={"train": str(tmp_path / "empty.csv")}))


def test_all_empty_texts(tmp_path):
    rows = [{"text": "  ", "label": "a" if i % 2 else "b"} for i in range(40)]
    with pytest.raises(FtlabError, match="(?s)All texts in column 'text'"):
        load_raw(spec_for(tmp_path, rows))


def test_max_train_samples_caps_with_seed(tmp_path):
    a = list(load_raw(spec_for(tmp_path, max_train_samples=50), seed=1).splits["train"]["text"])
    b = list(load_raw(spec_for(tmp_path, max_train_samples=50), seed=2).splits["train"]["text"])
    assert len(a) == 50 and a != b


def test_sentence_pairs_from_shared_vitaminc():
    train = shared_file("vitaminc/validation.jsonl")
    spec = DataSpec(path="json", files={"train": str(train)}, text_columns=["evidence", "claim"],
                    labels=["True", "False", "Neither"], splits={"train": "train"})
    raw = load_raw(spec)
    assert raw.labels == ["True", "False", "Neither"]
    assert len(raw.splits["train"]) == 3000
    assert set(list(raw.splits["train"]["label"])) == {0, 1, 2}


# --- data=vitaminc as shipped; data.splits (null drops, slices, a node's splits replace) ---

def _vitaminc(make_cfg, monkeypatch, tmp_path, *extra: str) -> DataSpec:
    from ftlab.config import bind_schema

    monkeypatch.chdir(tmp_path)  # a folder that is not the project root
    return bind_schema(DataSpec, make_cfg(["data=vitaminc", *extra]).data, "data")


def test_vitaminc_paths_follow_the_project_root_not_the_working_folder(
        make_cfg, monkeypatch, tmp_path):
    from ftlab.cli import CONFIG_DIR

    monkeypatch.delenv("FTLAB_DATA", raising=False)
    spec = _vitaminc(make_cfg, monkeypatch, tmp_path)
    expected = (Path(CONFIG_DIR).parent.parent / "shared" / "data" / "vitaminc").resolve()
    assert Path(spec.files["train"]).resolve() == expected / "train.jsonl"
    assert Path(spec.files["validation"]).resolve() == expected / "validation.jsonl"
    monkeypatch.setenv("FTLAB_DATA", str(tmp_path / "elsewhere"))
    spec = _vitaminc(make_cfg, monkeypatch, tmp_path)
    with pytest.raises(FtlabError, match=f"expected in {tmp_path}/elsewhere/vitaminc(?s:.*)"
                                         "FTLAB_DATA"):
        load_raw(spec)


def test_vitaminc_as_shipped_has_three_disjoint_splits(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("FTLAB_DATA", str(shared_file("vitaminc").parent))
    raw = load_raw(_vitaminc(make_cfg, monkeypatch, tmp_path, "data.max_train_samples=50"))
    assert {s: len(ds) for s, ds in raw.splits.items()} == {
        "train": 50, "validation": 1500, "test": 1500}
    val, test = ({(r["evidence"], r["claim"]) for r in raw.splits[s]} for s in ("validation",
                                                                                "test"))
    assert not val & test
    assert set(raw.splits["test"]["label"]) == {0, 1, 2}


def _three_files(tmp_path) -> list[str]:
    for split, n, seed in (("train", 40, 0), ("validation", 30, 1), ("test", 20, 2)):
        write_jsonl(tmp_path / f"{split}.jsonl", synthetic_rows(n, seed))
    return ["data=local", "data.path=json"] + [
        f"data.files.{s}={tmp_path}/{s}.jsonl" for s in ("train", "validation", "test")]


def test_a_null_split_is_dropped(make_cfg, tmp_path):
    from ftlab.config import bind_schema

    cfg = make_cfg([*_three_files(tmp_path), "data.splits.test=null"])
    raw = load_raw(bind_schema(DataSpec, cfg.data, "data"))
    assert set(raw.splits) == {"train", "validation"}
    hub = bind_schema(DataSpec, make_cfg(["data=hf", "data.splits.test=null"]).data, "data")
    assert hub.splits == {"train": "train", "validation": "validation", "test": None}


def test_a_nodes_splits_replace_the_default_ones(tmp_path):
    from ftlab.config import bind_schema

    node = {"path": "json", "files": {"train": "t.jsonl"},
            "splits": {"train": "train", "validation": "validation"}}
    assert bind_schema(DataSpec, node, "data").splits == {"train": "train",
                                                           "validation": "validation"}
    assert bind_schema(DataSpec, {"path": "json"}, "data").splits is None  # all three


def test_split_slices_partition_a_split_by_row_order(make_cfg, tmp_path):
    from ftlab.config import bind_schema

    cfg = make_cfg([*_three_files(tmp_path), "data.splits.validation='validation[:40%]'",
                    "data.splits.test='validation[40%:]'"])
    raw = load_raw(bind_schema(DataSpec, cfg.data, "data"))
    texts = [r["text"] for r in synthetic_rows(30, 1)]
    assert list(raw.splits["validation"]["text"]) == texts[:12]
    assert list(raw.splits["test"]["text"]) == texts[12:]
    cfg = make_cfg([*_three_files(tmp_path), "data.splits.test='validation[5:-20]'"])
    assert list(load_raw(bind_schema(DataSpec, cfg.data, "data")).splits["test"]["text"]) == \
        texts[5:10]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_words_that_pandas_reads_as_missing_stay_text(tmp_path, suffix):
    """"NA", "null", "None", "N/A" in a csv are a text or a label, not missing values; only
    an empty cell is missing."""
    sep = "\t" if suffix == ".tsv" else ","
    lines = ["text,label", "NA,None", "null,pos", "N/A,None", "None,pos", "nan,pos"]
    path = tmp_path / f"train{suffix}"
    path.write_text("\n".join(line.replace(",", sep) for line in lines) + "\n")
    raw = load_raw(DataSpec(files={"train": str(path)}, splits={"train": "train"}))
    assert raw.labels == ["None", "pos"]
    assert list(raw.splits["train"]["text"]) == ["NA", "null", "N/A", "None", "nan"]
    path.write_text(path.read_text() + sep.join(["fine", ""]) + "\n")  # an empty label cell
    with pytest.raises(FtlabError, match="1 row.* without a label"):
        load_raw(DataSpec(files={"train": str(path)}, splits={"train": "train"}))


def test_a_csv_text_column_is_read_as_written(tmp_path):
    """A csv text column of numbers ("007", "1.50": product codes, years) is text as written,
    and one file of numbers beside one of words is one text column (pandas read the first as
    int64, the splits could not be joined, and a csv cannot quote a number into a text)."""
    files = {}
    for split, texts in (("train", ["007", "1.50", "1999", "12"]),
                         ("validation", ["good film", "bad film", "42", "ok"])):
        files[split] = tmp_path / f"{split}.csv"
        files[split].write_text("text,label\n" + "".join(f"{t},{i % 2}\n"
                                                         for i, t in enumerate(texts)))
    raw = load_raw(DataSpec(files={k: str(v) for k, v in files.items()},
                            splits={"train": "train", "validation": "validation"}))
    assert list(raw.splits["train"]["text"]) == ["007", "1.50", "1999", "12"]
    assert list(raw.splits["validation"]["text"])[2] == "42"


def test_an_unlabelled_test_file_names_going_without_the_split(tmp_path):
    """A test file without labels (or without the label column) cannot be scored: the fix
    is to drop the split and predict on it later, not to label every row."""
    files = {s: str(write_jsonl(tmp_path / f"{s}.jsonl", synthetic_rows(20, i)))
             for i, s in enumerate(("train", "validation"))}
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": r["text"]}
                                                 for r in synthetic_rows(5, 3)])
    with pytest.raises(FtlabError, match=r"(?s)test split has 5 row.*data.splits.test=null"):
        load_raw(DataSpec(files={**files, "test": str(test)}))


def test_a_split_carved_from_train_may_not_share_training_rows(make_cfg, tmp_path):
    """validation='train[80%:]' beside train='train' scores the model on rows it trained on:
    refused; carved apart (train='train[:80%]') it loads, with no row in both."""
    from ftlab.config import bind_schema

    cfg = make_cfg([*_three_files(tmp_path), "data.splits.validation='train[80%:]'"])
    with pytest.raises(FtlabError, match=r"(?s)shares 8 row.*train\[:90%\]"):
        load_raw(bind_schema(DataSpec, cfg.data, "data"))
    cfg = make_cfg([*_three_files(tmp_path), "data.splits.train='train[:80%]'",
                    "data.splits.validation='train[80%:]'"])
    raw = load_raw(bind_schema(DataSpec, cfg.data, "data"))
    train, val = set(raw.splits["train"]["text"]), set(raw.splits["validation"]["text"])
    assert len(raw.splits["validation"]) == 8 and not train & val


def test_the_training_file_given_again_as_an_evaluation_file_is_refused(tmp_path):
    """data.files.validation naming the training file (by another spelling of its path) would
    score the model on its own training rows: refused, naming the split; a split that is not
    read (data.splits.validation=null) may name any file."""
    _three_files(tmp_path)
    train = str(tmp_path / "train.jsonl")
    files = {"train": train, "validation": f"{tmp_path}/../{tmp_path.name}/train.jsonl",
             "test": str(tmp_path / "test.jsonl")}
    with pytest.raises(FtlabError, match=r"(?s)data.files.validation is the training file.*"
                       r"scored on the rows it trained on.*data.files=\{all: FILE\}"):
        load_raw(DataSpec(path="json", files=files))
    raw = load_raw(DataSpec(path="json", files=files, splits={"train": "train",
                                                              "validation": None,
                                                              "test": "test"}))
    assert set(raw.splits) == {"train", "test"}


def test_one_file_for_validation_and_test_is_warned_about(tmp_path, caplog):
    """The best epoch is chosen on validation: the same rows as test make the test optimistic
    (warned, not refused: some datasets ship one held-out split)."""
    _three_files(tmp_path)
    files = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "test.jsonl"),
             "test": str(tmp_path / "test.jsonl")}
    with caplog.at_level("WARNING", logger="ftlab.data.splits"):
        load_raw(DataSpec(path="json", files=files))
    assert "data.files.validation and data.files.test are one file" in caplog.text
    caplog.clear()
    files["validation"] = str(tmp_path / "validation.jsonl")
    with caplog.at_level("WARNING", logger="ftlab.data.splits"):
        load_raw(DataSpec(path="json", files=files))
    assert "one file" not in caplog.text


@pytest.mark.parametrize("declared", [None, ["negative", "positive"]])
def test_a_classlabel_minus_one_is_a_missing_label(declared):
    """Hugging Face datasets mark unlabelled rows -1 (GLUE's test splits): refused as rows
    without a label, not kept as id -1 (a crash at test time) or read as the last class."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    from ftlab.data.labels import encode_labels

    feats = Features({"sentence": Value("string"),
                      "label": ClassLabel(names=["negative", "positive"])})
    dsd = DatasetDict({"train": Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]},
                                                  features=feats),
                       "test": Dataset.from_dict({"sentence": ["c", "d"], "label": [-1, -1]},
                                                 features=feats)})
    spec = DataSpec(path="glue", text_columns=["sentence"], labels=declared)
    with pytest.raises(FtlabError, match=r"(?s)test split has 2 row.*data.splits.test=null"):
        encode_labels(dsd, spec)
    ok, labels, _ = encode_labels(DatasetDict({"train": dsd["train"]}), spec)
    assert labels == ["negative", "positive"] and list(ok["train"]["label"]) == [0, 1]


def test_a_tsv_row_opening_with_a_quote_does_not_swallow_the_rows_after_it(tmp_path):
    """A tsv text that starts with a double quote was read as a quoted field up to the next
    quote, merging the rows between into one text: refused, naming the row."""
    path = tmp_path / "train.tsv"
    path.write_text('text\tlabel\n"the best film\tpos\nbad one\tneg\nit was "ok" really\tpos\n'
                    'a "fine" film\tpos\n')
    with pytest.raises(FtlabError, match=r"(?s)Row 1 of .*train.tsv has a tab.*stray quote"):
        load_raw(DataSpec(files={"train": str(path)}, splits={"train": "train"}))
    path.write_text('text\tlabel\n"quoted, and fine"\tpos\nbad one\tneg\n')
    raw = load_raw(DataSpec(files={"train": str(path)}, splits={"train": "train"}))
    assert list(raw.splits["train"]["text"]) == ["quoted, and fine", "bad one"]


def test_classlabel_columns_of_hugging_face_datasets_load(tmp_path):
    """A Hub dataset's label column is a ClassLabel (GLUE, imdb; conll2003's tags a list of
    them): refused as 'not a single text, number or boolean', so no such dataset loaded.
    Parquet written by datasets keeps the features, as a Hub dataset has them."""
    from datasets import ClassLabel, Dataset, Features, List, Value

    feats = Features({"sentence": Value("string"),
                      "label": ClassLabel(names=["negative", "positive"])})
    Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]},
                      features=feats).to_parquet(tmp_path / "cls.parquet")
    raw = load_raw(DataSpec(files={"train": str(tmp_path / "cls.parquet")},
                            splits={"train": "train"}, text_columns=["sentence"]))
    assert raw.labels == ["negative", "positive"] and list(raw.splits["train"]["label"]) == [
        1, 0, 1]
    tags = Features({"tokens": List(Value("string")),
                     "ner_tags": List(ClassLabel(names=["O", "B-PER", "I-PER"]))})
    Dataset.from_dict({"tokens": [["alice", "smith", "left"]], "ner_tags": [[1, 2, 0]]},
                      features=tags).to_parquet(tmp_path / "ner.parquet")
    raw = load_raw(DataSpec(files={"train": str(tmp_path / "ner.parquet")},
                            splits={"train": "train"}, text_columns=["tokens"],
                            label_column="ner_tags"))
    assert raw.labels == ["O", "B-PER", "I-PER"] and list(raw.splits["train"]["label"]) == [
        [1, 2, 0]]


def test_drop_labels_drops_a_classlabels_rows_by_name(tmp_path):
    """data.drop_labels names classes; a ClassLabel column holds ids, which never matched
    the names: nothing was dropped and the class stayed in the label set."""
    from datasets import ClassLabel, Dataset, Features, Value

    feats = Features({"premise": Value("string"),
                      "label": ClassLabel(names=["entailment", "neutral", "contradiction"])})
    Dataset.from_dict({"premise": list("abcdef"), "label": [0, 1, 2, 0, 1, 2]},
                      features=feats).to_parquet(tmp_path / "nli.parquet")
    raw = load_raw(DataSpec(files={"train": str(tmp_path / "nli.parquet")},
                            splits={"train": "train"}, text_columns=["premise"],
                            drop_labels=["neutral"]))
    assert raw.labels == ["entailment", "contradiction"]
    assert list(raw.splits["train"]["premise"]) == list("acdf")
    assert list(raw.splits["train"]["label"]) == [0, 1, 0, 1]


def test_an_empty_second_text_column_of_a_pair_is_named(tmp_path):
    """Only the first text column was checked: a pair whose second column is empty in every
    row trained on the first text alone."""
    rows = [{"premise": f"p {i}", "hypothesis": None if i % 2 else " ",
             "label": "a" if i % 2 else "b"} for i in range(40)]
    with pytest.raises(FtlabError, match="All texts in column 'hypothesis'"):
        load_raw(spec_for(tmp_path, rows, text_columns=["premise", "hypothesis"]))


def test_a_plain_text_corpus_reads_with_data_path_text(tmp_path):
    """A .txt is read as CoNLL (word TAB tag); a plain corpus of one text per line (DAPT) was
    refused with a BIO-tag error that never said how to read it: data.path=text."""
    path = tmp_path / "corpus.txt"
    path.write_text("The first plain sentence of a corpus.\nAnother line of text here.\n")
    spec = DataSpec(files={"train": str(path)}, splits={"train": "train"}, label_column=None)
    with pytest.raises(FtlabError, match="(?s)read as CoNLL.*data.path=text"):
        load_raw(spec)
    spec.path = "text"
    raw = load_raw(spec)
    assert list(raw.splits["train"]["text"]) == ["The first plain sentence of a corpus.",
                                                 "Another line of text here."]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path, suffix):
    """pandas renamed the second 'text' to 'text.1' and the run read the first silently."""
    sep = "\t" if suffix == ".tsv" else ","
    path = tmp_path / f"train{suffix}"
    path.write_text(sep.join(["text", "label", "text"]) + "\n" + sep.join(["a", "x", "b"]) + "\n")
    with pytest.raises(FtlabError, match=r"names the column\(s\) \['text'\] more than once"):
        load_raw(DataSpec(files={"train": str(path)}, splits={"train": "train"}))


def test_a_parquet_file_naming_a_column_twice_is_refused(tmp_path):
    """pyarrow writes a schema with two 'text' fields; Arrow's reader then failed with a
    multi-line schema dump and a fix about jsonl/csv files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a", "b"]), pa.array(["x", "y"]),
                                         pa.array(["c", "d"])], names=["text", "label", "text"]),
                   path)
    with pytest.raises(FtlabError, match=r"(?s)parquet file .*train.parquet names the column\(s\) "
                       r"\['text'\] more than once.*Fix: give every column its own name"):
        load_raw(DataSpec(files={"train": str(path)}, splits={"train": "train"}))


def _split_files(tmp_path, suffix: str, **rows: list[dict]) -> dict[str, str]:
    import pandas as pd

    files = {}
    for split, split_rows in rows.items():
        path = tmp_path / f"{split}{suffix}"
        if suffix == ".jsonl":
            write_jsonl(path, split_rows)
        else:
            pd.DataFrame(split_rows).to_csv(path, index=False)
        files[split] = str(path)
    return files


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_split_files_whose_extra_columns_differ_load_the_columns_the_run_reads(tmp_path,
                                                                             suffix):
    """Only the text and label columns are read: an `id` in some files and not others, or a
    `note` that is a number in one file and text in another, does not stop the run."""
    train, val, test = synthetic_rows(30, 0), synthetic_rows(20, 1), synthetic_rows(10, 2)
    files = _split_files(tmp_path, suffix, train=[dict(r, id=i) for i, r in enumerate(train)],
                         validation=[dict(r, id=i, note=i) for i, r in enumerate(val)],
                         test=[dict(r, note=f"n{i}") for i, r in enumerate(test)])
    raw = load_raw(DataSpec(files=files))
    assert raw.labels == ["neg", "pos"]
    for split, rows in (("train", train), ("validation", val), ("test", test)):
        ds = raw.splits[split]
        assert {"text", "label"} <= set(ds.column_names) and "id" not in ds.column_names
        assert list(ds["text"]) == [r["text"] for r in rows]
        assert [raw.labels[i] for i in ds["label"]] == [r["label"] for r in rows]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_split_file_without_a_column_the_run_reads_is_named(tmp_path, suffix):
    train, val = synthetic_rows(30, 0), synthetic_rows(20, 1)
    files = _split_files(tmp_path, suffix, train=[dict(r, id=i) for i, r in enumerate(train)],
                         validation=[{"txt": r["text"], "label": r["label"]} for r in val])
    with pytest.raises(FtlabError, match=rf"(?s)validation{suffix} \(split 'validation'\) has no "
                                         r"column 'text'.*Did you mean 'txt'.*data.text_columns"):
        load_raw(DataSpec(files=files))
    # a test file without labels (and with other columns) is still refused as unlabelled
    files = _split_files(tmp_path, suffix, train=[dict(r, id=i) for i, r in enumerate(train)],
                         validation=val, test=[{"text": r["text"]} for r in val])
    with pytest.raises(FtlabError, match=r"(?s)test split has 20 row.*data.splits.test=null"):
        load_raw(DataSpec(files=files))


def test_a_semicolon_separated_csv_reads_with_data_delimiter(tmp_path):
    """A European-locale csv (';' between fields, ',' inside texts): without data.delimiter the
    header is one column and the message says which separator; with it, every field is read."""
    path = tmp_path / "train.csv"
    path.write_text("text;label\ngood, really good;pos\nbad;neg\n\"a;b\";neg\n")
    spec = {"files": {"train": str(path)}, "splits": {"train": "train"}}
    with pytest.raises(FtlabError, match=r"columns found: .*text;label\. The header looks "
                                         r"';'-separated: set \"data.delimiter=';'\""):
        load_raw(DataSpec(**spec))
    raw = load_raw(DataSpec(**spec, delimiter=";"))
    assert list(raw.splits["train"]["text"]) == ["good, really good", "bad", "a;b"]
    assert raw.labels == ["neg", "pos"]
    path.write_text("text;label;text\na;pos;b\n")  # the header check reads the same separator
    with pytest.raises(FtlabError, match=r"names the column\(s\) \['text'\] more than once"):
        load_raw(DataSpec(**spec, delimiter=";"))
    with pytest.raises(FtlabError, match=r"data.delimiter='::' is not one character"):
        load_raw(DataSpec(**spec, delimiter="::"))


def test_data_delimiter_enters_the_stage_key_only_when_set():
    """null (by extension) keeps the key a stage had before the field existed, so cached stages
    stay valid (the key below was computed before data.delimiter was added); a separator is a
    new key."""
    from dataclasses import replace

    from hydra import compose, initialize_config_dir

    from ftlab.cli import CONFIG_DIR
    from ftlab.pipeline import build_pipeline
    from ftlab.stage_keys import stage_key

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", ["model=tiny_bert", "data=rotten_tomatoes", "seed=1"])
    stage = build_pipeline(cfg)[0]
    assert stage.data.delimiter is None
    assert stage_key(stage, None) == "classify-e410c8e101661a18"
    assert stage_key(replace(stage, data=replace(stage.data, delimiter=";")), None) != \
        "classify-e410c8e101661a18"
