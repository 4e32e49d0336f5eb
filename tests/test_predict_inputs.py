"""ftlab-predict and ftlab-export on untrusted inputs: input files, run folders and output paths
a user gets wrong end in one paragraph naming the fix, and never in silently wrong results or a
file written over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ftlab
from ftlab.errors import FtlabError
from ftlab.export import main as export_main
from ftlab.predict_cli import main as predict_main


def _predict_error(*args: str) -> str:
    with pytest.raises(SystemExit) as err:
        predict_main(list(args))
    return str(err.value.code)


@pytest.mark.parametrize(("name", "content", "said"), [
    ("two.csv", "text,text\ngreat superb film,awful boring mess\n",
     "names the column(s) ['text'] more than once"),
    ("two.jsonl", '{"text": "great"}\n{"text": "great superb film", "text": "awful mess"}\n',
     "line 2 names the key 'text' more than once")])
def test_a_text_column_named_twice_is_refused(two_steps, tmp_path, name, content, said):
    """csv.DictReader and json.loads keep the last of two same-named columns: the first
    column's texts went unread and the other was predicted without a word (training's
    readers refuse both)."""
    src = tmp_path / name
    src.write_text(content)
    out = tmp_path / "p.jsonl"
    msg = _predict_error(str(two_steps), "--input", str(src), "--output", str(out))
    assert said in msg and "Fix:" in msg
    assert not out.exists()


def test_predict_does_not_write_over_its_input_file(two_steps, tmp_path):
    src = tmp_path / "reviews.txt"
    src.write_text("great film\nawful film\n")
    msg = _predict_error(str(two_steps), "--input", str(src), "--output",
                         str(tmp_path / "." / "reviews.txt"))
    assert "is the input file" in msg and "reviews.preds.jsonl" in msg
    assert src.read_text() == "great film\nawful film\n"


def test_predict_keeps_an_earlier_predictions_file_unless_told_to_replace_it(two_steps,
                                                                           tmp_path):
    """A second run with the same --output replaced the first run's predictions without a
    word; they are results too."""
    src, out = tmp_path / "in.txt", tmp_path / "p.jsonl"
    src.write_text("great film\nawful film\n")
    out.write_text('{"label": "kept"}\n')
    msg = _predict_error(str(two_steps), "--input", str(src), "--output", str(out))
    assert "p.jsonl already exists" in msg and "pass --overwrite" in msg
    assert out.read_text() == '{"label": "kept"}\n'
    predict_main([str(two_steps), "--input", str(src), "--output", str(out), "--overwrite"])
    assert [json.loads(line)["label"] != "kept" for line in out.read_text().splitlines()] == [
        True, True]


@pytest.mark.parametrize("damage", ["{cut sho", "[1, 2]", '{"pipeline": "classify"}'])
def test_a_run_whose_metrics_json_is_damaged_still_predicts(two_steps, tmp_path, damage):
    """The stages' cards are the artefact: a metrics.json cut short, not an object or with a
    malformed stage list (a bare JSONDecodeError / AttributeError before) does not stop it."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    (run_dir / "metrics.json").write_text(damage)
    (tmp_path / "in.txt").write_text("great film\n")
    out = tmp_path / "p.jsonl"
    predict_main([str(run_dir), "--input", str(tmp_path / "in.txt"), "--output", str(out)])
    assert json.loads(out.read_text())["label"] in ("neg", "pos")


