"""W&B logging: offline without key/network, and the sweep/stage/method labels."""

from __future__ import annotations

from pathlib import Path

from ftlab import loggers
from tests.conftest import wandb_run_id


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


def test_a_stage_trains_without_wandb_when_it_cannot_start_and_says_so(make_cfg, sentiment_dir,
                                                                       monkeypatch, caplog):
    """W&B is extra to the CSV logs: a failing ``wandb.init`` (no network for mode=online, a
    bad key...) costs the W&B run, not the stage."""
    import json

    import wandb

    from ftlab.run import run
    from tests.conftest import tiny_overrides

    def refuse(*args, **kwargs):
        raise wandb.errors.CommError("Run initialization has timed out after 90.0 sec.")

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = make_cfg([o for o in tiny_overrides(sentiment_dir) if o != "logger=none"] + [
        "logger=wandb", "logger.wandb.mode=online", "trainer.max_steps=2"])
    run(cfg)
    out = Path(cfg.paths.output_dir)
    assert json.loads((out / "metrics.json").read_text())["status"] in ("ok", "failed")
    assert list(out.glob("classify/csv/*/metrics.csv"))  # the CSV logger still ran
    assert "W&B could not start (CommError: Run initialization has timed out" in caplog.text


def test_a_ddp_rank_other_than_zero_gets_a_logger_without_a_wandb_run(tmp_path, monkeypatch,
                                                                     caplog):
    """Under DDP only rank zero starts a W&B run; the others must not fail on the config."""
    from lightning.pytorch.loggers.logger import DummyExperiment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = loggers.wandb_logger(save_dir=str(tmp_path), name="job/classify",
                                  job_type="classify", config={"seed": 3}, mode="offline")
    assert logger is not None and isinstance(logger.experiment, DummyExperiment)
    assert "could not start" not in caplog.text and not list(tmp_path.glob("wandb/offline-*"))


def test_a_resumed_stage_continues_its_wandb_run(make_cfg, sentiment_dir, monkeypatch, tmp_path):
    """Killed mid-stage, then re-run: the stage resumes its checkpoint and logs to the same W&B
    run (one run per stage in W&B, not a second one starting at the checkpoint's step)."""
    import pytest
    from omegaconf import open_dict

    import ftlab.callbacks
    from ftlab.run import run
    from tests.conftest import tiny_overrides

    cfg = make_cfg([o for o in tiny_overrides(sentiment_dir) if o != "logger=none"] + [
        "logger=wandb", "logger.wandb.mode=offline", "data.max_train_samples=64",
        "trainer.max_steps=8", "trainer.max_epochs=4", "checkpoint.every_n_steps=2",
        f"cache.dir={tmp_path / 'c'}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")

    def crash(self, trainer, *args):
        if trainer.global_step == 5:
            raise RuntimeError("killed at step 5")

    with monkeypatch.context() as m:
        m.setattr(ftlab.callbacks.KeepBest, "on_train_batch_end", crash, raising=False)
        with pytest.raises(SystemExit):
            run(cfg)
    resumed = run(cfg)
    assert resumed["stages"]["classify"]["resumed_from_step"] == 4
    attempts = sorted((tmp_path / "run" / "classify" / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2, attempts
    assert len({wandb_run_id(a) for a in attempts}) == 1, attempts  # one run id
