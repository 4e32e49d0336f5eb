"""Resuming: a stage killed midway continues from its checkpoint and ends where an
uninterrupted run ends; finished jobs of a sweep are found by their stage keys and skipped."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import open_dict

import ftlab.callbacks
from ftlab.checkpoint import NAME, SafetensorsCheckpointIO
from ftlab.run import run
from ftlab.store import load_tensors
from tests.conftest import tiny_overrides

#: 112 rows / batch 16 = 7 batches an epoch: checkpoints at steps 4, 7 (epoch end), 8; the kill
#: at step 10 falls in the second epoch, so the resumed run must find its place mid-epoch
STEPS = ["data.max_train_samples=112", "trainer.max_steps=12", "trainer.max_epochs=5",
         "stage.optim.lr=1e-3", "checkpoint.every_n_steps=4",
         "callbacks=ema", "callbacks.progress=null", "callbacks.ema.decay=0.9"]


def run_maker(make_cfg, sentiment_dir, tmp_path, steps: list[str]):
    """``make(folder, *extra)``: the config of a tiny run of ``steps`` in ``tmp_path/folder``
    (one stage cache for all of them)."""
    def make(folder: str, *extra: str):
        cfg = make_cfg(tiny_overrides(sentiment_dir) + steps + [
            f"cache.dir={tmp_path / 'cache'}", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / folder)
        return cfg

    return make


@pytest.fixture
def tiny_run(make_cfg, sentiment_dir, tmp_path):
    return run_maker(make_cfg, sentiment_dir, tmp_path, STEPS)


def crash_at(monkeypatch, step: int, max_steps: int | None = None,
             hook: str = "on_train_batch_end") -> None:
    """Kill the run (an exception, as a crash would) at the end of optimiser step ``step`` (of
    the stage that runs ``max_steps`` steps, if given); ``hook="on_validation_batch_end"``:
    during the validation after that step."""

    def crash(self, trainer, *args):
        if trainer.global_step == step and max_steps in (None, trainer.max_steps) \
                and not trainer.sanity_checking:
            raise RuntimeError(f"killed at step {step}")

    monkeypatch.setattr(ftlab.callbacks.KeepBest, hook, crash, raising=False)


def same_last_weights(tmp_path: Path) -> tuple[dict, dict]:
    """The uninterrupted and the killed-then-resumed run's last checkpoints, after checking both
    end at step 12 with the same weights (within 1e-6)."""
    io = SafetensorsCheckpointIO()
    a, b = (io.load_checkpoint(tmp_path / name / "classify" / "checkpoints" / NAME)
            for name in ("whole", "killed"))
    assert a["global_step"] == b["global_step"] == 12
    assert max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item()
               for k in a["state_dict"]) <= 1e-6
    return a, b


def killed_and_resumed(tiny_run, monkeypatch, *extra: str, from_step: int = 8,
                       killed_with: Callable[[Any], None] | None = None) -> tuple[dict, dict]:
    """(uninterrupted record, killed-at-step-10-then-resumed record) of one run of ``STEPS``
    with ``extra``, after checking the resumed run started from the checkpoint of
    ``from_step`` and ends with the uninterrupted run's final metrics (within 1e-6).
    ``killed_with(monkeypatch)``: a change for the killed attempt only."""
    from ftlab.run import run

    whole = run(tiny_run("whole", *extra))
    assert whole["status"] == "ok", whole
    crash_at(monkeypatch, 10)
    if killed_with is not None:
        killed_with(monkeypatch)
    with pytest.raises(SystemExit):
        run(tiny_run("killed", *extra))
    monkeypatch.undo()
    resumed = run(tiny_run("killed", *extra))
    assert resumed["stages"]["classify"]["resumed_from_step"] == from_step
    for k, v in whole["final"].items():
        assert resumed["final"][k] == pytest.approx(v, abs=1e-6), k
    return whole, resumed


def test_checkpoint_io_round_trips_the_checkpoint_dict(tmp_path):
    ckpt = {"state_dict": {"w": torch.randn(3, 2)}, "epoch": 1, "optimizer_states": [
        {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.ones(2)}},
         "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]}], "none": None}
    io = SafetensorsCheckpointIO({"stage_key": "k"})
    io.save_checkpoint(ckpt, tmp_path / NAME)
    io.save_checkpoint(ckpt, tmp_path / NAME)  # replaces it
    back = io.load_checkpoint(tmp_path / NAME)
    # no temp folders left (the lock a writer holds stays)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{NAME}.lock", NAME]
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["optimizer_states"][0]["state"][0]["exp_avg"], torch.ones(2))
    assert torch.equal(back["state_dict"]["w"], ckpt["state_dict"]["w"]) and back["none"] is None


def test_a_killed_writes_temp_folder_is_cleared_but_not_a_live_writers(tmp_path):
    """A checkpoint write killed midway (SIGKILL: no cleanup) left ``.state.ckpt.tmp-<pid>-
    <hex>`` until the stage ended (with checkpoint.keep, for good); one another process is
    writing now (it holds the folder's lock) must stay."""
    from filelock import FileLock

    from ftlab.checkpoint_io import clear_stale_writes

    io = SafetensorsCheckpointIO({"stage_key": "k"})
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / NAME)
    stale = tmp_path / f".{NAME}.tmp-4242-a1b2c3"
    stale.mkdir()
    (stale / "tensors.safetensors").write_bytes(b"\0" * 100)  # the kill: half a file
    moved = tmp_path / f".{NAME}.old-4242-d4e5f6"  # killed after moving the last one aside
    shutil.copytree(tmp_path / NAME, moved)
    with FileLock(str(tmp_path / f".{NAME}.lock")):  # another process is writing
        clear_stale_writes(tmp_path)
        assert stale.is_dir()
    clear_stale_writes(tmp_path)
    assert not stale.exists() and moved.is_dir()  # the stage resumes from .old if need be
    io.save_checkpoint({"w": torch.zeros(2)}, tmp_path / NAME)  # a complete newer one
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{NAME}.lock", NAME]
    assert torch.equal(io.load_checkpoint(tmp_path / NAME)["w"], torch.zeros(2))


