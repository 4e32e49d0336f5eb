"""Hyper-parameter search on current Optuna: the loop behind ``hydra/sweeper=ftlab_optuna``.

Hydra's own ``hydra-optuna-sweeper`` 1.3 pins ``optuna<3`` and cannot prune, so ftlab drives
Optuna (4.x) itself. Each trial is one ftlab job per seed, launched through the configured
Hydra launcher (basic, joblib, submitit), with ``trial=<number>`` added to its overrides; the
job reports its validation score to that trial as it trains and stops when the pruner says so
(``ftlab.pruning``). The study lives in a storage (a journal file by default) that several
sweeper processes can share.

Search space syntax (Hydra's sweep grammar, as in ``hydra.sweeper.params`` or on the command
line): ``interval(a, b)`` a float in [a, b]; ``tag(log, interval(a, b))`` log-uniform;
``int(interval(a, b))`` an integer in [a, b]; ``range(a, b, step)`` integers a, a+step, .. < b;
``choice(x, y, z)`` or ``x,y,z`` categorical; a plain value is fixed for every trial.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError
from ftlab.store import atomic_write, write_json
from ftlab.study import build_object

log = logging.getLogger(__name__)

#: the ``_target_`` of ``hydra/sweeper=ftlab_optuna`` (what jobs and the report check for)
SWEEPER = "hydra_plugins.ftlab_sweeper.optuna_sweeper.FtlabOptunaSweeper"

def ask_first(study: Any, space: dict[str, Any], sampler_node: Any) -> Any:
    """This worker's first trial, sampled with the sampler's ``seed`` plus the trial's number.

    The storage hands each trial number out once, so workers that join a study at the same
    moment sample from different seeds (with ``seed + the trials already there`` they all read
    the same count and asked the same start-up points); a lone worker on a new study (trial 0)
    keeps the seed as configured, and a re-launch into a study of k trials samples with seed + k.
    Later trials come from ``study.ask(space)`` with that sampler.
    """
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.to_container(sampler_node) if isinstance(sampler_node, DictConfig) \
        else sampler_node
    seed = node.get("seed") if isinstance(node, dict) else None
    if not isinstance(seed, int) or isinstance(seed, bool):
        return study.ask(space)
    trial = study.ask()  # the number first: params are sampled lazily, at suggest time
    if trial.number:
        study.sampler = build_object({**node, "seed": seed + trial.number}, "sampler")
        log.info("Study had %d trial(s): sampler seed %d + %d", trial.number, seed, trial.number)
    for name, dist in space.items():
        suggest(trial, name, dist)
    return trial


def suggest(trial: Any, name: str, dist: Any) -> Any:
    """``trial.suggest_*`` for an Optuna distribution (what ``study.ask(space)`` does)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    method = trial.suggest_float if isinstance(dist, FloatDistribution) else trial.suggest_int
    return method(name, dist.low, dist.high, step=dist.step, log=dist.log)


