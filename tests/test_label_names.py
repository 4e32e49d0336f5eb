"""data.label_names: a dataset whose labels are codes (0/1, True/False) gets names for its
reports, predictions and verbalisers; ids and keys stay as they were."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ftlab.data.sources import load_raw
from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError
from tests.conftest import compose_cfg, synthetic_rows, tiny_overrides, write_jsonl


def _coded(tmp_path, n=12, classes=2):
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{i % classes}\n" for i in range(n)))
    return {"files": {"train": str(path)}, "splits": {"train": "train"}}


def test_integer_labels_take_names_and_keep_their_ids(tmp_path):
    """Integer labels could not be renamed: data.labels=[negative,positive] was refused as
    labels outside the set, so reports and predictions said '0' and '1'."""
    spec = _coded(tmp_path)
    plain = load_raw(DataSpec(**spec))
    named = load_raw(DataSpec(**spec, label_names={0: "negative", 1: "positive"}))
    assert plain.labels == ["0", "1"] and named.labels == ["negative", "positive"]
    assert list(named.splits["train"]["label"]) == list(plain.splits["train"]["label"])
    ordered = load_raw(DataSpec(**spec, labels=[1, 0], label_names={"0": "neg", "1": "pos"}))
    assert ordered.labels == ["pos", "neg"] and ordered.splits["train"]["label"][0] == 1


def test_a_label_set_of_names_for_coded_labels_points_at_label_names(tmp_path):
    with pytest.raises(FtlabError, match=r"(?s)outside the label set \['negative', 'positive'\]"
                                         r".*data.label_names=\{0: negative"):
        load_raw(DataSpec(**_coded(tmp_path), labels=["negative", "positive"]))


@pytest.mark.parametrize(("names", "said"), [
    ({0: "negative"}, r"leaves \['1'\] unnamed; the data's labels are \['0', '1'\]"),
    ({0: "a", 1: "b", 2: "c"}, r"names \['2'\], which is not among the labels"),
    ({0: "same", 1: "same"}, r"gives \['same'\] to more than one label"),
    ({0: " ", 1: "b"}, r"has an empty name")])
def test_label_names_that_do_not_name_every_label_once_are_refused(tmp_path, names, said):
    with pytest.raises(FtlabError, match=said):
        load_raw(DataSpec(**_coded(tmp_path), label_names=names))


def test_label_names_are_refused_for_tags(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("John\tB-PER\nruns\tO\n\nMary\tB-PER\nsings\tO\n")
    with pytest.raises(FtlabError, match="renames class labels, but the label column 'tags'"):
        load_raw(DataSpec(files={"train": str(path)}, splits={"train": "train"},
                          text_columns=["tokens"], label_column="tags", label_names={"O": "x"}))


def test_label_names_enter_the_stage_key_only_when_set():
    """null keeps the key stages had before the field existed (cached stages stay valid; the
    key is tests/test_data.py's, computed before); names change what a stage predicts."""
    from hydra import compose, initialize_config_dir

    from ftlab.cli import CONFIG_DIR
    from ftlab.pipeline import build_pipeline
    from ftlab.stage_keys import stage_key

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", ["model=tiny_bert", "data=rotten_tomatoes", "seed=1"])
    stage = build_pipeline(cfg)[0]
    assert stage.data.label_names is None
    assert stage_key(stage, None) == "classify-e410c8e101661a18"
    named = replace(stage, data=replace(stage.data, label_names={"rotten": "bad"}))
    assert stage_key(named, None) != "classify-e410c8e101661a18"


def test_a_run_on_coded_labels_predicts_their_names(tmp_path):
    from ftlab.predict_cli import main as predict_main
    from ftlab.run import run

    for split, n, seed in (("train", 32, 0), ("validation", 16, 1), ("test", 16, 2)):
        write_jsonl(tmp_path / f"{split}.jsonl", [{"text": r["text"], "label": int(
            r["label"] == "pos")} for r in synthetic_rows(n, seed)])
    run_dir = tmp_path / "run"
    run(compose_cfg([*tiny_overrides(tmp_path), "trainer.max_steps=1", "trainer.max_epochs=1",
                     "data.label_names={0: negative, 1: positive}"], run_dir))
    (tmp_path / "in.txt").write_text("great film\nawful film\n")
    out = tmp_path / "preds.jsonl"
    predict_main([str(run_dir), "--input", str(tmp_path / "in.txt"), "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(set(r["probs"]) == {"negative", "positive"} for r in rows)


def test_a_label_may_be_dropped_by_its_new_name_or_its_value(tmp_path):
    """data.drop_labels=[neutral] beside label_names {2: neutral} dropped nothing (a warning
    listed the labels 0, 1, 2), and naming a dropped label was refused as 'not among the
    labels'."""
    spec = _coded(tmp_path, classes=3)
    names = {0: "negative", 1: "positive", 2: "neutral"}
    for drop in (["neutral"], ["2"]):
        raw = load_raw(DataSpec(**spec, label_names=names, drop_labels=drop))
        assert raw.labels == ["negative", "positive"] and len(raw.splits["train"]) == 8


def test_label_names_keys_of_mixed_types_are_read_as_the_labels_they_name(tmp_path, capsys):
    """'data.label_names={0: negative}' '+data.label_names.1=positive' (a key given as text, as
    a YAML file's quoted "1": is) or a mistyped key
    ({0: negative, one: positive}) ended in a bare TypeError: the stage key and the card sort
    their keys, and an int does not sort beside a string. Keys are the labels' string forms."""
    from ftlab.pipeline import build_pipeline
    from ftlab.run import run
    from ftlab.stage_keys import pipeline_keys

    for split, n, seed in (("train", 32, 0), ("validation", 16, 1), ("test", 16, 2)):
        write_jsonl(tmp_path / f"{split}.jsonl", [{"text": r["text"], "label": int(
            r["label"] == "pos")} for r in synthetic_rows(n, seed)])
    base = [*tiny_overrides(tmp_path), "trainer.max_steps=1", "trainer.max_epochs=1"]
    record = run(compose_cfg([*base, "data.label_names={0: negative}",
                              "+data.label_names.1=positive"], tmp_path / "mixed"))
    assert record["status"] == "ok", record.get("error")
    card = json.loads((tmp_path / "mixed" / "classify" / "card.json").read_text())
    assert card["labels"] == ["negative", "positive"]
    ints = build_pipeline(compose_cfg([*base, "data.label_names={0: negative, 1: positive}"],
                                      tmp_path / "ints"))
    assert pipeline_keys(ints)["classify"] == record["job_identity"][0]  # 0 and "0": one key
    with pytest.raises(SystemExit):
        run(compose_cfg([*base, "data.label_names={0: negative, one: positive}"],
                        tmp_path / "typo"))
    assert "names ['one'], which is not among the labels" in capsys.readouterr().err
    with pytest.raises(FtlabError, match=r"names the label '1' twice"):
        build_pipeline(compose_cfg([*base, "data.label_names={0: a, 1: b}",
                                    "+data.label_names.1=c"], tmp_path / "twice"))
