"""The command line as a user meets it: clear errors, sweeps that survive a failing job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_overrides


def ftlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"FTLAB_ROOT": str(cwd), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": ""}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


# Bad input through a real `python -m ftlab`: tests/test_bad_inputs.py::test_cli_end_to_end
# (peft=nonexistent and trainer.max_epoch=3: exit 2; stage.batch_size=abc: exit 1, the route
# every run-time FtlabError takes, ftlab.run's one except). A missing data file or column is
# checked in-process there (test_bad_run_input[data-file-missing, text-column-missing]).


def test_seed_sweep_writes_summary_and_survives_a_failing_job(tmp_path, sentiment_dir):
    # the job with 8 training rows cannot fill a batch of 16: it fails, the others run
    proc = ftlab("-m", *tiny_overrides(sentiment_dir), "stage.trainer.max_epochs=1",
                 "seed=1,2", "data.max_train_samples=null,8", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # a job errored, and the exit code says so
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1
    summary = json.loads((sweeps[0] / "summary.json").read_text())
    ok = summary["data.max_train_samples=null"]
    bad = summary["data.max_train_samples=8"]
    assert ok["runs"] == 2 and ok["errored"] == 0 and ok["metrics"]["test/acc"]["n"] == 2
    assert set(ok["seeds"]) == {"1", "2"}
    assert bad["errored"] == 2 and "fewer than one batch" in bad["errors"]["1"]
    assert (sweeps[0] / "summary.png").is_file() and (sweeps[0] / "summary.md").is_file()


def test_python_m_and_console_script_are_the_same_app():
    proc = subprocess.run([sys.executable, "-m", "ftlab", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0
    script = Path(sys.executable).parent / "ftlab"
    if script.is_file():  # an installed console script (pip install -e .)
        same = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert same.stdout == proc.stdout
    groups = dict(line.split(": ", 1) for line in proc.stdout.splitlines()
                  if line.startswith(("peft: ", "stage: ")))
    assert "full" in groups["peft"].split(", ") and "classify" in groups["stage"].split(", ")


def test_a_failing_job_fails_the_sweep_under_a_parallel_launcher(tmp_path, sentiment_dir):
    # joblib runs jobs in worker processes: the exit status must come from the sweep folder
    proc = ftlab("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 *tiny_overrides(sentiment_dir), "trainer.max_steps=2",
                 "data.max_train_samples=null,8", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 of 2 job(s) ended in an error" in proc.stderr
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["data.max_train_samples=8"]["errored"] == 1
    assert summary["data.max_train_samples=null"]["errored"] == 0


def test_help_answers_without_importing_the_training_libraries():
    code = ("import sys\nsys.argv = ['ftlab', '--help']\nfrom ftlab.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', [m for m in ('torch', 'transformers', 'datasets', 'lightning')"
            " if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert "LOADED []" in proc.stdout, proc.stdout + proc.stderr
    assert "Which value wins" in proc.stdout and "ftlab pipeline=dapt_tapt_task" in proc.stdout
    assert "max_epochs: 2" not in proc.stdout  # no config dump with competing values


def test_data_files_dict_on_the_command_line_replaces_the_files(make_cfg, tmp_path):
    """The README's `'data.files={all: reviews.jsonl}'`: Hydra merges a dict value into the
    data config's {train, validation, test} and refuses the new key; the CLI makes it a
    replacement."""
    from hydra.errors import ConfigCompositionException

    from ftlab.cli import replace_files

    given = ["data=local", f"data.files={{all: {tmp_path}/reviews.jsonl}}"]
    with pytest.raises(ConfigCompositionException):  # what Hydra alone does with it
        make_cfg(given)
    cfg = make_cfg(replace_files(given))
    assert dict(cfg.data.files) == {"all": f"{tmp_path}/reviews.jsonl"}
    assert replace_files(["data.files.train=a.csv", "seed=1"]) == ["data.files.train=a.csv",
                                                                   "seed=1"]
