"""A finished run used on new text: the stage card, ftlab.load, ftlab-predict, ftlab-export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ftlab
from ftlab.artefact import read_stage_card
from ftlab.errors import FtlabError
from ftlab.export import PEFT_FOLDER
from ftlab.export import main as export_main
from ftlab.pipeline import build_pipeline
from ftlab.predict_cli import main as predict_main
from ftlab.run import run
from tests.conftest import tiny_overrides

METHODS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "peft").glob("*.yaml"))
#: methods that learn extra inputs (virtual tokens, key/value prefixes), not weights: they export
#: their PEFT folder (exit status PEFT_FOLDER); every other Mergeable method exports a model
EXTRA_INPUTS = {"prompt_tuning", "prefix_tuning"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def train(make_cfg, sentiment_dir, tmp_path):
    def _train(*extra: str) -> tuple[Path, dict, object]:
        cfg = make_cfg([*tiny_overrides(sentiment_dir), "stage.optim.lr=2e-3",
                        "trainer.max_epochs=2", *extra])
        record = run(cfg)
        assert record["status"] == "ok", record.get("error")
        return tmp_path / "run", record, cfg

    return _train


def test_each_stage_records_its_labels_tokenizer_and_resolved_stage(train):
    run_dir, _, cfg = train()
    stage, labels = read_stage_card(run_dir / "classify")
    assert labels == ["neg", "pos"]
    assert stage == build_pipeline(cfg)[0]  # round-trips to the very stage that trained
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run_dir / "classify" / "tokenizer"))
    assert tok("great film")["input_ids"] == ftlab.load(run_dir).tokenizer("great film")[
        "input_ids"]


def test_load_predicts_what_the_trained_model_scored_on_test(train, sentiment_dir):
    run_dir, record, _ = train("trainer.max_epochs=6", "stage.optim.lr=3e-3", "seed=3")
    test = _rows(sentiment_dir / "test.jsonl")
    model = ftlab.load(run_dir)
    preds = model.predict([r["text"] for r in test])
    acc = sum(p["label"] == r["label"] for p, r in zip(preds, test, strict=True)) / len(test)
    assert acc == pytest.approx(record["final"]["test/acc"], abs=1e-6)
    assert acc > 0.6  # it learnt something, so equality above is not chance
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in preds)
    assert model.labels == ["neg", "pos"]


def test_a_gpt2_stage_predicts_and_exports_what_it_scored_on_test(train, sentiment_dir,
                                                                  tmp_path):
    """The tiny tokenizer emits segment ids that GPT-2 (which adds them as token embeddings)
    never saw in training: the rebuilt and the exported tokenizer must drop them too."""
    import math

    from transformers import AutoTokenizer

    run_dir, record, _ = train("model=tiny_gpt2", "trainer.max_epochs=1")
    test = _rows(sentiment_dir / "test.jsonl")
    preds = ftlab.load(run_dir).predict([r["text"] for r in test])
    loss = -sum(math.log(p["probs"][r["label"]]) for p, r in zip(preds, test, strict=True))
    assert loss / len(test) == pytest.approx(record["final"]["test/loss"], abs=1e-5)
    export_main([str(run_dir), "--to", "hf", "--output", str(tmp_path / "hf")])
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(str(tmp_path / "hf"))("a b")


def test_a_pipeline_stage_is_rebuilt_from_the_stage_it_started_from(train, sentiment_dir,
                                                                      monkeypatch):
    run_dir, record, _ = train("pipeline=tiny")
    test = _rows(sentiment_dir / "test.jsonl")
    preds = ftlab.load(run_dir).predict([r["text"] for r in test])
    acc = sum(p["label"] == r["label"] for p, r in zip(preds, test, strict=True)) / len(test)
    assert acc == pytest.approx(record["final"]["test/acc"], abs=1e-6)
    def no_build(*args):
        raise AssertionError("the refusal came after building the model")

    with monkeypatch.context() as patch, pytest.raises(SystemExit) as err:
        patch.setattr("ftlab.rebuild.rebuild", no_build)  # refused from the card, unbuilt
        predict_main([str(run_dir), "--stage", "tapt", "--input",  # the MLM stage: no classes
                      str(sentiment_dir / "test.jsonl"), "--output", str(run_dir / "p.jsonl")])
    message = str(err.value.code)
    assert "Stage 'tapt' trains a language model and predicts no classes" in message
    assert "pick a stage that does with --stage: task;" in message  # not tapt
    assert f"ftlab-export {run_dir} --stage tapt --to hf" in message
    tapt = ftlab.load(run_dir, stage="tapt")  # the adapted LM loads; predicting says why not
    assert tapt.labels == [] and tapt.model.__class__.__name__.endswith("ForMaskedLM")
    with pytest.raises(FtlabError, match=r"(?s)predicts no classes.*ftlab-export .* "
                       r"--stage tapt --to hf.*ftlab.load\(run_dir, stage=") as python_err:
        tapt.predict(["great film"])
    assert "--stage:" not in str(python_err.value)  # Python gets stage=, not the CLI's flag


def test_a_stage_whose_upstream_folder_is_gone_says_so(train, sentiment_dir):
    run_dir, _, _ = train("pipeline=tiny", "trainer.max_steps=2")
    shutil.rmtree(run_dir / "tapt")
    with pytest.raises(SystemExit) as err:
        predict_main([str(run_dir), "--input", str(sentiment_dir / "test.jsonl"),
                      "--output", str(run_dir / "p.jsonl")])
    message = str(err.value.code)
    assert "Stage 'task' starts from stage 'tapt', whose folder" in message, message
    assert "Fix: restore tapt/ from the run" in message and "card.json" not in message


def test_a_stage_reused_from_the_cache_still_loads(train, tmp_path):
    cache = f"cache.dir={tmp_path / 'cache'}"
    run_dir, _, _ = train("pipeline=tiny", cache)
    texts = ["great superb film", "the plot was dull"]
    first = ftlab.load(run_dir).predict(texts)
    run_dir.rename(tmp_path / "first")  # the second run writes a fresh folder
    run_dir, record, _ = train("pipeline=tiny", cache)
    assert record["lineage"][0]["cache_hit"] is True
    assert read_stage_card(run_dir / "tapt")[0].name == "tapt"
    assert ftlab.load(run_dir).predict(texts) == first


@pytest.mark.parametrize(("extra", "auto"), [
    (("pipeline=tiny", "peft=lora"), "AutoModelForMaskedLM"),  # LoRA TAPT, merged
    (("model=tiny_gpt2", "pipeline=clm_task", "pipeline.stages.tapt.task.max_length=32",
      "pipeline.stages.tapt.optim.lr=1e-3", "pipeline.stages.tapt.trainer.max_steps=4",
      "pipeline.stages.task.trainer.max_steps=1"), "AutoModelForCausalLM")])
def test_an_adaptive_stage_exports_its_language_model(train, extra, auto, tmp_path, capsys):
    """TAPT/DAPT's point is the adapted LM: ``--stage tapt`` exports it as a plain masked or
    causal LM whose logits are ftlab's own model's for that stage."""
    import transformers
    from transformers import AutoTokenizer

    run_dir, _, _ = train(*extra)
    ours = ftlab.load(run_dir, stage="tapt")
    export_main([str(run_dir), "--stage", "tapt", "--to", "hf", "--output", str(tmp_path / "hf")])
    assert f"{auto}.from_pretrained loads it" in capsys.readouterr().err
    model = getattr(transformers, auto).from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(["great superb film", "the plot was dull and the ending awful"], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        got, expected = model(**enc).logits, ours.model(**enc).logits
    assert got.shape[-1] == len(tok) or got.shape[-1] >= tok.vocab_size  # vocabulary logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not list((tmp_path / "hf").glob("adapter_config.json"))  # plain, not a PEFT folder


@pytest.mark.parametrize("peft", ["full", "lora", "diff_pruning"])
def test_exported_folder_predicts_exactly_what_ftlab_load_does(train, peft, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, _, _ = train(f"peft={peft}", "trainer.max_epochs=4", "stage.optim.lr=3e-3")
    texts = ["great superb film", "the plot was dull and the ending awful",
             "a movie", "funny " * 40]
    expected = torch.tensor([[p["probs"]["neg"], p["probs"]["pos"]]
                             for p in ftlab.load(run_dir).predict(texts)])
    export_main([str(run_dir), "--to", "hf", "--output", str(tmp_path / "hf")])
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        got = model(**enc).logits.softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert not list((tmp_path / "hf").glob("adapter_config.json"))  # plain, not a PEFT folder


@pytest.mark.parametrize(("family", "peft"), [("t5", "ia3"), ("t5", "lora"), ("deberta", "ia3")])
def test_a_classifier_with_a_container_head_exports_merged(train, family, peft, tmp_path):
    """T5's classification head and DeBERTa's pooler are containers (dense + out_proj) that
    peft's IA3 unload could not put back (AttributeError: no 'weight')."""
    run_dir, _, _ = train(f"model=tiny_{family}", f"peft={peft}", "trainer.max_steps=4")
    _export_predicts_as_ftlab(run_dir, tmp_path / "hf", one_by_one=True)


