"""A stage is resolved once, overrides never vanish, and a job reports its objective."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig

import ftlab.build
from ftlab.cli import CONFIG_DIR
from ftlab.errors import FtlabError
from ftlab.overrides import explicit_keys
from ftlab.pipeline import build_pipeline
from ftlab.run import run
from ftlab.threads import set_threads
from tests.conftest import tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def resolve(make_cfg, overrides: list[str]):
    """Compose like the CLI and resolve with the explicit keys the job runner would see."""
    cfg = make_cfg(overrides)
    hc = HydraConfig.get()
    explicit = explicit_keys(list(hc.overrides.task), hc.runtime.choices.get("experiment"),
                             CONFIG_DIR)
    return {s.name: s for s in build_pipeline(cfg, explicit)}


def test_a_resolved_stage_is_frozen_and_complete(make_cfg, sentiment_dir):
    stage = resolve(make_cfg, tiny_overrides(sentiment_dir) + ["peft=lora", "seed=7"])["classify"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.seed = 3  # type: ignore[misc]
    assert stage.seed == 7 and stage.optim.lr == pytest.approx(5e-4)  # LoRA's own LR
    assert stage.model.config["model_type"] == "bert" and stage.data.path == "json"
    assert stage.peft["_target_"] == "ftlab.peft.hf.HfPeft" and "lr" not in stage.peft
    assert stage.trainer["_target_"] == "lightning.pytorch.Trainer"
    assert stage.trainer["max_epochs"] == 1  # the run's trainer group: the stage sets none


def test_run_level_trainer_keys_reach_every_stage_unless_the_stage_key_is_given(
        make_cfg, sentiment_dir):
    base = tiny_overrides(sentiment_dir) + ["pipeline=tiny"]
    plain = resolve(make_cfg, base)
    assert plain["tapt"].trainer["max_steps"] == 12  # the pipeline's own value...
    assert plain["task"].trainer["max_steps"] == -1  # ...and the run group's elsewhere
    typed = resolve(make_cfg, [*base, "trainer.max_steps=4", "trainer.max_epochs=3"])
    assert {s.trainer["max_steps"] for s in typed.values()} == {4}  # beats the stage's 12
    assert {s.trainer["max_epochs"] for s in typed.values()} == {3}
    both = resolve(make_cfg, [*base, "trainer.max_steps=4",
                              "pipeline.stages.tapt.trainer.max_steps=9"])
    assert both["tapt"].trainer["max_steps"] == 9 and both["task"].trainer["max_steps"] == 4


def test_stage_keys_reach_every_stage_of_a_pipeline(make_cfg, sentiment_dir):
    stages = resolve(make_cfg, tiny_overrides(sentiment_dir) + [
        "pipeline=tiny", "stage.batch_size=8", "stage.optim.lr=3e-4", "stage.task.max_length=24",
        "pipeline.stages.task.batch_size=4"])
    assert stages["tapt"].batch_size == 8 and stages["task"].batch_size == 4  # own key wins
    assert [s.optim.lr for s in stages.values()] == [pytest.approx(3e-4)] * 2
    assert {s.task["max_length"] for s in stages.values()} == {24}


@pytest.mark.parametrize(("extra", "message"), [
    (["stage=mlm"], "stage= picks the single stage"),
    (["stage.init_from=tapt"], "cannot apply to every stage"),
    (["peft=lora", "pipeline=madx"], "every stage of the pipeline has its own peft node"),
    (["peft.lr=1e-3", "pipeline=madx"], "pipeline.stages.<name>.peft"),
])
def test_an_override_no_stage_would_read_stops_with_the_key_to_set(extra, message, make_cfg,
                                                                   sentiment_dir):
    base = tiny_overrides(sentiment_dir)
    if not any(e.startswith("pipeline=") for e in extra):
        base.append("pipeline=tiny")
    with pytest.raises(FtlabError, match=message):
        resolve(make_cfg, base + extra)


@pytest.mark.parametrize("pipeline", [None, "tiny", "tapt_task"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_reaches_every_stage(experiment, pipeline, make_cfg, sentiment_dir):
    overrides = tiny_overrides(sentiment_dir) + [f"experiment={experiment}"]
    if pipeline:
        overrides.append(f"pipeline={pipeline}")
    stages = resolve(make_cfg, overrides)
    bundle = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").read_text())
    pipe = {} if not pipeline else yaml.safe_load(
        (Path(CONFIG_DIR) / "pipeline" / f"{pipeline}.yaml").read_text())["stages"]
    checked = 0
    for group, values in bundle.items():
        for key, value in _leaves(values):
            for name, stage in stages.items():
                own = pipe.get(name, {})
                if group == "trainer":
                    assert stage.trainer[key] == value, (name, key)
                elif group == "data" and key not in own.get("data_overrides", {}):
                    assert getattr(stage.data, key) == value, (name, key)
                elif group == "stage":  # nested keys (stage.optim.lr) too
                    assert yaml.safe_dump(_get(stage, key)) == yaml.safe_dump(value), (name, key)
                elif group == "peft" and own.get("peft") is None:  # the run's peft group
                    assert stage.peft[key] == value, (name, key)
                else:
                    continue
                checked += 1
    assert checked >= len(stages)


def _leaves(node: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) for every leaf of a bundle's group node."""
    out = []
    for k, v in node.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(prefix + k, v)]
    return out