def test_without_metrics_json_the_last_stage_is_the_one_no_other_starts_from(two_steps,
                                                                            tmp_path):
    """metrics.json lists the stages in pipeline order; without it the last was the last card
    by name (PET's p3 over distill): here 'zz', which 'classify' starts from. Stages that none
    starts from are each a candidate: refused without --stage."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    (run_dir / "metrics.json").unlink()
    shutil.copytree(run_dir / "classify", run_dir / "zz")
    card = json.loads((run_dir / "classify" / "card.json").read_text())
    zz = {**card, "stage": {**card["stage"], "name": "zz"}}
    (run_dir / "zz" / "card.json").write_text(json.dumps(zz))
    card["stage"]["init_from"] = "zz"
    (run_dir / "classify" / "card.json").write_text(json.dumps(card))
    assert ftlab.load(run_dir).stage.name == "classify"
    card["stage"]["init_from"] = "pretrained"  # two unrelated stages: which is last is unknown
    (run_dir / "classify" / "card.json").write_text(json.dumps(card))
    with pytest.raises(FtlabError, match=r"no readable metrics.json.*classify, zz each could be "
                       r"it(?s:.*)Fix: name the stage: --stage NAME"):
        ftlab.load(run_dir)
    assert ftlab.load(run_dir, stage="zz").stage.name == "zz"


def test_a_run_still_training_says_so_and_names_its_finished_stages(two_steps, tmp_path):
    """A run whose metrics.json says 'running' (training, or killed hard) and whose last stage
    has no card yet: it said the run "ended with status 'running'"."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    record = json.loads((run_dir / "metrics.json").read_text())
    record |= {"status": "running", "pipeline": ["classify", "later"]}
    (run_dir / "metrics.json").write_text(json.dumps(record))
    (run_dir / "later").mkdir()  # the stage in training: no card yet
    (tmp_path / "in.txt").write_text("great film\n")
    msg = _predict_error(str(run_dir), "--input", str(tmp_path / "in.txt"), "--output",
                         str(tmp_path / "p.jsonl"))
    assert "Stage 'later' of" in msg and "the run has not finished (status 'running'" in msg
    assert "ended" not in msg and "a finished stage loads with --stage: classify" in msg


@pytest.mark.parametrize(("status", "how", "named"), [
    ("discarded", "discarded by early discard", True),  # early discard's record names the stage
    ("pruned", "pruned by the search's pruner", False)])  # a pruned one's stage record says it
def test_a_job_stopped_early_says_so_and_its_stopped_stage_warns(two_steps, tmp_path, caplog,
                                                                 status, how, named):
    """Early discard (or a search's pruner) stops a sweep job in a stage (its partly trained
    artefact is written) and skips the later ones: loading the run said the last stage had "no
    card.json (written by ftlab since predict/export came in ...)", and the stopped stage
    loaded without a word."""
    import logging
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    record = json.loads((run_dir / "metrics.json").read_text())
    stopped = {"step": 4, "planned_steps": 16, "metric": "val/acc", "steps": 4}
    record |= {"status": status, "pipeline": ["classify", "later"],
               "discarded": stopped | ({"stage": "classify"} if named else {"pruned": True})}
    record["stages"]["classify"]["discarded"] = stopped
    (run_dir / "metrics.json").write_text(json.dumps(record))
    (tmp_path / "in.txt").write_text("great film\n")
    msg = _predict_error(str(run_dir), "--input", str(tmp_path / "in.txt"), "--output",
                         str(tmp_path / "p.jsonl"))
    assert (f"the job was {how} in stage 'classify' at step 4 of 16, so the stages after it did "
            "not run") in msg and "since predict/export" not in msg
    assert "stage 'classify' loads, partly trained, with --stage classify" in msg
    with caplog.at_level(logging.WARNING, logger="ftlab.run_folder"):
        ftlab.load(run_dir, stage="classify")
    assert "Stage 'classify' of" in caplog.text and "its weights are partly trained" in caplog.text


def test_a_stage_folder_given_as_the_run_names_its_run(two_steps, tmp_path):
    (tmp_path / "in.txt").write_text("great film\n")
    msg = _predict_error(str(two_steps / "classify"), "--input", str(tmp_path / "in.txt"),
                         "--output", str(tmp_path / "p.jsonl"))
    assert "is the folder of stage 'classify', not a run folder" in msg
    assert f"pass the run folder that holds it: {two_steps}" in msg