def _export_predicts_as_ftlab(run_dir: Path, out: Path, one_by_one: bool = False) -> None:
    """ftlab-export's folder, loaded with plain transformers, gives ftlab.load's probabilities
    (``one_by_one``: a row per call, no padding)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["great superb film", "the plot was dull and the ending awful"]
    expected = torch.tensor([[p["probs"]["neg"], p["probs"]["pos"]]
                             for p in ftlab.load(run_dir).predict(texts)])
    export_main([str(run_dir), "--to", "hf", "--output", str(out)])
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        got = (torch.cat([model(**tok(t, return_tensors="pt")).logits.softmax(-1)
                          for t in texts]) if one_by_one else
               model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_a_stage_trained_with_an_auxiliary_mlm_loss_exports_without_its_mlm_head(
        train, peft, tmp_path):
    """stage.aux_mlm_weight attaches a training-only MLM head whose decoder is tied to the
    word embeddings; save_pretrained refused it (RuntimeError: shared tensors)."""
    run_dir, _, _ = train(f"peft={peft}", "stage.aux_mlm_weight=0.5", "trainer.max_steps=4")
    _export_predicts_as_ftlab(run_dir, tmp_path / "hf")


def test_export_names_the_class_that_loads_a_cloze_stage(train, tmp_path, capsys):
    """A cloze stage exports its language model, not a sequence classifier."""
    from transformers import AutoModelForCausalLM

    run_dir, _, _ = train("model=tiny_gpt2", "stage=cloze", "trainer.max_steps=2")
    export_main([str(run_dir), "--to", "hf", "--output", str(tmp_path / "hf")])
    assert "(AutoModelForCausalLM.from_pretrained loads it)" in capsys.readouterr().err
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))


def test_a_calibrated_cloze_stage_predicts_calibrated_probabilities(train):
    """With stage.task.calibrate=true the stage's acc_cal scores p / p_cf renormalised;
    ftlab.load's predict reports those probabilities, not the raw softmax."""
    from ftlab.tasks.calibration import calibrate

    run_dir, _, _ = train("model=tiny_gpt2", "stage=cloze", "stage.task.calibrate=true",
                          "trainer.max_steps=2")
    loaded = ftlab.load(run_dir)
    texts = ["great superb film", "the plot was dull and the ending awful", "fine"]
    got = torch.tensor([list(p["probs"].values()) for p in loaded.predict(texts)])
    raw = loaded.scores(texts).softmax(-1)
    p_cf = loaded.task.content_free_probs(loaded.model)
    torch.testing.assert_close(got, calibrate(raw, p_cf))
    assert not torch.allclose(got, raw, atol=1e-4)  # the content-free bias was divided out


