"""One job: resolve the pipeline once, check it, run its stages in order, record everything in
``metrics.json``. The run config (``DictConfig``) stops here: stages get ``ResolvedStage``s."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.errors import ConfigError, FtlabError, config_checks
from ftlab.record import (
    began,
    busy,
    kept_finished,
    objective,
    previous_run,
    record_error,
    report_degenerate,
    save_record,
)
from ftlab.seedstats import failure
from ftlab.threads import job_environment, set_threads

log = logging.getLogger("ftlab")


def _hydra_info() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {"multirun": False, "overrides": [], "sweep": None, "job": "run", "choices": {},
                "launcher": None}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    launcher = hc.get("launcher") if multirun else None  # how many jobs run beside this one
    return {"multirun": multirun, "overrides": list(hc.overrides.task),
            "sweep": Path(hc.sweep.dir).name if multirun else None,
            "job": hc.job.override_dirname or "default", "choices": dict(hc.runtime.choices),
            "launcher": OmegaConf.to_container(launcher, resolve=False) if launcher else None}


def config_key(overrides: list[str]) -> str:
    """The configuration a job belongs to: its overrides other than the seed."""
    rest = sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "seed")
    return ",".join(rest) or "default"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage; write ``metrics.json`` after each; never lose a finished stage.

    Returns the record; ``record["objective"]`` is ``val/<monitor>`` of the last stage (what
    an optimising sweeper reads), or the worst value (-inf / +inf by the monitor's mode) when
    the job did not finish ``ok`` (errored, diverged, stopped, discarded).
    """
    with job_environment():  # OMP_NUM_THREADS a multi-process job exports ends with it
        return _job(cfg)


def _job(cfg: DictConfig) -> dict[str, Any]:
    """:func:`run`'s body."""
    from ftlab.cli import CONFIG_DIR
    from ftlab.overrides import explicit_keys
    from ftlab.record import kept_record
    from ftlab.status import Stopped, catch_signals, process_identity
    from ftlab.store import environment_error, is_rank_zero, write_json
    from ftlab.targets import allowing, check_config, settings_from_you

    primary = is_rank_zero()  # under DDP every rank runs the job; rank zero writes the files
    run_dir = Path(cfg.paths.output_dir)
    hydra = _hydra_info()
    key = config_key(hydra["overrides"])
    threads = set_threads(hydra.get("launcher"), cfg.get("trainer"))  # DDP: per rank
    record: dict[str, Any] = {"status": "running", "seed": cfg.get("seed"), "config_key": key,
                              "overrides": hydra["overrides"], "stages": {},
                              "torch_threads": threads,
                              "process": process_identity()}  # a later look tells a killed job
    out = run_dir / "metrics.json"
    from ftlab.resume import read_record

    earlier = read_record(out)  # before this run marks the folder 'running': a finished job?
    if primary and (refused := busy(earlier, run_dir)):  # metrics.json stays the other run's
        print(f"\nftlab: {refused}\n", file=sys.stderr)
        if not hydra["multirun"]:
            sys.exit(1)
        record |= {"status": "error", "failed": True, "error": str(refused)}
        return record | {"objective": objective(record)}  # a sweep goes on with its next job
    if primary and (previous := previous_run(earlier, out)):  # a re-run in the same folder
        record["previous"] = previous
    if (finished := kept_finished(earlier)) is not None:  # kept until this run finishes: a
        record["finished_before"] = finished  # kill or a failure loses nothing
    choices = hydra.get("choices", {})
    context = {"group": f"{hydra['sweep']}/{key}" if hydra["sweep"] else None,
               "tags": [f"peft:{choices.get('peft', 'custom')}",
                        f"regularizer:{choices.get('regularizer', 'custom')}"],
               "config": OmegaConf.to_container(cfg, resolve=True), "name": hydra["job"]}
    restore_signals = catch_signals()  # SIGINT/SIGTERM -> Stopped, recorded as interrupted
    saved = record  # what metrics.json ends with
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if primary:
            write_json(out, record)  # status running, with pid and host
            if "finished_before" not in record:  # else once a stage starts: until then
                save_config(cfg, run_dir)  # config.yaml is the finished results' own
        # the allow-list of _target_s, before anything is imported or instantiated
        with config_checks():
            settings_from_you(context["config"], hydra["overrides"], CONFIG_DIR)
        with allowing(cfg.get("allow_targets")):
            with config_checks():
                check_config(context["config"])
                explicit = explicit_keys(hydra["overrides"], choices.get("experiment"),
                                         CONFIG_DIR)
            _run_stages(cfg, explicit, record, context, run_dir,
                        run_dir.parent if hydra["multirun"] else None, earlier)
        final = record["final"]
        if record.get("discarded"):  # early discard or a search's pruner stopped it: neither
            pruned = bool(record["discarded"].get("pruned"))  # ok nor failed
            record |= {"status": "pruned" if pruned else "discarded", "failed": False}
        else:
            reason = failure(final, (record.get("monitor") or {}).get("failed_by"))
            record |= {"status": "ok", "failed": reason is not None}
            if reason:
                record["failure"] = reason
        record["objective"] = objective(record)
        record.pop("finished_before", None)  # this run finished: its results replace them
    except (FtlabError, Exception, KeyboardInterrupt, Stopped) as caught:
        started = began(record)  # has a stage run?
        err = caught if isinstance(caught, FtlabError) else environment_error(caught) or caught
        record_error(record, err, run_dir, primary,
                     run_dir.parent if hydra["multirun"] else None)
        record["objective"] = objective(record)
        if not hydra["multirun"]:  # (a sweep's report counts the job's error)
            saved = kept_record(record, earlier, started)
        if isinstance(err, Stopped):  # a sweep stops too: the user (or the scheduler) asked
            sys.exit(err.exit_code)
        if isinstance(err, KeyboardInterrupt):
            raise
        if not hydra["multirun"]:  # the message is printed; SystemExit passes Hydra without
            sys.exit(2 if isinstance(err, ConfigError) else 1)  # a traceback
        return record  # a sweep goes on with its next job
    finally:
        if primary:
            save_record(out, saved)
        from ftlab.loggers import finish_wandb

        finish_wandb(failed=record["status"] != "ok")
        restore_signals()
    if primary:
        log.info("Final metrics: %s", {k: round(v, 4) for k, v in record["final"].items()})
        log.info("Results in %s", run_dir)
        if record["failed"] and not hydra["multirun"]:
            report_degenerate(record)
    return record


