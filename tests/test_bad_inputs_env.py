"""The bad-input battery, environment part (issue 15): signals, killed jobs, a full disk,
read-only and permission-denied folders, damaged cache entries, and more shapes of names,
targets, YAML tags and unreadable files. Each case asserts the exit status (or the
``FtlabError``), that no traceback is shown, and that the message names the problem.

The signal cases send real signals to this process (one also to a ``python -m ftlab`` child);
disk and permission faults are simulated by making the writers raise what the OS and
safetensors raise (``OSError(errno.ENOSPC)``, safetensors' ``SafetensorError`` text).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

from ftlab.cli import preflight
from ftlab.config import instantiate_checked
from ftlab.errors import FtlabError
from ftlab.run import run
from tests.conftest import ROOT, tiny_overrides, write_jsonl
from tests.test_bad_inputs import assert_one_paragraph, no_training  # noqa: F401

FAST = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "cache.stages=off"]


def _metrics(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def _handlers() -> dict:
    return {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}


# --- signals: a stop is recorded as interrupted, with the stage and the step -----------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_training_is_recorded(sig, make_cfg, sentiment_dir, tmp_path, monkeypatch,
                                         capsys):
    from ftlab.callbacks import NoteStep

    def send(self, trainer, *args):
        if trainer.global_step == 3:
            # never the default handler: that would stop pytest itself
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler)
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(NoteStep, "on_train_batch_end", send, raising=False)
    before = _handlers()
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["trainer.max_steps=40", "cache.stages=off"])
    with pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 128 + sig  # 130 / 143, the shell's convention
    record = _metrics(tmp_path)
    name = signal.Signals(sig).name
    assert record["status"] == "interrupted" and record["failed"] is True
    assert record["interrupted"] == {"stage": "classify", "step": 3, "signal": name}
    assert re.search(rf"Stopped by {name} in stage 'classify' at step 3", record["error"])
    # the command that continues it (the same command again would start a new run folder)
    assert f"Fix: `ftlab resume={tmp_path / 'run'}` continues it" in record["error"]
    assert_one_paragraph(record["error"])
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run" / "error.log").exists()
    assert _handlers() == before  # the job's handlers are gone again


def test_signal_before_training_is_recorded(make_cfg, sentiment_dir, tmp_path, monkeypatch):
    import ftlab.validate

    def stop(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ftlab.validate, "check_models_and_data", stop)  # the data checks
    with pytest.raises(SystemExit) as exit_:
        run(make_cfg(tiny_overrides(sentiment_dir)))
    assert exit_.value.code == 143
    record = _metrics(tmp_path)
    assert record["status"] == "interrupted"
    assert record["interrupted"] == {"stage": None, "step": None, "signal": "SIGTERM"}
    assert_one_paragraph(record["error"])


def test_signal_stops_a_sweep_too(make_cfg, sentiment_dir, tmp_path, monkeypatch):
    """A failing sweep job returns so the next job runs; a stopped one ends the sweep."""
    import ftlab.run
    import ftlab.validate

    monkeypatch.setattr(ftlab.validate, "check_models_and_data",
                        lambda *a, **k: os.kill(os.getpid(), signal.SIGINT))
    monkeypatch.setattr(ftlab.run, "_hydra_info", lambda: {
        "multirun": True, "overrides": [], "sweep": "sweep", "job": "job", "launcher": None})
    with pytest.raises(SystemExit) as exit_:
        run(make_cfg(tiny_overrides(sentiment_dir)))
    assert exit_.value.code == 130
    record = _metrics(tmp_path)
    assert record["status"] == "interrupted"
    assert f"Fix: `ftlab -m resume={tmp_path}` continues it" in record["error"]


def test_sigterm_to_the_command_mid_training(tmp_path, sentiment_dir):
    """A real ``python -m ftlab`` child, stopped with SIGTERM once it has trained a step:
    non-zero exit, status interrupted with the stage and the step, no traceback."""
    out = tmp_path / "run"
    csv = out / "classify" / "csv"
    cmd = [sys.executable, "-m", "ftlab", *tiny_overrides(sentiment_dir), "logger=csv",
           "trainer.max_epochs=1000", "trainer.log_every_n_steps=1", "cache.stages=off",
           "+logger.csv.flush_logs_every_n_steps=1", f"hydra.run.dir={out}"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(csv.rglob("metrics.csv")) and proc.poll() is None:
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "interrupted"
    where = record["interrupted"]
    assert where["stage"] == "classify" and where["signal"] == "SIGTERM" and where["step"] >= 1
    assert re.search(rf"Stopped by SIGTERM in stage 'classify' at step {where['step']}", stderr)


# --- killed outright (SIGKILL, out of memory): recognised afterwards -------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _running(pid: int, **process) -> dict:
    import socket

    return {"status": "running", "seed": 1, "current_stage": "tapt", "stages": {},
            "overrides": ["seed=1"],
            "process": {"pid": pid, "host": socket.gethostname(), "pid_start": None} | process}


def test_killed_job_reads_as_interrupted_in_the_sweep_report(tmp_path):
    from ftlab.report import collect, markdown, summarize

    for job, record in (("0", {"status": "ok", "failed": False, "seed": 0, "final": {
            "val/acc": 0.9}, "overrides": ["seed=0"]}), ("1", _running(_dead_pid()))):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / "metrics.json").write_text(json.dumps(record))
    records = collect(tmp_path)
    assert [r["status"] for r in records] == ["ok", "interrupted"]
    assert records[1]["interrupted"]["stage"] == "tapt"
    assert re.search(r"The job \(pid \d+ on .*\) ended in stage 'tapt' without recording an "
                     r"outcome: it was killed.*Fix: re-run", records[1]["error"], re.S)
    [summary] = summarize(records).values()
    assert summary["errored"] == 1 and summary["interrupted"] == 1
    assert "interrupted (stopped or killed): 1" in markdown({"default": summary})


def test_a_job_of_another_live_sweep_in_the_folder_is_not_reported_killed(tmp_path):
    """Two sweeps launched into one folder: when the first ends, the second's job still runs
    (its process lives). The first's report said it was killed."""
    from ftlab.report import collect

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "0").mkdir()
        (tmp_path / "0" / "metrics.json").write_text(json.dumps(_running(other.pid)))
        [record] = collect(tmp_path)  # the sweep has ended
        assert record["status"] == "running", record
    finally:
        other.kill()
        other.wait()
    [record] = collect(tmp_path)
    assert record["status"] == "interrupted"  # the control: its process gone, it was killed