@pytest.mark.parametrize("peft", METHODS)
def test_every_method_exports_a_matching_model_or_says_why_not(train, peft, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ftlab.peft.base import Mergeable

    run_dir, _, _ = train(f"peft={peft}", "trainer.max_steps=4", "stage.optim.lr=3e-3")
    loaded = ftlab.load(run_dir)
    out = tmp_path / "hf"
    try:
        export_main([str(run_dir), "--output", str(out)])
    except SystemExit as err:  # not foldable: a message, and the PEFT folder where there is one
        if peft in EXTRA_INPUTS:  # a Mergeable class, but these configurations cannot fold
            assert err.code == PEFT_FOLDER, (peft, err.code)
            assert "cannot hold" in capsys.readouterr().err
            assert (out / "peft" / "adapter_config.json").is_file()
        else:  # any other method that refuses must lack merged() and say so
            assert not isinstance(loaded.peft, Mergeable), (peft, err.code)
            assert "does not fold into a plain Transformers model" in str(err.code), err.code
        return
    assert peft not in EXTRA_INPUTS, f"{peft} exported, yet its virtual inputs cannot fold"
    texts = ["great superb film", "the plot was dull and the ending awful"]
    expected = torch.tensor([list(p["probs"].values()) for p in loaded.predict(texts)])
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    enc = AutoTokenizer.from_pretrained(str(out))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits.softmax(-1), expected, atol=1e-6,
                                   rtol=1e-5)