def test_the_exported_tokenizer_cuts_long_texts_where_the_stage_did(two_steps, tmp_path):
    """A Transformers user's ``truncation=True`` (as in ``pipeline(..., truncation=True)``)
    cut at the tokenizer's model_max_length (512), not at the stage's max_length (128): texts
    longer than 128 tokens got other probabilities than ftlab.load(...).predict."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["great " * 20 + "awful " * 280, "superb film"]
    want = torch.tensor([[p["probs"]["neg"], p["probs"]["pos"]]
                         for p in ftlab.load(two_steps).predict(texts)])
    export_main([str(two_steps), "--to", "hf", "--output", str(tmp_path / "hf")])
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    got = []
    for text in texts:  # one by one: no padding
        with torch.no_grad():
            got.append(model(**tok(text, truncation=True, return_tensors="pt")).logits
                       .softmax(-1)[0])
    torch.testing.assert_close(torch.stack(got), want, atol=1e-6, rtol=1e-5)


def test_predict_says_how_many_rows_were_cut_at_max_length(two_steps, caplog):
    """Rows past the stage's max_length are cut (as in training): the prediction alone does not
    show it, so predict says how many."""
    texts = ["great film", "great " * 300, "film " * 126]  # [CLS] + 126 + [SEP]: not cut
    with caplog.at_level("WARNING", logger="ftlab.inference"):
        preds = ftlab.load(two_steps).predict(texts)
    assert len(preds) == 3
    said = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert said == ["1 of 3 row(s) are longer than the stage's max_length (128 tokens) and were "
                    "cut to fit it, as in training: the model did not see their ends."]


def test_a_json_array_file_training_reads_is_predicted_too(two_steps, tmp_path):
    """Training reads a .json file holding one array of objects (pretty-printed or not);
    ftlab-predict refused the same file ('line 1 is a JSON list')."""
    rows = [{"text": "great superb film", "id": 1}, {"text": "awful boring mess", "id": 2}]
    src = tmp_path / "rows.json"
    src.write_text(json.dumps(rows, indent=2))
    out = tmp_path / "p.jsonl"
    predict_main([str(two_steps), "--input", str(src), "--output", str(out)])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = ftlab.load(two_steps).predict([r["text"] for r in rows])
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["probs"] == pytest.approx(w["probs"], abs=1e-6)
    src.write_text(json.dumps([rows[0], "not an object"]))
    assert "rows.json item 2 is a JSON str, not an object" in _predict_error(
        str(two_steps), "--input", str(src), "--output", str(tmp_path / "p2.jsonl"))


@pytest.mark.parametrize(("name", "damage", "said"), [
    ("card.json", '{"format": 1, "stage": {"na', "card.json is damaged (not readable JSON"),
    ("card.json", "[]", "card.json is damaged (a JSON list, not an object)"),
    ("card.json", '{"format": 1}', "card.json is damaged (its stage does not read"),
    ("trainable.safetensors", None, "has a damaged trainable.safetensors"),
    ("tokenizer/tokenizer.json", "{cut", "has a damaged tokenizer/ folder"),
    ("tokenizer", "", "has no tokenizer/ folder")])
def test_a_damaged_stage_file_is_named_with_the_fix(two_steps, tmp_path, name, damage, said):
    """A run folder copied in part (a file cut short, a folder missing) or edited ended in a
    bare JSONDecodeError / AttributeError / SafetensorError / OSError traceback from predict
    and export."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    path = run_dir / "classify" / name
    if damage is None:  # cut short, as an interrupted copy leaves it
        path.write_bytes(path.read_bytes()[:100])
    elif path.is_dir():  # not copied at all
        shutil.rmtree(path)
    else:
        path.write_text(damage)
    (tmp_path / "in.txt").write_text("great film\n")
    msg = _predict_error(str(run_dir), "--input", str(tmp_path / "in.txt"), "--output",
                         str(tmp_path / "p.jsonl"))
    assert said in msg and "Fix: copy the run folder again" in msg
    with pytest.raises(SystemExit) as err:
        export_main([str(run_dir), "--to", "hf", "--output", str(tmp_path / "hf")])
    assert said in str(err.value.code)


