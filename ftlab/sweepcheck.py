"""Check every job of a sweep before the first one trains.

Hydra's basic sweeper runs a sweep's jobs one by one, so a bad value in the last job (``-m
stage.optim.lr=1e-4,-1``) would fail only after the good ones trained. ``SweepCheck`` (a Hydra
callback, ``conf/hydra/default.yaml``) expands the sweep with the basic sweeper's own logic,
composes each job's config the way its launcher will, resolves its pipeline and runs the
config-level checks (``validate.check_configs``: schemas, rules, constructor signatures, the
PEFT method's and regulariser's own constructors): no data and no model are loaded. The first
job then checks data and models as every job does.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from ftlab.errors import FtlabError

log = logging.getLogger(__name__)

#: the sweepers whose expansion is known (Hydra's basic one, and ftlab's default built on it);
#: other sweepers (Optuna) choose values as they go
BASIC = ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
         "hydra_plugins.ftlab_sweeper.basic_sweeper.FtlabBasicSweeper")


class SweepCheck(Callback):
    """Hydra callback: refuse a sweep with a bad job before any job runs (exit status 2)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep(config)
        except FtlabError as err:
            print(f"\nftlab: {err}\n", file=sys.stderr)
            sys.exit(2)


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as the basic sweeper will run them (None: another sweeper, or a
    sweep it cannot expand up front)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if config.hydra.sweeper.get("_target_") not in BASIC:
        return None
    params = config.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    try:
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        batches = BasicSweeper.split_arguments(parser.parse_overrides(args), None)
    except Exception:  # noqa: BLE001 - Hydra reports what it cannot expand
        return None
    return [list(job) for batch in batches for job in batch]


def check_sweep(config: DictConfig) -> None:
    """Raise ``FtlabError`` naming the first job (number and overrides) whose config fails."""
    jobs = sweep_jobs(config)
    if not jobs or len(jobs) < 2:
        return  # one job checks itself before it trains
    seen: dict[tuple[str, ...], int] = {}
    for num, job in enumerate(jobs):  # seed=1,1,2: the copy reuses the first job's record
        if (first := seen.setdefault(tuple(sorted(job)), num)) != num:
            same = " ".join(o for o in job if o in _varying(jobs)) or " ".join(job)
            raise FtlabError(f"Sweep job {num} ({same}) is the same job as sweep job {first}: "
                             "a value is given twice in the sweep, so its run would count "
                             "once where you expect two (the copy reuses the first's result).",
                             "give each value once (seed=1,2,3, not seed=1,1,2); more runs of "
                             "one configuration take more seeds.")
    check_jobs(config, jobs)


def check_jobs(config: DictConfig, jobs: list[list[str]], name: str = "Sweep job") -> None:
    """``check_sweep`` for given jobs' overrides (``ftlab_optuna`` checks its search space's
    corners this way: a key that is not in the config, a bound no job can run with)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ftlab.writable import check_names

    loader = GlobalHydra.instance().config_loader()
    saved = HydraConfig.instance().cfg
    folders: dict[str, int] = {}  # each job's folder: the first job that has it
    try:
        varying = _varying(jobs)
        for num, job in enumerate(jobs):
            where = f"{name} {num} ({' '.join(o for o in job if o in varying)})"
            try:
                cfg = loader.load_sweep_config(config, job)
            except (HydraException, OmegaConfBaseException) as err:
                raise _not_composing(err, where, job, config) from None
            with open_dict(cfg):  # what the launcher sets before the job runs
                cfg.hydra.job.num, cfg.hydra.job.id = num, f"check_{num}"
                cfg.hydra.runtime.output_dir = f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}"
            HydraConfig.instance().set_config(cfg)  # ${hydra:...} as in the job
            try:
                folder = str(cfg.hydra.runtime.output_dir)
                check_names(folder, "The job's folder")
                if (first := folders.setdefault(folder, num)) != num:
                    raise FtlabError(
                        f"it would write into the folder of sweep job {first} ({folder}), "
                        "over that job's results (hydra.sweep.subdir gives both the same "
                        "name).", "give every job its own folder: keep the default "
                        "hydra.sweep.subdir (${hydra.job.num}), or add what differs, e.g. "
                        "hydra.sweep.subdir='${hydra.job.override_dirname}/${seed}' "
                        "(override_dirname leaves the seed out).")
                check_job(cfg, job)
            except FtlabError as err:
                raise FtlabError(f"{where}: {err.problem} Nothing ran: every job of a sweep is "
                                 "checked before the first one starts.", err.fix) from None
            except Exception as err:  # noqa: BLE001 - undecided here: the job reports it
                log.debug("Sweep check of job %d skipped (%s: %s).", num,
                          type(err).__name__, err)
    finally:
        HydraConfig.instance().cfg = saved


def _not_composing(err: Exception, where: str, job: list[str], config: DictConfig) -> FtlabError:
    """A job that does not compose: the bad key with the closest valid one and the fix where
    ``ftlab.preflight`` can tell (a misspelt key), else Hydra's first line."""
    from ftlab.preflight import _explain

    try:
        explained = _explain(err, job, config.hydra.job.config_name or "config")
        return FtlabError(f"{where}: {explained.problem}", explained.fix)
    except Exception:  # noqa: BLE001 - no better words than Hydra's
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return FtlabError(f"{where} does not compose: {first}",
                          "fix that value in the sweep (ftlab --cfg job with the job's "
                          "overrides prints its config).")


