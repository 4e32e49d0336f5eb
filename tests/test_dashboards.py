"""W&B dashboards, offline: a summary run per sweep configuration with the cross-seed tables,
each pipeline stage its own run, and stage artifacts that name their upstream."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_overrides, wandb_run_id
from tests.test_cli import ftlab


def test_sweep_logs_summary_tables_and_stage_lineage_offline(tmp_path, sentiment_dir):
    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("logger=")]
    proc = ftlab("-m", *overrides, "pipeline=tiny", "logger=wandb", "logger.wandb.mode=offline",
                 "trainer.max_steps=4", "seed=1,2", cwd=tmp_path)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: a job at the majority baseline
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    summary = json.loads((sweep / "summary.json").read_text())["default"]
    records = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(2)]

    # the summary run: in the jobs' group, job_type summary, both tables
    (run,) = sweep.glob("wandb/offline-run-*")
    log = next(run.glob("*.wandb")).read_bytes()
    assert f"{sweep.name}/{records[0]['config_key']}".encode() in log and b"summary" in log
    cross = json.loads(next(run.glob("files/media/table/cross_seed_*.table.json")).read_text())
    rows = {row[0]: dict(zip(cross["columns"], row, strict=True)) for row in cross["data"]}
    assert rows["val/acc"]["mean"] == pytest.approx(summary["metrics"]["val/acc"]["mean"])
    assert rows["val/acc"]["n"] == 2
    assert [rows["val/acc"]["ci95_low"], rows["val/acc"]["ci95_high"]] == \
        pytest.approx(summary["metrics"]["val/acc"]["ci95"])
    per_seed = json.loads(next(run.glob("files/media/table/per_seed_*.table.json")).read_text())
    assert sorted(str(r[0]) for r in per_seed["data"]) == ["1", "2"]

    # lineage: every trained stage is its own run and logs its artifact; the task stage's
    # artifact names the TAPT stage it started from (offline W&B refuses use_artifact)
    first = {line["stage"]: line for line in records[0]["lineage"]}
    assert first["tapt"]["artifact"] == first["tapt"]["key"]
    assert first["task"]["artifact"] == first["task"]["key"]
    tapt_log = next((sweep / "0" / "tapt").glob("wandb/offline-run-*/*.wandb")).read_bytes()
    task_log = next((sweep / "0" / "task").glob("wandb/offline-run-*/*.wandb")).read_bytes()
    assert first["tapt"]["key"].encode() in tapt_log
    assert f'"upstream":"{first["tapt"]["key"]}"'.encode() in task_log
    second = {line["stage"]: line for line in records[1]["lineage"]}
    assert second["tapt"]["cache_hit"] and second["tapt"]["artifact"] is None  # reused: no run
    assert second["task"]["artifact"] == second["task"]["key"] != first["task"]["key"]


def test_a_relaunched_sweep_updates_its_summary_run_not_a_second_one(tmp_path):
    """The report runs again when a sweep is re-launched (``ftlab -m resume=<sweep>``): each
    configuration keeps one summary run (the same W&B id), not one more per launch."""
    from omegaconf import OmegaConf

    from ftlab.dashboards import log_sweep_summary
    from ftlab.report import write_report
    from tests.test_report import rec

    config = OmegaConf.create({"logger": {"wandb": {"_target_": "ftlab.loggers.wandb_logger",
                                                    "mode": "offline"}}})
    for seed in (1, 2, 3):  # the first launch ran seeds 1 and 2, the re-launch adds 3
        job = tmp_path / str(seed - 1)
        job.mkdir()
        (job / "metrics.json").write_text(json.dumps(rec(seed, 0.7 + seed / 20)))
        if seed > 1:
            assert log_sweep_summary(config, tmp_path, write_report(tmp_path)) == 1
    runs = sorted(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and len({wandb_run_id(r) for r in runs}) == 1, runs