def test_a_stage_folder_renamed_or_copied_from_another_is_named(two_steps, tmp_path):
    """A stage started from a folder whose card is another stage's (renamed, or copied from a
    sibling) ended in a bare KeyError from the builder."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    shutil.copytree(run_dir / "classify", run_dir / "up")  # its card still says 'classify'
    card = json.loads((run_dir / "classify" / "card.json").read_text())
    card["stage"]["init_from"] = "up"
    (run_dir / "classify" / "card.json").write_text(json.dumps(card))
    with pytest.raises(FtlabError, match=r"run/up holds the card of stage 'classify': it was "
                       r"renamed(?s:.*)Fix: give it its stage's name \(classify/\) again"):
        ftlab.load(run_dir, stage="classify")


def test_stage_names_read_from_a_run_folder_never_leave_it(two_steps, tmp_path):
    """A run folder is untrusted input: a stage name in its metrics.json or an init_from in a
    card with '..' loaded a stage from outside the run (here one whose labels are swapped)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(two_steps, run_dir)
    outside = tmp_path / "outside"
    shutil.copytree(two_steps / "classify", outside)
    card = json.loads((outside / "card.json").read_text())
    (outside / "card.json").write_text(json.dumps({**card, "labels": ["pos", "neg"]}))
    record = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**record, "pipeline": ["../outside"]}))
    assert ftlab.load(run_dir).labels == ["neg", "pos"]  # the run's own stage
    card = json.loads((run_dir / "classify" / "card.json").read_text())
    card["stage"]["init_from"] = "../outside"
    (run_dir / "classify" / "card.json").write_text(json.dumps(card))
    with pytest.raises(FtlabError, match=r"(?s)names the stage it started from "
                       r"'\.\./outside' cannot be used.*Fix: the card is damaged"):
        ftlab.load(run_dir)


def test_predict_takes_a_series_an_array_or_a_generator_and_refuses_one_string(two_steps):
    """df['text'] or a numpy array raised numpy's 'truth value ... is ambiguous', a generator
    'not subscriptable'; a DataFrame predicted its column names, and one string character by
    character (10 rows)."""
    import numpy as np
    import pandas as pd

    model = ftlab.load(two_steps)
    texts = ["great superb film", "awful boring mess"]
    want = model.predict(texts)
    for given in (pd.Series(texts), np.array(texts), (t for t in texts), tuple(texts)):
        got = model.predict(given)
        assert [g["probs"] for g in got] == [w["probs"] for w in want], type(given)
    frame = pd.DataFrame({"id": [1, 2], "text": texts})  # list(frame): its column names
    assert [g["probs"] for g in model.predict(frame)] == [w["probs"] for w in want]
    assert model.predict(pd.Series([], dtype=str)) == []
    assert model.scores(pd.Series(texts)).shape == (2, 2)
    with pytest.raises(FtlabError, match=r"(?s)got one string \('great film'\).*predict\(\[text"):
        model.predict("great film")


def test_a_tilde_in_input_and_output_is_the_home_folder(two_steps, tmp_path, monkeypatch):
    """``--output=~/p.jsonl`` (no shell expands a ~ after '=') wrote into a folder named '~'
    under the current one, and ``--input=~/x.txt`` was 'no input file'; the run folder's ~
    was expanded already."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "in.txt").write_text("great film\n")
    predict_main([str(two_steps), "--input=~/in.txt", "--output=~/p.jsonl"])
    assert (tmp_path / "home" / "p.jsonl").is_file() and not (tmp_path / "~").exists()
    export_main([str(two_steps), "--to", "hf", "--output=~/hf"])
    assert (tmp_path / "home" / "hf" / "config.json").is_file() and not (tmp_path / "~").exists()


def test_a_csv_row_with_more_fields_than_its_header_is_refused(two_steps, tmp_path):
    """An unquoted comma in a text split it: 'good, not great' was predicted as 'good' (the
    rest went to an unnamed extra field), silently; training's reader refuses such rows."""
    src = tmp_path / "in.csv"
    src.write_text('id,text\n1,"fine, really"\n2,good, not great\n')
    msg = _predict_error(str(two_steps), "--input", str(src), "--output", str(tmp_path / "p.jsonl"))
    assert "in.csv row 2 has more fields than its header (2)" in msg
    assert "Fix: quote texts that hold the separator" in msg


def test_a_later_dict_row_without_the_text_column_is_named(two_steps):
    """Only the first row's columns were checked: a later row without one was a bare
    KeyError."""
    with pytest.raises(FtlabError, match=r"(?s)Row 2 has no column 'text' \(it has review\)"
                                         r".*Fix: pass the stage's text columns: text"):
        ftlab.load(two_steps).predict([{"text": "great film"}, {"review": "awful"}])


