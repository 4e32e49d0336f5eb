"""stage=regression: numeric labels read from csv/jsonl/parquet/HF columns and refused row by
row, Pearson/Spearman/MSE as scipy computes them (0 for a constant prediction, which the
report flags as failed), a tiny model learning a numeric target, and ftlab.load / ftlab-predict
/ ftlab-export giving the same numbers."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from scipy.stats import pearsonr, spearmanr

from ftlab.data.numeric import numeric_labels
from ftlab.data.sources import load_raw
from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError
from ftlab.run import run
from ftlab.tasks.base import TaskOutput
from ftlab.tasks.regression import Regression
from tests.conftest import tiny_overrides

PAIR = ["stage=regression", "data.label_column=score", "data.text_columns=[text,text_pair]"]


def csv_overrides(scores_dir: Path, *extra: str) -> list[str]:
    """The tiny defaults reading the scores fixture's csv files as sentence pairs."""
    base = [o.replace(".jsonl", ".csv") if o.startswith("data.files.") else o
            for o in tiny_overrides(scores_dir) if o != "data.path=json"]
    return [*base, *PAIR, *extra]


def _rows(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- metrics --------------------------------------------------------------------------------

def _score(preds: torch.Tensor, target: torch.Tensor, batch: int = 7) -> dict[str, float]:
    """The task's validation metrics over ``preds`` fed in batches of ``batch`` rows."""
    task = Regression()
    metrics = task.metrics()
    for i in range(0, len(preds), batch):
        out = TaskOutput(torch.tensor(0.0), preds[i:i + batch, None])
        task.update(metrics, out, {"labels": target[i:i + batch]})
    return {k: float(v) for k, v in metrics.compute().items()}


def test_metrics_equal_scipy_on_fixed_predictions_with_ties():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, 50).astype(np.float32)  # STS-B-like: many ties
    preds = (target + rng.normal(0, 1.5, 50)).round(1).astype(np.float32)  # ties too
    got = _score(torch.from_numpy(preds), torch.from_numpy(target))
    assert got["pearson"] == pytest.approx(pearsonr(preds, target)[0], abs=1e-5)
    assert got["spearman"] == pytest.approx(spearmanr(preds, target)[0], abs=1e-5)
    assert got["mse"] == pytest.approx(float(np.mean((preds - target) ** 2)), rel=1e-5)
    assert 0.3 < got["pearson"] < 0.95  # neither degenerate nor perfect: the check can fail


def test_a_constant_prediction_scores_0_not_nan_and_is_flagged_as_failed():
    """Correlation with a constant is undefined (scipy: NaN); the task reports 0, which is its
    trivial baseline, so the run is flagged and the sweep report counts it as degenerate."""
    from ftlab.report import summarize
    from ftlab.seedstats import failure

    target = torch.tensor([0.0, 1.5, 2.0, 4.5, 5.0, 3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torchmetrics variance warning either
        got = _score(torch.full_like(target, 2.6), target)
    assert got["pearson"] == 0.0 and got["spearman"] == 0.0
    assert got["mse"] == pytest.approx(float(((target - 2.6) ** 2).mean()))
    base = Regression().baseline(target.tolist())
    final = {"val/loss": got["mse"], **{f"val/{k}": v for k, v in got.items()},
             **{f"val/baseline_{k}": v for k, v in base.items()}}
    reason = failure(final)
    assert reason is not None and reason.startswith("val/pearson 0.0000 <= baseline"), reason
    from ftlab.status import degenerate_line

    assert "trivial predictor: a constant prediction" in degenerate_line({"failure": reason})
    learnt = final | {"val/pearson": 0.8, "val/spearman": 0.7, "val/mse": got["mse"] / 2}
    assert failure(learnt) is None
    records = [{"status": "ok", "seed": s, "final": f, "failed": failure(f) is not None,
                "failure": failure(f), "monitor": {"metric": "val/pearson", "mode": "max"}}
               for s, f in ((1, final), (2, learnt))]
    summary = next(iter(summarize(records).values()))
    assert summary["degenerate"] == 1 and summary["failed_seeds"] == ["1"]
    assert summary["baseline"]["val/pearson"] == 0.0
    assert summary["delta"]["val/pearson"] == pytest.approx(0.4)
    assert summary["metrics"]["val/mse"]["best"] == learnt["val/mse"] < final["val/mse"]  # min


# --- reading numbers ------------------------------------------------------------------------

def _spec(path: Path, fmt: str | None = None, **kw) -> DataSpec:
    return DataSpec(path=fmt, files={"train": str(path)}, splits={"train": "train"},
                    label_column="score", **kw)


def _write(path: Path, fmt: str, texts: list[str], scores: list) -> Path:
    if fmt == "csv":
        path.write_text("text,score\n" + "".join(f"{t},{s}\n" for t, s in
                                                 zip(texts, scores, strict=True)))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "score": s}) + "\n"
                                for t, s in zip(texts, scores, strict=True)))
    else:
        Dataset.from_dict({"text": texts, "score": scores}).to_parquet(str(path))
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_numbers_are_read_as_floats_from_each_format(fmt, tmp_path):
    scores = [0.0, 3.8, 5, 1.25]
    path = _write(tmp_path / f"d.{fmt}", fmt, ["a b", "c d", "e", "f g"], scores)
    raw = load_raw(_spec(path), numeric=True)
    train = raw.splits["train"]
    assert raw.labels is None  # no label set is inferred
    assert train.features["label"] == Value("float32")
    assert train["label"] == pytest.approx([0.0, 3.8, 5.0, 1.25])