def _varying(jobs: list[list[str]]) -> set[str]:
    """The overrides that differ between jobs (what names a job: ``stage.optim.lr=-1``)."""
    seen: dict[str, set[str]] = {}
    for job in jobs:
        for o in job:
            seen.setdefault(o.split("=", 1)[0], set()).add(o)
    return {o for values in seen.values() if len(values) > 1 for o in values}


def check_job(cfg: DictConfig, overrides: list[str]) -> None:
    """The config-level checks of one job (what ``run`` checks before loading data)."""
    from ftlab.cache import CacheSpec
    from ftlab.checkpoint import CheckpointSpec
    from ftlab.cli import CONFIG_DIR
    from ftlab.config import bind_schema, plain
    from ftlab.overrides import explicit_keys
    from ftlab.pipeline import build_pipeline
    from ftlab.run import artefact_policy
    from ftlab.targets import allowing, settings_from_you
    from ftlab.validate import check_configs

    choices = cfg.hydra.runtime.get("choices") or {}
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    settings_from_you(raw, overrides, CONFIG_DIR)
    with allowing(cfg.get("allow_targets"), warn=False):
        explicit = explicit_keys(overrides, choices.get("experiment"), CONFIG_DIR)
        stages = build_pipeline(cfg, explicit)
        check_configs(stages, plain(cfg.get("callbacks")) or {}, plain(cfg.get("logger")))
        check_launcher(cfg, stages)
        bind_schema(CacheSpec, cfg.get("cache"), "cache", "cache")
        bind_schema(CheckpointSpec, cfg.get("checkpoint"), "checkpoint", "checkpoint")
        artefact_policy(cfg.get("save_artefact", "best"))


def check_launcher(cfg: DictConfig, stages: list[Any]) -> None:
    """A multi-device stage cannot run in a joblib worker: Lightning starts the other ranks by
    re-running the worker's own command (loky's), which fails and leaves rank zero waiting."""
    from ftlab.device_checks import several_devices

    launcher = str((cfg.hydra.get("launcher") or {}).get("_target_", ""))
    multi = next((s for s in stages if several_devices(s.trainer)), None)
    if "joblib" in launcher.lower() and multi is not None:
        raise FtlabError(f"{multi.where} trains on several devices (trainer strategy="
                         f"{multi.trainer.get('strategy')}, devices="
                         f"{multi.trainer.get('devices')}) under hydra/launcher=joblib, whose "
                         "worker processes cannot start the other ranks.",
                         "run the sweep's jobs one by one (drop hydra/launcher=joblib: each "
                         "job then uses every device), or use one device per job "
                         "(trainer=cpu, or trainer=gpu trainer.devices=1).")
