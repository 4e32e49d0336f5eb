"""Re-running a job in the folder of a finished one (the same command again, ``resume=``): the
finished results are never lost, whether the re-run fails, is interrupted or is killed outright
(SIGKILL, out of memory) before it finishes; the readers (``ftlab-report``, the sweep report,
``resume``) recover them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.resume import finished_record, read_record
from tests.conftest import ROOT, tiny_overrides

ARGS = ["trainer.max_steps=2", "data.max_train_samples=32", "cache.stages=off"]


def ftlab(tmp_path: Path, data: Path, *extra: str, kill_at: str | None = None,
          into: str | None = None):
    """``python -m ftlab`` into ``tmp_path/run`` (SIGKILLed at ``kill_at``, see
    ``tests.crash.sigkill_main``), or with ``into``: those arguments and no others."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    head = ["-m", "ftlab"]
    if kill_at:
        env["FTLAB_TEST_SIGKILL_AT"] = kill_at
        head = ["-c", "from tests.crash import sigkill_main; sigkill_main()"]
    cmd = [sys.executable, *head, *tiny_overrides(data), *ARGS, *extra,
           f"hydra.run.dir={tmp_path / 'run'}"] if into is None else \
        [sys.executable, *head, *extra, into]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_rerun_killed_outright_keeps_the_finished_results(tmp_path, sentiment_dir, capsys):
    """A finished run, re-run in its folder and SIGKILLed (a real child process, ``kill -9`` as
    the OOM killer does): before any stage started, every reader sees the finished results
    (with the kill as ``rerun_error``) and the same command reuses them; killed while a changed
    stage trains, the job reads as interrupted, the finished results stay in metrics.json and
    the original command gets them back without training."""
    from ftlab.report_cli import main as report

    out = tmp_path / "run" / "metrics.json"
    first = ftlab(tmp_path, sentiment_dir)
    assert first.returncode in (0, 3), first.stderr[-2000:]
    done = json.loads(out.read_text())
    assert done["status"] == "ok"

    killed = ftlab(tmp_path, sentiment_dir, kill_at="pipeline")
    assert killed.returncode == -9, killed.stderr[-2000:]
    raw = json.loads(out.read_text())  # what the killed re-run left
    assert raw["status"] == "running" and raw["finished_before"]["final"] == done["final"]
    seen = read_record(out)
    assert seen["status"] == "ok" and seen["final"] == done["final"]
    assert seen["rerun_error"]["status"] == "interrupted"
    assert "killed" in seen["rerun_error"]["error"]
    assert finished_record(out.parent, done["job_identity"], None, seen)[0]["final"] == \
        done["final"]
    with pytest.raises(SystemExit) as exit_:
        report([str(out.parent)])
    assert exit_.value.code in (0, 3)  # ok (3: at the majority baseline after 2 steps)
    assert f"{out.parent}: ok" in capsys.readouterr().out

    again = ftlab(tmp_path, sentiment_dir)  # the same command: reused, not trained again
    assert again.returncode in (0, 3), again.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["reused"]["skipped"] and record["final"] == done["final"]
    assert "finished_before" not in record and "rerun_error" not in record

    changed = ftlab(tmp_path, sentiment_dir, "trainer.max_steps=3", kill_at="stage")
    assert changed.returncode == -9, changed.stderr[-2000:]
    assert json.loads(out.read_text())["finished_before"]["final"] == done["final"]
    seen = read_record(out)  # a changed job was training: it is what the folder holds now
    assert seen["status"] == "interrupted" and seen["interrupted"]["stage"] == "classify"
    back = ftlab(tmp_path, sentiment_dir)  # the original command: its results, not trained
    assert back.returncode in (0, 3), back.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["reused"]["skipped"] and record["final"] == done["final"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _job(sweep: Path, name: str, record: dict) -> Path:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / "metrics.json").write_text(json.dumps(record))
    return sweep / name


def _finished(seed: int, acc: float) -> dict:
    return {"status": "ok", "failed": False, "seed": seed, "final": {"val/acc": acc},
            "overrides": [f"seed={seed}"], "job_identity": [f"classify-{seed}", "callbacks-x"],
            "monitor": {"metric": "val/acc", "mode": "max", "failed_by": None}}


def _rerun(finished: dict, *, host: str | None = None, **more) -> dict:
    import socket

    return {"status": "running", "seed": finished["seed"], "stages": {},
            "overrides": finished["overrides"], "finished_before": finished,
            "process": {"pid": _dead_pid(), "host": host or socket.gethostname(),
                        "pid_start": None}} | more