def test_a_hugging_face_float_column_is_read_and_a_class_column_refused():
    texts = ["a", "b", "c"]
    floats = DatasetDict(train=Dataset.from_dict({"text": texts, "label": [0.5, 2.0, 4.75]},
                                                 Features(text=Value("string"),
                                                          label=Value("float32"))))
    out = numeric_labels(floats, DataSpec())
    assert out["train"]["label"] == [0.5, 2.0, 4.75]
    classes = DatasetDict(train=Dataset.from_dict(
        {"text": texts, "label": [0, 1, 0]},
        Features(text=Value("string"), label=ClassLabel(names=["neg", "pos"]))))
    with pytest.raises(FtlabError, match=r"(?s)holds classes \['neg', 'pos'\], not numbers.*"
                                         r"stage=classify"):
        numeric_labels(classes, DataSpec())


BAD = [  # (format, scores, expected message)
    ("csv", ["1.5", "2", "high", "3"], r"Row 3 of the train split \(.*d\.csv\) has 'high' in "
                                       r"label column 'score', not a finite number \(1 such"),
    ("csv", ["1.5", "", "2", ""], r"Row 2 of the train split .* has None in label column "
                                  r"'score'.*\(2 such row\(s\)"),
    ("csv", ["1.5", "nan", "2", "3"], r"Row 2 .* has 'nan' in label column 'score'"),
    ("jsonl", [True, False, True, True], r"Row 1 .* has True in label column 'score'"),
    ("jsonl", [1.5, None, 2.0, 3.0], r"Row 2 .* has None in label column 'score'"),
    ("parquet", [1.5, 2.0, 3.0, float("inf")], r"Row 4 .* has inf in label column 'score'"),
    ("parquet", [1.5, float("nan"), 3.0, 4.0], r"Row 2 .* has nan in label column 'score'"),
    ("csv", ["2.5", "2.5", "2.5", "2.5"], r"Every row of the train split .* has the label 2\.5 "
                                          r"in column 'score': there is nothing to learn"),
]


@pytest.mark.parametrize(("fmt", "scores", "expected"), BAD,
                         ids=["text", "empty", "nan-text", "bool", "null", "inf", "nan",
                              "constant"])
def test_a_label_that_is_not_a_finite_number_is_refused_naming_row_and_column(
        fmt, scores, expected, tmp_path):
    path = _write(tmp_path / f"d.{fmt}", fmt, ["a", "b", "c", "d"], scores)
    with pytest.raises(FtlabError, match=re.compile(expected, re.S)) as err:
        load_raw(_spec(path), numeric=True)
    assert err.value.fix, err.value