def test_killed_run_folder_reads_as_interrupted_in_ftlab_report(tmp_path, capsys):
    from ftlab.report_cli import main

    (tmp_path / "metrics.json").write_text(json.dumps(_running(_dead_pid())))
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert f"{tmp_path}: interrupted in stage tapt" in out and "Traceback" not in out


def test_reused_pid_reads_as_interrupted():
    from ftlab.status import effective, process_identity

    mine = process_identity()  # alive, but started at another time than the one recorded
    assert effective(_running(os.getpid(), pid_start=mine["pid_start"]))["status"] == "running"
    if mine["pid_start"] is None:
        pytest.skip("no /proc: a reused pid cannot be told apart")
    assert effective(_running(os.getpid(), pid_start=mine["pid_start"] - 1))["status"] == \
        "interrupted"


@pytest.mark.usefixtures("no_training")
def test_alive_or_remote_job_stays_running():  # the control: no false alarm
    from ftlab.status import effective

    assert effective(_running(os.getpid()))["status"] == "running"
    assert effective(_running(_dead_pid(), host="another-machine"))["status"] == "running"


def test_rerun_in_the_folder_of_a_killed_run(make_cfg, sentiment_dir, tmp_path, caplog):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(_running(_dead_pid())))
    with pytest.raises(SystemExit):
        run(make_cfg(tiny_overrides(sentiment_dir) + ["+stage.batch_sise=8"]))
    record = _metrics(tmp_path)
    assert record["previous"]["status"] == "interrupted"
    assert record["previous"]["interrupted"]["stage"] == "tapt"
    assert re.search(r"previous run in .*run was interrupted in stage 'tapt' \(killed\); this "
                     r"run goes on from its last checkpoint", caplog.text)  # not a raw dict