@pytest.mark.parametrize("packed", [".gz", ".bz2", ".xz"])
def test_compressed_inputs_predict_as_their_plain_file(two_steps, tmp_path, packed):
    """Training reads reviews.csv.bz2 (the default data is one): predict reads .gz, .bz2 and .xz
    text files as their plain form, and says what a file that does not decompress is."""
    import bz2
    import gzip
    import lzma

    content = b"text,id\ngreat film,1\n\"awful, dull\",2\n"
    plain, packed_file = tmp_path / "in.csv", tmp_path / f"in.csv{packed}"
    plain.write_bytes(content)
    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[packed]
    packed_file.write_bytes(compress(content))
    outs = []
    for src in (plain, packed_file):
        out = tmp_path / f"{src.name}.preds.jsonl"
        predict_main([str(two_steps), "--input", str(src), "--output", str(out)])
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert len(outs[0]) == 2 and outs[0] == outs[1]
    bad = tmp_path / f"bad.jsonl{packed}"
    bad.write_bytes(b'{"text": "not compressed"}\n')
    msg = _predict_error(str(two_steps), "--input", str(bad), "--output", str(tmp_path / "b.jsonl"))
    assert f"does not decompress as {packed}" in msg and "Fix:" in msg


def test_an_empty_text_a_gpt2_style_tokenizer_makes_no_tokens_of_is_named(make_cfg,
                                                                           sentiment_dir,
                                                                           tmp_path):
    """A tokenizer that adds no special tokens (GPT-2's) makes nothing of an empty text: a
    batch of only such rows crashed in the model ('cannot reshape tensor of 0 elements')."""
    from ftlab.run import run
    from tests.conftest import tiny_overrides
    from tests.test_tokens import byte_level_tokenizer

    byte_level_tokenizer(tmp_path / "tok")
    cfg = make_cfg([*tiny_overrides(sentiment_dir), "model=tiny_gpt2", "trainer.max_steps=2",
                    f"model.tokenizer={tmp_path / 'tok'}", "model.config.vocab_size=300"])
    assert run(cfg)["status"] == "ok"
    loaded = ftlab.load(cfg.paths.output_dir)
    assert len(loaded.predict(["great film", "a plot"])) == 2
    for rows, batch in ((["great film", ""], 1), (["", "", "a plot"], 64)):
        with pytest.raises(FtlabError, match=r"have no tokens: an empty text(?s:.*)Fix: drop "
                           "those rows"):
            loaded.predict(rows, batch_size=batch)
    (tmp_path / "in.txt").write_text("great film\n\n")
    assert "1 row(s) (2; 1 = the first) have no tokens" in _predict_error(
        cfg.paths.output_dir, "--input", str(tmp_path / "in.txt"), "--output",
        str(tmp_path / "p.jsonl"))
    assert not (tmp_path / "p.jsonl").exists()


def test_a_tagging_row_without_words_gets_no_tags_under_a_gpt2_style_tokenizer(make_cfg,
                                                                                tmp_path):
    """A row with no words has no tags to predict; under a tokenizer that adds no special
    tokens it went to the model as no token at all and crashed it (alone in its batch)."""
    from ftlab.run import run
    from tests.test_tokens import byte_level_tokenizer, tagged_rows, token_overrides, write_conll

    for split, n in (("train", 32), ("validation", 16), ("test", 16)):
        write_conll(tmp_path / f"{split}.conll", tagged_rows(n, 0))
    byte_level_tokenizer(tmp_path / "tok")
    cfg = make_cfg(token_overrides(tmp_path, "model=tiny_gpt2", "stage.trainer.max_steps=2",
                                   f"model.tokenizer={tmp_path / 'tok'}",
                                   "model.config.vocab_size=300"))
    assert run(cfg)["status"] == "ok"
    loaded = ftlab.load(cfg.paths.output_dir)
    words = ["alice", "is", "in", "paris"]
    tagged = loaded.predict([words])[0]
    got = loaded.predict([[], words, ""], batch_size=1)
    assert got == [{"tokens": [], "tags": [], "scores": []}, tagged,
                   {"tokens": [], "tags": [], "scores": []}]


