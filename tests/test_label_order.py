"""Inferred labels that are numbers take the ids of their numbers (label i of 0..N gets id i;
they were ordered as text: 0, 1, 10, 11, 2...); other labels keep their text order; a run
folder's card keeps the order it trained with; a checkpoint of an older ftlab (text order) is
not resumed under the new ids."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from omegaconf import open_dict

import ftlab
from ftlab.checkpoint import NAME
from ftlab.data.labels import encode_labels
from ftlab.data.spec import DataSpec
from ftlab.run import run
from tests.conftest import FILLER, tiny_overrides

TWELVE = [str(i) for i in range(12)]


def _encoded(values: list, **spec) -> tuple[list[str], list[int], bool]:
    dsd = DatasetDict({"train": Dataset.from_dict({"text": ["a"] * len(values), "y": values})})
    out, labels, renumbered = encode_labels(dsd, DataSpec(text_columns=["text"], label_column="y",
                                                          **spec))
    return labels, list(out["train"]["label"]), renumbered


@pytest.mark.parametrize("values", [
    list(range(11, -1, -1)),  # an integer column (csv, parquet)
    [str(i) for i in range(11, -1, -1)],  # integers as text (a JSON column of "3", "10")
], ids=["int", "str"])
def test_integer_labels_get_the_ids_of_their_numbers(values):
    labels, ids, renumbered = _encoded(values)
    assert labels == TWELVE
    assert ids == list(range(11, -1, -1))  # each row's id is its label's number
    assert renumbered  # text order gave other ids (1, 10, 11, 2...)


def test_numbers_sort_as_numbers_and_text_as_text():
    assert _encoded([10.0, 2.0, -1.0, 1.0])[0] == ["-1.0", "1.0", "2.0", "10.0"]  # a float column
    assert _encoded([-2, -10, 3])[0] == ["-10", "-2", "3"]
    assert _encoded(["10", "2", "b"])[0] == ["10", "2", "b"]  # not all numbers: text order
    assert _encoded(["10", "2", " 3"])[0] == [" 3", "10", "2"]  # " 3" is text, not 3
    assert _encoded([True, False])[0] == ["False", "True"]
    labels, _, renumbered = _encoded(["pos", "neg"])
    assert labels == ["neg", "pos"] and not renumbered
    assert _encoded([3, 1, 2])[2] is False  # one digit: text order was number order already


def test_declared_and_renamed_labels_keep_their_order():
    labels, ids, renumbered = _encoded([1, 10, 2], labels=["10", "2", "1"])
    assert labels == ["10", "2", "1"] and ids == [2, 0, 1] and not renumbered
    labels, ids, _ = _encoded([1, 10, 2], label_names={1: "one", 2: "two", 10: "ten"})
    assert labels == ["one", "two", "ten"] and ids == [0, 2, 1]


def _twelve_classes(folder: Path) -> Path:
    """A 12-class csv (integer labels 0..11, each with a word of its own among filler)."""
    import csv

    rng = random.Random(0)
    for split, n in (("train", 96), ("validation", 24), ("test", 24)):
        with (folder / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(n):
                words = rng.choices(FILLER, k=5)
                words.insert(2, FILLER[i % 12])
                writer.writerow([" ".join(words), i % 12])
    return folder


@pytest.fixture
def twelve(make_cfg, tmp_path):
    data = _twelve_classes(tmp_path)

    def make(folder: str, *extra: str):
        over = [o.replace(".jsonl", ".csv").replace("path=json", "path=csv")
                for o in tiny_overrides(data)]
        cfg = make_cfg([*over, "trainer.max_steps=4", "trainer.max_epochs=3",
                        "stage.optim.lr=1e-3", f"cache.dir={tmp_path / 'cache'}", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / folder)
        return cfg

    return make


def test_an_integer_label_run_exports_id_i_as_label_i_and_its_card_keeps_its_order(twelve,
                                                                                   tmp_path):
    """ftlab-export --to hf wrote id2label {2: "10", 3: "11", 4: "2", ...}. A run folder
    trained before (text order in its card) still predicts by its card, not the data's order."""
    from transformers import AutoConfig

    from ftlab.artefact import CARD
    from ftlab.export import main as export_main

    cfg = twelve("run")
    assert run(cfg)["status"] == "ok"
    run_dir = Path(cfg.paths.output_dir)
    new = ftlab.load(run_dir)
    assert new.labels == TWELVE
    export_main([str(run_dir), "--to", "hf", "--output", str(tmp_path / "hf")])
    assert AutoConfig.from_pretrained(str(tmp_path / "hf")).id2label == dict(enumerate(TWELVE))
    # an older run's card: its head's rows in text order, read from the card as trained
    card = json.loads((run_dir / "classify" / CARD).read_text())
    card["labels"] = sorted(TWELVE)
    (run_dir / "classify" / CARD).write_text(json.dumps(card))
    old = ftlab.load(run_dir)
    assert old.labels == sorted(TWELVE)
    texts = ["the film was a plot music"]
    by_row = dict(zip(TWELVE, sorted(TWELVE), strict=True))  # the same weights: row 2 is "10"
    old_probs, new_probs = old.predict(texts)[0]["probs"], new.predict(texts)[0]["probs"]
    assert all(old_probs[by_row[n]] == p for n, p in new_probs.items())


def test_a_checkpoint_written_under_the_text_order_is_not_resumed(twelve, monkeypatch,
                                                                  tmp_path):
    """A stage's checkpoint is found by its stage key, which the label order is not part of:
    an older ftlab's checkpoint (its head trained on the text order's ids) was resumed with
    the new ids."""
    from tests.test_resume import crash_at

    steps = ["checkpoint.every_n_steps=1", "trainer.max_steps=6"]
    for folder in ("new", "old"):
        crash_at(monkeypatch, 3)
        with pytest.raises(SystemExit):
            run(twelve(folder, *steps))
        monkeypatch.undo()
    state = tmp_path / "old" / "classify" / "checkpoints" / NAME / "state.json"
    written = json.loads(state.read_text())
    key = written["ftlab"]["stage_key"]
    assert key.endswith("+labels-by-number")
    written["ftlab"]["stage_key"] = key.removesuffix("+labels-by-number")  # as ftlab wrote it
    state.write_text(json.dumps(written))
    resumed = run(twelve("new", *steps))["stages"]["classify"]
    assert resumed["resumed_from_step"] == 2  # this ftlab's own checkpoint resumes
    assert run(twelve("old", *steps))["stages"]["classify"]["resumed_from_step"] is None