# --- a full disk, read-only folders, permission errors ----------------------------------------

def _safetensors(message: str, code: int):
    return lambda path: SafetensorError(f"Error while serializing: I/O error: {message} (os "
                                        f"error {code}) at path \"{path}.tmpXYZ\"")


WRITE_FAULTS = {
    "enospc": (lambda p: OSError(errno.ENOSPC, "No space left on device"),
               r"disk is full .*while writing .*trainable.safetensors.*Fix: free disk space"),
    "enospc-safetensors": (_safetensors("No space left on device", 28),
                           r"disk is full .*Fix: free disk space"),
    "edquot": (lambda p: OSError(errno.EDQUOT, "Disk quota exceeded"), r"over quota"),
    "eacces": (lambda p: PermissionError(errno.EACCES, "Permission denied"),
               r"trainable.safetensors cannot be written \(permission denied\).*Fix: .*"
               r"paths.log_dir=.*chmod"),
    "eacces-safetensors": (_safetensors("Permission denied", 13), r"permission denied"),
    "erofs": (lambda p: OSError(errno.EROFS, "Read-only file system"),
              r"is on a read-only file system.*Fix: point the output elsewhere"),
}


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_artefact_write_fault(fault, make_cfg, sentiment_dir, tmp_path, monkeypatch, capsys):
    """The stage trained, then its artefact cannot be written: one paragraph with the fix,
    exit 1, and the stage's metrics are in metrics.json (recorded before the artefact)."""
    import ftlab.store

    make, expected = WRITE_FAULTS[fault]

    def failing(tensors, path, metadata=None):
        raise make(path)

    monkeypatch.setattr(ftlab.store, "save_file", failing)
    with pytest.raises(SystemExit) as exit_:
        run(make_cfg(tiny_overrides(sentiment_dir) + FAST))
    assert exit_.value.code == 1
    record = _metrics(tmp_path)
    assert record["status"] == "error"
    assert re.search(expected, record["error"], re.S), record["error"]
    assert_one_paragraph(record["error"])
    assert "val/acc" in record["stages"]["classify"]["metrics"]  # the finished work survives
    assert not (tmp_path / "run" / "error.log").exists()
    assert not list((tmp_path / "run").rglob("*.tmp"))
    assert "Traceback" not in capsys.readouterr().err


def test_full_disk_while_writing_the_stage_card(make_cfg, sentiment_dir, tmp_path, monkeypatch):
    import ftlab.stage

    def full(stage_dir, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(stage_dir / "tokenizer"))

    monkeypatch.setattr(ftlab.stage, "write_stage_card", full)
    with pytest.raises(SystemExit):
        run(make_cfg(tiny_overrides(sentiment_dir) + FAST))
    record = _metrics(tmp_path)
    assert re.search(r"disk is full .*while writing .*classify/tokenizer", record["error"])
    assert_one_paragraph(record["error"])
    assert "val/acc" in record["stages"]["classify"]["metrics"]


def test_full_disk_while_writing_metrics(make_cfg, sentiment_dir, tmp_path, monkeypatch,
                                         capsys):
    """metrics.json itself cannot be updated: both said, the last good copy stays whole."""
    import ftlab.store

    real = ftlab.store.atomic_write

    def full_for_results(path, write):
        if Path(path).name == "metrics.json" and Path(path).exists():
            raise FtlabError(f"The disk is full (or over quota) while writing {path}.", "free")
        return real(path, write)

    monkeypatch.setattr(ftlab.store, "atomic_write", full_for_results)
    with pytest.raises(SystemExit) as exit_:
        run(make_cfg(tiny_overrides(sentiment_dir) + FAST))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "disk is full" in err and "could not update" in err and "Traceback" not in err
    assert _metrics(tmp_path)["status"] == "running"  # the first copy, whole; a later look
    # (this process gone) reads it as interrupted


