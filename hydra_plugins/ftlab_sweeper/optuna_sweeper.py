"""``hydra/sweeper=ftlab_optuna``: Optuna 4 search with pruning over ftlab jobs (conf:
conf/hydra/sweeper/ftlab_optuna.yaml; the search logic: ftlab/search.py)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: Hydra's default job folder, where jobs are placed by ftlab.resume.place_jobs
NUMBERED = "${hydra.job.num}"


def check_seeds(seeds: Any) -> list[int] | None:
    """``hydra.sweeper.seeds`` as a list of ints (null or empty: None); else ``FtlabError``
    (``seeds=3`` was a TypeError from Hydra, ``[a,b]`` failed every job)."""
    from omegaconf import ListConfig

    from ftlab.errors import FtlabError

    if seeds is None:
        return None
    values = list(seeds) if isinstance(seeds, list | tuple | ListConfig) else None
    if values is None or not all(isinstance(s, int) and not isinstance(s, bool) for s in values):
        raise FtlabError(f"hydra.sweeper.seeds={seeds!r} is not a list of integer seeds.",
                         "give a list: 'hydra.sweeper.seeds=[1,2,3]' (quoted for the shell), "
                         "or null for the run's seed.")
    return values or None


class FtlabOptunaSweeper(Sweeper):
    """Ask Optuna for ``n_trials`` trials (``n_jobs`` at a time, launched together), run each
    as one ftlab job per seed and tell Optuna the outcome (complete / pruned / fail).

    Args (``hydra.sweeper.*``; documented in conf/hydra/sweeper/ftlab_optuna.yaml):
        params: search space, ``key: sweep expression`` (ftlab.search's docstring).
        n_trials: trials this process adds to the study.
        n_jobs: trials launched at once (a parallel launcher runs them side by side).
        seeds: run each trial once per seed and optimise the mean; null: the run's seed.
        direction: maximize | minimize | auto (from the task's monitor mode).
        study_name, storage: the shared study (storage null: <sweep dir>/optuna.journal).
        sampler, pruner: Optuna objects (``_target_: optuna.samplers.*`` / ``optuna.pruners.*``).
    """

    def __init__(self, params: dict[str, str] | None = None, n_trials: int = 10,
                 n_jobs: int = 1, seeds: list[int] | None = None, direction: str = "auto",
                 study_name: str = "ftlab", storage: str | None = None, sampler: Any = None,
                 pruner: Any = None) -> None:
        self.params = dict(params or {})
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.seeds = seeds  # checked in sweep(), where a bad value gets a message
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.sampler_node, self.pruner_node = sampler, pruner
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def study(self, sweep_dir: Path, fixed: list[str], space: dict[str, Any]) -> Any:
        """Create the study, or join it when another worker already did."""
        import optuna

        from ftlab import search
        from ftlab import study as study_
        from ftlab.errors import FtlabError

        direction = self.direction
        try:
            task = search.auto_direction(self.hydra_context.config_loader, self.config, fixed)
        except Exception:  # noqa: BLE001 - auto needs it; a given direction stands alone
            if direction == "auto":
                raise
            task = direction  # no monitor to compare with: the direction as given
        if direction not in ("auto", task):  # the search (and its pruner) would seek the worst
            raise FtlabError(f"hydra.sweeper.direction={direction}, but the objective, the "
                             f"task's monitored metric, is to {task} (its mode): the search "
                             "and its pruner would keep the worst trials.",
                             "set hydra.sweeper.direction=auto (or drop it).")
        direction = task
        url = study_.storage_url(self.storage, sweep_dir)
        log.info("Optuna %s: study %r in %s, %s", optuna.__version__, self.study_name, url,
                 direction)
        # (the sampler's seed is offset per worker by ftlab.search.ask_first)
        sampler = study_.build_object(self.sampler_node, "sampler")
        pruner = study_.build_object(self.pruner_node, "pruner")
        try:
            study = optuna.create_study(
                study_name=self.study_name, storage=study_.open_storage(url),
                direction=direction, sampler=sampler, pruner=pruner, load_if_exists=True)
        except Exception as err:  # noqa: BLE001 - OSError, ImportError, SQLAlchemy's errors
            raise study_.storage_error(url, err) from None
        study_.check_joinable(study, space, direction, url)
        study_.check_settings(study, fixed, url)
        return study

    def launch(self, batch: list[list[str]]) -> list[dict[str, Any]]:
        from ftlab.resume import place_jobs
        from ftlab.search import job_outcome
        from ftlab.status import stops_reported
        from ftlab.threads import launching

        self.validate_batch_is_legal(batch)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        places = list(range(self.job_idx, self.job_idx + len(batch)))
        if OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("subdir") \
                == NUMBERED:  # a job run before (a resumed trial's) goes back to its folder
            places = place_jobs(sweep_dir, batch, self.job_idx)
            batch = [job if n == self.job_idx + i else [*job, f"hydra.sweep.subdir={n}"]
                     for i, (job, n) in enumerate(zip(batch, places, strict=True))]
        with launching(len(batch)), stops_reported(sweep_dir):
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
        self.job_idx = max([self.job_idx - 1, *places]) + 1  # after the new folders
        return [job_outcome(r) for r in returns]

    def run_trials(self, study: Any, trials: list[Any], fixed: list[str]) -> dict[int, Any]:
        """Run ``trials`` (launched together) and tell the study each one's outcome."""
        from optuna.trial import TrialState

        from ftlab.search import trial_outcome

        seeds = self.seeds or [None]
        states = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
                  "fail": TrialState.FAIL}

        def job(trial: Any, seed: int | None) -> list[str]:
            params = [f"{k}={v}" for k, v in trial.params.items()]
            return [*fixed, *params, f"trial={trial.number}",
                    *([f"seed={seed}"] if seed is not None else [])]

        # the first seed of every trial (the job that may be pruned), then the other seeds
        # of the trials that were not pruned
        records = {t.number: [r] for t, r in zip(
            trials, self.launch([job(t, seeds[0]) for t in trials]), strict=True)}
        go_on = [t for t in trials if trial_outcome(records[t.number]).state != "pruned"]
        rest = [(t, s) for t in go_on for s in seeds[1:]]
        if rest:
            for (t, _), r in zip(rest, self.launch([job(t, s) for t, s in rest]), strict=True):
                records[t.number].append(r)
        ran = {}
        for t in trials:
            outcome = ran[t.number] = trial_outcome(records[t.number])
            # in the study, so search.json names the folders of every trial (a re-launch's
            # or another worker's report keeps those of the trials it did not run)
            t.set_user_attr("jobs", outcome.jobs)
            study.tell(t, outcome.value, state=states[outcome.state])
            log.info("Trial %d: %s%s %s", t.number, outcome.state,
                     f" {outcome.value:.4f}" if outcome.value is not None else "", t.params)
        return ran

    def sweep(self, arguments: list[str]) -> Any:
        from ftlab.errors import FtlabError

        try:
            import optuna  # noqa: F401
        except ImportError:
            raise FtlabError("hydra/sweeper=ftlab_optuna needs Optuna 4. Fix: pip install "
                             "'ftlab[search]' (or pip install 'optuna>=4,<5').") from None
        from ftlab.search import ask_first, corners, parse_space, unfinished, write_results
        from ftlab.sweepcheck import check_jobs

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # a re-launch into the folder (resume=) numbers its new trials' jobs after the old
        # ones, whose folders it would otherwise write over
        self.job_idx = 1 + max((int(p.name) for p in sweep_dir.iterdir()
                                if p.is_dir() and p.name.isdigit()), default=-1)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        try:
            if self.n_trials < 1:  # (the loop below would not run, and there is no result)
                raise FtlabError(f"hydra.sweeper.n_trials={self.n_trials}: a search needs at "
                                 "least one trial.", "set hydra.sweeper.n_trials=1 or more.")
            self.seeds = check_seeds(self.seeds)
            twice = sorted({s for s in self.seeds or [] if self.seeds.count(s) > 1})
            if twice:  # the copy reuses the first job's record: that seed counts twice
                raise FtlabError(f"hydra.sweeper.seeds={self.seeds} names seed "
                                 f"{', '.join(map(str, twice))} more than once: each trial's "
                                 "mean would count that seed's score twice.",
                                 "list each seed once, e.g. hydra.sweeper.seeds=[1,2,3].")
            if self.direction not in ("auto", "maximize", "minimize"):
                raise FtlabError(f"hydra.sweeper.direction={self.direction!r} is not one of: "
                                 "auto, maximize, minimize.",
                                 "set hydra.sweeper.direction=auto (from the task's monitor).")
            space, fixed = parse_space(lines, self.hydra_context.config_loader)
            # a key not in the config, or a bound no job can run with, fails every trial:
            # stop before the study records any
            check_jobs(self.config, corners(space, fixed), "Search point")
            study = self.study(sweep_dir, fixed, space)
        except FtlabError as err:  # a message, not a traceback (SystemExit passes Hydra)
            print(f"\nftlab: {err}\n", file=sys.stderr)
            sys.exit(2)
        ran = {}
        stopped = unfinished(study, sweep_dir)  # left running by a stopped search: finish them
        if stopped:
            log.info("Finishing trial(s) %s, left running when this search was stopped.",
                     ", ".join(str(t.number) for t in stopped))
            ran |= self.run_trials(study, stopped, fixed)
            result = write_results(study, sweep_dir, ran, space)
        for start in range(0, self.n_trials, self.n_jobs):
            # the first trial reseeds the sampler from its number: workers joining the same
            # study must not ask the same random start-up points (ftlab.search.ask_first)
            trials = [ask_first(study, space, self.sampler_node) if start == 0 and i == 0
                      else study.ask(space) for i in range(min(self.n_jobs,
                                                               self.n_trials - start))]
            ran |= self.run_trials(study, trials, fixed)
            result = write_results(study, sweep_dir, ran, space)  # after every batch
        log.info("Search done: %s; best %s", result["counts"], result["best"])
        return result