def _run_stages(cfg: DictConfig, explicit: Any, record: dict[str, Any],
                context: dict[str, Any], run_dir: Path, sweep_dir: Path | None = None,
                earlier: dict[str, Any] | None = None) -> None:
    """Resolve, validate and run the stages into ``record``; a finished job with the same
    stage keys in ``run_dir`` or ``sweep_dir`` is reused instead (``ftlab.resume``)."""
    from ftlab.build import StageBuilder
    from ftlab.cache import CacheSpec, StageCache, cached_stages, run_or_reuse
    from ftlab.checkpoint import CheckpointSpec
    from ftlab.config import bind_schema, plain
    from ftlab.dashboards import log_stage_artifact
    from ftlab.pipeline import build_pipeline
    from ftlab.pruning import trial_callbacks
    from ftlab.stage import RunContext, StageResult
    from ftlab.stage_keys import pipeline_keys
    from ftlab.store import is_rank_zero, write_json
    from ftlab.validate import check_configs, check_models_and_data

    callbacks = plain(cfg.get("callbacks")) or {}
    logger = plain(cfg.get("logger")) or None
    with config_checks():  # a wrong config exits 2 (README: exit statuses), as in a sweep
        stages = build_pipeline(cfg, explicit)
        check_configs(stages, callbacks, logger)
        cache_spec = bind_schema(CacheSpec, cfg.get("cache"), "cache", "cache")
        checkpoint = bind_schema(CheckpointSpec, cfg.get("checkpoint"), "checkpoint",
                                 "checkpoint")
        policy = artefact_policy(cfg.get("save_artefact", "best"))
    record["pipeline"] = [s.name for s in stages]
    record["monitor"] = _monitor(stages[-1])  # known before validation: failures score worst
    if _reuse_finished(record, stages, callbacks, run_dir, sweep_dir, earlier):
        return
    builder = StageBuilder()
    check_models_and_data(stages, builder)  # (its configs: above), before training
    last = builder.task(stages[-1])  # bound: monitor auto is decided by the training labels
    record["monitor"] = _judging(last)
    keys = pipeline_keys(stages, run_dir, callbacks)  # an EMA-averaged stage is another stage
    callbacks |= trial_callbacks(cfg.get("trial"), cfg.get("seed"), stages[-1].name)  # search
    cache = StageCache(cache_spec.dir)
    cached = cached_stages(stages, cache_spec.stages, run_dir)
    lineage = record["lineage"] = [{"stage": s.name, "init_from": s.init_from,
                                    "key": keys[s.name], "cache_hit": None} for s in stages]
    context["config"]["lineage"] = lineage  # W&B config: the chain of stages and keys

    def trained(result: StageResult) -> None:  # recorded before the stage writes its artefact
        record["stages"][result.name] = {"metrics": result.metrics, **result.info}
        if is_rank_zero():
            write_json(run_dir / "metrics.json", record)

    run = RunContext(run_dir, callbacks, logger, context, on_trained=trained,
                     checkpoint=checkpoint, save_artefact=policy, sweep_dir=sweep_dir)
    results: dict[str, StageResult] = {}
    for stage, line in zip(stages, lineage, strict=True):
        record["current_stage"] = stage.name  # a killed job is known to have died here
        if is_rank_zero():
            write_json(run_dir / "metrics.json", record)
            if "finished_before" in record and stage is stages[0]:
                save_config(cfg, run_dir)  # the finished run's artefacts give way from here
        result = run_or_reuse(stage, builder, run, results, keys[stage.name],
                              cache if stage.name in cached else None)
        results[stage.name] = result
        line["cache_hit"] = result.info["cache_hit"]
        up = results.get(stage.init_from)  # logger=wandb: the stage's artifact and its input
        line["artifact"] = log_stage_artifact(stage, result.info, up.info if up else None)
        record["stages"][stage.name] = {"metrics": result.metrics, **result.info}
        if is_rank_zero():
            write_json(run_dir / "metrics.json", record)
        if result.info.get("discarded"):  # early discard: the later stages do not run
            record["discarded"] = result.info["discarded"]
            break
    record["final"] = results[stage.name].metrics
    record.pop("current_stage", None)


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The job's resolved config as ``config.yaml`` (atomically: a kill leaves the old one)."""
    from ftlab.store import atomic_write

    atomic_write(run_dir / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))