def _get(stage, dotted: str):
    value = stage
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def test_validation_and_training_load_data_and_tokenizer_once(make_cfg, sentiment_dir,
                                                              monkeypatch):
    calls = {"raw": 0, "tokenizer": 0}
    real_raw, real_tok = ftlab.build.load_raw, ftlab.build.load_tokenizer

    def count(name, real):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ftlab.build, "load_raw", count("raw", real_raw))
    monkeypatch.setattr(ftlab.build, "load_tokenizer", count("tokenizer", real_tok))
    record = run(make_cfg(tiny_overrides(sentiment_dir) + [
        "pipeline=tiny", "pipeline.stages.task.trainer.max_steps=2", "cache.stages=off"]))
    assert record["status"] == "ok", record
    # both stages read the same uncapped data (seeds 0 and 1): one load, one tokenizer
    assert calls == {"raw": 1, "tokenizer": 1}


def test_the_objective_is_the_last_stages_monitor_or_the_worst_value(make_cfg, sentiment_dir,
                                                                      monkeypatch):
    base = tiny_overrides(sentiment_dir) + ["trainer.max_steps=2", "cache.stages=off"]
    record = run(make_cfg(base))
    assert record["objective"] == pytest.approx(record["final"]["val/acc"])
    mlm = run(make_cfg([*base, "stage=mlm", "stage.task.max_length=32"]))
    assert mlm["status"] == "ok" and mlm["monitor"] == {"metric": "val/loss", "mode": "min",
                                                      "failed_by": None}
    assert mlm["objective"] == pytest.approx(mlm["final"]["val/loss"])
    monkeypatch.setattr("ftlab.run._hydra_info", lambda: {  # a sweep job returns, not exits
        "multirun": True, "overrides": [], "sweep": "s", "job": "j", "choices": {}})
    bad = run(make_cfg([*base, "stage=mlm", "stage.batch_size=100000"]))
    assert bad["status"] == "error" and bad["objective"] == math.inf  # lower is better
    bad = run(make_cfg([*base, "stage.batch_size=100000"]))
    assert bad["status"] == "error" and bad["objective"] == -math.inf


def test_torch_threads_follow_the_cores_and_parallel_jobs(monkeypatch):
    """Each job's threads = cores / the jobs running at once on the machine: joblib's n_jobs
    (bounded by the batch), a submitit_local batch (all at once); the user's setting wins."""
    import torch

    from ftlab.threads import JOBS_AT_ONCE, LAUNCHER_OMP

    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
              "n_jobs": 4}
    local = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
             "tasks_per_node": 1, "cpus_per_task": None}
    slurm = {**local, "_target_": local["_target_"].replace("Local", "Slurm")}
    for var in ("OMP_NUM_THREADS", JOBS_AT_ONCE, LAUNCHER_OMP):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    before = torch.get_num_threads()
    try:
        assert set_threads(None) == 8 and torch.get_num_threads() == 8  # one run: every core
        assert set_threads(joblib) == 2 and torch.get_num_threads() == 2
        assert set_threads({**joblib, "n_jobs": -1}) == 1  # joblib's -1: one job per core
        monkeypatch.setenv(JOBS_AT_ONCE, "2")  # ... but a batch of two runs two at once
        assert set_threads({**joblib, "n_jobs": -1}) == 4
        monkeypatch.setenv(JOBS_AT_ONCE, "4")  # submitit_local starts the whole batch
        assert set_threads(local) == 2 and torch.get_num_threads() == 2
        assert set_threads({**local, "cpus_per_task": 3}) == 3  # its own CPU setting
        assert set_threads(slurm) == 8  # a SLURM job has its own allocation (its affinity)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # joblib's own, in its worker: not the
        monkeypatch.setenv(LAUNCHER_OMP, "")  # user's (the sweep's process had none)
        assert set_threads(joblib) == 2
        monkeypatch.delenv(LAUNCHER_OMP)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert set_threads(local) == 3  # the user's setting wins
    finally:
        torch.set_num_threads(before)