@pytest.mark.usefixtures("no_training")
def test_config_copy_permission_denied(make_cfg, sentiment_dir, tmp_path, monkeypatch):
    import ftlab.run

    def denied(cfg, f, resolve=False):
        raise PermissionError(errno.EACCES, "Permission denied", str(f))

    monkeypatch.setattr(ftlab.run.OmegaConf, "save", denied)
    with pytest.raises(SystemExit) as exit_:
        run(make_cfg(tiny_overrides(sentiment_dir)))
    assert exit_.value.code == 1
    record = _metrics(tmp_path)
    assert re.search(r"config.yaml cannot be written \(permission denied\)", record["error"])
    assert_one_paragraph(record["error"])


@pytest.mark.usefixtures("no_training")
def test_output_folder_under_a_file(make_cfg, sentiment_dir, tmp_path, capsys):
    from omegaconf import open_dict

    (tmp_path / "afile").write_text("x")
    cfg = make_cfg(tiny_overrides(sentiment_dir))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "afile" / "run")
    with pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert re.search(r"Cannot write .*afile/run: a part of its path is a file", err)
    assert "Traceback" not in err


OUTPUT_FAULTS = {
    "file-in-path": (None, r"a part of its path is a file, not a folder"),
    "full": (("os.fsync", OSError(errno.ENOSPC, "No space left on device")),
             r"The disk is full .*Fix: free disk space"),
    "read-only": (("tempfile.NamedTemporaryFile", OSError(errno.EROFS, "Read-only file system")),
                  r"is on a read-only file system.*hydra.run.dir="),
    "denied": (("tempfile.NamedTemporaryFile", PermissionError(errno.EACCES, "Permission "
                                                                "denied")),
               r"cannot be written \(permission denied\).*chmod"),
}