@pytest.mark.parametrize("extra", [("peft=prompt_tuning",), (
    "pipeline=tiny", "+peft@pipeline.stages.task.peft=prompt_tuning",
    "pipeline.stages.tapt.trainer.max_steps=2")])
def test_prompt_tuning_exports_its_peft_folder_and_the_model_it_goes_on(train, tmp_path, capsys,
                                                                        extra):
    """The PEFT folder alone went on no model a user has (a model built from a config, or an
    earlier stage's, here TAPT's encoder): ``DIR/base`` beside it, with ``peft`` and plain
    Transformers, predicts what ftlab.load does."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, _, _ = train("stage.optim.lr=0.3", "trainer.max_steps=8", *extra)
    texts = ["great superb film", "the plot was dull and the ending awful"]
    loaded = ftlab.load(run_dir)
    expected = torch.tensor([list(p["probs"].values()) for p in loaded.predict(texts)])
    assert (expected[:, 0] - expected[:, 1]).abs().max() > 1e-3  # not the uniform guess
    with pytest.raises(SystemExit) as err:
        export_main([str(run_dir), "--output", str(tmp_path / "hf")])
    assert err.value.code == PEFT_FOLDER
    said = capsys.readouterr().err
    assert "cannot hold" in said and "AutoModelForSequenceClassification.from_pretrained(" in said
    base = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf" / "base"))
    model = PeftModel.from_pretrained(base, str(tmp_path / "hf" / "peft")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf" / "peft"))
    with torch.no_grad():
        got = torch.cat([model(**tok(t, return_tensors="pt")).logits.softmax(-1) for t in texts])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["csv", "semicolon_csv", "jsonl", "txt", "parquet"])
def test_predict_cli_reads_csv_jsonl_txt_and_writes_one_line_per_row(
        two_steps, sentiment_dir, tmp_path, kind):
    run_dir = two_steps
    texts = [r["text"] for r in _rows(sentiment_dir / "test.jsonl")][:20]
    src = tmp_path / f"in.{kind.split('_')[-1]}"
    if kind.endswith("csv"):
        import csv

        sep = ";" if kind == "semicolon_csv" else ","
        with src.open("w", newline="") as f:
            w = csv.writer(f, delimiter=sep)
            w.writerow(["id", "review"])
            w.writerows([i, t] for i, t in enumerate(texts))
        extra = ["--text-column", "review", *(["--delimiter", sep] if sep != "," else [])]
    elif kind == "jsonl":
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        extra = []
    elif kind == "parquet":  # training reads parquet: predict does too
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), src)
        extra = []
    else:
        src.write_text("\n".join(texts) + "\n")
        extra = []
    out = tmp_path / "preds.jsonl"
    predict_main([str(run_dir), "--input", str(src), "--output", str(out), "--batch-size",
                  "4", *extra])
    got = _rows(out)
    want = ftlab.load(run_dir).predict(texts)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["probs"] == pytest.approx(w["probs"], abs=1e-6)


def test_predict_cli_errors_name_the_fix(two_steps, sentiment_dir, tmp_path):
    run_dir = two_steps
    src = sentiment_dir / "test.jsonl"

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as err:
            predict_main([*args, "--output", str(tmp_path / "p.jsonl")])
        return str(err.value.code)

    assert "There is no run folder" in error(str(tmp_path / "nope"), "--input", str(src))
    assert "no stage 'clasify'. Did you mean 'classify'" in error(
        str(run_dir), "--stage", "clasify", "--input", str(src))
    msg = error(str(run_dir), "--input", str(src), "--text-column", "review")
    assert "has no column 'review'" in msg and "label, text" in msg
    semi = tmp_path / "semi.csv"
    semi.write_text("id;text\n1;good film\n")
    assert "The header looks ';'-separated: pass --delimiter=';'" in error(
        str(run_dir), "--input", str(semi))
    assert not (tmp_path / "p.jsonl").exists()


def test_predict_cli_bad_input_files_name_the_row_and_the_fix(two_steps, tmp_path):
    """Untrusted input files end in one paragraph (not a traceback), and a .txt file's output
    lines up with its lines, an empty line included."""
    run_dir = two_steps
    out = tmp_path / "p.jsonl"

    def error(name: str, content: bytes, *extra: str) -> str:
        src = tmp_path / name
        src.write_bytes(content)
        with pytest.raises(SystemExit) as err:
            predict_main([str(run_dir), "--input", str(src), "--output", str(out), *extra])
        return str(err.value.code)

    assert "not valid UTF-8" in error("latin.txt", "caf\xe9\n".encode("latin-1"))
    assert "line 2 is not valid JSON" in error("bad.jsonl", b'{"text": "a"}\n{oops\n')
    assert "line 1 is a JSON list" in error("list.jsonl", b'[{"text": "a"}]\n')
    assert "row 2 has no text column 'text'" in error("miss.jsonl",
                                                      b'{"text": "a"}\n{"review": "b"}\n')
    assert "row 1 has no text in column 'text'" in error("null.jsonl", b'{"text": null}\n')
    assert "has an int (5)" in error("num.jsonl", b'{"text": 5}\n')
    assert "row 2 has no text in column 'review'" in error(
        "ragged.csv", b"id,review\n1,good\n2\n", "--text-column", "review")
    assert "has no rows" in error("empty.txt", b"")
    assert "has no rows" in error("empty.csv", b"")
    assert "is a folder" in error("ok.txt", b"good\n", "--output", str(tmp_path))
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\ngood,x\n")  # Excel's csv
    predict_main([str(run_dir), "--input", str(tmp_path / "bom.csv"), "--output", str(out)])
    assert len(_rows(out)) == 1
    out.unlink()
    assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: a batch of 0 rows
        predict_main([str(run_dir), "--input", str(tmp_path / "ok.txt"), "--output", str(out),
                      "--batch-size", "0"])
    (tmp_path / "lines.txt").write_text("great\n\nawful\n")
    predict_main([str(run_dir), "--input", str(tmp_path / "lines.txt"), "--output", str(out)])
    assert len(_rows(out)) == 3  # one prediction per line


def test_export_onto_a_file_says_so_and_leaves_it(two_steps, tmp_path):
    """save_pretrained only logs "should be a directory" for a file: the export must not
    report success with nothing written."""
    run_dir = two_steps
    target = tmp_path / "notes.csv"
    target.write_text("keep me\n")
    with pytest.raises(SystemExit) as err:
        export_main([str(run_dir), "--to", "hf", "--output", str(target)])
    assert "is a file, not a folder" in str(err.value.code)
    assert target.read_text() == "keep me\n"


def test_export_into_a_folder_with_files_is_refused_and_leaves_them(two_steps, tmp_path):
    """An earlier export's files (another model's config.json and weights, a peft/ folder) would
    stay beside the new ones and load instead of it: a folder with files is refused, untouched;
    an empty or new one is written."""
    old = tmp_path / "exported"
    (old / "peft").mkdir(parents=True)
    (old / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(SystemExit) as err:
        export_main([str(two_steps), "--to", "hf", "--output", str(old)])
    assert "holds files already" in str(err.value.code) and "rm -r" in str(err.value.code)
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "peft"]
    assert (old / "config.json").read_text() == '{"model_type": "gpt2"}'
    empty = tmp_path / "empty"
    empty.mkdir()
    export_main([str(two_steps), "--to", "hf", "--output", str(empty)])
    assert (empty / "config.json").is_file()


def test_an_unwritable_output_stops_predict_and_export_before_any_work(two_steps, tmp_path,
                                                                       monkeypatch):
    """An --output under a file or in a folder that refuses new files (read-only, /proc) ends
    in one paragraph before the model is loaded, not in a traceback after predicting."""
    import errno
    import tempfile

    import ftlab.inference
    import ftlab.predict_cli

    (tmp_path / "ok.txt").write_text("good\n")
    (tmp_path / "afile").write_text("x")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(ftlab.predict_cli, "load", no_load)
    monkeypatch.setattr(ftlab.inference, "load", no_load)

    def fails(output: Path) -> list[str]:
        msgs = []
        for cli, out in ((predict_main, output / "p.jsonl"), (export_main, output / "hf")):
            with pytest.raises(SystemExit) as err:
                cli([str(two_steps), "--input", str(tmp_path / "ok.txt"), "--output", str(out)]
                    if cli is predict_main else [str(two_steps), "--output", str(out)])
            msgs.append(str(err.value.code))
        return msgs

    for msg in fails(tmp_path / "afile" / "sub"):
        assert "afile is a file, not a folder" in msg and "Fix: name a --output" in msg

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    for msg in fails(tmp_path / "ro"):
        assert "refuses new files (Read-only file system)" in msg and "Fix: name a" in msg
    assert not (tmp_path / "ro").exists()


def test_a_dropped_full_size_artefact_names_the_policy_not_the_stage_key(train, tmp_path):
    """save_artefact=none (and a sweep's best policy) delete full-size weights; loading such a
    job must say so rather than suggest the stage's own save_artefact key."""
    run_dir, record, _ = train("trainer.max_steps=2", "save_artefact=none")
    assert "artefact_dropped" in record["stages"]["classify"]
    with pytest.raises(ftlab.errors.FtlabError, match=r"(?s)the run ran with save_artefact="
                       r"none, which writes no full-size artefact.*Fix: re-run it with "
                       r"save_artefact=all") as err:
        ftlab.load(run_dir)
    assert "load the job that kept it" not in str(err.value)  # no job kept it


def test_a_job_whose_artefact_a_sweeps_best_policy_deleted_names_the_job_that_kept_one(
        train, tmp_path):
    """The end of a sweep (save_artefact=best) deletes the other jobs' full-size weights and
    records why (``ftlab.artefact.keep_best_full_artefacts``); loading such a job says so."""
    from ftlab.artefact import keep_best_full_artefacts
    from ftlab.report import collect

    run_dir, _, _ = train("trainer.max_steps=2")
    sweep = tmp_path / "sweep"
    for job, acc in (("0", 0.6), ("1", 0.9)):
        shutil.copytree(run_dir, sweep / job)
        (sweep / job / ".hydra").mkdir(exist_ok=True)
        record = json.loads((sweep / job / "metrics.json").read_text())
        stage = record["stages"]["classify"]
        stage["artefact"] = str(sweep / job / "classify" / "trainable.safetensors")
        record |= {"objective": acc, "final": {"val/acc": acc}, "seed": int(job),  # two seeds
                   "overrides": [f"seed={job}"], "config_key": job, "job_identity": [job]}
        (sweep / job / "metrics.json").write_text(json.dumps(record))
    assert keep_best_full_artefacts(collect(sweep), sweep) == "1"
    with pytest.raises(ftlab.errors.FtlabError, match=r"(?s)save_artefact policy deleted it "
                       r"\(save_artefact=best: job 1 kept its full-size artefact\).*Fix: load "
                       r"the job that kept it"):
        ftlab.load(sweep / "0")
    assert ftlab.load(sweep / "1").predict(["great film"])


def test_loading_a_run_that_ended_in_an_error_says_so(make_cfg, sentiment_dir, tmp_path):
    """It said the stage had no card.json "since predict/export came in" and to re-run with
    save_artefact: true; the run never trained."""
    cfg = make_cfg([*tiny_overrides(sentiment_dir), "data.files.train=/nonexistent.jsonl"])
    with pytest.raises(SystemExit):
        run(cfg)
    with pytest.raises(ftlab.errors.FtlabError, match=r"(?s)the run ended with status 'error' "
                                                      r"\(Data file .* not found.*resume="):
        ftlab.load(tmp_path / "run")


def test_a_txt_file_for_a_sentence_pair_stage_names_the_fix(train, tmp_path):
    run_dir, _, _ = train("trainer.max_steps=2", "data.text_columns=[text,group]")
    (tmp_path / "lines.txt").write_text("good\n")
    with pytest.raises(SystemExit) as err:
        predict_main([str(run_dir), "--input", str(tmp_path / "lines.txt"), "--output",
                      str(tmp_path / "p.jsonl")])
    assert "holds one text per line, but the stage reads 2" in str(err.value.code)
    assert "use a .csv or .jsonl" in str(err.value.code)


@pytest.mark.parametrize(("arch", "auto"), [
    ("BertForTokenClassification", "AutoModelForTokenClassification"),  # was "Sequence..."
    ("RobertaForSequenceClassification", "AutoModelForSequenceClassification"),
    ("T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("GPT2LMHeadModel", "AutoModelForCausalLM"), ("Mystery", "AutoModel")])
def test_export_message_names_the_auto_class_of_the_stage(tmp_path, arch, auto):
    from ftlab.export import auto_class

    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch]}))
    assert auto_class(tmp_path) == auto