def test_cpu_ddp_divides_each_jobs_threads_by_its_processes(monkeypatch):
    """trainer=ddp trainer.accelerator=cpu trainer.devices=2: two processes per job, each took
    the job's share of the cores (Lightning's DDP launcher divides by the devices only when
    OMP_NUM_THREADS is unset, and then ignores the jobs beside it). Checked as a rank trains:
    after the launcher's own thread setting, which every rank runs."""
    import torch
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

    from ftlab.threads import JOBS_AT_ONCE, LAUNCHER_OMP

    ddp = {"strategy": "ddp", "accelerator": "cpu", "devices": 2}
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
              "n_jobs": 2}
    local = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
             "tasks_per_node": 1, "cpus_per_task": None}
    for var in ("OMP_NUM_THREADS", JOBS_AT_ONCE, LAUNCHER_OMP):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)), raising=False)

    def rank_threads(launcher, trainer) -> int:  # ftlab's run, then Lightning's DDP launcher
        set_threads(launcher, trainer)
        _set_num_threads_if_needed(num_processes=2)
        return torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        assert rank_threads(None, ddp) == 4  # one run of 2 processes on 8 cores
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv(JOBS_AT_ONCE, "2")  # 2 submitit_local jobs x 2 processes
        assert rank_threads(local, ddp) == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "4")  # joblib's own, in its worker: not the
        monkeypatch.setenv(LAUNCHER_OMP, "")  # user's (the sweep's process had none)
        assert rank_threads(joblib, ddp) == 2
        assert set_threads(None, {**ddp, "devices": 1}) == 8  # one process
        assert set_threads(None, {**ddp, "devices": [0, 1, 2, 3]}) == 2
        assert set_threads(None, {**ddp, "devices": "0,1,2,3"}) == 2  # ids, as Lightning reads
        assert set_threads(None, {**ddp, "devices": "1,"}) == 8  # one id: one process
        monkeypatch.delenv(LAUNCHER_OMP)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert rank_threads(None, ddp) == 3  # the user's setting wins
    finally:
        torch.set_num_threads(before)


def test_a_multi_process_jobs_thread_count_ends_with_the_job(make_cfg, sentiment_dir,
                                                             monkeypatch):
    """A job of two processes per machine exports its count as OMP_NUM_THREADS (for Lightning's
    DDP launcher). Left set, the next job in the same process (a sweep's next batch under the
    basic launcher or Optuna, a script's next run) read it as the user's setting: a one-process
    job kept half the cores. (The job here trains in one process; only the count is DDP's.)"""
    import os

    import torch

    from ftlab.threads import JOBS_AT_ONCE, LAUNCHER_OMP

    for var in ("OMP_NUM_THREADS", JOBS_AT_ONCE, LAUNCHER_OMP):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr("ftlab.threads.processes_per_machine", lambda trainer: 2)
    before = torch.get_num_threads()
    try:
        record = run(make_cfg([*tiny_overrides(sentiment_dir), "trainer.max_steps=1"]))
        assert record["status"] == "ok" and record["torch_threads"] == 1  # 2 cores / 2
        assert "OMP_NUM_THREADS" not in os.environ
        monkeypatch.undo()  # the next job: one process, the machine's cores
        for var in ("OMP_NUM_THREADS", JOBS_AT_ONCE, LAUNCHER_OMP):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1}, raising=False)
        assert set_threads(None, {"devices": 1}) == 2
    finally:
        torch.set_num_threads(before)
