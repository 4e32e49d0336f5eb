"""Callbacks scheduled by fractions of a stage's planned steps (SWA's start, snapshot cycles,
early discard's at, an EMA start) and the adaptive budget's early stopping: the stage trains its
planned length, so they are not silently skipped."""

from __future__ import annotations

import pytest

from ftlab.run import run
from tests.conftest import tiny_overrides

#: 64 rows / batch 16 = 4 steps an epoch; the budget plans 6 epochs (24 steps); at an LR this
#: small val/acc never improves, so patience 1 would stop it after epoch 2 (8 steps)
BUDGET = ["data.max_train_samples=64", "trainer.budget.min_steps=24",
          "trainer.budget.patience=1", "stage.optim.lr=1e-9"]


@pytest.mark.parametrize(("callbacks", "extra"), [
    ("swa", ["callbacks.swa.every_n_steps=2"]),
    ("snapshots", []),
    ("ema", ["callbacks.ema.start=0.5"]),
])
def test_a_callback_that_follows_the_planned_steps_gets_them(callbacks, extra, make_cfg,
                                                             sentiment_dir):
    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("callbacks=")]
    record = run(make_cfg(overrides + BUDGET + [f"callbacks={callbacks}",
                                                "callbacks.progress=null", *extra]))
    stage = record["stages"]["classify"]
    assert stage["budget"]["steps_per_epoch"] * stage["budget"]["max_epochs"] == 24
    assert stage["global_steps"] == 24, stage["budget"]
    assert not stage["budget"]["stopped_early"] and stage["budget"]["patience"] == 0


@pytest.mark.parametrize("callbacks", ["none", "early_discard"])  # the latter: not a multirun
def test_without_such_a_callback_the_budget_still_stops_early(callbacks, make_cfg,
                                                              sentiment_dir):
    record = run(make_cfg(tiny_overrides(sentiment_dir) + BUDGET + [f"callbacks={callbacks}"]))
    stage = record["stages"]["classify"]
    assert stage["budget"]["stopped_early"] and stage["global_steps"] < 24
