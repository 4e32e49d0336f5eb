"""The search's pruning callback on a trial in a shared study (no training: a stand-in
trainer), so its decisions are checked exactly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

optuna = pytest.importorskip("optuna")

from ftlab.pruning import OptunaPruning  # noqa: E402
from ftlab.study import open_storage  # noqa: E402


def _trainer(step: int, planned: int, score: float, root: Path) -> SimpleNamespace:
    return SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=step,
                           estimated_stepping_batches=planned, should_stop=False,
                           callback_metrics={"val/acc": torch.tensor(score)},
                           default_root_dir=str(root / "task"),
                           strategy=SimpleNamespace(broadcast=lambda value, src: value))


def test_a_trial_is_pruned_before_its_last_step_but_never_at_it(tmp_path):
    """A trial below the threshold is pruned mid-training; at its last validation it has
    trained in full, so it is not pruned (that only dropped a finished trial's score)."""
    url = str(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    module = SimpleNamespace(task=SimpleNamespace(monitor="acc"))
    always = {"class": "optuna.pruners.ThresholdPruner", "kwargs": {"lower": 2.0}}
    for step, planned, pruned in ((5, 10, True), (10, 10, False)):
        trial = study.ask().number
        cb = OptunaPruning(trial, "s", url, "task", pruner=always)
        trainer = _trainer(step, planned, 0.5, tmp_path)
        cb.on_train_start(trainer, module)
        cb.on_validation_end(trainer, module)
        assert trainer.should_stop is pruned and (cb.outcome is not None) is pruned
        # the score is reported either way (the sampler and pruner learn from it)
        assert study.trials[trial].intermediate_values == {step: 0.5}