def test_a_kept_checkpoint_folder_loses_a_killed_writes_temp_folder_on_resume(
        tiny_run, monkeypatch, tmp_path):
    crash_at(monkeypatch, 10)
    with pytest.raises(SystemExit):
        run(tiny_run("killed", "checkpoint.keep=true"))
    monkeypatch.undo()
    folder = tmp_path / "killed" / "classify" / "checkpoints"
    stale = folder / f".{NAME}.tmp-4242-a1b2c3"  # as a SIGKILL during a write leaves it
    stale.mkdir()
    resumed = run(tiny_run("killed", "checkpoint.keep=true"))
    assert resumed["stages"]["classify"]["resumed_from_step"] == 8
    assert not stale.exists() and (folder / NAME).is_dir()


def test_a_non_zero_fsdp_rank_reads_no_model_or_optimiser_tensor_nor_other_ranks_shards(
        tmp_path):
    from ftlab.strategies import _not_read

    shard = {"shadow": {"w": torch.ones(2)}}
    ckpt = {"state_dict": {"w": torch.randn(3, 2)}, "epoch": 1, "optimizer_states": [
        {"state": {"w": {"exp_avg": torch.ones(2)}}, "param_groups": [{"params": ["w"]}]}],
        "callbacks": {"EMA": {"per_rank": [shard, {"shadow": {"w": torch.full((2,), 2.0)}},
                                          shard]}, "Rng": {"numpy": np.arange(3)}}}
    io = SafetensorsCheckpointIO()
    io.save_checkpoint(ckpt, tmp_path / NAME)
    back = io.load_checkpoint(tmp_path / NAME, skip=_not_read(1))
    assert back["epoch"] == 1 and back["state_dict"] == {"w": None}
    assert back["optimizer_states"][0]["state"]["w"]["exp_avg"] is None
    assert back["optimizer_states"][0]["param_groups"] == [{"params": ["w"]}]  # JSON: all
    ranks = back["callbacks"]["EMA"]["per_rank"]  # its own and rank zero's (RngState's fallback)
    assert torch.equal(ranks[1]["shadow"]["w"], torch.full((2,), 2.0))
    assert torch.equal(ranks[0]["shadow"]["w"], torch.ones(2))
    assert ranks[2]["shadow"]["w"] is None
    assert back["callbacks"]["Rng"]["numpy"].tolist() == [0, 1, 2]
    full = io.load_checkpoint(tmp_path / NAME)
    assert torch.equal(full["state_dict"]["w"], ckpt["state_dict"]["w"])


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
    a, b = same_last_weights(tmp_path)
    ema_a, ema_b = (next(v["shadow"] for k, v in c["callbacks"].items() if "WeightAverage" in k)
                    for c in (a, b))
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6


@pytest.mark.parametrize("validation", ["epoch", "step 4"])
def test_a_run_resumed_from_an_epoch_end_checkpoint_ends_like_an_uninterrupted_one(
        tiny_run, monkeypatch, tmp_path, validation):
    """Checkpoints written in Lightning's on_train_epoch_end resumed with that epoch's end run
    again: with no validation at the epoch's end (val_check_interval=4 of 7 batches) the
    resumed run trained one batch more, and the weights ended 1e-3 away. An epoch's last step
    is now written when its batch ends, or after the validation that follows it."""
    ends = ["checkpoint.every_n_steps=0", "checkpoint.keep=true"]  # at epoch ends only
    if validation != "epoch":
        ends.append("trainer.val_check_interval=4")
    killed_and_resumed(tiny_run, monkeypatch, *ends, from_step=7)  # the end of epoch 0
    same_last_weights(tmp_path)


def test_an_epoch_end_checkpoint_written_in_on_train_epoch_end_resumes_the_next_epochs_order(
        tiny_run, monkeypatch, tmp_path):
    """Such a checkpoint (ftlab's before it wrote epoch ends at the last batch or after its
    validation; still so when training stops within an epoch) resumes with that epoch's end
    run again, and Lightning counts the epoch twice: its set_epoch gave the next epoch the
    order of the one after it. The loader takes the Trainer's epoch instead."""
    from ftlab.checkpoint import StageCheckpoint

    def the_old_way(patch):  # epoch ends written in on_train_epoch_end
        patch.setattr(StageCheckpoint, "_due", lambda self, trainer: False)

    killed_and_resumed(tiny_run, monkeypatch, "checkpoint.every_n_steps=0",
                       "checkpoint.keep=true", from_step=7, killed_with=the_old_way)
    same_last_weights(tmp_path)