def test_a_stage_after_a_multi_task_stage_whose_data_is_gone_says_why_load_reads_it(
        make_cfg, sentiment_dir, tmp_path):
    """Loading rebuilds a multi-task upstream's heads from its card's sub-task label sets; from
    an older card, without them, from its sub-tasks' data: with that data moved away it said
    only "Data file for split 'train' not found ... fix the path in data.files.train", as if
    training."""
    import json

    from ftlab.run import run
    from tests.conftest import tiny_overrides
    from tests.test_multitask import _pairs

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    at = "pipeline.stages.multi.tasks.vitaminc.data.files"
    cfg = make_cfg([*tiny_overrides(sentiment_dir), "pipeline=multitask_task",
                    f"{at}.train={_pairs(pairs / 'train.jsonl', 64, 0)}",
                    f"{at}.validation={_pairs(pairs / 'validation.jsonl', 24, 1)}",
                    "pipeline.stages.multi.trainer.max_steps=2",
                    "pipeline.stages.task.trainer.max_steps=2"])
    assert run(cfg)["status"] == "ok"
    pairs.rename(tmp_path / "moved")
    card = Path(cfg.paths.output_dir) / "multi" / "card.json"
    card.write_text(json.dumps({k: v for k, v in json.loads(card.read_text()).items()
                                if k != "subtask_labels"}))  # as an older ftlab wrote it
    with pytest.raises(FtlabError, match=r"Stage 'multi' is multi-task and its card \(an older "
                       r"ftlab's\) has no label sets of its sub-tasks: loading rebuilds its "
                       r"heads from their data, as training did, which failed: Data "
                       r"file for split 'train' not found(?s:.*)Fix: make that data readable"):
        ftlab.load(cfg.paths.output_dir)


def test_a_run_from_a_relative_local_model_loads_from_another_folder(two_steps, sentiment_dir,
                                                                     make_cfg, tmp_path,
                                                                     monkeypatch):
    """model.name_or_path=mdl (a folder beside where the run started): loading from any other
    folder stopped with "Could not load the model from 'mdl'"; Hydra's record of the folder the
    run started in (.hydra/hydra.yaml, as every ftlab command writes) now finds it. A folder
    that holds another model at the same relative path (here: the same weights under another
    activation) must not be read instead: it predicted other probabilities without a word."""
    import shutil

    from omegaconf import OmegaConf

    from ftlab.run import run
    from tests.conftest import tiny_overrides

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    export_main([str(two_steps), "--to", "hf", "--output", "mdl"])
    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("model=")]
    cfg = make_cfg([*overrides, "model=hf", "model.name_or_path=mdl", "trainer.max_steps=2"])
    assert run(cfg)["status"] == "ok"
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save({"hydra": {"runtime": {"cwd": str(start)}}}, run_dir / ".hydra" / "hydra.yaml")
    texts = ["great superb film", "the plot was dull"]
    before = ftlab.load(run_dir).predict(texts)
    monkeypatch.chdir(elsewhere)
    assert ftlab.load(run_dir).predict(texts) == before
    other = shutil.copytree(start / "mdl", elsewhere / "mdl")  # a namesake here
    config = json.loads((other / "config.json").read_text())
    config["hidden_act"] = "relu" if config.get("hidden_act") != "relu" else "gelu"
    (other / "config.json").write_text(json.dumps(config))
    assert ftlab.load(run_dir).predict(texts) == before


def test_a_multi_task_upstream_with_relative_data_loads_from_another_folder(
        make_cfg, sentiment_dir, tmp_path, monkeypatch):
    """Its sub-tasks' data files (relative, as typed on the command line) are read from the
    folder the run was started in (.hydra/hydra.yaml), not from wherever ftlab.load runs."""
    from omegaconf import OmegaConf

    from ftlab.run import run
    from tests.conftest import tiny_overrides
    from tests.test_multitask import _pairs

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    (start / "pairs").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    _pairs(start / "pairs" / "train.jsonl", 64, 0)
    _pairs(start / "pairs" / "validation.jsonl", 24, 1)
    at = "pipeline.stages.multi.tasks.vitaminc.data.files"
    cfg = make_cfg([*tiny_overrides(sentiment_dir), "pipeline=multitask_task",
                    f"{at}.train=pairs/train.jsonl", f"{at}.validation=pairs/validation.jsonl",
                    "pipeline.stages.multi.trainer.max_steps=2",
                    "pipeline.stages.task.trainer.max_steps=2"])
    assert run(cfg)["status"] == "ok"
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save({"hydra": {"runtime": {"cwd": str(start)}}}, run_dir / ".hydra" / "hydra.yaml")
    before = ftlab.load(run_dir).predict(["great superb film"])
    monkeypatch.chdir(elsewhere)
    assert ftlab.load(run_dir).predict(["great superb film"]) == before