def test_an_unlabelled_test_split_and_a_label_set_are_refused_with_their_fix(tmp_path):
    train = _write(tmp_path / "train.csv", "csv", ["a", "b"], [1, 2])
    test = _write(tmp_path / "test.csv", "csv", ["c", "d"], [-1, -1])  # GLUE STS-B's test
    spec = DataSpec(files={"train": str(train), "test": str(test)},
                    splits={"train": "train", "test": "test"}, label_column="score")
    with pytest.raises(FtlabError, match=r"(?s)Every row of the test split .* label -1.*"
                                         r"undefined.*data\.splits\.test=null"):
        load_raw(spec, numeric=True)
    with pytest.raises(FtlabError, match=r"(?s)data\.labels / data\.drop_labels / "
                                         r"data\.label_names name classes"):
        load_raw(_spec(train, labels=["1", "2"]), numeric=True)


def test_classification_data_under_stage_regression_stops_before_training(
        make_cfg, sentiment_dir, tmp_path):
    with pytest.raises(SystemExit):
        run(make_cfg([*tiny_overrides(sentiment_dir), "stage=regression"]))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "error"
    assert re.search(r"Row 1 of the train split .* has '(pos|neg)' in label column 'label', "
                     r"not a finite number", record["error"]), record["error"]
    assert not (tmp_path / "run" / "error.log").exists()  # a user error, not a crash


@pytest.mark.parametrize("regularizer", ["r3f", "smart", "freelb", "mixout"])
def test_regularizers_comparing_distributions_are_refused_the_others_train(
        regularizer, make_cfg, scores_dir, tmp_path):
    """R3F's KL between softmaxes of one output is always 0: refused, not a silent no-op (as
    fairseq, which has no R3F term for regression). SMART uses the squared loss there (the
    paper's l_s for regression), FreeLB (the task loss under perturbed embeddings) and mixout
    apply."""
    cfg = make_cfg(csv_overrides(scores_dir, f"regularizer={regularizer}", "trainer.max_steps=2"))
    if regularizer == "r3f":
        with pytest.raises(SystemExit):
            run(cfg)
        record = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert f"regularizer={regularizer} compares" in record["error"], record
        assert "stage=regression predicts one number per row" in record["error"], record
    else:
        record = run(cfg)
        assert record["status"] == "ok", record.get("error")
        assert record["stages"]["regression"]["global_steps"] == 2


# --- training, predicting, exporting --------------------------------------------------------