def test_sweep_report_and_relaunch_recover_a_rerun_killed_before_it_trained(tmp_path):
    """A sweep re-launch killed (SIGKILL) while a job of a finished sweep was re-running: the
    job's finished results count in the report and a further re-launch skips it. A re-run
    killed while a changed stage trained reads as interrupted, its finished results kept."""
    from ftlab.report import collect, summarize

    sweep = tmp_path / "sweep"
    a, b, c = _finished(1, 0.8), _finished(2, 0.7), _finished(3, 0.6)
    job0 = _job(sweep, "0", _rerun(a))  # killed here
    _job(sweep, "1", _rerun(b, host="another-machine"))  # killed on another host
    job2 = _job(sweep, "2", _rerun(c, current_stage="classify"))  # killed while training
    records = collect(sweep)
    assert [r["status"] for r in records] == ["ok", "ok", "interrupted"]
    assert [r.get("final") for r in records[:2]] == [a["final"], b["final"]]
    assert records[0]["rerun_error"]["status"] == "interrupted"
    [summary] = summarize(records).values()
    assert summary["metrics"]["val/acc"]["n"] == 2 and summary["errored"] == 1
    for job, rec in ((job0, a), (job2, c)):  # the re-launch finds them: not trained again
        own = read_record(job / "metrics.json")
        found, folder = finished_record(job, rec["job_identity"], sweep, own)
        assert folder == job and found["final"] == rec["final"]
    # a re-run that finished a stage wrote that stage's artefact over the finished job's: the
    # finished metrics stay in metrics.json, but are not reused for those artefacts
    job3 = _job(sweep, "3", _rerun(_finished(4, 0.5), stages={"classify": {"metrics": {}}},
                                   current_stage="task"))
    assert read_record(job3 / "metrics.json")["finished_before"]["final"] == {"val/acc": 0.5}
    assert finished_record(job3, _finished(4, 0.5)["job_identity"], None,
                           read_record(job3 / "metrics.json")) is None


