"""The progress bar of the ``callbacks`` group: Lightning's rich bar, drawn at most every
``interval`` seconds.

Lightning's ``RichProgressBar`` updates and redraws its bars after every batch (its
``refresh_rate`` only switches it on or off). That costs ~0.15 ms of host time per step on a 2-core
CPU (3% of tiny_bert's 5.4 ms step there), and on a GPU it is host time the step waits for where
launches already bound it (small batches, CUDA graphs). Drawn at most ten times a second, the
bar looks the same; the last batch of each loop (or the run's last step) is always drawn, so a
bar never ends short of its total.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def _throttled(loop: str, total: str) -> Callable[..., None]:
    """``RichProgressBar.on_<loop>_batch_end``, run only when the bar is due (``total``: the
    property holding the loop's batch count)."""
    hook = getattr(RichProgressBar, f"on_{loop}_batch_end")

    def on_batch_end(self: ProgressBar, trainer: L.Trainer, pl_module: L.LightningModule,
                     outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # a disabled bar (every rank but zero under DDP) has no current dataloader: its
        # batch count asserts, and Lightning's hook would return at once anyway
        if not self.is_disabled and self._due(batch_idx + 1, getattr(self, total)):
            hook(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
    return on_batch_end


class ProgressBar(RichProgressBar):
    """``RichProgressBar`` (same arguments) updated at most every ``interval`` seconds."""

    def __init__(self, interval: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interval = interval
        self._drawn = -math.inf  # monotonic time of the last update

    def _due(self, current: int, total: float, last: bool = False) -> bool:
        now = time.monotonic()
        if last or current >= total or now - self._drawn >= self.interval:
            self._drawn = now
            return True
        return False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        last_step = 0 < trainer.max_steps <= trainer.global_step  # max_steps ends mid-epoch
        if self._due(batch_idx + 1, self.total_train_batches, last_step):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    on_validation_batch_end = _throttled("validation", "total_val_batches_current_dataloader")
    on_test_batch_end = _throttled("test", "total_test_batches_current_dataloader")
    on_predict_batch_end = _throttled("predict", "total_predict_batches_current_dataloader")