def test_a_tiny_bert_learns_a_numeric_target_and_predict_and_export_agree(
        make_cfg, scores_dir, tmp_path):
    """score = 1.25 x the number of cue words spread over a sentence pair: a constant or random
    predictor has correlation ~0; the trained one well above it. ftlab.load, ftlab-predict and
    the exported Transformers folder give the numbers the run scored on test."""
    import ftlab
    from ftlab.export import main as export_main
    from ftlab.predict_cli import main as predict_main

    record = run(make_cfg(csv_overrides(scores_dir, "trainer.max_epochs=8",
                                        "stage.optim.lr=3e-3")))
    assert record["status"] == "ok" and not record["failed"], record
    final = record["final"]
    assert final["val/pearson"] > 0.6 and final["test/pearson"] > 0.6, final
    assert final["test/spearman"] > 0.6 and final["test/baseline_pearson"] == 0.0, final
    assert record["monitor"]["metric"] == "val/pearson"
    info = record["stages"]["regression"]
    assert info["label_mean"] == pytest.approx(np.mean([float(r["score"]) for r in _rows(
        scores_dir / "train.csv")]), abs=1e-5)

    run_dir = tmp_path / "run"
    test = _rows(scores_dir / "test.csv")
    model = ftlab.load(run_dir)
    assert model.labels == ["value"]
    preds = model.predict([(r["text"], r["text_pair"]) for r in test])
    values = np.array([p["value"] for p in preds])
    target = np.array([float(r["score"]) for r in test])
    assert set(preds[0]) == {"value"}
    assert np.mean((values - target) ** 2) == pytest.approx(final["test/mse"], rel=1e-4)
    assert pearsonr(values, target)[0] == pytest.approx(final["test/pearson"], abs=1e-4)

    predict_main([str(run_dir), "--input", str(scores_dir / "test.csv"),
                  "--output", str(tmp_path / "p.jsonl")])
    cli = [json.loads(line)["value"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert cli == pytest.approx(values.tolist(), abs=1e-5)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    export_main([str(run_dir), "--to", "hf", "--output", str(tmp_path / "hf")])
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.config.problem_type == "regression" and hf.config.num_labels == 1
    enc = tok([r["text"] for r in test], [r["text_pair"] for r in test], padding=True,
              return_tensors="pt")
    with torch.no_grad():
        exported = hf(**enc).logits[:, 0].numpy()
    assert np.allclose(exported, values, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_bert"])
def test_lora_regression_predicts_and_exports_the_same_numbers(model, make_cfg, scores_dir,
                                                                tmp_path):
    """Decoder-only (pad handling: the head pools the last non-pad token) and encoder, with
    LoRA merged on export: the exported folder predicts what ftlab.load does."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import ftlab
    from ftlab.export import main as export_main

    record = run(make_cfg(csv_overrides(scores_dir, f"model={model}", "peft=lora",
                                        "trainer.max_epochs=1")))
    assert record["status"] == "ok", record.get("error")
    assert all(math.isfinite(record["final"][k]) for k in ("test/pearson", "test/mse"))
    run_dir = tmp_path / "run"
    rows = _rows(scores_dir / "test.csv")[:20]
    values = [p["value"] for p in ftlab.load(run_dir).predict(
        [{"text": r["text"], "text_pair": r["text_pair"]} for r in rows])]
    assert len(set(np.round(values, 6))) > 1  # rows differ: equality below is not trivial
    export_main([str(run_dir), "--to", "hf", "--output", str(tmp_path / "hf")])
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():  # one row at a time: no padding question for the exported model
        exported = [hf(**tok(r["text"], r["text_pair"], return_tensors="pt")).logits[0, 0].item()
                    for r in rows]
    assert exported == pytest.approx(values, abs=1e-5)


def test_targets_far_from_unit_scale_are_recorded_and_warned_about(caplog):
    """Targets are not standardised (the exported head must predict raw numbers): the training
    labels' mean/std are recorded, and a scale that trains slowly is named with the fix."""
    from ftlab.data.sources import RawData
    from ftlab.model.backbone import ModelSpec, load_tokenizer

    tok = load_tokenizer(ModelSpec(tokenizer="pkg://ftlab/assets/tiny_tokenizer"))
    for scores, warned in (([0.5, 4.0, 2.5, 1.0], False), ([1900.0, 2010.0, 1985.0, 1999.0],
                                                           True)):
        caplog.clear()
        ds = Dataset.from_dict({"text": list("abcd"), "label": scores},
                               Features(text=Value("string"), label=Value("float32")))
        task = Regression()
        task.bind(RawData(DatasetDict(train=ds), None), tok, ["text"])
        assert task.info["label_mean"] == pytest.approx(np.mean(scores), rel=1e-6)
        assert task.info["label_std"] == pytest.approx(np.std(scores, ddof=1), rel=1e-5)
        assert ("Rescale the column" in caplog.text) == warned, caplog.text


def test_a_regression_sub_task_trains_beside_a_classifier_with_its_own_baseline(
        make_cfg, scores_dir, sentiment_dir):
    """stage=multitask: a regression sub-task reads its numbers (the classifier its classes)
    and gets the constant predictor's baseline like the classifier gets the majority's."""
    record = run(make_cfg(csv_overrides(
        scores_dir, "stage=multitask", "trainer.max_steps=4",
        "stage.tasks.task.task._target_=ftlab.tasks.regression.Regression",
        f"stage.tasks.vitaminc.data.files={{train: {sentiment_dir}/train.jsonl, "
        f"validation: {sentiment_dir}/validation.jsonl}}",
        "stage.tasks.vitaminc.data.text_columns=[text]",
        "stage.tasks.vitaminc.data.labels=[neg,pos]",
        "stage.tasks.vitaminc.data.splits={train: train, validation: validation}")))
    assert record["status"] == "ok", record.get("error")
    final = record["final"]
    assert final["val/baseline_task/pearson"] == 0.0 and "val/baseline_vitaminc/acc" in final
    assert math.isfinite(final["val/task/pearson"]) and math.isfinite(final["val/vitaminc/acc"])


@pytest.mark.parametrize("regularizer", ["r3f", "smart"])
def test_a_regression_sub_task_refuses_r3f_and_gets_smarts_squared_loss(
        regularizer, make_cfg, scores_dir, sentiment_dir, tmp_path):
    """R3F's KL on a regression sub-task's batches was silently 0; SMART (no teacher in
    multitask) compares its numbers by the squared loss."""
    cfg = make_cfg(csv_overrides(
        scores_dir, "stage=multitask", "trainer.max_steps=4", f"regularizer={regularizer}",
        "stage.tasks.task.task._target_=ftlab.tasks.regression.Regression",
        f"stage.tasks.vitaminc.data.files={{train: {sentiment_dir}/train.jsonl, "
        f"validation: {sentiment_dir}/validation.jsonl}}",
        "stage.tasks.vitaminc.data.text_columns=[text]",
        "stage.tasks.vitaminc.data.labels=[neg,pos]",
        "stage.tasks.vitaminc.data.splits={train: train, validation: validation}",
        *(["regularizer.mu=0"] if regularizer == "smart" else [])))
    if regularizer == "r3f":
        with pytest.raises(SystemExit):
            run(cfg)
        record = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert "sub-task 'task' (a regression) predicts one number per row" in record["error"]
        return
    assert run(cfg)["status"] == "ok"


def test_many_numbers_with_fractions_are_refused_as_class_labels(caplog):
    """stage=classify (or distill) on an STS-B-like score made each score its own class."""
    from ftlab.data.labels import MAX_FRACTION_CLASSES, encode_labels

    scores = [i / 4 for i in range(MAX_FRACTION_CLASSES + 1)]  # 0, 0.25, ... 5.0
    dsd = DatasetDict({"train": Dataset.from_dict({"text": ["a"] * len(scores),
                                                   "score": scores})})
    with pytest.raises(FtlabError, match=r"(?s)'score' holds 21 distinct numbers, with "
                       r"fractions \(\['0.25', '0.5'.*stage=regression"):
        encode_labels(dsd, DataSpec(text_columns=["text"], label_column="score"))
    few = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "y": [0.5, 2.0]})})
    assert encode_labels(few, DataSpec(text_columns=["text"], label_column="y"))[1] == \
        ["0.5", "2.0"]  # a few may be class codes: taken, with a warning
    assert "taken as 2 class labels. For a numeric target use stage=regression" in caplog.text
    whole = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "y": [0.0, 1.0]})})
    caplog.clear()
    assert encode_labels(whole, DataSpec(text_columns=["text"], label_column="y"))[1] == \
        ["0.0", "1.0"]  # whole numbers are classes, silently
    assert "stage=regression" not in caplog.text


def test_few_shot_k_per_class_names_numeric_labels():
    from ftlab.data.transforms.base import Rows
    from ftlab.data.transforms.few_shot import FewShot

    ds = Dataset.from_dict({"text": [f"r{i}" for i in range(9)], "label": [0.5] * 9})
    with pytest.raises(FtlabError, match=r"labels are numbers \(stage=regression\), not classes"):
        FewShot(k=2)(Rows(ds, None, ("text",), None, 0))
    assert len(FewShot(k=None, k_total=3)(Rows(ds, None, ("text",), None, 0)).train) == 3


@pytest.mark.parametrize("max_length", [1, 4])
def test_a_max_length_with_no_room_for_both_texts_is_refused_before_training(
        max_length, make_cfg, scores_dir, tmp_path):
    """A pair takes 3 special tokens: below that Transformers skipped truncation (the setting
    was ignored); at 3-4 a row kept its special tokens and at most one text."""
    with pytest.raises(SystemExit):
        run(make_cfg(csv_overrides(scores_dir, f"stage.task.max_length={max_length}")))
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert re.search(rf"max_length={max_length} leaves no room.*adds 3 special.*at least 5",
                     error, re.S), error