@pytest.mark.parametrize(("hook", "kill", "back_to"), [
    ("on_train_batch_end", 6, 4),  # after the validation at step 4: resumed from there
    ("on_validation_batch_end", 4, 2)])  # during it: from step 2, and validated again
def test_a_step_checkpoint_keeps_the_validation_that_follows_its_step(
        tiny_run, monkeypatch, tmp_path, hook, kill, back_to):
    """A step checkpoint was written before the validation after its step, and Lightning
    resumes a step as validated: the resumed run never scored the weights of step 4, picked
    another best epoch, and ended with other final metrics (val/acc 0.43, not 0.57). Written
    after the validation, it must still hold the data's position (the epoch's rest)."""
    steps = ["trainer.val_check_interval=4", "checkpoint.every_n_steps=2", "checkpoint.keep=true"]
    whole = run(tiny_run("whole", *steps))
    crash_at(monkeypatch, kill, hook=hook)
    with pytest.raises(SystemExit):
        run(tiny_run("killed", *steps))
    monkeypatch.undo()
    resumed = run(tiny_run("killed", *steps))
    assert resumed["stages"]["classify"]["resumed_from_step"] == back_to
    assert resumed["stages"]["classify"]["best_epoch"] == whole["stages"]["classify"]["best_epoch"]
    for k, v in whole["final"].items():
        assert resumed["final"][k] == pytest.approx(v, abs=1e-6), k
    same_last_weights(tmp_path)  # and the data position, taken during the validation


def test_a_stage_that_stopped_early_and_was_killed_while_testing_resumes_stopped(
        make_cfg, sentiment_dir, tmp_path, monkeypatch):
    """Lightning keeps no should_stop in checkpoints: a stage killed after early stopping
    (while it tested) trained on from its last checkpoint, 2 steps past the stop."""
    budget = ["data.max_train_samples=112", "stage.optim.lr=3e-3", "checkpoint.every_n_steps=2",
              "trainer.budget.min_steps=40", "trainer.budget.val_every_steps=2",
              "trainer.budget.patience=4"]
    tiny = run_maker(make_cfg, sentiment_dir, tmp_path, budget)
    whole = run(tiny("whole"))["stages"]["classify"]
    assert whole["budget"]["stopped_early"] and whole["global_steps"] < 40
    crash_at(monkeypatch, whole["global_steps"], hook="on_test_batch_end")
    with pytest.raises(SystemExit):
        run(tiny("killed"))
    monkeypatch.undo()
    resumed = run(tiny("killed"))["stages"]["classify"]
    assert resumed["resumed_from_step"] == resumed["global_steps"] == whole["global_steps"]
    assert resumed["budget"]["stopped_early"] and resumed["best_epoch"] == whole["best_epoch"]


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


def test_save_artefact_none_drops_full_size_weights_but_keeps_peft_ones(tiny_run, tmp_path):
    full = run(tiny_run("full", "save_artefact=none", "trainer.max_steps=2"))
    stage = tmp_path / "full" / "classify"
    assert full["status"] == "ok" and full["stages"]["classify"]["full_size_artefact"]
    assert not (stage / "trainable.safetensors").exists() and (stage / "card.json").is_file()
    lora = run(tiny_run("lora", "save_artefact=none", "peft=lora", "trainer.max_steps=2"))
    assert lora["status"] == "ok" and not lora["stages"]["classify"]["full_size_artefact"]
    assert (tmp_path / "lora" / "classify" / "trainable.safetensors").is_file()


def test_pipeline_resumes_its_second_stage_and_reuses_the_finished_first(
        make_cfg, sentiment_dir, tmp_path, monkeypatch):
    def cfg(folder: str):
        c = make_cfg(tiny_overrides(sentiment_dir) + [
            "pipeline=tiny", f"cache.dir={tmp_path / 'cache'}", "checkpoint.every_n_steps=4",
            "pipeline.stages.tapt.trainer.max_steps=6", "pipeline.stages.task.trainer.max_steps=8",
            # at full fine-tuning's 5e-5 the 8 steps barely move the model: the val/loss of a
            # resumed run that lost its random state differed by 1e-7
            "pipeline.stages.task.optim.lr=1e-3",
            "data.max_train_samples=112", "trainer.max_epochs=5"])
        with open_dict(c):
            c.paths.output_dir = str(tmp_path / folder)
        return c

    whole = run(cfg("whole"))
    crash_at(monkeypatch, 6, max_steps=8)  # in the task stage, after TAPT finished
    with pytest.raises(SystemExit):
        run(cfg("killed"))
    monkeypatch.undo()
    resumed = run(cfg("killed"))
    assert resumed["status"] == "ok"
    assert [line["cache_hit"] for line in resumed["lineage"]] == [True, False]
    assert resumed["stages"]["task"]["resumed_from_step"] == 4
    for k, v in whole["final"].items():
        assert resumed["final"][k] == pytest.approx(v, abs=1e-6), k
    again = run(cfg("killed"))  # finished: the same command again trains nothing
    assert again["reused"]["skipped"] and again["final"] == resumed["final"]