def test_a_second_run_in_the_folder_of_a_live_run_is_refused(make_cfg, sentiment_dir, tmp_path,
                                                              capsys):
    """Two runs in one folder (the same command in two terminals) wrote over each other's
    checkpoints (the second crashed renaming the first's) and results: the second stops with
    the fix, leaving the live run's metrics.json alone."""
    import socket

    from ftlab.run import run
    from ftlab.status import _start_ticks

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = {"status": "running", "stages": {}, "current_stage": "classify",
                "process": {"pid": other.pid, "host": socket.gethostname(),
                            "pid_start": _start_ticks(other.pid), "started": "then"}}
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.json").write_text(json.dumps(live))
        with pytest.raises(SystemExit) as exit_:
            run(make_cfg(tiny_overrides(sentiment_dir) + ["trainer.max_steps=1"]))
        assert exit_.value.code == 1
        assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == live
        err = capsys.readouterr().err
        assert f"another ftlab run (pid {other.pid}, started then) is still writing" in err
        assert f"Fix: wait for it to end (or stop it: kill {other.pid})" in err
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("content, says", [
    ("[1, 2]", "holds a JSON list, not a job's record"),
    ('{"status": "ok", "fin', "no readable metrics.json"),
])
def test_ftlab_report_on_a_damaged_run_folder_says_so(tmp_path, capsys, content, says):
    """``ftlab-report <run>`` on a metrics.json that is not a record (a list: was a bare
    AttributeError traceback) or is cut short."""
    from ftlab.report_cli import main

    (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_ftlab_report_on_a_run_whose_rerun_was_killed_says_whose_results_it_shows(tmp_path,
                                                                                 capsys):
    from ftlab.report_cli import main

    finished = _finished(1, 0.8)
    replaced = _rerun(finished, stages={"classify": {}}, current_stage="task")
    for record, says in ((_rerun(finished), "a later re-run ended before it trained"),
                         (_rerun(finished, current_stage="classify"), "reuses them without"),
                         (replaced, "replaced its stage artefacts, so its own command trains")):
        (tmp_path / "metrics.json").write_text(json.dumps(record))
        with pytest.raises(SystemExit) as exit_:
            main([str(tmp_path)])
        out = capsys.readouterr().out
        assert exit_.value.code == (0 if "later" in says else 1) and says in out, out


@pytest.mark.slow
def test_a_sweep_relaunch_killed_outright_loses_no_finished_job(tmp_path, sentiment_dir):
    """``ftlab -m resume=<sweep>`` SIGKILLed (a real child) while its first job, finished
    before, was being re-checked: the sweep report still counts it, and the next re-launch
    skips every finished job."""
    from ftlab.report import collect

    sweep = tmp_path / "sweep"
    first = ftlab(tmp_path, sentiment_dir, "-m", *tiny_overrides(sentiment_dir), *ARGS,
                  "seed=1,2", into=f"hydra.sweep.dir={sweep}")
    assert first.returncode in (0, 3), first.stderr[-2000:]
    done = {j: json.loads((sweep / j / "metrics.json").read_text()) for j in ("0", "1")}
    killed = ftlab(tmp_path, sentiment_dir, "-m", kill_at="reuse", into=f"resume={sweep}")
    assert killed.returncode == -9, killed.stderr[-2000:]
    raw = [json.loads((sweep / j / "metrics.json").read_text())["status"] for j in done]
    assert sorted(raw) == ["ok", "running"]
    records = collect(sweep)
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert [r["final"] for r in records] == [done[j]["final"] for j in done]
    again = ftlab(tmp_path, sentiment_dir, "-m", into=f"resume={sweep}")
    assert again.returncode in (0, 3), again.stderr[-2000:]
    for j, rec in done.items():
        now = json.loads((sweep / j / "metrics.json").read_text())
        assert now["reused"]["skipped"] and now["final"] == rec["final"]


@pytest.mark.parametrize("content", ["[1]", '{"status": "running", "process": "pid 7"}'])
def test_a_run_in_a_folder_with_a_damaged_metrics_json_runs(make_cfg, sentiment_dir, tmp_path,
                                                            content):
    """A metrics.json that is not a record (a list) or has a damaged process entry (an edit,
    other code): the run writes its own, instead of a bare AttributeError traceback."""
    from ftlab.run import run

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(content)
    record = run(make_cfg(tiny_overrides(sentiment_dir) + ["trainer.max_steps=1"]))
    assert record["status"] == "ok"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "ok"


def test_save_artefact_best_keeps_a_killed_reruns_finished_record_recoverable(tmp_path):
    """The end of a sweep (save_artefact=best) drops the full-size artefact of a job whose
    re-run was killed: the note goes into the finished record it kept, so the job still reads
    as finished (it used to be written into the killed re-run's record, which then read as
    interrupted and was trained again)."""
    from ftlab.artefact import keep_best_full_artefacts
    from ftlab.report import collect

    sweep = tmp_path / "sweep"
    best = _job(sweep, "0", _finished(1, 0.9) | {"objective": 0.9, "stages": {}})
    weights = sweep / "1" / "classify" / "trainable.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"w")
    stage = {"artefact": str(weights), "full_size_artefact": True, "metrics": {}}
    finished = _finished(2, 0.5) | {"objective": 0.5, "stages": {"classify": stage}}
    job = _job(sweep, "1", _rerun(finished))
    assert keep_best_full_artefacts(collect(sweep), sweep) == best.name
    assert not weights.exists()
    seen = read_record(job / "metrics.json")
    assert seen["status"] == "ok" and "artefact_dropped" in seen["stages"]["classify"]
    assert seen["stages"]["classify"]["artefact"] is None  # it named the deleted file
    assert finished_record(job, finished["job_identity"], None, seen) is not None


def test_report_counts_jobs_of_a_sweep_run_with_no_hydra_subfolder(tmp_path):
    """``hydra.output_subdir=null``: job folders without ``.hydra/`` were left out, so the
    sweep's report (and its exit status) said nothing of jobs that finished."""
    from ftlab.report import collect
    from ftlab.report_cli import main

    for job, acc in (("0", 0.8), ("1", 0.7)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "metrics.json").write_text(json.dumps(_finished(int(job), acc)))
    assert [r["final"]["val/acc"] for r in collect(tmp_path)] == [0.8, 0.7]
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["default"]["runs"] == 2


def test_finished_results_whose_artefacts_a_rerun_replaced_are_kept_not_restored(
        make_cfg, sentiment_dir, tmp_path, monkeypatch):
    """A changed re-run finished a stage (its artefact replaced the finished job's) and then
    failed; the next re-run stops before training: metrics.json must not turn back into the
    finished record (its metrics would describe artefacts that are gone). They stay, marked
    ``artefacts_replaced``, and are not recovered or reused later."""
    import ftlab.pipeline
    from ftlab.errors import FtlabError
    from ftlab.run import run

    finished = _finished(1, 0.8)
    crashed = {"status": "error", "error": "boom", "stages": {"classify": {"metrics": {}}},
               "finished_before": finished}
    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "metrics.json"
    out.write_text(json.dumps(crashed))

    def bad(*args, **kwargs):
        raise FtlabError("a bad override", "fix it")

    monkeypatch.setattr(ftlab.pipeline, "build_pipeline", bad)
    with pytest.raises(SystemExit):
        run(make_cfg(tiny_overrides(sentiment_dir) + ["trainer.max_steps=1"]))
    record = json.loads(out.read_text())
    assert record["status"] == "error" and "a bad override" in record["error"]
    assert record["finished_before"] == finished | {"artefacts_replaced": True}
    killed = _rerun(record["finished_before"])  # and killed before training: still not ok
    assert finished_record(out.parent, finished["job_identity"], None, killed) is None
    out.write_text(json.dumps(killed))
    assert read_record(out)["status"] == "interrupted"
