"""End-to-end behaviour of a single-stage run on a tiny BERT (seconds, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ftlab.config import bind_schema, instantiate_checked
from ftlab.model.backbone import ModelSpec
from ftlab.pipeline import split_peft
from ftlab.run import run
from ftlab.store import load_tensors
from tests.conftest import tiny_overrides


def test_tiny_run_learns_and_writes_results(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "stage.trainer.max_epochs=6", "stage.optim.lr=3e-3", "seed=3"])
    record = run(cfg)
    final = record["final"]
    # the cue words make the task learnable: far above the majority baseline
    assert final["val/acc"] > final["val/baseline_acc"] + 0.2, final
    assert final["test/acc"] > 0.75, final
    assert record["status"] == "ok" and record["failed"] is False
    run_dir = Path(cfg.paths.output_dir)
    out = json.loads((run_dir / "metrics.json").read_text())
    assert out["final"] == final and out["pipeline"] == ["classify"]
    info = out["stages"]["classify"]
    assert info["params_trainable_pct"] == 100.0 and info["artefact_kb"] > 0
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "classify" / "trainable.safetensors").is_file()


def test_artefact_reproduces_predictions(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["stage.trainer.max_epochs=1"])
    run(cfg)
    state = load_tensors(f"{cfg.paths.output_dir}/classify/trainable.safetensors")
    task = instantiate_checked(cfg.stage.task, "task")
    task.labels = ["neg", "pos"]
    spec = bind_schema(ModelSpec, cfg.model, "model")
    fresh = task.build_model(spec).eval()
    batch = {"input_ids": torch.randint(5, 2000, (4, 12)),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    before = fresh(**batch).logits
    peft = instantiate_checked(split_peft(cfg.peft)[0], "peft")
    peft.load_trainable_state(peft.apply(fresh), state)
    after = fresh(**batch).logits
    assert not torch.allclose(before, after)  # the artefact really changed the model
    again = task.build_model(spec).eval()
    peft.load_trainable_state(peft.apply(again), state)
    torch.testing.assert_close(again(**batch).logits, after)


def test_seed_changes_result_and_same_seed_repeats(make_cfg, sentiment_dir):
    base = tiny_overrides(sentiment_dir) + ["stage.trainer.max_epochs=1"]
    a = run(make_cfg(base + ["seed=1"]))["final"]["val/loss"]
    b = run(make_cfg(base + ["seed=1"]))["final"]["val/loss"]
    c = run(make_cfg(base + ["seed=2"]))["final"]["val/loss"]
    assert a == b
    assert a != c


def test_stage_may_set_a_trainer_argument_absent_from_the_trainer_yaml(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["+stage.trainer.min_steps=3",
                                                    "stage.trainer.max_epochs=1"])
    record = run(cfg)
    assert record["status"] == "ok" and record["stages"]["classify"]["global_steps"] >= 3