def ftlab_cli(*args: str, cwd: Path, **env: str):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "FTLAB_TEST_CRASH_SEEDS"} | {
        "FTLAB_ROOT": str(cwd), "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)} | env
    return subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_relaunched_sweep_skips_finished_jobs_resumes_killed_ones_and_adds_new_seeds(
        tmp_path, sentiment_dir):
    import json

    steps = [s for s in STEPS if not s.startswith("callbacks")]
    args = [*tiny_overrides(sentiment_dir), *steps, "seed=1,2,3,4",
            "+callbacks.crash._target_=tests.crash.CrashAt", "allow_targets=[tests.]"]
    first = ftlab_cli("-m", *args, cwd=tmp_path, FTLAB_TEST_CRASH_SEEDS="3,4")
    assert first.returncode == 1, first.stderr[-2000:]  # two jobs were killed
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    status = {j.name: json.loads((j / "metrics.json").read_text())["status"]
              for j in sorted(sweep.iterdir()) if (j / ".hydra").is_dir()}
    assert status == {"0": "ok", "1": "ok", "2": "error", "3": "error"}
    again = ftlab_cli(f"resume={sweep}", cwd=tmp_path)
    # 3: every job at the majority baseline (12 steps of a tiny model); no job errored
    assert again.returncode in (0, 3), again.stderr[-2000:]
    assert len(list((tmp_path / "outputs" / "multirun").iterdir())) == 1  # the same folder
    records = {j: json.loads((sweep / j / "metrics.json").read_text()) for j in status}
    assert [bool(records[j].get("reused")) for j in status] == [True, True, False, False]
    assert [records[j]["stages"]["classify"]["resumed_from_step"] for j in ("2", "3")] == [4, 4]
    assert all(r["status"] == "ok" for r in records.values())
    summary = json.loads((sweep / "summary.json").read_text())
    (config,) = summary.values()
    assert config["runs"] == 4 and config["reused"] == 2 and config["errored"] == 0
    assert config["metrics"]["test/acc"]["n"] == 4
    # save_artefact: best (the default): one job keeps its full model; every job keeps a card
    kept = [j for j in status if (sweep / j / "classify" / "trainable.safetensors").exists()]
    assert len(kept) == 1 and all((sweep / j / "classify" / "card.json").exists() for j in status)
    assert kept == [max(status, key=lambda j: records[j]["objective"])]
    assert all("artefact_dropped" in records[j]["stages"]["classify"] for j in status
               if j not in kept)
    print("\nfirst launch:", status, "\nre-launch:",
          {j: ("skipped" if r.get("reused") else f"resumed from step "
               f"{r['stages']['classify']['resumed_from_step']}") for j, r in records.items()})
    # a third launch with a new seed (the README's `ftlab -m resume=<sweep> seed=...`): Hydra
    # numbers its one job 0, but it goes to a new folder and the finished jobs are kept
    third = ftlab_cli("-m", f"resume={sweep}", "seed=5", cwd=tmp_path)
    assert third.returncode in (0, 3), third.stderr[-2000:]
    seeds = {j.name: json.loads((j / "metrics.json").read_text())["seed"]
             for j in sweep.iterdir() if (j / "metrics.json").is_file()}
    assert seeds == {"0": 1, "1": 2, "2": 3, "3": 4, "4": 5}  # not over seed 1's folder 0
    (config,) = json.loads((sweep / "summary.json").read_text()).values()
    assert sorted(map(str, config["seeds"])) == ["1", "2", "3", "4", "5"]


def test_a_job_without_a_checkpoint_finds_its_stages_in_the_sweeps_other_jobs(tmp_path):
    """What a re-launched job placed in a new folder resumes: the checkpoint with its stage key
    and the most steps among the other job folders, not one of another stage, nor one of a
    job that is running now (its checkpoint may be replaced as it is read)."""
    import json

    from ftlab.checkpoint_io import checkpoint_elsewhere
    from ftlab.resume import other_checkpoints
    from ftlab.status import process_identity

    def job(name: str, status: str, key: str, step: int) -> None:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"status": status, "process": process_identity()}))  # this process: alive
        SafetensorsCheckpointIO({"stage_key": key}).save_checkpoint(
            {"global_step": step, "w": torch.ones(1)},
            tmp_path / name / "classify" / "checkpoints" / NAME)

    job("0", "error", "k", 4)
    job("1", "interrupted", "k", 8)
    job("2", "error", "other", 12)  # another stage (its settings changed)
    job("3", "running", "k", 10)  # still training, in another process
    job("4", "error", "k", 2)  # this job's own folder
    folders = other_checkpoints(tmp_path, tmp_path / "4", "classify")
    assert sorted(f.parent.parent.name for f in folders) == ["0", "1", "2"]
    found = checkpoint_elsewhere(folders, "k")
    assert found == tmp_path / "1" / "classify" / "checkpoints" / NAME
    assert checkpoint_elsewhere(folders, "new") is None


