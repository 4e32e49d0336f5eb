"""The bad-input battery, round two: values out of range, a bad later stage, a bad sweep job,
data whose types are wrong, and messages that used to mislead. Each case ends before any
training with one paragraph naming the problem and the fix (``assert_one_paragraph``).

Allowed values live in one place, beside each field (``ftlab.rules``); these cases check that
every kind of field is covered, and that the message names the override to fix.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.cli import preflight
from ftlab.errors import FtlabError
from tests.conftest import synthetic_rows, tiny_overrides, write_jsonl
from tests.test_bad_inputs import (  # noqa: F401
    PIPE,
    Case,
    assert_one_paragraph,
    no_training,
    stops_with_user_error,
)


def _files(sdir: Path, **files: Path) -> list[str]:
    """Tiny overrides with some of the split files swapped."""
    base = [o for o in tiny_overrides(sdir) if not o.startswith(("data.files", "data.path"))]
    paths = {s: sdir / f"{s}.jsonl" for s in ("train", "validation", "test")} | files
    return [*base, *(f"data.files.{s}={p}" for s, p in paths.items())]


def _write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _jsonl(tmp: Path, name: str, rows: list[dict]) -> Path:
    return write_jsonl(tmp / name, rows)


def _rows(n: int = 40, seed: int = 0, **change: object) -> list[dict]:
    """Synthetic rows; ``change={"7": {...}}`` replaces keys of row 7."""
    rows = [{"text": r["text"], "label": r["label"], "group": r["group"]}
            for r in synthetic_rows(n, seed)]
    for i, values in change.items():
        rows[int(i)] |= values
    return rows


def _csv(tmp: Path, name: str, rows: list[dict]) -> Path:
    import pandas as pd

    path = tmp / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _csv_splits(tmp: Path, sdir: Path, test_body: str | None = None,
                valid_rows: list[dict] | None = None,
                train_rows: list[dict] | None = None,
                test_rows: list[dict] | None = None) -> list[str]:
    """csv files for every split; the test file's text or some split's rows replaced."""
    files = {"train": _csv(tmp, "train.csv", train_rows or _rows(64, 0)),
             "validation": _csv(tmp, "validation.csv", valid_rows or _rows(16, 1)),
             "test": (_write(tmp, "test.csv", test_body) if test_body is not None
                      else _csv(tmp, "test.csv", test_rows or _rows(16, 2)))}
    return _files(sdir, **files)


def _int_labels(rows: list[dict]) -> list[dict]:
    return [r | {"label": int(r["label"] == "pos")} for r in rows]


def _review_only(tmp: Path) -> str:
    """A data node for one stage whose files have a 'review' column, not 'text'."""
    rows = [{"review": r["text"], "label": r["label"]} for r in _rows(40)]
    paths = {s: _jsonl(tmp, f"{s}-reviews.jsonl", rows) for s in ("train", "validation", "test")}
    return "{" + ", ".join(f"{s}: {p}" for s, p in paths.items()) + "}"  # a file each


S = tiny_overrides
MLM = ["stage=mlm", "data.label_column=null"]

# (id, overrides builder, pattern the message must match)
VALUE_CASES: list[tuple[str, Case, str]] = [
    # --- stage fields (StageSpec)
    ("batch-size-zero", lambda t, s: S(s) + ["stage.batch_size=0"],
     r"batch_size=0 is out of range: it must be 1 or more.*Fix: set stage.batch_size"),
    ("batch-size-negative", lambda t, s: S(s) + ["stage.batch_size=-8"],
     r"batch_size=-8 is out of range"),
    ("batch-size-word", lambda t, s: S(s) + ["stage.batch_size=big"],
     r"Invalid value in stage 'classify' for key 'batch_size': 'big' \(it must be 1 or more, "
     r"or auto\)"),
    ("max-epochs-unlimited-without-max-steps", lambda t, s: S(s) + ["trainer.max_epochs=-1"],
     r"stage 'classify': trainer.max_epochs=-1 \(no epoch limit\) with no trainer.max_steps: "
     r"the stage would never end.*Fix: set trainer.max_steps="),
    ("max-length-past-positions", lambda t, s: S(s) + ["stage.task.max_length=4096"],
     r"stage 'classify': task.max_length=4096 is more than the 512 positions this model has"
     r".*Fix: set stage.task.max_length to at most 512"),
    ("max-length-plus-virtual-tokens", lambda t, s: S(s) + ["peft=prompt_tuning",
                                                          "stage.task.max_length=500"],
     r"task.max_length=500 plus the PEFT method's 20 virtual tokens is more than the 512 "
     r"positions.*Fix: set stage.task.max_length to at most 492 \(or lower the PEFT method's "
     r"num_virtual_tokens\)"),
    ("batch-size-fraction", lambda t, s: S(s) + ["stage.batch_size=1.5"],
     r"(?s)key 'batch_size': Value '1.5' of type 'float'.*Fix: set stage.batch_size to a whole "
     r"number, 1 or more, or auto"),
    ("batch-size-null", lambda t, s: S(s) + ["stage.batch_size=null"],
     r"Invalid value in stage 'classify' for key 'batch_size': Value 'None'"),
    ("eval-batch-size-zero", lambda t, s: S(s) + ["stage.eval_batch_size=0"],
     r"eval_batch_size=0 is out of range.*stage.eval_batch_size"),
    ("aux-mlm-weight-negative", lambda t, s: S(s) + ["stage.aux_mlm_weight=-0.5"],
     r"aux_mlm_weight=-0.5 is out of range: it must be 0 or more"),
    ("save-artefact-not-bool", lambda t, s: S(s) + ["stage.save_artefact=maybe"],
     r"Invalid value in stage 'classify' for key 'save_artefact'"),
    ("head-warmup-negative", lambda t, s: S(s) + ["stage.head_warmup_steps=-1"],
     r"head_warmup_steps=-1.0 is out of range: it must be 0 or more"),
    ("head-warmup-part-step", lambda t, s: S(s) + ["stage.head_warmup_steps=2.5"],
     r"head_warmup_steps=2.5: a step count must be a whole number.*stage.head_warmup_steps=2"),
    ("head-warmup-whole-stage", lambda t, s: S(s) + ["stage.head_warmup_steps=3",
                                                     "trainer.max_steps=3"],
     r"head_warmup_steps=3 is not below its trainer.max_steps=3.*Fix: lower head_warmup"),
    # --- optimiser fields (OptimSpec)
    ("lr-negative", lambda t, s: S(s) + ["stage.optim.lr=-1"],
     r"optim.lr=-1.0 is out of range: it must be 0 or more.*stage.optim.lr=5e-5"),
    ("warmup-ratio-two", lambda t, s: S(s) + ["stage.optim.warmup_ratio=2"],
     r"(?s)warmup_ratio=2.0 is out of range: it must be in \[0, 1\).*Fix: set "
     r"stage.optim.warmup_ratio to a value in \[0, 1\)"),
    ("warmup-ratio-one", lambda t, s: S(s) + ["stage.optim.warmup_ratio=1"],
     r"warmup_ratio=1.0 is out of range"),
    ("layer-decay-negative", lambda t, s: S(s) + ["stage.optim.layer_decay=-1"],
     r"layer_decay=-1.0 is out of range: it must be in \(0, 1\]"),
    ("layer-decay-above-one", lambda t, s: S(s) + ["stage.optim.layer_decay=1.5"],
     r"layer_decay=1.5 is out of range"),
    ("weight-decay-negative", lambda t, s: S(s) + ["stage.optim.weight_decay=-0.01"],
     r"weight_decay=-0.01 is out of range"),
    ("betas-above-one", lambda t, s: S(s) + ["stage.optim.betas=[0.9,1.5]"],
     r"betas=\[0.9, 1.5\] is out of range: it must be each in \[0, 1\)"),
    ("eps-zero", lambda t, s: S(s) + ["stage.optim.eps=0"],
     r"eps=0.0 is out of range: it must be more than 0"),
    ("peft-lr-negative", lambda t, s: S(s) + ["peft.lr=-0.001"],
     r"stage 'classify': lr=-0.001 is out of range: it must be 0 or more.*Fix: set peft.lr"),
    ("lr-scaling-unknown", lambda t, s: S(s) + ["stage.optim.lr_scaling=cubic"],
     r"lr_scaling='cubic' is not allowed: it must be one of: linear, none, sqrt"),
    ("reference-batch-zero", lambda t, s: S(s) + ["stage.optim.reference_batch=0"],
     r"reference_batch=0 is out of range"),
    # --- ftlab's own trainer keys (RuntimeSpec)
    ("num-workers-negative", lambda t, s: S(s) + ["trainer.num_workers=-1"],
     r"num_workers=-1 is out of range: it must be 0 or more.*Fix: set trainer.num_workers"),
    ("pad-multiple-zero", lambda t, s: S(s) + ["trainer.pad_to_multiple_of=0"],
     r"pad_to_multiple_of=0 is out of range"),
    ("pad-bucket-zero", lambda t, s: S(s) + ["trainer.pad_to_buckets=[0,64]"],
     r"pad_to_buckets=\[0, 64\] is out of range: it must be each 1 or more"),
    ("compile-mode-unknown", lambda t, s: S(s) + ["trainer.compile=fastest"],
     r"compile='fastest' is not allowed: it must be one of: .*reduce-overhead.*"
     r"Fix: set trainer.compile"),
    # --- task arguments (the constructor's signature)
    ("max-length-zero", lambda t, s: S(s) + ["stage.task.max_length=0"],
     r"stage 'classify'.task: max_length=0 is out of range: it must be 1 or more"),
    ("max-length-not-int", lambda t, s: S(s) + ["stage.task.max_length=long"],
     r"max_length='long' is a str, but int is expected.*Fix: give max_length .* an int value"),
    ("max-length-float", lambda t, s: S(s) + ["stage.task.max_length=64.5"],
     r"max_length=64.5 is a float, but int is expected"),
    ("mlm-max-length-one", lambda t, s: S(s) + MLM + ["stage.task.max_length=1"],
     r"max_length=1 is out of range: it must be 2 or more"),
    ("mlm-mask-prob-zero", lambda t, s: S(s) + MLM + ["stage.task.mask_prob=0"],
     r"mask_prob=0 is out of range: it must be in \(0, 1\)"),
    ("mlm-whole-word-not-bool", lambda t, s: S(s) + MLM + ["stage.task.whole_word=maybe"],
     r"whole_word='maybe' is a str, but bool is expected"),
    ("mlm-monitor-acc", lambda t, s: S(s) + MLM + ["stage.task.monitor=acc"],
     r"task.monitor='acc' is not a metric this task reports \(loss, ppl\)"),
    ("classify-monitor-typo", lambda t, s: S(s) + ["stage.task.monitor=accuracy"],
     r"task.monitor='accuracy' is not a metric.*\(acc, f1, loss\)"),
    # --- regulariser arguments
    ("mixout-p-one", lambda t, s: S(s) + ["regularizer=mixout", "regularizer.p=1"],
     r"p=1 is out of range: it must be in \[0, 1\)"),
    ("r3f-noise-unknown", lambda t, s: S(s) + ["regularizer=r3f", "regularizer.noise=gauss"],
     r"noise='gauss' is not allowed: it must be one of: normal, uniform"),
    ("r3f-eps-negative", lambda t, s: S(s) + ["regularizer=r3f", "regularizer.eps=-1"],
     r"eps=-1 is out of range"),
    # --- averaging, snapshot and early-discard callbacks (silently trained on, divided by zero
    #     or raised a bare ValueError)
    ("ema-decay-above-one", lambda t, s: S(s) + ["callbacks=ema", "callbacks.ema.decay=1.5"],
     r"callbacks.ema: decay=1.5 is out of range: it must be in \[0, 1\)"),
    ("ema-start-past-the-end", lambda t, s: S(s) + ["callbacks=ema", "callbacks.ema.start=2"],
     r"callbacks.ema: start=2 is out of range"),
    ("snapshots-zero-cycles", lambda t, s: S(s) + ["callbacks=snapshots",
                                                   "callbacks.snapshots.cycles=0"],
     r"callbacks.snapshots: cycles=0 is out of range: it must be 1 or more"),
    ("early-discard-at-zero", lambda t, s: S(s) + ["callbacks=early_discard",
                                                   "callbacks.early_discard.at=0"],
     r"callbacks.early_discard: at=0 is out of range: it must be in \(0, 1\)"),
    ("early-discard-keep-unknown", lambda t, s: S(s) + ["callbacks=early_discard",
                                                        "callbacks.early_discard.keep=best"],
     r"keep='best' is not allowed: it must be one of: above_median, top_k"),
    # --- seeds: numpy's generators refuse negatives (mid-run, as a crash), Lightning resets
    #     seeds past 2^32 - 1 to 0 with a warning
    ("seed-negative", lambda t, s: S(s) + ["seed=-1"],
     r"seed=-1 is out of range: it must be in \[0, 4294967295\].*Fix: e.g. seed=1"),
    ("seed-too-big", lambda t, s: S(s) + ["seed=4294967296"], r"seed=4294967296 is out of range"),
    ("stage-seed-negative", lambda t, s: S(s) + ["stage.seed=-3"],
     r"stage 'classify': seed=-3 is out of range.*stage.seed"),
    # --- trainer keys (the TRAINER table) and types (Trainer's signature)
    ("val-check-past-the-epoch", lambda t, s: S(s) + ["trainer.val_check_interval=100000"],
     r"trainer.val_check_interval=100000 batches is more than one epoch \(\d+ batches.*"
     r"check_val_every_n_epoch=null"),  # was Lightning's ValueError as fit started
    ("devices-zero", lambda t, s: S(s) + ["trainer.devices=0"],  # Lightning's own check
     r"stage 'classify' trainer: `Trainer\(devices=0\)` value is not a valid input"),
    ("max-epochs-zero", lambda t, s: S(s) + ["trainer.max_epochs=0"],
     r"trainer: max_epochs=0 is out of range: it must be 1 or more, or -1.*trainer.max_epochs"),
    ("max-steps-negative", lambda t, s: S(s) + ["trainer.max_steps=-2"],
     r"max_steps=-2 is out of range: it must be 0 or more, or -1"),
    ("stage-max-steps-negative", lambda t, s: S(s) + ["stage.trainer.max_steps=-5"],
     r"max_steps=-5 is out of range"),
    ("val-check-interval-zero", lambda t, s: S(s) + ["trainer.val_check_interval=0"],
     r"val_check_interval=0 is out of range: it must be more than 0"),
    ("accumulate-zero", lambda t, s: S(s) + ["trainer.accumulate_grad_batches=0"],
     r"accumulate_grad_batches=0 is out of range"),
    ("precision-unknown", lambda t, s: S(s) + ["trainer.precision=8"],
     r"precision=8 is not allowed: it must be one of: .*bf16-mixed"),
    ("gradient-clip-negative", lambda t, s: S(s) + ["trainer.gradient_clip_val=-1"],
     r"gradient_clip_val=-1 is out of range"),
    ("log-every-zero", lambda t, s: S(s) + ["trainer.log_every_n_steps=0"],
     r"log_every_n_steps=0 is out of range"),
    ("max-epochs-not-int", lambda t, s: S(s) + ["trainer.max_epochs=many"],
     r"max_epochs='many' is a str, but int or null is expected"),
    # --- data and cache fields
    ("max-train-samples-zero", lambda t, s: S(s) + ["data.max_train_samples=0"],
     r"max_train_samples=0 is out of range.*Fix: set data.max_train_samples"),
    ("max-eval-samples-negative", lambda t, s: S(s) + ["data.max_eval_samples=-1"],
     r"max_eval_samples=-1 is out of range"),
    ("split-fractions-negative", lambda t, s: S(s) + ["data.split_fractions=[1.2,-0.1,-0.1]"],
     r"split_fractions=\[1.2, -0.1, -0.1\] is out of range"),
    ("cache-stages-typo", lambda t, s: S(s) + ["cache.stages=upsteam"],
     r"stages='upsteam' is not allowed.*upstream"),
    ("checkpoint-every-negative", lambda t, s: S(s) + ["checkpoint.every_n_steps=-1"],
     r"every_n_steps=-1 is out of range.*Fix: set checkpoint.every_n_steps"),
    ("save-artefact-policy-unknown", lambda t, s: S(s) + ["save_artefact=some"],
     r"save_artefact is 'some'.*best"),
    # --- a bad LAST stage of a pipeline fails before the first stage trains
    ("pipeline-last-lr", lambda t, s: S(s) + PIPE + ["pipeline.stages.task.optim.lr=-1"],
     r"stage 'task': optim.lr=-1.0 is out of range.*Fix: set pipeline.stages.task.optim.lr"),
    ("pipeline-last-task-type", lambda t, s: S(s) + PIPE + [
        "pipeline.stages.task.task.max_length=abc"],
     r"stage 'task'.task: max_length='abc' is a str, but int is expected"),
    ("pipeline-last-task-unknown-arg", lambda t, s: S(s) + PIPE + [
        "+pipeline.stages.task.task.mask_prob=0.2"],
     r"stage 'task'.task has key\(s\) \['mask_prob'\] that Classify does not take"),
    ("pipeline-last-monitor", lambda t, s: S(s) + PIPE + [
        "pipeline.stages.task.task.monitor=ppl"],
     r"stage 'task': task.monitor='ppl' is not a metric.*\(acc, f1, loss\)"),
    ("pipeline-last-data-no-text", lambda t, s: S(s) + PIPE + [
        f"+pipeline.stages.task.data_overrides.files={_review_only(t)}"],
     r"\['text'\] not found in the train split; columns found: label, review"),
    # a stage's data error names the key that sets it for that stage
    ("pipeline-stage-data-override-column", lambda t, s: S(s) + PIPE + [
        "+pipeline.stages.task.data_overrides.label_column=lab"],
     r"stage 'task' data: Column\(s\) \['lab'\] not found.*"
     r"Fix: set pipeline.stages.task.data_overrides.label_column to"),
    ("pipeline-stage-data-override-range", lambda t, s: S(s) + PIPE + [
        "+pipeline.stages.task.data_overrides.max_train_samples=0"],
     r"Fix: set pipeline.stages.task.data_overrides.max_train_samples to 1 or more"),
    ("pipeline-stage-drops-every-label", lambda t, s: S(s) + PIPE + [
        "+pipeline.stages.task.data_overrides.drop_labels=[pos,neg]"],
     r"stage 'task' data: Found 0 label value\(s\) \[\] in column 'label' after "
     r"pipeline.stages.task.data_overrides.drop_labels=\['neg', 'pos'\].*"
     r"Fix: drop fewer labels in pipeline.stages.task.data_overrides.drop_labels"),
    ("pipeline-own-data-columns", lambda t, s: S(s) + [
        "pipeline=intermediate_task", "cache.stages=off",
        f"pipeline.stages.inter.data.files.train={s / 'train.jsonl'}",
        f"pipeline.stages.inter.data.files.validation={s / 'validation.jsonl'}"],
     r"stage 'inter' data: Column\(s\) \['evidence', 'claim'\] not found in the train split.*"
     r"Fix: set pipeline.stages.inter.data.text_columns to"),
    # the run's regulariser reaches the MLM stage too: the stage is named, and the per-stage form
    ("pipeline-run-regularizer-misfits-a-stage", lambda t, s: S(s) + PIPE + ["regularizer=r3f"],
     r"stage 'tapt': regularizer=r3f compares.*Fix: .*"
     r"\+regularizer@pipeline.stages.<name>.regularizer=r3f"),
    ("pipeline-stage-renamed", lambda t, s: S(s) + PIPE + ["pipeline.stages.task.name=tapt"],
     r"pipeline.stages.task.name=tapt would do nothing.*Fix: rename the key"),
    # ... and only where the method is the misfit: a length error gets no word of peft=
    ("pipeline-stage-length-is-no-method-misfit", lambda t, s: S(s) + PIPE + [
        "pipeline.stages.task.task.max_length=600"],
     r"(?s)stage 'task': task.max_length=600 is more than the 512 positions.*Fix: set "
     r"pipeline.stages.task.task.max_length to at most 512(?!.*regularizer@)"),
    ("pipeline-first-monitor", lambda t, s: S(s) + PIPE + [
        "pipeline.stages.tapt.task.monitor=acc"],
     r"stage 'tapt': task.monitor='acc' is not a metric this task reports \(loss, ppl\)"),
    ("pipeline-last-trainer", lambda t, s: S(s) + PIPE + [
        "+pipeline.stages.task.trainer.accumulate_grad_batches=0"],
     r"stage 'task' trainer: accumulate_grad_batches=0 is out of range"),
    # --- data files: types, folders, headers
    ("data-file-is-a-folder", lambda t, s: _files(s, train=t),
     r"Data file for split 'train' is a folder, not a file"),
    ("test-file-header-only", lambda t, s: _csv_splits(t, s, test_body="text,label\n"),
     r"The test split is empty: its file .*test.csv has no rows.*Fix: add rows"),
    ("jsonl-label-changes-type", lambda t, s: _files(s, train=_jsonl(
        t, "train.jsonl", _int_labels(_rows(40)) + [{"text": "odd one", "label": "maybe",
                                                     "group": "g"}])),
     r"Column 'label' in .*train.jsonl changes type at row 41: string 'maybe' where the rows "
     r"above hold numbers"),
    ("jsonl-text-is-a-list", lambda t, s: _files(s, train=_jsonl(
        t, "train.jsonl", _rows(40, **{"12": {"text": ["two", "texts"]}}))),
     r"Column 'text' in .*train.jsonl changes type at row 13: list \['two', 'texts'\] where "
     r"the rows above hold strings"),
    ("jsonl-text-all-lists", lambda t, s: _files(s, train=_jsonl(
        t, "train.jsonl", [r | {"text": [r["text"]]} for r in _rows(40)])),
     r"Column 'text' holds lists in the other files, but .*|Column 'text' holds strings in the "
     r"other files, but .*train.jsonl \(split 'train'\) has \['.*at row 1"),
    ("csv-split-label-types-differ", lambda t, s: _csv_splits(
        t, s, train_rows=_int_labels(_rows(64)), test_rows=_int_labels(_rows(16, 2)),
        valid_rows=_int_labels(_rows(16, 1))[:5] + [{"text": "x", "label": "unknown",
                                                     "group": "g"}]),
     r"Column 'label' holds numbers in the other files, but .*validation.csv \(split "
     r"'validation'\) has 'unknown' at row 6"),
]


@pytest.mark.parametrize(("builder", "expected"), [c[1:] for c in VALUE_CASES],
                         ids=[c[0] for c in VALUE_CASES])
@pytest.mark.usefixtures("no_training")
def test_bad_value(builder, expected, make_cfg, sentiment_dir, tmp_path, capsys):
    stops_with_user_error(builder, expected, make_cfg, sentiment_dir, tmp_path, capsys)


# command-line mistakes the pre-flight explains
CLI_CASES: list[tuple[list[str], str]] = [
    (["model.config.num_layers=2"],
     r"model.config.num_layers is not set in this model's YAML \(its model.config is empty\)"
     r".*Fix: add it with \+model.config.num_layers="),
    (["model=tiny_bert", "model.config.num_layers=2"],
     r"'num_layers' is not a key of the bert config. Did you mean 'num_hidden_layers'"),
    (["model=tiny_bert", "model.config.hidden_dropout_prob=0.2"],
     r"hidden_dropout_prob is not set in this model's YAML.*\+model.config.hidden_dropout_prob"),
    # a misspelt stage with a key under it: the pipeline's stages are the valid keys
    (["model=tiny_bert", "pipeline=tiny", "pipeline.stages.tsk.optim.lr=1e-4"],
     r"Unknown key 'tsk' in 'pipeline.stages'. Did you mean 'task'\? Valid keys: tapt, task"),
    # a stage's own PEFT method, where its YAML has peft: null: Hydra needs the +
    (["model=tiny_bert", "pipeline=tiny", "peft@pipeline.stages.task.peft=lora"],
     r"'peft@pipeline.stages.task.peft' is not in the config's defaults list.*"
     r"Fix: add it with a leading \+: \+peft@pipeline.stages.task.peft=lora"),
    # + for a key the config has (README's multitask example lists the key already)
    (["model=tiny_bert", "pipeline=multitask_task",
      "+pipeline.stages.multi.tasks.vitaminc.data_overrides.max_train_samples=100"],
     r"pipeline.stages.multi.tasks.vitaminc.data_overrides.max_train_samples is already in the "
     r"config.*Fix: set it without the \+: "
     r"pipeline.stages.multi.tasks.vitaminc.data_overrides.max_train_samples=100"),
]


@pytest.mark.parametrize(("argv", "expected"), CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_command_line_value(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        preflight(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(expected, err, re.S), err
    assert "Valid keys: (none)" not in err
    assert_one_paragraph(err.strip().removeprefix("ftlab: "))


def _searchpath(tmp: Path) -> Path:
    """A shared config folder: a model option and an experiment that picks it."""
    (tmp / "shared" / "model").mkdir(parents=True)
    (tmp / "shared" / "experiment").mkdir()
    (tmp / "shared" / "model" / "mine.yaml").write_text(
        "name_or_path: null\ntokenizer: pkg://ftlab/assets/tiny_tokenizer\n"
        "config: {model_type: bert, vocab_size: 2000, hidden_size: 32, num_hidden_layers: 1,"
        " num_attention_heads: 2, intermediate_size: 64}\nrevision: null\n"
        "trust_remote_code: false\n")
    (tmp / "shared" / "experiment" / "paper.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: mine\nseed: 4\n")
    return tmp / "shared"


@pytest.mark.parametrize("extra", [
    ["model=mine"], ["experiment=paper"], ["-m", "model=mine,tiny_bert"],
    ["-m", "experiment=paper,quick"], ["model=mine", "+model.config.hidden_dropout_prob=0.2"],
], ids=lambda e: " ".join(e))
def test_searchpath_options_hydra_accepts_pass_the_preflight(extra, tmp_path, monkeypatch):
    """Options found only in a ``hydra.searchpath`` folder (absolute or relative to where
    ftlab runs) are accepted, as Hydra accepts them."""
    folder = _searchpath(tmp_path)
    monkeypatch.chdir(tmp_path)
    for where in (f"file://{folder}", "file://shared"):
        preflight([f"hydra.searchpath=[{where}]", *extra])


def ftlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env | {"WANDB_MODE": "offline"})


def test_a_bad_sweep_job_stops_the_sweep_before_any_job_trains(tmp_path, sentiment_dir):
    """The bad value is in the second job: the sweep is refused before the first one runs."""
    proc = ftlab("-m", "seed=1,2", "stage.optim.lr=1e-4,-1", *tiny_overrides(sentiment_dir),
                 cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.strip().removeprefix("ftlab: ")
    assert re.search(r"Sweep job 1 \(seed=1 stage.optim.lr=-1\): stage 'classify': optim.lr=-1.0 "
                     r"is out of range.*Nothing ran.*Fix: set stage.optim.lr", message, re.S), \
        message
    assert_one_paragraph(message)
    assert not list(tmp_path.rglob("metrics.json"))  # no job ran, the first included


def test_sweep_jobs_follow_the_basic_sweeper():
    """The checker sees the jobs Hydra will run (same expansion, same order)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from ftlab.cli import CONFIG_DIR
    from ftlab.sweepcheck import sweep_jobs

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        with open_dict(cfg):  # what `ftlab -m ...` gives the multirun
            cfg.hydra.overrides.task = ["seed=1,2", "stage.optim.lr=1e-4,3e-4", "peft=full"]
        jobs = sweep_jobs(cfg)
    assert jobs == [[f"seed={s}", f"stage.optim.lr={lr}", "peft=full"]
                    for s in (1, 2) for lr in ("0.0001", "0.0003")]  # as Hydra writes them


