"""End-to-end behaviour of a single-stage run on a tiny BERT (seconds, no downloads)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

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
    saved = OmegaConf.load(run_dir / "config.yaml")  # the resolved config of this run
    assert saved.seed == 3 and saved.stage.optim.lr == 3e-3
    assert OmegaConf.to_container(saved) == OmegaConf.to_container(cfg, resolve=True)
    state = load_tensors(run_dir / "classify" / "trainable.safetensors")  # full: every weight
    model = task_model(cfg)
    assert set(state) == {n for n, _ in model.named_parameters()}
    assert info["artefact_kb"] == round((run_dir / "classify" / "trainable.safetensors")
                                        .stat().st_size / 1024, 1)
    assert any(not torch.equal(state[n], p) for n, p in model.named_parameters())  # trained


def task_model(cfg) -> torch.nn.Module:
    """A fresh (untrained) tiny-BERT classifier of ``cfg``, with the test data's two labels."""
    task = instantiate_checked(cfg.stage.task, "task")
    task.labels = ["neg", "pos"]
    return task.build_model(bind_schema(ModelSpec, cfg.model, "model"))


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
    # overfit_batches is not in conf/trainer/*.yaml; it caps an epoch at 3 of the 16 batches
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["+stage.trainer.overfit_batches=3",
                                                    "stage.trainer.max_epochs=1"])
    record = run(cfg)
    assert record["status"] == "ok" and record["stages"]["classify"]["global_steps"] == 3


@pytest.mark.parametrize("max_length", [1, 2])
def test_a_max_length_with_no_room_for_the_text_is_refused_before_training(
        max_length, make_cfg, sentiment_dir, tmp_path):
    """[CLS] and [SEP] take 2 tokens: at 1 Transformers skipped truncation (every row kept
    its full length, the setting ignored); at 2 every row was [CLS] [SEP], no word read."""
    with pytest.raises(SystemExit):
        run(make_cfg(tiny_overrides(sentiment_dir) + [f"stage.task.max_length={max_length}"]))
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert re.search(rf"max_length={max_length} leaves no room.*at least 3", error, re.S), error
