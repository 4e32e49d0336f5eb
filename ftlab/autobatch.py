"""``stage.batch_size=auto``: the largest training batch whose step fits in memory.

Lightning's batch-size tuner (``Tuner.scale_batch_size``, mode ``power``) runs a few steps at
``auto_batch_init`` rows, doubles the batch while a step fits and stops at the first
out-of-memory error (or after ``auto_batch_max_trials`` doublings, or at the size of the
training split); the model, optimiser and loop are restored afterwards, and so are the random
number streams (torch, CUDA, numpy, Python) the trial steps drew from (dropout), so the stage
then trains as a run given the found batch size directly would. ftlab batches by length and pads
each batch to its own longest row, so a trial on a short batch would say nothing about a long
one: during the search every batch is padded to the longest training row.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch

from ftlab.data.datamodule import TextDataModule
from ftlab.errors import FtlabError
from ftlab.runtime import RuntimeSpec

log = logging.getLogger(__name__)


def find_batch_size(trainer: L.Trainer, module: L.LightningModule, dm: TextDataModule,
                    runtime: RuntimeSpec, where: str) -> int:
    """Set ``dm.batch_size`` to the largest batch that fits and return it."""
    from lightning.pytorch.tuner import Tuner

    if trainer.world_size > 1:
        raise FtlabError(f"{where}: batch_size=auto searches on one device; this run has "
                         f"{trainer.world_size}.", "find it with trainer=gpu on one GPU, then "
                         "set that number as stage.batch_size for the multi-device run.")
    if trainer.accelerator.__class__.__name__ == "CPUAccelerator":
        log.warning("%s: batch_size=auto on the CPU: memory rarely runs out there, so the "
                    "search stops after trainer.auto_batch_max_trials=%d doublings.", where,
                    runtime.auto_batch_max_trials)
    rows = len(dm.splits["train"])
    longest = int(dm.splits["train"].with_format("arrow")["length"].to_numpy().max())
    pad_to = dm.collate.pad_to
    dm.collate.pad_to = -(-longest // dm.collate.multiple_of) * dm.collate.multiple_of
    try:
        with unmoved_random_numbers():  # the trial steps' dropout draws are undone
            found = Tuner(trainer).scale_batch_size(
                module, datamodule=dm, mode="power",
                init_val=min(runtime.auto_batch_init, rows),
                max_trials=runtime.auto_batch_max_trials, steps_per_trial=3, max_val=rows)
    finally:
        dm.collate.pad_to = pad_to
    if not found:
        raise FtlabError(f"{where}: batch_size=auto found no batch that fits.",
                         "set stage.batch_size to a number, or lower trainer.auto_batch_init.")
    dm.batch_size = int(found)
    log.info("%s: batch_size=auto chose %d rows per batch (searched at %d tokens per row).",
             where, found, dm.collate.pad_to or longest)
    return int(found)


@contextmanager
def unmoved_random_numbers() -> Iterator[None]:
    """Run the block, then put the global random states back as they were before it: torch's
    (CPU and every CUDA device's), numpy's and Python's."""
    python, numpy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
