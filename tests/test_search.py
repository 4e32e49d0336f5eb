"""Hyper-parameter search (hydra/sweeper=ftlab_optuna): the space syntax, pruning from
intermediate validation scores, the best trial's file, one study shared by two workers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from ftlab.errors import FtlabError  # noqa: E402
from ftlab.search import parse_space, trial_outcome  # noqa: E402
from ftlab.study import build_object, open_storage, storage_url  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402


def test_space_syntax_maps_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space, fixed = parse_space(["stage.optim.lr=tag(log, interval(1e-5, 1e-3))",
                                "stage.batch_size=choice(16, 32)", "peft.config.r=range(4,17,4)",
                                "regularizer.r3f_lambda=interval(0.1, 5)",
                                "stage.trainer.max_steps=int(interval(2, 8))",
                                "peft=lora"], None)
    assert space["stage.optim.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["stage.batch_size"] == CategoricalDistribution([16, 32])
    assert space["peft.config.r"] == IntDistribution(4, 16, step=4)  # range's end is exclusive
    assert space["regularizer.r3f_lambda"] == FloatDistribution(0.1, 5.0)
    assert space["stage.trainer.max_steps"] == IntDistribution(2, 8)
    assert fixed == ["peft=lora"]
    space, fixed = parse_space(["stage.batch_size=choice(16, 32)", "stage.optim.lr=interval(0.1,1)",
                                "stage.batch_size=16"], None)  # the command line wins
    assert list(space) == ["stage.optim.lr"] and fixed == ["stage.batch_size=16"]
    with pytest.raises(FtlabError, match="search space is empty"):
        parse_space(["peft=lora"], None)
    # `-m seed=1,2,3` with the search: Optuna tuned the seed and kept the luckiest one
    with pytest.raises(FtlabError, match=r"(?s)seed is in the search space.*hydra.sweeper.seeds="):
        parse_space(["stage.optim.lr=interval(0.1,1)", "seed=1,2,3"], None)
    assert parse_space(["stage.optim.lr=interval(0.1,1)", "seed=4"], None)[1] == ["seed=4"]


def test_only_optuna_samplers_and_pruners_are_built():
    assert type(build_object({"_target_": "optuna.pruners.MedianPruner"}, "pruner")).__name__ \
        == "MedianPruner"
    with pytest.raises(FtlabError, match="optuna.samplers"):
        build_object({"_target_": "os.system", "command": "true"}, "sampler")


def test_a_bad_search_gives_a_message_not_a_traceback(tmp_path):
    proc = ftlab("hydra/sweeper=ftlab_optuna", "~hydra.sweeper.params", "model=tiny_bert",
                 cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "search space is empty" in out and "Traceback" not in out


def test_storage_and_trial_outcomes(tmp_path):
    assert storage_url(None, tmp_path) == str(tmp_path / "optuna.journal")
    assert storage_url("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    ok = {"status": "ok", "objective": 0.8}
    assert trial_outcome([ok, ok | {"objective": 0.6}]).value == pytest.approx(0.7)
    assert trial_outcome([{"status": "pruned", "objective": -math.inf}]).state == "pruned"
    assert trial_outcome([ok, {"status": "error", "objective": -math.inf}]).state == "fail"


def ftlab(*args: str, cwd: Path, omp: str | None = "1",
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """``ftlab -m ARGS`` in ``cwd``; ``omp`` None: no OMP_NUM_THREADS (ftlab picks threads);
    ``env``: more environment variables."""
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "OMP_NUM_THREADS")}
    env |= {"FTLAB_ROOT": str(cwd), "WANDB_MODE": "offline"} | ({"OMP_NUM_THREADS": omp} if omp
                                                                  else {}) | extra
    return subprocess.Popen([sys.executable, "-m", "ftlab", "-m", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def search_args(data: Path, *extra: str) -> list[str]:
    return ["hydra/sweeper=ftlab_optuna", *tiny_overrides(data),
            "hydra.sweeper.params={stage.optim.lr:'tag(log, interval(1e-5, 3e-2))'}",
            "hydra.sweeper.pruner.n_startup_trials=1", "trainer.val_check_interval=4", *extra]


def finish(proc: subprocess.Popen) -> str:
    """The sweep's output; it ended without errored jobs (3 only when no trial learnt: a
    search expects some trials at the majority baseline and still exits 0)."""
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode in (0, 3), out[-3000:]
    finish.code = proc.returncode
    return out


def test_search_prunes_trials_and_writes_the_best(tmp_path, sentiment_dir):
    out = finish(ftlab(*search_args(sentiment_dir, "hydra.sweeper.n_trials=6",
                                    "stage.batch_size=16", "trainer.max_epochs=3"),
                       cwd=tmp_path))
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    result = json.loads((sweep / "search.json").read_text())
    states = [t["state"] for t in result["trials"]]
    assert len(states) == 6 and result["direction"] == "maximize"  # val/acc: auto -> maximize
    assert "pruned" in states and "complete" in states, result["trials"]
    assert "fail" not in states, out[-3000:]
    for trial in result["trials"]:
        record = json.loads((Path(trial["jobs"][0]) / "metrics.json").read_text())
        assert record["overrides"][-1] == f"trial={trial['number']}"
        if trial["state"] == "pruned":  # stopped early and recorded as pruned, not failed
            assert record["status"] == "pruned" and not record["failed"]
            assert record["stages"]["classify"]["global_steps"] < max(
                int(s) for t in result["trials"] for s in t["intermediate"])
        else:  # a complete trial's value is its job's objective, the best validation score
            assert trial["value"] == pytest.approx(record["objective"])
            assert record["objective"] == record["final"]["val/acc"]
            assert len(trial["intermediate"]) > 1
    complete = [t for t in result["trials"] if t["state"] == "complete"]
    best = max(complete, key=lambda t: t["value"])
    assert result["best"]["number"] == best["number"]
    best_file = (sweep / "best_params.yaml").read_text()
    assert f"stage.optim.lr: {json.dumps(best['params']['stage.optim.lr'])}" in best_file
    summary = json.loads((sweep / "summary.json").read_text())
    learnt = any(len(s["seeds"]) > len(s["failed_seeds"]) for s in summary.values())
    assert finish.code == (0 if learnt else 3)  # failed trials alone do not fail a search
    assert sum(s["pruned"] for s in summary.values()) == states.count("pruned")
    assert sum(s["errored"] for s in summary.values()) == 0


def test_two_workers_share_one_study(tmp_path, sentiment_dir):
    journal = tmp_path / "study.journal"
    shared = search_args(sentiment_dir, "hydra.sweeper.n_trials=2", "trainer.max_steps=4",
                         f"hydra.sweeper.storage={journal}", "hydra.sweeper.study_name=shared")
    workers = [ftlab(*shared, f"hydra.sweep.dir={tmp_path}/worker{i}", cwd=tmp_path)
               for i in range(2)]  # two processes at once, one journal file
    for proc in workers:
        finish(proc)
    study = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert len(study.trials) == 4 and sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    mine = [{t["number"] for t in json.loads((tmp_path / f"worker{i}" / "search.json")
                                             .read_text())["trials"] if t["this_sweep"]}
            for i in range(2)]
    assert len(mine[0]) == len(mine[1]) == 2 and not mine[0] & mine[1]


def test_workers_joining_an_empty_study_at_once_ask_different_points(tmp_path):
    """Both workers open the study before either asks (0 trials seen by each): their first
    trials are numbered apart by the storage and sampled with seed + that number. A lone
    worker on a new study keeps the configured seed."""
    from optuna.distributions import FloatDistribution

    from ftlab.search import ask_first

    space = {"lr": FloatDistribution(1e-5, 1e-3, log=True)}
    node = {"_target_": "optuna.samplers.TPESampler", "seed": 7}
    url = storage_url(None, tmp_path)
    studies = [optuna.create_study(study_name="s", storage=open_storage(url), load_if_exists=True,
                                   sampler=build_object(node, "sampler")) for _ in range(2)]
    firsts = [ask_first(study, space, node) for study in studies]
    assert [t.number for t in firsts] == [0, 1]
    assert firsts[0].params != firsts[1].params
    alone = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=7)).ask(space)
    assert firsts[0].params == alone.params
    # the worker's later trials keep sampling (the reseeded sampler, not the first one again)
    assert studies[1].ask(space).params != firsts[1].params


def test_slurm_launcher_config_has_the_documented_keys(make_cfg):
    from hydra.core.hydra_config import HydraConfig

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    make_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
              "hydra.launcher.gpus_per_task=1"])
    launcher = HydraConfig.get().launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_task) == ("gpu", 1)
    assert {"timeout_min", "cpus_per_task", "mem_gb", "nodes"} <= set(launcher)


@pytest.mark.slow
def test_submitit_local_runs_two_jobs(tmp_path, sentiment_dir):  # ~40 s: two subprocesses
    from ftlab.threads import cores

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = ftlab("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                 *tiny_overrides(sentiment_dir), "trainer.max_steps=3", "seed=1,2", cwd=tmp_path,
                 omp=None)  # the two jobs run at once: each gets half the cores
    finish(proc)
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    records = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert [r["seed"] for r in records] == [1, 2]
    assert all(r["status"] == "ok" and r["stages"]["classify"]["global_steps"] == 3
               for r in records)
    assert records[0]["final"] != records[1]["final"]  # two jobs, two seeds, not one run twice
    assert [r["torch_threads"] for r in records] == [max(1, cores() // 2)] * 2
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["default"]["runs"] == 2 and summary["default"]["errored"] == 0


def test_a_relaunched_search_asks_new_points_into_new_job_folders(tmp_path, sentiment_dir):
    """`ftlab -m resume=<search>` (or a second run into the same folder and study): the seeded
    sampler must not ask the study's start-up points again (trial 2 was trial 0's params and
    its jobs reused trial 0's records), and new trials' jobs must not write over old folders."""
    sweep = tmp_path / "search"
    args = search_args(sentiment_dir, "hydra.sweeper.n_trials=2", "trainer.max_steps=2",
                       f"hydra.sweep.dir={sweep}")
    for _ in range(2):
        finish(ftlab(*args, cwd=tmp_path))
    trials = json.loads((sweep / "search.json").read_text())["trials"]
    lrs = [t["params"]["stage.optim.lr"] for t in trials]
    assert len(trials) == 4 and len(set(lrs)) == 4, lrs
    for job in range(4):  # job n ran trial n: nothing was written over
        record = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert record["overrides"][-1] == f"trial={job}" and "reused" not in record
    # the re-launch's search.json still names the first launch's job folders (it said [])
    assert [t["jobs"] for t in trials] == [[str(sweep / str(n))] for n in range(4)]


@pytest.mark.slow  # ~35 s: two searches of 2 and 3 jobs
def test_a_search_stopped_by_ctrl_c_finishes_its_trial_when_resumed(tmp_path, sentiment_dir):
    """Ctrl+C in a trial's second seed: the trial stayed 'running' in the study for good, its
    interrupted job was never continued (resume= asked new trials), and that job made every
    later report of the folder exit 1. Resumed, the trial's jobs go back to their folders (the
    finished one reused, the stopped one from its checkpoint) and the study gets its value."""
    sweep = tmp_path / "search"
    args = search_args(sentiment_dir, "hydra.sweeper.n_trials=1", "hydra.sweeper.seeds=[1,2]",
                       "trainer.max_steps=8", "checkpoint.every_n_steps=4",
                       "+callbacks.stop._target_=tests.crash.InterruptAt",
                       "+callbacks.stop.step=5", "allow_targets=[tests.]",
                       f"hydra.sweep.dir={sweep}")
    proc = ftlab(*args, cwd=tmp_path, env={"FTLAB_TEST_INTERRUPT_SEEDS": "2",
                                           "PYTHONPATH": str(Path(__file__).parents[1])})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:]
    proc = ftlab(f"resume={sweep}", cwd=tmp_path,
                 env={"PYTHONPATH": str(Path(__file__).parents[1])})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode in (0, 3), out[-2000:]  # (3: no trial beat the baseline)
    trials = json.loads((sweep / "search.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete"], trials
    assert [t["jobs"] for t in trials] == [[str(sweep / "0"), str(sweep / "1")],
                                           [str(sweep / "2"), str(sweep / "3")]]
    jobs = [json.loads((sweep / str(n) / "metrics.json").read_text()) for n in range(4)]
    assert [j["status"] for j in jobs] == ["ok"] * 4
    assert jobs[1]["stages"]["classify"]["resumed_from_step"] == 4
    assert trials[0]["value"] == pytest.approx((jobs[0]["objective"] + jobs[1]["objective"]) / 2)


@pytest.mark.parametrize(("setting", "expected"), [
    ("hydra.sweeper.n_trials=0", "a search needs at least one trial"),  # was UnboundLocalError
    ("hydra.sweeper.direction=up", "'up' is not one of: auto, maximize, minimize"),  # ValueError
    # val/acc minimised: the search kept the worst trials and pruned the best
    ("hydra.sweeper.direction=minimize", "the task's monitored metric, is to maximize"),
    # storages that cannot open: SQLAlchemy's traceback; a URL Optuna has no database for
    # was taken as a file path (a folder 'redis:' in the working folder, a search in it)
    ("hydra.sweeper.storage=sqlite:////no-such-folder/s.db", "Cannot open the Optuna study's "
     "storage hydra.sweeper.storage=sqlite:////no-such-folder/s.db: OperationalError"),
    ("hydra.sweeper.storage=redis://localhost:6379", "Can't load plugin: sqlalchemy.dialects"),
    # a space no trial can run: Hydra's error after the study had a trial (left 'running'),
    # or every trial's job failing in turn
    ("stage.optim.lrr=tag(log,interval(1e-4,1e-2))",
     "stage.optim.lrr=0.0001): Unknown key 'lrr' in 'stage.optim'. Did you mean 'lr'?"),
    ("stage.optim.warmup_ratio=interval(0,2.0)", "optim.warmup_ratio=2.0 is out of range"),
    # the second seed-1 job reused the first's record: mean(s1, s1, s2) was the trial's value
    ("hydra.sweeper.seeds=[1,2,1]", "names seed 1 more than once"),
    # Hydra's TypeError traceback (seeds=3), or every trial's jobs failing on 'a'
    ("hydra.sweeper.seeds=3", "hydra.sweeper.seeds=3 is not a list of integer seeds"),
    ("hydra.sweeper.seeds=[a,b]", "is not a list of integer seeds"),
    # Hydra's "Error in call to target" / "Error locating target" tracebacks
    ("hydra.sweeper.sampler._target_=optuna.samplers.TPESamplr", "Did you mean 'TPESampler'?"),
    ("hydra.sweeper.pruner.n_startup_trials=-1",
     "hydra.sweeper.pruner (MedianPruner) could not be built: ValueError"),
    ("hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
     "drop it: ~hydra.sweeper.sampler.n_startup_trials"),
])
def test_bad_sweeper_settings_give_a_message_not_a_traceback(tmp_path, sentiment_dir, setting,
                                                             expected):
    proc = ftlab(*search_args(sentiment_dir, setting, f"hydra.sweep.dir={tmp_path / 's'}"),
                 cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:]
    assert expected in out and "Traceback" not in out, out[-2000:]
    journal = tmp_path / "s" / "optuna.journal"
    if journal.exists():  # no trial was asked (and none left 'running' in the study)
        assert not optuna.load_study(study_name="ftlab", storage=open_storage(str(journal))).trials


@pytest.mark.parametrize(("direction", "space", "expected"), [
    # Optuna loaded the stored direction silently: accuracies were minimised, and the best
    # trial was picked among losses and accuracies
    ("minimize", "stage.batch_size=choice(16,32)", "was made to minimize its objective"),
    # a changed choice(): a bare ValueError traceback from inside Optuna
    ("maximize", "stage.batch_size=choice(8,16)", "does not fit study 'shared'"),
])
def test_joining_a_study_of_another_objective_or_space_stops_with_the_fix(
        tmp_path, sentiment_dir, direction, space, expected):
    from optuna.distributions import CategoricalDistribution

    journal = tmp_path / "study.journal"
    study = optuna.create_study(study_name="shared", direction=direction,
                                storage=open_storage(str(journal)))
    trial = study.ask({"stage.batch_size": CategoricalDistribution([16, 32])})
    study.tell(trial, 0.5)
    proc = ftlab(*search_args(sentiment_dir, space, "hydra.sweeper.n_trials=1",
                              f"hydra.sweeper.storage={journal}",
                              "hydra.sweeper.study_name=shared"), cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:]
    assert expected in out and "hydra.sweeper.study_name=<a new name>" in out, out[-2000:]
    assert "Traceback" not in out and len(study.trials) == 1  # nothing was asked or run


def test_a_study_is_joined_only_with_its_fixed_settings():
    """A second search with `peft=lora` joined a `peft=full` study: Optuna compared the two
    recipes' trials, and best_params.yaml (lr only) was read as a setting for LoRA."""
    from ftlab.study import check_settings

    study = optuna.create_study(direction="maximize")
    check_settings(study, ["peft=full", "data=local"], "memory")  # a new study keeps them
    study.tell(study.ask(), 0.5)
    check_settings(study, ["data=local", "peft=full"], "memory")  # the same, in any order
    with pytest.raises(FtlabError, match=r"this search adds peft=lora; it lacks peft=full"):
        check_settings(study, ["peft=lora", "data=local"], "memory")
    # how jobs are kept or logged is not the recipe: a resumed search may change it (README:
    # "Extra overrides after resume= win", e.g. checkpoint.keep=true)
    check_settings(study, ["data=local", "peft=full", "checkpoint.keep=true", "logger=wandb",
                           "+logger.project=x", "allow_targets=[mypkg.]"], "memory")
    old = optuna.create_study()  # made before ftlab kept them: nothing to compare with
    old.tell(old.ask(), 0.5)
    check_settings(old, ["peft=lora"], "memory")


