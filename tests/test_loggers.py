"""W&B logging: offline without key/network, and the sweep/stage/method labels."""

from __future__ import annotations

from ftlab import loggers


def test_auto_mode_goes_offline_when_server_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(loggers, "_reachable", lambda host, **kw: False)
    logger = loggers.wandb_logger(save_dir=str(tmp_path), name="job/classify", group="sweep/lr=1",
                                  job_type="classify", tags=["full", "none"],
                                  config={"seed": 3, "stage": {"name": "classify"}})
    try:
        run = logger.experiment
        assert run.settings.mode in ("offline", "dryrun")  # wandb names offline "dryrun"
        assert (run.group, run.job_type, sorted(run.tags)) == ("sweep/lr=1", "classify",
                                                               ["full", "none"])
        assert run.config["seed"] == 3 and run.config["stage"]["name"] == "classify"
        assert list(tmp_path.glob("wandb/offline-run-*"))
    finally:
        loggers.finish_wandb()
    import wandb

    assert wandb.run is None  # the next job in the same process gets its own run