@pytest.mark.parametrize("fault", OUTPUT_FAULTS)
def test_output_folder_is_checked_before_hydra_writes(fault, tmp_path, monkeypatch, capsys):
    """Hydra's run/sweep folder, checked by the callback before Hydra writes into it."""
    from omegaconf import OmegaConf

    import ftlab.writable
    from ftlab.writable import OutputFolderCheck

    patch, expected = OUTPUT_FAULTS[fault]
    folder = tmp_path / "out" / "run"
    if patch is None:
        (tmp_path / "out").write_text("a file where a folder should be")
    else:
        name, error = patch
        module, attr = name.split(".")

        def raise_(*args, **kwargs):
            raise error

        monkeypatch.setattr(getattr(ftlab.writable, module), attr, raise_)
    config = OmegaConf.create({"hydra": {"run": {"dir": str(folder)},
                                         "sweep": {"dir": str(folder)}}})
    hook = OutputFolderCheck().on_multirun_start if fault == "denied" else \
        OutputFolderCheck().on_run_start
    with pytest.raises(SystemExit) as exit_:
        hook(config)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().removeprefix("ftlab: ")
    assert re.search(expected, err, re.S), err
    assert_one_paragraph(err)
    assert "results written earlier" not in err  # nothing was written yet


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder_chmod(tmp_path, capsys):
    from ftlab.writable import check_writable

    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(FtlabError, match=r"cannot be written \(permission denied\)"):
            check_writable(tmp_path / "ro" / "run")
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_unwritable_run_dir_from_the_command_line(tmp_path, sentiment_dir):
    """``hydra.run.dir`` where nobody may write (sysfs refuses even root): no Hydra
    traceback, one paragraph with the fix, exit 1."""
    target = Path("/sys/ftlab-battery-probe")
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys is writable here")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-m", "ftlab", *tiny_overrides(sentiment_dir),
                           f"hydra.run.dir={target}/run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert re.search(r"ftlab-battery-probe/run cannot be written \(permission denied\).*Fix: "
                     r"point the output elsewhere with paths.log_dir=", proc.stderr, re.S)


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_override_values_too_long_for_a_folder_name(sweep, tmp_path, sentiment_dir):
    """``${hydra.job.override_dirname}`` in the run (or job) folder with long override values:
    one paragraph with the fix before anything is written, not Hydra's OSError traceback
    (single run: exit 1, the folder check; sweep: exit 2, the sweep check)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    folder = ["-m", f"hydra.sweep.dir={tmp_path}/sweep", "hydra.sweep.subdir="
              "${hydra.job.override_dirname}", "seed=1,2"] if sweep else \
        [f"hydra.run.dir={tmp_path}/run/" + "${hydra.job.override_dirname}"]
    proc = subprocess.run([sys.executable, "-m", "ftlab", *folder,
                           *tiny_overrides(sentiment_dir), "cache.dir=" + "c" * 300],
                          cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=env | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == (2 if sweep else 1), proc.stderr[-2000:]
    message = proc.stderr.strip().removeprefix("ftlab: ")
    assert re.search(r"has a name of \d+ bytes .*the file system allows 255.*Fix: keep long "
                     r"values out of folder names", message, re.S), message
    assert_one_paragraph(message)
    assert not list(tmp_path.rglob("metrics.json"))


def test_a_run_folder_too_deep_for_the_files_inside_it_is_refused_up_front(tmp_path):
    """Values holding paths nest ${hydra.job.override_dirname} folders: a folder just under
    the file system's path limit (4096 bytes) was created, and the run failed later, writing
    a checkpoint or log inside it."""
    from ftlab.writable import check_writable

    deep = tmp_path.joinpath(*["d" * 200] * ((3950 - len(str(tmp_path))) // 201))
    with pytest.raises(FtlabError) as err:
        check_writable(deep)
    assert re.search(r"bytes long; with the files a run writes inside it .* passes the file "
                     r"system's 4096.*Fix: keep long values out of folder names", str(err.value),
                     re.S)
    assert_one_paragraph(str(err.value))
    assert not (tmp_path / ("d" * 200)).exists()  # nothing created


def test_sweep_jobs_that_would_share_a_folder_are_refused(tmp_path, sentiment_dir):
    """``hydra.sweep.subdir=${hydra.job.override_dirname}`` leaves the seed out (conf/hydra):
    seeds 1 and 2 would train in one folder, the second over the first's results (the report
    then counted one job). Refused before any job runs."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-m", "ftlab", "-m", f"hydra.sweep.dir={tmp_path}/s",
                           "hydra.sweep.subdir=${hydra.job.override_dirname}", "seed=1,2",
                           *tiny_overrides(sentiment_dir)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.strip().removeprefix("ftlab: ")
    assert re.search(r"Sweep job 1 \(seed=2\): it would write into the folder of sweep job 0 "
                     r".*Fix: give every job its own folder", message, re.S), message
    assert_one_paragraph(message)
    assert not list(tmp_path.rglob("metrics.json"))


# --- damaged stage-cache entries (more shapes than tests/test_safety.py's) ------------------

def _store(tmp_path: Path):
    import torch

    from ftlab.cache import StageCache

    cache = StageCache(tmp_path / "cache")
    cache.store("s-1", {"w": torch.ones(2)}, {"name": "s", "metrics": {}, "info": {}})
    return cache, cache.entry("s-1")


def _replace_with_file(entry: Path) -> None:
    import shutil

    shutil.rmtree(entry)
    entry.write_text("not a folder")