def test_the_sweepers_tell_their_jobs_how_many_run_at_once(tmp_path, monkeypatch):
    """The batch's size is in the environment a launcher's processes inherit, only while the
    batch launches (ftlab.threads divides the cores by it)."""
    import os

    from ftlab.threads import JOBS_AT_ONCE
    from hydra_plugins.ftlab_sweeper.basic_sweeper import PlacingLauncher

    seen = []

    class Launcher:
        def launch(self, jobs, initial_job_idx):
            seen.append((len(jobs), os.environ.get(JOBS_AT_ONCE)))
            return []

    monkeypatch.delenv(JOBS_AT_ONCE, raising=False)
    for place in (True, False):  # with and without job placement
        PlacingLauncher(Launcher(), tmp_path, place).launch([["seed=1"], ["seed=2"],
                                                              ["seed=3"]], 0)
    assert seen == [(3, "3"), (3, "3")] and JOBS_AT_ONCE not in os.environ


def test_jobs_stopped_by_ctrl_c_under_a_launcher_stop_the_sweep_as_a_stop(tmp_path, capsys):
    """Ctrl-C reaches submitit_local's job processes: they record 'interrupted' and exit 130
    without a result, and submitit raised UncompletedJobError: a traceback and exit status 1.
    The sweep exits 130 with the resume command, as a stopped job does."""
    from hydra_plugins.ftlab_sweeper.basic_sweeper import PlacingLauncher

    class Stopped(RuntimeError):  # what submitit raises for a job without a result
        pass

    class Launcher:
        def __init__(self, signal):
            self.signal = signal

        def launch(self, jobs, initial_job_idx):
            (tmp_path / "0").mkdir(exist_ok=True)
            (tmp_path / "0" / "metrics.json").write_text(json.dumps({
                "status": "interrupted" if self.signal else "error",
                "interrupted": {"signal": self.signal, "stage": "classify", "step": 3}}))
            raise Stopped("Job 11817 has not produced any output (state: FINISHED)")

    with pytest.raises(SystemExit) as exit_:
        PlacingLauncher(Launcher("SIGINT"), tmp_path).launch([["seed=1"]], 0)
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert "Stopped by SIGINT" in err and f"ftlab -m resume={tmp_path}" in err
    with pytest.raises(Stopped):  # the control: a launcher failure that no signal caused
        PlacingLauncher(Launcher(None), tmp_path).launch([["seed=1"]], 0)