def test_the_python_api_takes_no_texts_and_refuses_a_batch_of_zero(two_steps):
    run_dir = two_steps
    predictor = ftlab.load(run_dir)
    assert predictor.predict([]) == []
    with pytest.raises(ftlab.errors.FtlabError, match="batch_size must be at least 1"):
        predictor.predict(["good"], batch_size=0)


def test_predict_cli_splits_txt_and_jsonl_at_line_ends_only(tmp_path):
    """A text holding a form feed or U+2028 (a line separator to str.splitlines, not to a
    file) is one row: the output lines up with the input's lines."""
    from ftlab.predict_cli import read_rows

    txt = tmp_path / "in.txt"
    txt.write_bytes("page one\x0cpage two\r\nsee\u2028this\n\nlast \x1c one\n".encode())
    assert read_rows(txt, None)[0] == ["page one\x0cpage two", "see\u2028this", "",
                                       "last \x1c one"]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    assert read_rows(jsonl, None)[0] == [{"text": "a\u2028b\x85c"}]


def test_predict_cli_names_a_bad_parquet_file_and_a_column_named_twice(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ftlab.errors import FtlabError
    from ftlab.predict_cli import read_rows

    bad = tmp_path / "in.parquet"
    bad.write_text("id,text\n1,csv under a parquet name\n")
    with pytest.raises(FtlabError, match=r"is not a readable parquet file"):
        read_rows(bad, None)
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], ["text", "text"]),
                   bad)
    with pytest.raises(FtlabError, match=r"names the column\(s\) \['text'\] more than once"):
        read_rows(bad, None)