CACHE_DAMAGE = {
    "entry-is-a-file": (_replace_with_file, r"it is not a folder"),
    "empty-model": (lambda e: (e / "model.safetensors").write_bytes(b""),
                    r"model.safetensors does not match its checksum"),
    "json-is-a-list": (lambda e: (e / "stage.json").write_text("[]"),
                       r"stage.json has no checksums"),
    "checksums-not-a-dict": (lambda e: (e / "stage.json").write_text('{"checksums": "x"}'),
                             r"stage.json has no checksums"),
    "json-not-utf8": (lambda e: (e / "stage.json").write_bytes(b"\xff\xfe{"),
                      r"stage.json is unreadable"),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_damaged_cache_entry_variants(damage, tmp_path, caplog):
    cache, entry = _store(tmp_path)
    break_it, expected = CACHE_DAMAGE[damage]
    break_it(entry)
    assert cache.lookup("s-1", repair=True) is None
    assert not entry.exists() and list(entry.parent.glob("s-1-*.corrupt-*"))
    assert re.search(rf"is damaged: {expected}.*Moved it aside", caplog.text), caplog.text


# --- names that would become paths -------------------------------------------------------------

NAMES = {"backslash": "a\\\\b", "unicode": "'étape'", "space": "'my stage'",
         "leading-dash": "-x", "colon": "c:x"}


@pytest.mark.parametrize("case", NAMES)
@pytest.mark.usefixtures("no_training")
def test_unsafe_stage_name_variants(case, make_cfg, sentiment_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        run(make_cfg(tiny_overrides(sentiment_dir) + [f"stage.name={NAMES[case]}"]))
    assert exit_.value.code == 2  # a wrong config (README: exit statuses)
    error = _metrics(tmp_path)["error"]
    assert re.search(r"Stage name .* cannot be used: names become folder names", error), error
    assert_one_paragraph(error)


# --- config that would run code -----------------------------------------------------------------

TARGETS = {
    "subprocess": {"_target_": "subprocess.Popen", "args": "true"},
    "import-module": {"_target_": "importlib.import_module", "name": "os"},
    "torch-load": {"_target_": "torch.load", "f": "x.pt"},
    "torch-hub": {"_target_": "torch.hub.load", "repo_or_dir": "x/y", "model": "m"},
    "builtins-exec": {"_target_": "builtins.exec", "_args_": ["1"]},
    "ftlab-function": {"_target_": "ftlab.store.atomic_write", "path": "x", "write": None},
    "class-method": {"_target_": "ftlab.peft.full.Full.__init__"},
    "partial": {"_target_": "os.system", "_partial_": True, "command": "true"},
    "nested-in-list": {"_target_": "ftlab.peft.full.Full", "x": [{"_target_": "os.system"}]},
    "whitespace": {"_target_": " os.system"},
}


@pytest.mark.parametrize("case", TARGETS)
def test_malicious_target_variants(case):
    with pytest.raises(FtlabError) as err:
        instantiate_checked(TARGETS[case], "peft")
    assert re.search(r"peft\S*\._target_ '[^']+' (is not allowed|is not a dotted name)",
                     str(err.value)), str(err.value)
    assert_one_paragraph(str(err.value))


TAGS = {"apply": "!!python/object/apply:os.system ['true']",
        "name": "!!python/name:os.system", "module": "!!python/module:os",
        "new": "!!python/object/new:os.system ['true']"}


@pytest.mark.parametrize("case", TAGS)
def test_yaml_python_tag_variants(case, tmp_path, capsys):
    folder = tmp_path / "shared_configs"
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "tagged.yaml").write_text(
        f"# @package _global_\nseed: {TAGS[case]}\n")
    with pytest.raises(SystemExit) as exit_:
        preflight([f"hydra.searchpath=[file://{folder}]", "experiment=tagged"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().removeprefix("ftlab: ")
    assert re.search(r"tagged.yaml, line 2 uses a YAML tag that would construct a Python "
                     r"object.*Fix: remove the !!python tag", err, re.S), err
    assert_one_paragraph(err)


# --- files that are not what their extension says ------------------------------------------------

def _file(tmp: Path, name: str, content: bytes) -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


FILES = {
    "binary-as-jsonl": (lambda t: _file(t, "train.jsonl", bytes(range(256)) * 8),
                        r"Data file .*train.jsonl is not valid UTF-8 \(invalid start byte on "
                        r"line 2\)\."),  # was "Could not read json files"
    "text-as-parquet": (lambda t: _file(t, "train.parquet", b"text,label\nfine,pos\n" * 40),
                        r"parquet files .*train.parquet.*not a parquet file"),
    "text-as-gzip": (lambda t: _file(t, "train.jsonl.gz", b'{"text": "a", "label": "pos"}\n'),
                     r"train.jsonl.gz.*Not a gzipped file"),
    "utf16-csv": (lambda t: _file(t, "train.csv", "text,label\n".encode("utf-16")
                                  + "good film,pos\n".encode("utf-16-le") * 40),
                  r"not valid UTF-8"),
}


@pytest.mark.parametrize("case", FILES)
@pytest.mark.usefixtures("no_training")
def test_unreadable_file_variants(case, make_cfg, sentiment_dir, tmp_path):
    path = FILES[case][0](tmp_path)
    base = [o for o in tiny_overrides(sentiment_dir) if not o.startswith(("data.files",
                                                                           "data.path"))]
    with pytest.raises(SystemExit) as exit_:  # the one split; its format from the extension
        run(make_cfg([*base, "~data.files", f"+data.files={{train: {path}}}",
                      "data.splits={train: train}"]))
    assert exit_.value.code == 1
    record = _metrics(tmp_path)
    assert re.search(FILES[case][1], record["error"]), record["error"]
    assert_one_paragraph(record["error"])
    assert not (tmp_path / "run" / "error.log").exists()


# --- a run at the majority baseline: the exit status says so, as in a sweep -------------------

def test_degenerate_single_run_says_failed(make_cfg, sentiment_dir, tmp_path, monkeypatch,
                                           capsys):
    """A validation split of one class: the majority baseline is 1.0, so the model can only
    end at it. The final line says FAILED; the ``ftlab`` command is told to exit 3."""
    rows = [json.loads(line) for line in (sentiment_dir / "validation.jsonl").read_text()
            .splitlines()]
    val = write_jsonl(tmp_path / "val.jsonl", [r for r in rows if r["label"] == "pos"])
    status = tmp_path / "status.json"
    monkeypatch.setenv("FTLAB_SWEEP_STATUS", str(status))
    record = run(make_cfg(tiny_overrides(sentiment_dir) + FAST + [
        f"data.files.validation={val}"]))
    assert record["status"] == "ok" and record["failed"] is True
    err = capsys.readouterr().err
    assert re.search(r"FAILED: val/acc \d\.\d{4} <= baseline 1.0000 \(no better than a trivial "
                     r"predictor.*exit status 3", err.strip().splitlines()[-1])
    assert json.loads(status.read_text()) == {"jobs": 1, "errored": 0, "degenerate": 1}


@pytest.mark.parametrize(("outcome", "code", "line"), [
    ({"jobs": 1, "errored": 0, "degenerate": 1}, 3, None),
    ({"jobs": 4, "errored": 0, "degenerate": 1, "sweep_dir": "s"}, 3,
     r"FAILED: 1 of 4 job\(s\) ended at or below a trivial baseline; see s/summary.md"),
    ({"jobs": 4, "errored": 1, "degenerate": 1, "sweep_dir": "s"}, 1,
     r"1 of 4 job\(s\) ended in an error"),
], ids=["single", "sweep", "errors-win"])
def test_command_exit_status_for_degenerate_jobs(outcome, code, line, monkeypatch, capsys):
    import ftlab.cli

    monkeypatch.setattr(ftlab.cli, "preflight", lambda argv: None)
    monkeypatch.setattr(ftlab.cli, "_app", lambda: Path(
        os.environ[ftlab.cli.SWEEP_STATUS]).write_text(json.dumps(outcome)))
    with pytest.raises(SystemExit) as exit_:
        ftlab.cli.main()
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert re.search(line, err) if line else err == ""


def test_ftlab_report_mid_sweep_counts_running_jobs_apart_from_errors(tmp_path, capsys):
    """ftlab-report during a sweep: a live job is 'still running', not an error (exit 0); the
    sweep's own report, when the sweep has ended, reads a leftover 'running' as killed."""
    from ftlab.report import write_report
    from ftlab.report_cli import main
    from ftlab.status import process_identity

    for job, record in (("0", {"status": "ok", "seed": 1, "overrides": ["seed=1"],
                               "final": {"val/acc": 0.8}}),
                        ("1", _running(os.getpid(), pid_start=process_identity()["pid_start"])
                         | {"seed": 2, "overrides": ["seed=2"]})):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 0
    out = capsys.readouterr()
    assert "still running: 1" in out.out and "1 job(s) still running" in out.err
    [ended] = write_report(tmp_path).values()
    assert (ended["running"], ended["errored"], ended["interrupted"]) == (0, 1, 1)