def test_a_pruned_trial_killed_while_testing_resumes_pruned(make_cfg, sentiment_dir, tmp_path,
                                                            monkeypatch):
    """The pruning decision is in the checkpoint with the stop: resumed, the stage does not
    train on, and its job is still recorded as pruned (not ok)."""
    from ftlab.run import run
    from tests.test_resume import crash_at

    journal = tmp_path / "study.journal"
    optuna.create_study(study_name="s", storage=open_storage(str(journal))).ask()  # trial 0
    node = ("+callbacks.optuna_pruning={_target_: ftlab.pruning.OptunaPruning, trial: 0, "
            f"stage: classify, study: s, storage: '{journal}', pruner: {{class: "
            "optuna.pruners.ThresholdPruner, kwargs: {lower: 2.0}}}")  # val/acc < 2: pruned
    cfg = make_cfg([*tiny_overrides(sentiment_dir), node, "trainer.val_check_interval=4",
                    "checkpoint.every_n_steps=4", "stage.optim.lr=1e-3"])
    crash_at(monkeypatch, 4, hook="on_test_batch_end")  # pruned at step 4, killed testing
    with pytest.raises(SystemExit):
        run(cfg)
    monkeypatch.undo()
    rec = run(cfg)
    stage = rec["stages"]["classify"]
    assert rec["status"] == "pruned" and stage["resumed_from_step"] == stage["global_steps"] == 4
