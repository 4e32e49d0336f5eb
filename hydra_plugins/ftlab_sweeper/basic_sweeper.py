"""``hydra/sweeper=ftlab_basic`` (ftlab's default): Hydra's basic sweeper, with each job placed
in the sweep folder by ``ftlab.resume.place_jobs``, so a re-launched sweep never writes over a
finished job of another configuration or seed (Hydra numbers a batch's jobs from 0 on every
launch). Only when the job folders are Hydra's default ``${hydra.job.num}``. Each batch's size
reaches its jobs (``ftlab.threads.launching``): jobs run side by side share the cores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

#: Hydra's default job folder, which numbering places (a custom ``subdir`` is left alone)
NUMBERED = "${hydra.job.num}"


class PlacingLauncher:
    """The configured launcher, with ``hydra.sweep.subdir=<n>`` added to a job whose folder
    number is not the one Hydra would give it (``place``), the batch's size in its jobs'
    environment, and jobs stopped by a signal reported as a stop (``ftlab.status``)."""

    def __init__(self, launcher: Any, sweep_dir: Path, place: bool = True) -> None:
        self.launcher, self.sweep_dir, self.place = launcher, sweep_dir, place

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        from ftlab.resume import place_jobs
        from ftlab.status import stops_reported
        from ftlab.threads import launching

        batch = [list(job) for job in job_overrides]
        if self.place:
            places = place_jobs(self.sweep_dir, batch, initial_job_idx)
            batch = [job if n == initial_job_idx + i else [*job, f"hydra.sweep.subdir={n}"]
                     for i, (job, n) in enumerate(zip(batch, places, strict=True))]
        with launching(len(batch)), stops_reported(self.sweep_dir):
            return self.launcher.launch(batch, initial_job_idx=initial_job_idx)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.launcher, name)


class FtlabBasicSweeper(BasicSweeper):
    """Hydra's ``BasicSweeper`` (``max_batch_size``, ``params``) with placed job folders."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
        self.launcher = PlacingLauncher(self.launcher, Path(config.hydra.sweep.dir),
                                        place=subdir == NUMBERED)