def distribution(override: Any) -> Any:
    """An Optuna distribution for one parsed Hydra sweep override, or None for a fixed value."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value, key = override.value(), override.get_key_element()
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values or not all(isinstance(v, int) for v in values):
            raise FtlabError(f"{key}: range() in a search needs integers; use "
                             f"interval({value.start}, {value.stop}) for floats.")
        return IntDistribution(values[0], values[-1], step=1 if log_scale else value.step,
                               log=log_scale)
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator()))
    raise FtlabError(f"{key}: {override.input_line} is not a search space ftlab understands; "
                     "use interval(a,b), tag(log,interval(a,b)), range(a,b,step) or choice(..).")


def parse_space(lines: list[str], config_loader: Any) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` lines -> (search space by key, fixed overrides for every trial). A later
    line for the same key wins (the command line over ``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space, fixed = {}, {}
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(lines):
        dist = distribution(override)
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if dist is None:
            fixed[key] = f"{key}={override.get_value_element_as_str()}"
        else:
            space[key] = dist
    seeded = [k for k in space if k == "seed" or k.endswith(".seed")]
    if seeded:  # the search would pick the luckiest seed and report it as a setting
        raise FtlabError(f"{seeded[0]} is in the search space, so the search would tune the "
                         "seed like a hyper-parameter: its best trial is the luckiest seed, "
                         "not the best setting.", "give the seeds to the sweeper instead: "
                         "hydra.sweeper.seeds=[1,2,3] runs every trial once per seed and "
                         "scores their mean (a plain seed=N fixes one seed).")
    if not space:
        raise FtlabError("The search space is empty. Fix: give hydra.sweeper.params (or "
                         "command-line sweeps) such as stage.optim.lr='tag(log,interval(1e-5,"
                         "1e-3))' and stage.batch_size='choice(16,32)'.")
    return space, list(fixed.values())


def corners(space: dict[str, Any], fixed: list[str]) -> list[list[str]]:
    """Jobs' overrides at the space's corners, checked before the study is made: every key at
    its low end (the first choice), then at its high end (the last), and each other choice."""
    from optuna.distributions import CategoricalDistribution

    def ends(dist: Any) -> list[Any]:
        if isinstance(dist, CategoricalDistribution):
            return list(dist.choices)
        return [dist.low, dist.high]

    values = {k: ends(d) for k, d in space.items()}
    points = [{k: v[0] for k, v in values.items()}, {k: v[-1] for k, v in values.items()}]
    points += [points[0] | {k: c} for k, v in values.items() for c in v[1:-1]]
    return [[*fixed, *(f"{k}={v}" for k, v in p.items())] for p in points]


def unfinished(study: Any, sweep_dir: Path) -> list[Any]:
    """Trials a stopped search in this folder left ``running`` (Ctrl+C, SIGTERM, a kill): one
    of their jobs here was interrupted and none still runs. ``resume=`` runs them again first
    (each job back in its folder: a finished one is reused, an interrupted one continues from
    its checkpoint) and tells the study their outcome; without that they stayed ``running``
    for good, and their interrupted job made every later report exit 1. A running trial with
    no job here (another worker's) is left alone."""
    from optuna.trial import Trial, TrialState

    from ftlab.report_jobs import collect

    jobs: dict[int, list[str]] = {}
    for rec in collect(sweep_dir, ended=False, unique=False) if sweep_dir.is_dir() else []:
        number = [o.split("=", 1)[1] for o in rec.get("overrides") or [] if o.startswith("trial=")]
        if number and number[-1].isdigit():
            jobs.setdefault(int(number[-1]), []).append(str(rec.get("status")))
    return [Trial(study, t._trial_id)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if "interrupted" in jobs.get(t.number, []) and "running" not in jobs[t.number]]


@dataclass
class Outcome:
    """What one trial's jobs ended in: ``complete`` (value = mean objective over seeds),
    ``pruned`` or ``fail``."""

    state: str
    value: float | None = None
    jobs: list[str] = field(default_factory=list)


def job_outcome(ret: Any) -> dict[str, Any]:
    """A launched job's record (its ``metrics.json``), or an error record when it has none."""
    try:
        out = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        return json.loads((out / "metrics.json").read_text()) | {"dir": str(out)}
    except Exception as err:  # noqa: BLE001 - a job that died before writing its record
        return {"status": "missing", "objective": None, "error": str(err)}


def trial_outcome(records: list[dict[str, Any]]) -> Outcome:
    """A trial is pruned if its pruned job was (early discard counts the same), failed if any
    job did not finish with a finite objective, else complete with the seeds' mean."""
    dirs = [r.get("dir", "?") for r in records]
    if any(r.get("status") in ("pruned", "discarded") for r in records):
        return Outcome("pruned", None, dirs)
    values = [r.get("objective") for r in records]
    if any(r.get("status") != "ok" for r in records) or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in values):
        return Outcome("fail", None, dirs)
    return Outcome("complete", statistics.fmean(values), dirs)


def write_results(study: Any, sweep_dir: Path, ran: dict[int, Outcome],
                  space: dict[str, Any]) -> dict[str, Any]:
    """``search.json`` (every trial of the study, this process's marked) and, when a trial
    completed, ``best_params.yaml`` (the overrides that reproduce the best trial)."""
    from optuna.trial import TrialState

    trials = [{"number": t.number, "state": t.state.name.lower(), "value": t.value,
               "params": t.params, "intermediate": dict(t.intermediate_values),
               "this_sweep": t.number in ran,
               "jobs": ran[t.number].jobs if t.number in ran else t.user_attrs.get("jobs", [])}
              for t in study.trials]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = None
    if done:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params}
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail")}
    result = {"study": study.study_name, "direction": study.direction.name.lower(),
              "space": sorted(space), "counts": counts, "best": best, "trials": trials}
    write_json(sweep_dir / "search.json", result)
    if best:
        lines = [f"# best trial {best['number']} of study {study.study_name}: objective "
                 f"{best['value']:.6g} ({result['direction']})",
                 *(f"{k}: {json.dumps(v)}" for k, v in sorted(best["params"].items()))]
        atomic_write(sweep_dir / "best_params.yaml", lambda p: p.write_text("\n".join(lines)
                                                                           + "\n"))
    return result


def auto_direction(config_loader: Any, config: Any, overrides: list[str]) -> str:
    """``maximize`` or ``minimize`` from the last stage's monitored metric, composed once."""
    from omegaconf import open_dict

    from ftlab.overrides import explicit_keys
    from ftlab.pipeline import build_pipeline
    from ftlab.run import _monitor

    cfg = config_loader.load_sweep_config(master_config=config, sweep_overrides=overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    from ftlab.cli import CONFIG_DIR

    explicit = explicit_keys(overrides, config.hydra.runtime.choices.get("experiment"),
                             CONFIG_DIR)
    monitor = _monitor(build_pipeline(cfg, explicit)[-1])
    if monitor is None:
        raise FtlabError("hydra.sweeper.direction=auto could not find the task's monitored "
                         "metric. Fix: set hydra.sweeper.direction=maximize (or minimize).")
    return "maximize" if monitor["mode"] == "max" else "minimize"