@pytest.mark.parametrize(("sweep", "bad"), [
    (["pipeline=madx", "seed=1,2"], None),  # ${paths.output_dir} in a stage resolves
    (["seed=1,2", "stage.optim.lr=1e-4,-1"], r"Sweep job 1 \(seed=1 stage.optim.lr=-1\)"),
    (["stage.batch_size=8,0"], r"Sweep job 1 \(stage.batch_size=0\).*batch_size=0 is out"),
    (["trainer.max_steps=5,-2"], r"Sweep job 1 \(trainer.max_steps=-2\)"),
    (["pipeline=tiny", "pipeline.stages.task.task.max_length=32,abc"],
     r"Sweep job 1 \(pipeline.stages.task.task.max_length=abc\): stage 'task'.task"),
    (["stage.batch_size=8,abc"], r"Sweep job 1 \(stage.batch_size=abc\).*batch_size"),
    (["save_artefact=all,some"], r"Sweep job 1 \(save_artefact=some\): save_artefact is"),
    # the PEFT method's and regulariser's constructors check what a rule cannot say
    (["peft=movement_pruning", "peft.sparsity=0.5,1.5"],
     r"Sweep job 1 \(peft.sparsity=1.5\): movement pruning's sparsity=1.5 is not a fraction"),
    (["regularizer=freelb", "regularizer.norm=l2,l3"],
     r"Sweep job 1 \(regularizer.norm=l3\): regularizer=freelb got .*norm='l3'"),
    # a value given twice: the copy reused the first job's record, one run fewer than asked
    (["seed=1,2,1"], r"Sweep job 2 \(seed=1\) is the same job as sweep job 0.*seed=1,2,3"),
    # a project name wandb.init refuses: every stage trained without W&B (a warning whose fix
    # was "pip install wandb"), and the summary runs were not logged
    (["logger=wandb", "logger.wandb.project='runs/sst2:v1'", "seed=1,2"],
     r"Sweep job 0 \(seed=1\): logger.wandb.project='runs/sst2:v1' is not a name W&B accepts "
     r"\(it holds '/' ':'.*Fix: name the project"),
], ids=["good-madx", "lr", "batch", "max-steps", "last-stage-type", "wrong-type", "policy",
        "peft-constructor", "regularizer-constructor", "twice", "wandb-project"])