def test_predict_cli_refuses_a_tsv_row_that_swallows_the_rows_after_it(tmp_path):
    """A text opening with a double quote read the next rows into it: fewer predictions than
    input rows, silently. Refused, naming the row."""
    from ftlab.errors import FtlabError
    from ftlab.predict_cli import read_rows

    tsv = tmp_path / "in.tsv"
    tsv.write_text('id\ttext\n1\t"so good\n2\tbad\n3\tit was "ok"\n')
    with pytest.raises(FtlabError, match=r"row 1 has a tab inside its 'text'"):
        read_rows(tsv, None)
    tsv.write_text('id\ttext\n1\t"quoted, fine"\n2\tbad\n')
    assert [r["text"] for r in read_rows(tsv, None)[0]] == ["quoted, fine", "bad"]


def test_loading_a_run_does_not_report_its_trained_head_as_untrained(train, monkeypatch):
    """Rebuilding the model from the pre-trained checkpoint makes Transformers report the task
    head as "newly initialized ... Consider training"; ftlab.load then loads the trained head, so
    the report is false and silenced while the model is built (and only then)."""
    from transformers.utils import logging as hf_logging

    import ftlab
    from ftlab.build import StageBuilder

    run_dir, _, _ = train()
    seen = []
    real = StageBuilder.model

    def model(self, *args, **kwargs):
        seen.append(hf_logging.get_verbosity())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StageBuilder, "model", model)
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # a Python session's default (ftlab's jobs quiet it)
    try:
        ftlab.load(run_dir)
        assert seen == [hf_logging.ERROR]  # warnings (the untrained-head report) are off
        assert hf_logging.get_verbosity() == hf_logging.WARNING  # and back on after
    finally:
        hf_logging.set_verbosity(before)
