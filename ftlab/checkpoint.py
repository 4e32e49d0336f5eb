"""Resumable stages on Lightning's own machinery: a ``ModelCheckpoint`` that writes
``<stage>/checkpoints/state.ckpt`` every N optimiser steps and at each epoch's last step, a
``CheckpointIO`` that stores Lightning's checkpoint dict as a folder of
``tensors.safetensors`` (every tensor, under its flattened path) + ``state.json`` (everything
else; ``ftlab/checkpoint_io.py``), and ``Trainer.fit(ckpt_path=...)`` to continue. Loop
progress, optimiser, scheduler, the data order's position (``TextDataModule.state_dict``)
and stateful callbacks (``KeepBest``, ``WeightAverage``, ``RngState``) travel in that dict;
a callback whose state differs between ranks (``ftlab.strategies.PerRank``: the RNG states;
weight averages under FSDP) has every rank's gathered into it. Under FSDP,
``ftlab.strategies.FSDP`` puts the whole (gathered) model and optimiser state in the same
dict, rank zero writes it; on resume rank zero alone reads the model and optimiser tensors
and sends every rank its shard.

A checkpoint folder is written beside its target and renamed into place (atomic); the one it
replaces is moved aside first and deleted after, so a kill at any moment leaves one complete
checkpoint. ``state.json`` records the stage key: a checkpoint of a changed stage is never
resumed.
"""

from __future__ import annotations

import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from ftlab.checkpoint_io import NAME, SafetensorsCheckpointIO
from ftlab.rules import at_least
from ftlab.strategies import PerRank, gather_per_rank, own_per_rank

log = logging.getLogger(__name__)

# a resumed stage's checkpoint folder is not empty, by design
warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")


@dataclass
class CheckpointSpec:
    """The ``checkpoint`` config node (README, "Resuming runs and sweeps").

    Attributes:
        every_n_steps: also checkpoint every N optimiser steps (0: at epoch ends only).
        enabled: false turns checkpointing (and resuming) off.
        keep: keep ``<stage>/checkpoints`` after the stage finishes (default: deleted).
    """

    every_n_steps: Annotated[int, at_least(0, example="100")] = 100
    enabled: bool = True
    keep: bool = False


class StageCheckpoint(ModelCheckpoint):
    """One checkpoint, ``<dir>/state.ckpt``, replaced every ``every_n_steps`` optimiser steps
    (0: never within an epoch) and at every epoch's last step.

    A checkpoint is written when its step's batch ends or, when a validation follows that
    batch (``val_check_interval``, the budget's ``val_every_steps``, the epoch's end), after
    that validation: Lightning resumes such a step as validated and skips its validation, so
    a checkpoint written before it lost that score from the best-epoch choice and early
    stopping (and a kill during the validation lost it too). An epoch's last step is written
    there as well, not in ``on_train_epoch_end``: from a checkpoint written at the epoch's end
    Lightning ran that end again, counting the epoch twice, and without a validation at the
    epoch's end it trained one batch more (the next epoch's first, so twice)."""

    def __init__(self, dirpath: Path, every_n_steps: int = 0) -> None:
        super().__init__(dirpath=str(dirpath), filename=NAME.removesuffix(".ckpt"),
                         every_n_train_steps=every_n_steps or None,
                         every_n_epochs=None if every_n_steps else 0, save_top_k=1,
                         enable_version_counter=False, save_on_train_epoch_end=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           *args: Any) -> None:
        if self._due(trainer) and not _validation_follows(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):  # the checkpoint put off for this validation
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Training stopped within an epoch (``max_steps``, early stopping), or a validation
        expected after the last batch did not come: the last state (``checkpoint.keep``)."""
        if not self._should_skip_saving_checkpoint(trainer):
            self._save(trainer)

    def _due(self, trainer: L.Trainer) -> bool:
        """A checkpoint is due at this step (every N steps, an epoch's last), not yet written."""
        every, step = self._every_n_train_steps, trainer.global_step
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return ((last or every >= 1 and step % every == 0)
                and not self._should_skip_saving_checkpoint(trainer))

    def _save(self, trainer: L.Trainer) -> None:
        self._save_checkpoint(trainer, str(Path(self.dirpath) / NAME))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Every rank's state of the ``PerRank`` callbacks (RNG states; EMA/SWA/snapshots
        under FSDP) goes to rank zero, which writes the checkpoint (every rank runs this);
        whether training was told to stop (early stopping, early discard, a pruned trial)."""
        gather_per_rank(trainer, checkpoint)
        checkpoint["should_stop"] = bool(trainer.should_stop)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Each rank takes its own state of the ``PerRank`` callbacks (before they load it). A
        stage that had stopped early (killed while it tested or wrote its artefact) stays
        stopped: Lightning keeps no ``should_stop``, and the resumed stage trained on."""
        own_per_rank(trainer, checkpoint, trainer.ckpt_path)
        if checkpoint.get("should_stop"):
            trainer.should_stop = True


class RngState(PerRank, L.Callback):
    """Saves the torch, CUDA (this rank's device), numpy and Python random states (dropout,
    masking) in checkpoints and puts them back when training resumes, so a resumed stage draws
    the same numbers. Each rank of a DDP/FSDP run has its own (``PerRank``)."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                           cached]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # the current device: this rank's
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict

    def own_state(self, ranks: list[Any], rank: int, world_size: int, where: Any) -> Any:
        """This rank's states; on another number of processes the ranks the checkpoint has no
        states for take rank zero's, with a warning (random states change no result's
        correctness, only which dropout masks are drawn; refusing would block a DDP resume
        on fewer or more devices, which otherwise works)."""
        if len(ranks) != world_size and rank == 0:
            lo, hi = sorted((len(ranks), world_size))
            one = hi - lo == 1
            which = f"rank {lo}" if one else f"ranks {lo}-{hi - 1}"
            fate = (f"{which} take{'s' * one} rank zero's states" if world_size > len(ranks)
                    else f"the states of {which} are dropped")
            log.warning("The checkpoint %s holds the random states of %d processes, this run "
                        "has %d: %s, so dropout draws differ from an uninterrupted run (resume "
                        "with the same trainer.devices and num_nodes to match it).", where,
                        len(ranks), world_size, fate)
        return ranks[rank] if rank < len(ranks) else ranks[0]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.loaded is None:  # a fresh start
            return
        state, self.loaded = self.loaded, None
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after this training batch (its own rule, asked in
    ``on_train_batch_end``, before it decides: the checkpoint callbacks run last)."""
    batches = trainer.num_val_batches
    if not sum(batches if isinstance(batches, list) else [batches]):
        return False  # no validation data: no validation (nor its hooks) runs
    loop = trainer.fit_loop.epoch_loop
    return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def stage_checkpointing(spec: CheckpointSpec | None, folder: Path, key: str | None
                        ) -> tuple[list[L.Callback], list[CheckpointIO]]:
    """(callbacks, Trainer plugins) that checkpoint a stage into ``folder`` under ``spec``
    (under FSDP, ``ftlab.strategies.FSDP`` gathers the full state for them)."""
    if spec is None or not spec.enabled:
        return [], []
    if spec.every_n_steps < 0:
        from ftlab.errors import FtlabError

        raise FtlabError(f"checkpoint.every_n_steps is {spec.every_n_steps}.",
                         "use 0 (epoch ends only) or a positive number of steps.")
    return ([StageCheckpoint(folder, spec.every_n_steps), RngState()],
            [SafetensorsCheckpointIO({"stage_key": key})])