def artefact_policy(value: Any) -> str:
    """The run's ``save_artefact`` (which jobs keep full-size artefacts), checked."""
    from ftlab.artefact import POLICIES
    from ftlab.errors import choices_text

    if value not in POLICIES:
        raise FtlabError(f"save_artefact is {value!r}.", f"use one of: {choices_text(POLICIES)} "
                         "(a stage's own save_artefact: false writes no artefact at all).")
    return value


def _reuse_finished(record: dict[str, Any], stages: list[Any], callbacks: dict[str, Any],
                    run_dir: Path, sweep_dir: Path | None,
                    earlier: dict[str, Any] | None = None) -> bool:
    """Fill ``record`` from a finished job with the same identity (stage keys + callbacks), if
    there is one."""
    from ftlab.resume import finished_record, job_identity
    from ftlab.stage_keys import pipeline_keys

    record["job_identity"] = job_identity(list(pipeline_keys(stages, run_dir).values()),
                                          callbacks)
    found = finished_record(run_dir, record["job_identity"], sweep_dir, earlier)
    if found is None:
        return False
    previous, folder = found
    keep = ("stages", "lineage", "final", "discarded", "pipeline", "monitor")
    record |= {k: previous[k] for k in keep if k in previous}
    record["reused"] = {"from": str(folder), "skipped": True}
    log.info("This job already finished (same stage keys) in %s: reusing its results, not "
             "training again.", folder)
    return True


def _monitor(stage: Any) -> dict[str, Any] | None:
    """The metric that scores the stage's task, whether higher (max) or lower wins, and the
    baselines that decide a failure (``failed_by``; None: all)."""
    from ftlab.tasks.nodes import instantiate_task

    try:
        task = instantiate_task(stage.task, f"{stage.where}.task")
    except Exception:  # validation reports it with the fix
        return None
    return _judging(task)


def _judging(task: Any) -> dict[str, Any]:
    """A task's monitor and mode, and the baselines its failures are judged by."""
    failed_by = getattr(task, "failed_by", None)
    return {"metric": f"val/{task.monitor}", "mode": task.mode,
            "failed_by": None if failed_by is None else list(failed_by)}