@pytest.mark.slow
def test_a_relaunch_with_an_extra_override_resumes_an_errored_jobs_checkpoint(
        tmp_path, sentiment_dir):
    """README: jobs that errored run again, resuming their checkpoint. With an extra override
    (``ftlab -m resume=<sweep> checkpoint.keep=true``, the README's example) the job goes to a
    new folder (its overrides differ), and started over from step 0 beside the checkpoint its
    errored run left (~40 s: two sweeps of two jobs)."""
    import json

    steps = [s for s in STEPS if not s.startswith("callbacks")]
    args = [*tiny_overrides(sentiment_dir), *steps, "seed=1,2",
            "+callbacks.crash._target_=tests.crash.CrashAt", "allow_targets=[tests.]"]
    first = ftlab_cli("-m", *args, cwd=tmp_path, FTLAB_TEST_CRASH_SEEDS="2")
    assert first.returncode == 1, first.stderr[-2000:]  # seed 2 was killed at step 6
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    again = ftlab_cli("-m", f"resume={sweep}", "checkpoint.keep=true", cwd=tmp_path)
    assert again.returncode in (0, 3), again.stderr[-2000:]
    records = {j.name: json.loads((j / "metrics.json").read_text())
               for j in sweep.iterdir() if (j / "metrics.json").is_file()}
    assert {k: (r["seed"], r["status"]) for k, r in records.items()} == {
        "0": (1, "ok"), "1": (2, "error"), "2": (1, "ok"), "3": (2, "ok")}
    assert records["2"]["reused"]["skipped"]  # finished: not run again
    info = records["3"]["stages"]["classify"]
    assert info["resumed_from_step"] == 4 and info["global_steps"] == 12
    assert info["resumed_from"] == str(sweep / "1" / "classify" / "checkpoints" / NAME)
    (config,) = json.loads((sweep / "summary.json").read_text()).values()
    assert config["runs"] == 2 and config["errored"] == 0


def test_resume_argv_rebuilds_the_command_of_a_run_folder(tmp_path):
    from omegaconf import OmegaConf

    from ftlab.errors import FtlabError
    from ftlab.resume import resume_argv

    run_dir = tmp_path / "runs" / "r1"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save({"hydra": {"overrides": {"hydra": [f"hydra.run.dir={tmp_path}/old"],
                                            "task": ["model=tiny_bert", "seed=3"]}}},
                   run_dir / ".hydra" / "hydra.yaml")
    assert resume_argv([f"resume={run_dir}", "checkpoint.keep=true"]) == [
        "model=tiny_bert", "seed=3", "checkpoint.keep=true", f"hydra.run.dir={run_dir}"]
    assert resume_argv(["seed=1"]) == ["seed=1"]
    with pytest.raises(FtlabError, match="single run"):
        resume_argv(["-m", f"resume={run_dir}"])
    with pytest.raises(FtlabError, match="no ftlab run or sweep"):
        resume_argv([f"resume={tmp_path}"])


def test_sampler_resumes_mid_epoch_in_the_same_order_and_gets_lightnings_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    from ftlab.data.batching import LengthGroupedBatchSampler

    lengths = [(i * 7) % 23 + 1 for i in range(100)]
    fresh = LengthGroupedBatchSampler(lengths, 8, group=2, seed=5)
    fresh.set_epoch(1)
    epoch1 = list(fresh)
    resumed = LengthGroupedBatchSampler(lengths, 8, group=2, seed=5)
    resumed.resume(1, 3)
    assert list(resumed) == epoch1[3:]  # the rest of epoch 1, in its order
    assert list(resumed) != epoch1  # then epoch 2: a new order, nothing skipped
    loader = DataLoader(list(range(100)), batch_sampler=LengthGroupedBatchSampler(lengths, 8))
    _set_sampler_epoch(loader, 4)  # what Lightning calls at each epoch start
    assert loader.batch_sampler.epoch == 4


def test_resume_argv_puts_flags_before_the_overrides(tmp_path):
    """`ftlab -m resume=<sweep>` (the README's form): Hydra's argparse refuses overrides that
    follow a flag once some came before it, so every flag must lead."""
    import argparse

    from omegaconf import OmegaConf

    from ftlab.resume import resume_argv

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save({"hydra": {"overrides": {"hydra": [f"hydra.sweep.dir={sweep}",
                                                      "hydra.mode=MULTIRUN"],
                                            "task": ["seed=1,2", "model=tiny_bert"]}}},
                   sweep / "multirun.yaml")
    parser = argparse.ArgumentParser()  # Hydra's shape: flags + one positional override list
    parser.add_argument("-m", "--multirun", action="store_true")
    parser.add_argument("-cd", "--config-dir")
    parser.add_argument("overrides", nargs="*")
    for argv in (["-m", f"resume={sweep}"], [f"resume={sweep}", "-m", "seed=1,2,3"],
                 ["--config-dir", "mine", "-m", f"resume={sweep}", "checkpoint.keep=true"]):
        new = resume_argv(argv)
        args = parser.parse_args(new)  # argparse exits (SystemExit) on a misplaced override
        assert args.multirun
        assert args.overrides[:2] == ["seed=1,2", "model=tiny_bert"]
        assert args.overrides[-1] == f"hydra.sweep.dir={sweep}"
    assert parser.parse_args(new).config_dir == "mine"
    assert resume_argv([f"resume={sweep}", "seed=1,2,3"])[-2] == "seed=1,2,3"  # later wins


