"""Data transforms (``data.transforms``): gender swap, few-shot, and how a stage applies them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from ftlab.build import StageBuilder
from ftlab.cli import CONFIG_DIR
from ftlab.data.datamodule import TextDataModule
from ftlab.data.transforms.base import Rows
from ftlab.data.transforms.few_shot import FewShot
from ftlab.data.transforms.gender_swap import GenderSwap
from ftlab.data.transforms.nodes import build, resolve_nodes
from ftlab.errors import FtlabError
from ftlab.pipeline import build_pipeline
from ftlab.run import run
from ftlab.stage_keys import pipeline_keys
from tests import your_conf
from tests.conftest import synthetic_rows, tiny_overrides, write_jsonl


@pytest.fixture(scope="module")
def swap() -> GenderSwap:
    """The shipped transform (conf/transform/gender_swap.yaml)."""
    return build(resolve_nodes(["gender_swap"]))[0][1]


@pytest.mark.parametrize(("text", "expected"), [
    ("He loved her.", "She loved him."),                       # her at the end: object
    ("She gave her book to him.", "He gave his book to her."),  # her + noun: possessive
    ("I saw her at the park", "I saw him at the park"),        # her + preposition
    ("give her a break", "give him a break"),                  # her + determiner
    ("He kissed her passionately", "She kissed him passionately"),  # her + -ly adverb
    ("her lovely voice", "his lovely voice"),                  # -ly adjective: possessive
    ("Her dog is his.", "His dog is hers."),                   # his standing alone: hers
    ("into her 50s, her oddly charming film", "into his 50s, his oddly charming film"),
    ("about her \u201cmadness\u201d", "about his \u201cmadness\u201d"),  # opening quote
    ("wise-beyond-her-years", "wise-beyond-his-years"),
    ("his or her own", "her or his own"),
    ("makes her appear foolish", "makes him appear foolish"),
    ("The choice is his to make", "The choice is hers to make"),
    ("hers, not his own", "his, not her own"),
    ("HE is the KING", "SHE is the QUEEN"),                    # case kept
    ("Mr. Smith and his wife", "Mrs. Smith and her husband"),
    ("The woman's hat", "The man's hat"),                      # apostrophe is a boundary
    ("The actress thanked herself", "The actor thanked himself"),
    ("He'd seen the men", "She'd seen the women"),
    ("The manager and the shepherd met.", "The manager and the shepherd met."),  # inside words
    ("Themes of womanhood", "Themes of manhood"),
    ("he2 and shed", "he2 and shed"),                          # not whole words
    ("A tedious film with a great score.", "A tedious film with a great score."),
    ("John met Mary", "John met Mary"),                        # names are off by default
])
def test_gender_swap_known_sentences(swap, text, expected):
    assert swap.swap_text(text) == expected


def test_gender_swap_names_when_enabled_and_only_capitalised():
    node = resolve_nodes([{"gender_swap": {"swap_names": True}}])
    names = build(node)[0][1]
    assert names.swap_text("John met Mary. Tom and anna") == "Mary met John. Anna and anna"


def test_gender_swap_records_whether_it_swapped_names():
    """The record (metrics.json, card.json) holds the settings that change the rows."""
    rows = Rows(Dataset.from_dict({"text": ["John met Mary."], "label": ["a"]}), None,
                ("text",), ["a"], 0)
    on = build(resolve_nodes([{"gender_swap": {"swap_names": True}}]))[0][1](rows)
    off = build(resolve_nodes(["gender_swap"]))[0][1](rows)
    assert on.train["text"][-1] == "Mary met John." and len(off.train) == 1
    assert on.info["swap_names"] is True and off.info["swap_names"] is False
    assert on.info["mode"] == "add" and on.info["columns"] == ["text"]


def test_gender_swap_word_lists_keep_their_length(swap):
    words = ["Her", "brother", "told", "her", ".", "He", "left"]
    assert swap.swap_value(words) == ["His", "sister", "told", "him", ".", "She", "left"]
    assert swap.swap_value(3) == 3 and swap.swap_value(None) is None  # non-text: as is


@pytest.mark.parametrize(("pairs", "message"), [
    ([["king", "queen"], ["king", "empress"]], "'king' is in two pairs"),
    ([["he", "she"]], "pronoun 'he'"),
    ([["king"]], "not a pair of words"),
])
def test_gender_swap_refuses_a_bad_pair_list(pairs, message):
    with pytest.raises(FtlabError, match=message):
        GenderSwap(pairs=pairs)


def _rows(train: Dataset, seed: int = 0, validation: Dataset | None = None,
          labels: list[str] | None = None) -> Rows:
    return Rows(train, validation, ("premise", "hypothesis"), labels or ["a", "b"], seed)


PAIRS = Dataset.from_dict({
    "premise": ["He is tall.", "A film.", "The king smiled.", "Nothing here."],
    "hypothesis": ["Someone is tall.", "The queen left.", "A man smiled.", "Nope."],
    "label": [0, 1, 0, 1], "score": [0.5, 1.5, 2.5, 3.5]})


def test_add_copies_only_the_rows_that_changed_with_their_labels():
    out = GenderSwap(pairs=[["king", "queen"], ["man", "woman"]], mode="add")(_rows(PAIRS))
    assert len(out.train) == 4 + 3 and out.changed == 0
    assert out.train.select(range(4)).to_dict() == PAIRS.to_dict()  # originals untouched
    copies = out.train.select(range(4, 7)).to_dict()
    assert copies["premise"] == ["She is tall.", "A film.", "The queen smiled."]
    assert copies["hypothesis"] == ["Someone is tall.", "The king left.", "A woman smiled."]
    assert copies["label"] == [0, 1, 0] and copies["score"] == [0.5, 1.5, 2.5]
    assert out.train.features == PAIRS.features


def test_replace_rewrites_the_rows_that_changed_in_place():
    out = GenderSwap(pairs=[["king", "queen"]], mode="replace")(_rows(PAIRS))
    assert len(out.train) == 4 and out.changed == 3
    assert list(out.train["premise"]) == ["She is tall.", "A film.", "The queen smiled.",
                                    "Nothing here."]
    assert list(out.train["label"]) == list(PAIRS["label"])
    with pytest.raises(FtlabError, match="mode 'double'"):
        GenderSwap(mode="double")(_rows(PAIRS))


# --- few_shot -----------------------------------------------------------------------------

LABELLED = Dataset.from_dict({"text": [f"row {i}" for i in range(60)],
                              "label": [i % 3 for i in range(60)]})


def test_few_shot_draws_k_per_class_keeps_the_rest_unlabelled_and_follows_the_seed():
    def draw(stage_seed: int, **kw):
        rows = Rows(LABELLED, LABELLED, ("text",), ["x", "y", "z"], stage_seed)
        return FewShot(k=4, **kw)(rows)

    out = draw(1)
    assert sorted(out.train["label"]) == [0] * 4 + [1] * 4 + [2] * 4
    assert out.info["per_class"] == {"x": 4, "y": 4, "z": 4}
    assert "label" not in out.unlabelled.column_names and len(out.unlabelled) == 48
    everything = [*out.train["text"], *out.unlabelled["text"]]
    assert sorted(everything) == sorted(LABELLED["text"])
    assert out.keep_validation is None and out.info["validation"] == "full"
    texts = list(out.train["text"])
    assert list(draw(1).train["text"]) == texts          # same seed, same rows
    assert list(draw(2).train["text"]) != texts          # another seed, another draw
    assert list(draw(2, seed=1).train["text"]) == texts  # a fixed draw seed wins
    true_few = draw(1, validation="k_shot")
    kept = LABELLED.select(true_few.keep_validation)
    assert sorted(kept["label"]) == sorted(out.train["label"])  # same k per class
    total = FewShot(k=None, k_total=7)(Rows(LABELLED, None, ("text",), None, 0))
    assert len(total.train) == 7 and len(total.unlabelled) == 53
    capped = draw(1, unlabelled=10)  # a seeded sample of the rest, never a labelled row
    assert len(capped.unlabelled) == 10 and not set(capped.unlabelled["text"]) & set(texts)
    assert list(draw(1, unlabelled=10).unlabelled["text"]) == list(capped.unlabelled["text"])
    assert draw(1, unlabelled=False).unlabelled is None


def test_few_shot_names_a_class_with_too_few_rows():
    uneven = LABELLED.select([i for i in range(60) if i % 3 != 2 or i < 15])  # 5 of class z
    with pytest.raises(FtlabError, match=r"k=6: class 'z' has only 5 row\(s\) in the training"):
        FewShot(k=6)(Rows(uneven, None, ("text",), ["x", "y", "z"], 0))
    small_val = LABELLED.select(range(6))  # 2 rows per class
    with pytest.raises(FtlabError, match=r"'y' has only 2 row\(s\).* in the validation split"):
        FewShot(k=3, validation="k_shot")(Rows(LABELLED, small_val, ("text",), ["x", "y", "z"],
                                               0))
    with pytest.raises(FtlabError, match="not both"):
        FewShot(k=4, k_total=8)


def test_few_shot_on_tagged_rows_draws_k_total_and_names_it_for_k():
    """Token classification rows hold a tag per word: k per class has no class to count
    (a numpy error before), so it names k_total, which draws rows as for any data."""
    from datasets import Features, List, Value

    tagged = Dataset.from_dict(
        {"tokens": [["Paris", "is", str(i)] for i in range(20)],
         "label": [[1, 0, 0] if i % 2 else [0, 0, 2] for i in range(20)]},
        features=Features({"tokens": List(Value("string")), "label": List(Value("int64"))}))
    rows = Rows(tagged, None, ("tokens",), ["O", "B-LOC", "I-LOC"], 0)
    with pytest.raises(FtlabError, match=r"(?s)k=4 draws k rows per class, but the rows hold a "
                       r"tag per word.*Fix: .*\{few_shot: \{k: null, k_total: 12\}\}"):
        FewShot(k=4)(rows)
    applied = FewShot(k=None, k_total=6)(rows)
    assert len(applied.train) == 6 and len(applied.unlabelled) == 14
    assert applied.info["k_total"] == 6 and "per_class" not in applied.info


# --- a stage's data: the split is made first, and only training rows change ---------------

@pytest.fixture
def gendered_dir(tmp_path: Path) -> Path:
    for split, n, seed in (("train", 120, 0), ("validation", 48, 1), ("test", 48, 2)):
        rows = synthetic_rows(n, seed)
        for i, row in enumerate(rows):  # two of three rows have a gendered word
            cue = "great" if row["label"] == "pos" else "dull"
            row["text"] = (f"she said her {cue} film" if i % 3 == 0 else
                           f"the king said {cue} {i}" if i % 3 == 1 else f"a {cue} film {i}")
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    return tmp_path


def _stage(make_cfg, data_dir: Path, *extra: str):
    return build_pipeline(make_cfg(tiny_overrides(data_dir) + list(extra)))[0]


def test_transforms_change_training_rows_only(make_cfg, gendered_dir):
    plain = StageBuilder().raw(_stage(make_cfg, gendered_dir))
    for entry in ("[gender_swap]", "[{few_shot: {k: 5}}]"):
        raw = StageBuilder().raw(_stage(make_cfg, gendered_dir, f"data.transforms={entry}"))
        for split in ("validation", "test"):
            assert raw.splits[split].to_dict() == plain.splits[split].to_dict(), (entry, split)
        assert raw.transforms[0]["train_rows_before"] == len(plain.splits["train"])
    swapped = StageBuilder().raw(_stage(make_cfg, gendered_dir, "data.transforms=[gender_swap]"))
    added = list(swapped.splits["train"]["text"])[len(plain.splits["train"]):]
    assert len(added) == 80 and swapped.transforms[0]["added"] == 80  # 2 of 3 rows are gendered
    assert sum(t.startswith("he said his ") for t in added) == 40
    held_out = [*plain.splits["validation"]["text"], *plain.splits["test"]["text"]]
    assert not set(added) & set(held_out)


def test_cache_key_follows_the_transforms_and_their_settings(make_cfg, sentiment_dir):
    def key(*extra: str) -> str:
        return pipeline_keys([_stage(make_cfg, sentiment_dir, *extra)])["classify"]

    keys = {key(), key("data.transforms=[gender_swap]"),
            key("data.transforms=[{gender_swap: {mode: replace}}]"),
            key("data.transforms=[{few_shot: {k: 8}}]"),
            key("data.transforms=[{few_shot: {k: 9}}]"),
            key("data.transforms=[gender_swap,{few_shot: {k: 8}}]")}
    assert len(keys) == 6
    assert key("data.transforms=[gender_swap]") == key("data.transforms=[gender_swap]")


def test_bad_entries_are_named(make_cfg, sentiment_dir):
    with pytest.raises(FtlabError, match="no transform named 'gender_swp'.*gender_swap"):
        _stage(make_cfg, sentiment_dir, "data.transforms=[gender_swp]")
    stage = _stage(make_cfg, sentiment_dir, "data.transforms=[{_target_: os.system}]")
    with pytest.raises(FtlabError, match="not allowed"):
        StageBuilder().raw(stage)


def test_a_few_shot_run_records_what_the_transforms_did(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "data.transforms=[{few_shot: {k: 8, validation: k_shot}},gender_swap]",
        "stage.batch_size=8", "stage.trainer.max_steps=2"])
    record = run(cfg)
    assert record["status"] == "ok", record
    few, swap = record["stages"]["classify"]["data_transforms"]
    assert (few["transform"], few["train_rows_after"], few["validation_rows_after"],
            few["validation"]) == ("few_shot", 16, 16, "k_shot")
    assert few["unlabelled_rows"] == 256 - 16 and swap["train_rows_before"] == 16
    assert record["stages"]["classify"]["train_rows"] == 16 + swap["added"]
    card = json.loads((Path(cfg.paths.output_dir) / "classify" / "card.json").read_text())
    assert card["data_transforms"][0]["per_class"] == few["per_class"]


TRANSFORMS = your_conf.options("transform")  # and FTLAB_CONTRACT_CONF's (your_conf.py)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_every_shipped_transform_binds_and_trains_a_batch(name, make_cfg, sentiment_dir):
    """Each conf/transform/*.yaml (picked up here with no test edits) runs as the README says."""
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [f"data.transforms=[{name}]",
                                                     "trainer.fast_dev_run=true"])
    record = run(cfg)
    assert record["status"] == "ok", record
    (done,) = record["stages"]["classify"]["data_transforms"]
    assert done["transform"] == name and done["train_rows_before"] == 256


def test_a_pipeline_stage_can_go_without_the_runs_transforms(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "pipeline=tapt_task", "data.transforms=[{few_shot: {k: 4}}]",
        "+pipeline.stages.tapt.data_overrides.transforms=[]", "pipeline.stages.task.batch_size=4"])
    tapt, task = build_pipeline(cfg)
    assert tapt.data.transforms == []
    assert task.data.transforms[0]["_target_"].endswith("FewShot")
    assert task.data.transforms[0]["k"] == 4 and task.data.transforms[0]["validation"] == "full"
    builder = StageBuilder()
    assert set(builder.raw(tapt).splits) == {"train", "validation", "test"}
    assert len(builder.raw(tapt).splits["train"]) == 256
    few = builder.raw(task).splits
    assert len(few["train"]) == 8 and len(few["unlabelled"]) == 248
    assert few["unlabelled"].column_names == ["text", "group"]  # no labels
    dm = TextDataModule(few, StageBuilder().task(task), 0, batch_size=4)
    assert set(dm.splits) == {"train", "validation", "test"}  # not tokenised for training
    assert list(dm.unlabelled["text"]) == list(few["unlabelled"]["text"])


@pytest.mark.parametrize("override", ["transform=gender_swap", "+transform=few_shot"])
def test_a_transform_given_as_a_group_option_names_the_list(override):
    from hydra.core.global_hydra import GlobalHydra

    from ftlab.preflight import check_overrides

    GlobalHydra.instance().clear()
    with pytest.raises(FtlabError, match=r"not a group option.*\n.*data.transforms=\["):
        check_overrides([override], CONFIG_DIR)


def test_a_distillation_stage_labels_the_rows_few_shot_set_aside(make_cfg, sentiment_dir):
    from tests.test_distill import PIPE  # two cloze teachers, three steps each

    cfg = make_cfg(tiny_overrides(sentiment_dir) + PIPE + [
        "data.transforms=[{few_shot: {k: 8}}]",
        "+pipeline.stages.student={name: student, task: {_target_: "
        "ftlab.tasks.classify.Classify}, teachers: [t1, t2], trainer: {max_steps: 3}}"])
    record = run(cfg)
    assert record["status"] == "ok", record.get("error")
    teacher, student = record["stages"]["t1"], record["stages"]["student"]
    assert teacher["train_rows"] == 16 and teacher["data_transforms"][0]["unlabelled_rows"] == 240
    assert (student["distilled_from"], student["distilled_rows"]) == ("unlabelled", 240)
    assert student["data_transforms"] == teacher["data_transforms"]


def test_few_shot_a_class_missing_from_validation_names_a_fix_that_works():
    """A class with no validation rows: no k fits it ("use k <= 0" was suggested); the fix
    names k_total and validation: full."""
    no_z = LABELLED.select([i for i in range(30) if i % 3 != 2])
    with pytest.raises(FtlabError, match="class 'z' has only 0 row") as err:
        FewShot(k=2, validation="k_shot")(Rows(LABELLED, no_z, ("text",), ["x", "y", "z"], 0))
    assert "k <= 0" not in str(err.value) and "validation: full" in str(err.value)


def test_few_shot_a_declared_class_no_training_row_has_names_a_fix_that_works(tmp_path):
    """A class listed in data.labels that no training row has: the fix said 'drop the class
    (data.drop_labels)', which leaves a listed class in the label set; the fix that works is
    to remove it from data.labels."""
    from ftlab.data.sources import load_raw
    from ftlab.data.spec import DataSpec
    from ftlab.data.transforms.nodes import resolve_nodes, transform_raw
    from tests.conftest import write_jsonl

    path = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t {i}", "label": "xy"[i % 2]}
                                                  for i in range(20)])
    spec = {"files": {"train": str(path)}, "splits": {"train": "train"}}
    nodes = resolve_nodes([{"few_shot": {"k": 2}}], "data.transforms")
    for drop in ([], ["z"]):
        raw = load_raw(DataSpec(**spec, labels=["x", "y", "z"], drop_labels=drop))
        with pytest.raises(FtlabError, match=r"(?s)class 'z' has only 0 row.*remove the class "
                                             r"from data.labels") as err:
            transform_raw(raw, nodes, ["text"], 0)
        assert "or drop the class (data.drop_labels)." not in str(err.value)
    raw = load_raw(DataSpec(**spec, labels=["x", "y"]))
    assert len(transform_raw(raw, nodes, ["text"], 0).splits["train"]) == 4