def test_every_sweep_job_is_checked(sweep, bad, sentiment_dir, caplog):
    """``check_sweep`` composes each job as the launcher will; a bad one names itself."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from ftlab.cli import CONFIG_DIR
    from ftlab.sweepcheck import check_sweep

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.overrides.task = [*tiny_overrides(sentiment_dir), *sweep]
        if bad is None:
            with caplog.at_level(logging.DEBUG, logger="ftlab.sweepcheck"):
                check_sweep(cfg)
            assert "skipped" not in caplog.text  # every job was checked, none left undecided
            return
        with pytest.raises(FtlabError) as err:
            check_sweep(cfg)
    assert re.search(bad, str(err.value), re.S), str(err.value)
    assert_one_paragraph(str(err.value))


def test_a_pretrained_name_over_a_tiny_model_drops_its_architecture(make_cfg, caplog):
    """``model=tiny_bert model.name_or_path=X``: X loads with its own config and tokenizer;
    the YAML's from-scratch config and tokenizer are dropped with a warning, keys you set stay."""
    from ftlab.overrides import explicit_keys
    from ftlab.pipeline import build_pipeline

    given = ["model=tiny_bert", "model.name_or_path=/models/bert-base",
             "+model.config.hidden_dropout_prob=0.2"]
    with caplog.at_level(logging.WARNING):
        [stage] = build_pipeline(make_cfg(given), explicit_keys(given))
    assert stage.model.name_or_path == "/models/bert-base"
    assert stage.model.config == {"hidden_dropout_prob": 0.2}
    assert stage.model.tokenizer is None  # the model's own tokenizer
    assert re.search(r"replaces the chosen model YAML's from-scratch model: its config.model_type"
                     r".*tokenizer \(pkg://ftlab/assets/tiny_tokenizer\) are dropped", caplog.text)
    [kept] = build_pipeline(make_cfg(["model=tiny_bert"]), explicit_keys(["model=tiny_bert"]))
    assert kept.model.config["model_type"] == "bert"  # nothing dropped without a name


@pytest.mark.parametrize(("sweep", "bad"), [
    (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "seed=1,2"], True),
    (["seed=1,2"], False),
])
def test_a_multi_device_sweep_under_joblib_is_refused_before_any_job(sweep, bad,
                                                                     sentiment_dir):
    """Lightning starts DDP's other ranks by re-running the process's command: in a joblib
    worker that is loky's, which failed with a TerminatedWorkerError after rank zero began."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from ftlab.cli import CONFIG_DIR
    from ftlab.sweepcheck import check_sweep

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=joblib"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.overrides.task = [*tiny_overrides(sentiment_dir), *sweep]
            cfg.hydra.overrides.hydra = ["hydra/launcher=joblib"]
        if not bad:
            check_sweep(cfg)
            return
        with pytest.raises(FtlabError) as err:
            check_sweep(cfg)
    assert "under hydra/launcher=joblib" in str(err.value) and "Sweep job 0" in str(err.value)
    assert_one_paragraph(str(err.value))