@pytest.mark.parametrize("content", ["hydra: {overrides: [", "hydra: {}\n", "", "- a list\n"])
def test_resume_of_a_damaged_folder_names_the_file_and_the_fix(tmp_path, content):
    """A half-written or edited hydra.yaml/multirun.yaml: one paragraph, not a YAML or
    omegaconf traceback."""
    from ftlab.errors import FtlabError
    from ftlab.resume import resume_argv

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text(content)
    with pytest.raises(FtlabError, match=r"(?s)cannot read the command from .*hydra.yaml.*"
                                         rf"Fix: run the original command again with "
                                         rf"hydra.run.dir={run_dir}"):
        resume_argv([f"resume={run_dir}"])
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(content)
    with pytest.raises(FtlabError, match=rf"hydra.sweep.dir={sweep}"):
        resume_argv(["-m", f"resume={sweep}"])


def test_a_truncated_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    """A half-copied run folder: state.json is fine but tensors.safetensors is cut short.
    Resuming from it crashed (SafetensorError) on every re-run; it is now passed over for an
    intact older copy, or none (the stage starts over)."""
    import json
    import logging

    import torch
    from safetensors.torch import save_file

    from ftlab.checkpoint_io import NAME, STATE, TENSORS, latest_checkpoint

    def write(path: Path, cut: bool) -> None:
        path.mkdir(parents=True)
        (path / STATE).write_text(json.dumps({"ftlab": {"stage_key": "classify-abc"}}))
        save_file({"w": torch.zeros(64, 64)}, str(path / TENSORS))
        if cut:
            data = (path / TENSORS).read_bytes()
            (path / TENSORS).write_bytes(data[: len(data) // 2])

    folder = tmp_path / "checkpoints"
    write(folder / NAME, cut=True)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(folder, "classify-abc") is None
    assert "is damaged" in caplog.text
    write(folder / f".{NAME}.old-1", cut=False)
    assert latest_checkpoint(folder, "classify-abc") == folder / f".{NAME}.old-1"


def test_resume_brings_back_the_runs_config_dir_and_name(tmp_path):
    """Hydra keeps --config-dir and --config-name out of the overrides (in hydra.runtime /
    hydra.job): resume= passes them again, unless the command line gives its own."""
    from omegaconf import OmegaConf

    from ftlab.errors import FtlabError
    from ftlab.resume import resume_argv

    run_dir, mine = tmp_path / "run", tmp_path / "mine"
    (run_dir / ".hydra").mkdir(parents=True)
    mine.mkdir()
    (mine / "lab.yaml").write_text("defaults: [config]\n")
    sources = [{"path": "hydra.conf", "provider": "hydra", "schema": "pkg"},
               {"path": "/x/conf", "provider": "main", "schema": "file"},
               {"path": str(mine), "provider": "command-line", "schema": "file"}]
    OmegaConf.save({"hydra": {"overrides": {"hydra": [], "task": ["experiment=own"]},
                              "runtime": {"config_sources": sources},
                              "job": {"config_name": "lab"}}}, run_dir / ".hydra" / "hydra.yaml")
    assert resume_argv([f"resume={run_dir}"]) == [
        "--config-dir", str(mine), "--config-name", "lab", "experiment=own",
        f"hydra.run.dir={run_dir}"]
    assert resume_argv(["-cd=/other", f"resume={run_dir}"])[:3] == [
        "-cd=/other", "--config-name", "lab"]
    # the config folder moved (or the folder is another Hydra app's): said before Hydra's
    # "Cannot find primary config 'lab'" with a fix that does not help
    (mine / "lab.yaml").unlink()
    with pytest.raises(FtlabError, match=r"(?s)made with --config-name lab, and lab.yaml is in "
                       r"none of .*Fix: give the config's folder: ftlab --config-dir"):
        resume_argv([f"resume={run_dir}"])


def test_a_rerun_that_stops_before_training_keeps_the_finished_results(tiny_run, tmp_path,
                                                                        monkeypatch):
    """`ftlab resume=<run>` from another folder (relative data paths no longer found) or with a
    bad override: the run's finished metrics.json stays, with the re-run's error beside it. A
    re-run that got to training and crashed is recorded as the error it is."""
    import json

    from omegaconf import OmegaConf

    first = run(tiny_run("r", "trainer.max_steps=2"))
    assert first["status"] == "ok"
    out, config = tmp_path / "r" / "metrics.json", tmp_path / "r" / "config.yaml"
    with pytest.raises(SystemExit):
        run(tiny_run("r", "trainer.max_steps=2", f"data.files.train={tmp_path}/gone.jsonl"))
    kept = json.loads(out.read_text())
    assert kept["status"] == "ok" and kept["final"] == pytest.approx(first["final"])
    assert kept["rerun_error"]["status"] == "error"
    assert "gone.jsonl" in kept["rerun_error"]["error"]
    assert "gone.jsonl" not in config.read_text()  # the finished results' config, not the error's
    crash_at(monkeypatch, 1)  # a changed stage that trains, then crashes: not kept
    with pytest.raises(SystemExit):
        run(tiny_run("r", "trainer.max_steps=3"))
    crashed = json.loads(out.read_text())
    assert crashed["status"] == "error"
    assert OmegaConf.load(config).trainer.max_steps == 3  # the config that trained last
    assert crashed["finished_before"]["final"] == pytest.approx(first["final"])  # not lost:
    monkeypatch.undo()
    back = run(tiny_run("r", "trainer.max_steps=2"))  # the first command gets them back
    assert back["reused"]["skipped"] and back["final"] == pytest.approx(first["final"])
    assert "finished_before" not in json.loads(out.read_text())


def test_resume_from_another_folder_runs_where_the_run_was_started(tmp_path, sentiment_dir):
    """`ftlab resume=<run>` typed in another folder: the run's relative data paths are read
    from the folder it was started in (Hydra's runtime.cwd), so the finished job is found and
    reused, not turned into a 'data file not found' error."""
    import json
    import shutil

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    splits = ("train", "validation", "test")
    for split in splits:
        shutil.copy(sentiment_dir / f"{split}.jsonl", project / "data")
    args = [*(o for o in tiny_overrides(sentiment_dir) if not o.startswith("data.files")),
            *(f"data.files.{s}=data/{s}.jsonl" for s in splits), "trainer.max_steps=2",
            "hydra.run.dir=outputs/runs/r"]
    first = ftlab_cli(*args, cwd=project)
    assert first.returncode in (0, 3), first.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = ftlab_cli("resume=../project/outputs/runs/r", cwd=elsewhere, FTLAB_ROOT=str(project))
    assert again.returncode in (0, 3), again.stderr[-2000:]
    assert f"resuming in {project}" in again.stderr
    record = json.loads((project / "outputs" / "runs" / "r" / "metrics.json").read_text())
    assert record["status"] == "ok" and record["reused"]["skipped"]
    assert not (elsewhere / "outputs").exists()


def test_snapshot_ensemble_resumes_with_its_earlier_snapshots(make_cfg, sentiment_dir,
                                                              monkeypatch, tmp_path):
    """Snapshots taken before the kill come back from the checkpoint: the resumed run scores
    the same three-snapshot ensemble as an uninterrupted one (cycles end at steps 4, 8, 12)."""
    snap = [s for s in STEPS if not s.startswith("callbacks")] + [
        "callbacks=snapshots", "callbacks.progress=null", "callbacks.snapshots.cycles=3"]

    whole, _ = killed_and_resumed(run_maker(make_cfg, sentiment_dir, tmp_path, snap),
                                  monkeypatch)
    for name in ("whole", "killed"):
        assert sorted(p.name for p in (tmp_path / name / "classify" / "snapshots").iterdir()) \
            == ["cycle1.safetensors", "cycle2.safetensors", "cycle3.safetensors"]
    assert "test/ensemble_acc" in whole["final"]
    # the same three snapshots (an accuracy on 96 rows rarely moves when one of them differs)
    for cycle in (1, 2, 3):
        a, b = (load_tensors(tmp_path / name / "classify" / "snapshots" /
                             f"cycle{cycle}.safetensors") for name in ("whole", "killed"))
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, cycle


def test_jobs_are_placed_by_their_overrides_not_their_number(tmp_path):
    """Hydra numbers a launch's jobs from 0: a re-launch with new values would write over the
    finished jobs in folders 0, 1, ... (their results gone from the report)."""
    import json

    from ftlab.resume import place_jobs

    sweep = tmp_path / "sweep"
    for n, seed in ((0, 1), (1, 2)):
        (sweep / str(n)).mkdir(parents=True)
        (sweep / str(n) / "metrics.json").write_text(json.dumps(
            {"overrides": ["model=tiny_bert", f"seed={seed}"]}))
    (sweep / "2" / ".hydra").mkdir(parents=True)  # a job killed before its first record
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- model=tiny_bert\n- seed=3\n")
    job = [["model=tiny_bert", f"seed={s}"] for s in range(1, 7)]
    assert place_jobs(sweep, [job[3], job[4]], 0) == [3, 4]  # new seeds: new folders
    assert place_jobs(sweep, [job[2], job[0], job[1]], 0) == [2, 0, 1]  # each to its own
    # a placed job's folder is taken (claimed) at once: job 3 and 4 hold 3 and 4 now
    assert place_jobs(sweep, [job[0], job[5], job[2]], 0) == [0, 5, 2]
    assert place_jobs(sweep, [job[3]], 6) == [3]  # placed before, never started: its folder
    assert place_jobs(sweep, [["model=tiny_bert", "seed=9"]], 6) == [6]  # its own number
    assert place_jobs(tmp_path / "new", job[:2], 0) == [0, 1]


def test_two_sweeps_launched_into_one_folder_at_once_get_their_own_job_folders(tmp_path):
    """Two `ftlab -m` started into one sweep folder (or in the same second: one
    outputs/multirun/<time>) both numbered their jobs 0, 1: one job refused as busy, left out
    of its report, and the other sweep's running job reported as killed."""
    from ftlab.resume import place_jobs

    sweep = tmp_path / "sweep"
    a = place_jobs(sweep, [["seed=1"], ["seed=2"]], 0)  # both before any job has started
    b = place_jobs(sweep, [["seed=3"], ["seed=4"]], 0)
    assert a == [0, 1] and b == [2, 3]


@pytest.fixture
def one_process_group():
    """FSDP on one CPU process opens a gloo process group in this process and sets its
    address in the environment: both undone after, for the tests that launch processes."""
    import os

    env = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def test_fsdp_stage_killed_midway_resumes_like_an_uninterrupted_one(
        tiny_run, monkeypatch, tmp_path, one_process_group):
    """FSDP on one CPU process (two: tests/test_distributed.py): the gathered model and
    optimiser state, the data position and the weight average come back from the checkpoint
    (FSDP reads it after building the training loader, which must start again from there)."""
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1",
            "trainer.precision=32-true", "trainer.num_workers=0", "trainer.pin_memory=false",
            "checkpoint.keep=true"]
    _, resumed = killed_and_resumed(tiny_run, monkeypatch, *fsdp)
    assert resumed["status"] == "ok"
    a, b = same_last_weights(tmp_path)
    moments = [{k: s["exp_avg_sq"] for k, s in c["optimizer_states"][0]["state"].items()}
               for c in (a, b)]
    assert moments[0].keys() == a["state_dict"].keys()  # whole tensors, by parameter name
    assert max((moments[0][k] - moments[1][k]).abs().max().item() for k in moments[0]) <= 1e-9
    ema_a, ema_b = (next(v["per_rank"][0]["shadow"] for k, v in c["callbacks"].items()
                         if "WeightAverage" in k) for c in (a, b))
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) <= 1e-6


