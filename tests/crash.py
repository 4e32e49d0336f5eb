"""A Lightning callback that kills chosen jobs of a sweep midway (tests of resuming)."""

from __future__ import annotations

import os

import lightning as L


class CrashAt(L.Callback):
    """Raise at the end of optimiser step ``step`` when the job's seed is listed in the
    environment variable ``FTLAB_TEST_CRASH_SEEDS`` (e.g. ``3,4``); otherwise do nothing."""

    def __init__(self, step: int = 6) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        seeds = os.environ.get("FTLAB_TEST_CRASH_SEEDS", "").split(",")
        if trainer.global_step == self.step and os.environ.get("PL_GLOBAL_SEED") in seeds:
            raise RuntimeError(f"killed at step {self.step}")