def test_training_rows_a_gpt2_style_tokenizer_makes_no_tokens_of_are_refused(make_cfg,
                                                                            tmp_path):
    """Training on empty texts under a tokenizer that adds no special tokens: the length-grouped
    sampler put them in one batch, and the model stopped midway ('cannot reshape tensor of 0
    elements'); they are refused before training, by split and row."""
    from ftlab.run import run
    from tests.conftest import synthetic_rows, tiny_overrides, write_jsonl
    from tests.test_tokens import byte_level_tokenizer

    rows = synthetic_rows(80, 1)
    for row in rows[3:23]:
        row["text"] = ""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", synthetic_rows(20, 2))
    write_jsonl(data / "test.jsonl", synthetic_rows(20, 3))
    byte_level_tokenizer(tmp_path / "tok")
    cfg = make_cfg([*tiny_overrides(data), "model=tiny_gpt2", "trainer.max_steps=8",
                    f"model.tokenizer={tmp_path / 'tok'}", "model.config.vocab_size=300"])
    with pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 1
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert ("20 of 80 rows of the train split have no tokens (rows 4, 5, 6, 7, 8, ... of the "
            "split") in record["error"]
    assert not (Path(cfg.paths.output_dir) / "error.log").exists()  # refused, not a crash


def test_a_csv_quote_that_never_closes_is_refused_and_a_folder_is_named(two_steps, tmp_path):
    """The csv reader took every line after an unclosed quote into one text: three input rows
    gave one prediction, and the output no longer lined up (training refuses such a file)."""
    src, out = tmp_path / "in.csv", tmp_path / "p.jsonl"
    src.write_text('text\ngreat film\n"awful, and\nit goes on\nbad\n')
    msg = _predict_error(str(two_steps), "--input", str(src), "--output", str(out))
    assert "in.csv line 3 opens a quoted field" in msg and "Fix:" in msg and not out.exists()
    src.write_text('text\n"hi" there\n"a, quoted"\n')  # read as before: 'hi there', 'a, quoted'
    predict_main([str(two_steps), "--input", str(src), "--output", str(out)])
    assert len(out.read_text().splitlines()) == 2
    msg = _predict_error(str(two_steps), "--input", str(tmp_path), "--output",
                         str(tmp_path / "q.jsonl"))
    assert "is a folder, not a file" in msg


@pytest.mark.parametrize("stage", [["model=tiny_gpt2", "stage=cloze"],
                                   ["model=tiny_bert", "stage=cloze",
                                    "stage.task.verbalizer={pos: great, neg: bad}"],
                                   ["model=tiny_t5", "stage=text2text"],
                                   ["model=tiny_gpt2", "stage=text2text"]],
                         ids=["cloze-causal", "cloze-masked", "t5", "decoder-only"])
def test_predict_counts_rows_cut_beside_a_templates_own_tokens(make_cfg, sentiment_dir, stage,
                                                               caplog):
    """A cloze pattern's and a text2text source template's own tokens take room from the text:
    a text that fit max_length alone, but not with them, was cut and not counted."""
    from tests.conftest import tiny_overrides

    cfg = make_cfg([*tiny_overrides(sentiment_dir), *stage, "stage.task.max_length=24",
                    "trainer.max_steps=1"])
    from ftlab.run import run

    assert run(cfg)["status"] == "ok"
    model = ftlab.load(cfg.paths.output_dir)
    alone = [n for n in range(1, 30)  # as many words as fit max_length alone, specials and all
             if len(model.tokenizer("film " * n)["input_ids"]) <= 24][-1]
    texts = ["great film", "film " * alone, "great " * 300]
    with caplog.at_level("WARNING", logger="ftlab.inference"):
        model.predict(texts)
    said = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert said == ["2 of 3 row(s) are longer than the stage's max_length (24 tokens) with its "
                    "template's own tokens and were cut to fit it, as in training: the model "
                    "did not see their ends."]
    featurised = model.task.featurize({"text": texts, "label": [0] * 3})["input_ids"]
    assert model.task.cut_to_fit({"text": texts}) == [False, True, True]
    assert len(featurised[1]) <= 24