def _rank_states(seed: int) -> dict:
    """An ``RngState`` state after seeding every generator with ``seed``."""
    import random

    import numpy as np

    from ftlab.checkpoint import RngState

    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    return RngState().state_dict()


def _draw() -> tuple:
    import random

    import numpy as np

    return torch.rand(3), np.random.rand(), random.random()


def test_every_ranks_random_state_is_gathered_and_comes_back_on_its_own_rank(
        tmp_path, monkeypatch, caplog):
    """A fake 2-process DDP world: rank zero's checkpoint holds both ranks' random states
    (the weight average, equal on every DDP rank, only once) and, after the safetensors round
    trip, rank 1 resumes drawing rank 1's numbers; a 3-process resume warns and gives the
    third rank rank zero's; a checkpoint with one state (before every rank's was kept) gives
    it to every rank."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    from ftlab.averaging import WeightAverage
    from ftlab.checkpoint import RngState, StageCheckpoint

    def trainer(rank: int, world: int, callbacks: list):
        return SimpleNamespace(strategy=DDPStrategy(), callbacks=callbacks, global_rank=rank,
                               world_size=world, ckpt_path=tmp_path / NAME, should_stop=False)

    rng, ema = RngState(), WeightAverage()
    ckpt_cb = StageCheckpoint(tmp_path)
    ckpt = {"callbacks": {"RngState": _rank_states(0), ema.state_key: ema.state_dict()}}
    other = _rank_states(1)  # rank 1's, as gather_object brings it

    def gather(own, ranks, dst):
        ranks[:] = [own, other]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "gather_object", gather)
    ckpt_cb.on_save_checkpoint(trainer(0, 2, [ckpt_cb, rng, ema]), None, ckpt)
    monkeypatch.undo()
    assert "per_rank" not in ckpt["callbacks"][ema.state_key]  # the same on every DDP rank
    io = SafetensorsCheckpointIO()
    io.save_checkpoint(ckpt, tmp_path / NAME)

    def resume(rank: int, world: int, checkpoint: dict | None = None) -> tuple:
        cb, back = RngState(), checkpoint or io.load_checkpoint(tmp_path / NAME)
        t = trainer(rank, world, [ckpt_cb, cb])
        ckpt_cb.on_load_checkpoint(t, None, back)
        cb.load_state_dict(back["callbacks"]["RngState"])
        torch.manual_seed(99)  # the seed a fresh start would draw from
        cb.on_train_start(t, None)
        return _draw()

    def expected(seed: int) -> tuple:
        _rank_states(seed)
        return _draw()

    def same(a: tuple, b: tuple) -> bool:
        return torch.equal(a[0], b[0]) and a[1:] == b[1:]

    assert not same(expected(0), expected(1))
    assert same(resume(1, 2), expected(1)) and same(resume(0, 2), expected(0))
    with caplog.at_level("WARNING", logger="ftlab.checkpoint_io"):
        assert same(resume(2, 3), expected(0)) and not caplog.records  # warned by rank zero
        assert same(resume(0, 3), expected(0))
    assert "2 processes, this run has 3: rank 2 takes rank zero's" in caplog.text
    old = {"callbacks": {"RngState": _rank_states(0)}}
    assert same(resume(1, 2, old), expected(0))  # an old checkpoint: rank zero's, as before
