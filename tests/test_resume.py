"""Resuming: a stage killed midway continues from its checkpoint and ends where an
uninterrupted run ends; finished jobs of a sweep are found by their stage keys and skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

import ftlab.callbacks
from ftlab.checkpoint import NAME, SafetensorsCheckpointIO
from ftlab.run import run
from tests.conftest import tiny_overrides

#: 112 rows / batch 16 = 7 batches an epoch: checkpoints at steps 4, 7 (epoch end), 8; the kill
#: at step 10 falls in the second epoch, so the resumed run must find its place mid-epoch
STEPS = ["data.max_train_samples=112", "trainer.max_steps=12", "trainer.max_epochs=5",
         "stage.optim.lr=1e-3", "checkpoint.every_n_steps=4",
         "callbacks=ema", "callbacks.progress=null", "callbacks.ema.decay=0.9"]


@pytest.fixture
def tiny_run(make_cfg, sentiment_dir, tmp_path):
    def _make(folder: str, *extra: str):
        cfg = make_cfg(tiny_overrides(sentiment_dir) + STEPS + [
            f"cache.dir={tmp_path / 'cache'}", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / folder)
        return cfg

    return _make


def crash_at(monkeypatch, step: int) -> None:
    """Kill the run (an exception, as a crash would) at the end of optimiser step ``step``."""

    def crash(self, trainer, *args):
        if trainer.global_step == step:
            raise RuntimeError(f"killed at step {step}")

    monkeypatch.setattr(ftlab.callbacks.KeepBest, "on_train_batch_end", crash, raising=False)


def test_checkpoint_io_round_trips_the_checkpoint_dict(tmp_path):
    ckpt = {"state_dict": {"w": torch.randn(3, 2)}, "epoch": 1, "optimizer_states": [
        {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.ones(2)}},
         "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]}], "none": None}
    io = SafetensorsCheckpointIO({"stage_key": "k"})
    io.save_checkpoint(ckpt, tmp_path / NAME)
    io.save_checkpoint(ckpt, tmp_path / NAME)  # replaces it
    back = io.load_checkpoint(tmp_path / NAME)
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]  # no temp folders left
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["optimizer_states"][0]["state"][0]["exp_avg"], torch.ones(2))
    assert torch.equal(back["state_dict"]["w"], ckpt["state_dict"]["w"]) and back["none"] is None


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tiny_run, monkeypatch, tmp_path):
    whole = run(tiny_run("whole", "checkpoint.keep=true"))
    assert whole["status"] == "ok", whole
    crash_at(monkeypatch, 10)
    with pytest.raises(SystemExit):
        run(tiny_run("killed"))
    ckpt = tmp_path / "killed" / "classify" / "checkpoints" / NAME
    assert (ckpt / "tensors.safetensors").is_file() and (ckpt / "state.json").is_file()
    monkeypatch.undo()
    resumed = run(tiny_run("killed", "checkpoint.keep=true"))  # the same command, same folder
    assert resumed["status"] == "ok"
    stage = resumed["stages"]["classify"]
    assert stage["resumed_from_step"] == 8 and stage["global_steps"] == 12
    assert whole["stages"]["classify"]["resumed_from_step"] is None
    print("\nuninterrupted:", whole["final"], "\nresumed:     ", resumed["final"])
    assert resumed["final"].keys() == whole["final"].keys()
    for k, v in whole["final"].items():
        assert resumed["final"][k] == pytest.approx(v, abs=1e-6), k
    assert stage["best_epoch"] == whole["stages"]["classify"]["best_epoch"]
    for name in ("whole", "killed"):  # the best epoch's weights (what the stage keeps)
        assert (tmp_path / name / "classify" / "trainable.safetensors").is_file()
    # the weights after the last step (kept checkpoints), and the EMA average: the whole path
    io = SafetensorsCheckpointIO()
    a, b = (io.load_checkpoint(tmp_path / name / "classify" / "checkpoints" / NAME)
            for name in ("whole", "killed"))
    assert a["global_step"] == b["global_step"] == 12
    assert max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item()
               for k in a["state_dict"]) <= 1e-6
    ema_a, ema_b = (next(v["shadow"] for k, v in c["callbacks"].items() if "WeightAverage" in k)
                    for c in (a, b))
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6


def test_checkpoints_are_deleted_when_the_stage_finishes(tiny_run, tmp_path):
    assert run(tiny_run("r"))["status"] == "ok"
    assert (tmp_path / "r" / "classify" / "trainable.safetensors").is_file()
    assert not (tmp_path / "r" / "classify" / "checkpoints").exists()


def test_changed_stage_does_not_resume_a_stale_checkpoint(tiny_run, monkeypatch, tmp_path):
    crash_at(monkeypatch, 6)
    with pytest.raises(SystemExit):
        run(tiny_run("r"))
    monkeypatch.undo()
    again = run(tiny_run("r", "stage.optim.lr=2e-3"))  # another stage key
    assert again["status"] == "ok" and again["stages"]["classify"]["resumed_from_step"] is None
