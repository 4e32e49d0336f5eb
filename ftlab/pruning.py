"""Pruning a search trial from inside its job: a Lightning callback that reports the
validation score to the Optuna trial (``ftlab.search``) and stops training when the study's
pruner says the trial is unpromising.

optuna-integration's ``PyTorchLightningPruningCallback`` checks for ``pytorch_lightning``
classes and an in-process trial; this one works with ``lightning`` 2.x and a trial that lives
in a storage shared with the sweeper (any launcher: the job may run in another process or on
another machine).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from ftlab.discard import StopsJob
from ftlab.search import SWEEPER

log = logging.getLogger(__name__)


def trial_callbacks(trial: int | None, seed: int | None, stage: str) -> dict[str, Any]:
    """The pruning callback node for a job of ``hydra/sweeper=ftlab_optuna`` (empty for any
    other job). Only the trial's first seed reports and may be pruned; later seeds run in full
    (the sweeper launches them only when the first was not pruned)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from ftlab.discard import sweep_dir
    from ftlab.study import storage_url

    if trial is None or not HydraConfig.initialized():
        return {}
    node = HydraConfig.get().sweeper
    if node.get("_target_") != SWEEPER or sweep_dir() is None:
        return {}
    seeds = list(node.get("seeds") or [])
    if seeds and seed != seeds[0]:
        return {}
    pruner = OmegaConf.to_container(node.pruner) if node.get("pruner") is not None else None
    if pruner:  # as class + kwargs: ftlab's allow-list would refuse an optuna `_target_` here
        pruner = {"class": pruner.pop("_target_", None), "kwargs": pruner}
    return {"optuna_pruning": {
        "_target_": "ftlab.pruning.OptunaPruning", "trial": int(trial), "stage": stage,
        "study": node.study_name, "storage": storage_url(node.storage, sweep_dir()),
        "pruner": pruner}}


class OptunaPruning(StopsJob):
    """Report ``val/<monitor>`` to trial ``trial`` of ``study`` after each validation of stage
    ``stage`` (step = the optimiser step) and stop the job when ``pruner`` prunes it.

    A pruned job keeps its metrics so far and is recorded as ``status: pruned``
    (``outcome`` holds the step and score).
    """

    def __init__(self, trial: int, study: str, storage: str, stage: str,
                 pruner: dict[str, Any] | None = None) -> None:
        """``pruner``: ``{class: optuna.pruners.X, kwargs: {...}}`` (null: Optuna's median)."""
        self.number, self.study_name, self.storage_url = trial, study, storage
        self.stage, self.pruner_node = stage, pruner
        self.outcome: dict[str, Any] | None = None
        self._trial: Any = None
        self._active = False

    def _open(self) -> Any:
        import optuna

        from ftlab.study import open_storage

        storage = open_storage(self.storage_url)
        study = optuna.load_study(study_name=self.study_name, storage=storage,
                                  pruner=self._pruner())
        study_id = storage.get_study_id_from_name(self.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        return optuna.trial.Trial(study, trial_id)

    def _pruner(self) -> Any:
        from ftlab.study import build_object

        node = self.pruner_node
        return build_object({"_target_": node["class"], **node["kwargs"]}, "pruner") \
            if node else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.outcome = None
        self._active = Path(trainer.default_root_dir).name == self.stage  # the scored stage
        self._trial = self._open() if self._active and trainer.is_global_zero else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = f"val/{pl_module.task.monitor}"
        if trainer.sanity_checking or not self._active:
            return
        prune = False
        if trainer.is_global_zero and name in trainer.callback_metrics:
            score, step = float(trainer.callback_metrics[name]), trainer.global_step
            self._trial.report(score, step)
            # the last validation: training is done, pruning would only drop a finished score
            prune = step < trainer.estimated_stepping_batches and self._trial.should_prune()
        prune = trainer.strategy.broadcast(prune, src=0)  # every rank stops together
        if prune:
            self.outcome = {"step": trainer.global_step, "metric": name,
                            "score": float(trainer.callback_metrics.get(name, float("nan"))),
                            "planned_steps": int(trainer.estimated_stepping_batches),
                            "rule": f"optuna pruner (trial {self.number})", "pruned": True}
            log.info("Trial %d pruned at step %d: %s=%.4f is unpromising.", self.number,
                     trainer.global_step, name, self.outcome["score"])
            trainer.should_stop = True
