"""Resumable stages on Lightning's own machinery: a ``ModelCheckpoint`` that writes
``<stage>/checkpoints/state.ckpt`` every N optimiser steps and at each epoch end, a
``CheckpointIO`` that stores Lightning's checkpoint dict as a folder of
``tensors.safetensors`` (every tensor, under its flattened path) + ``state.json`` (everything
else), and ``Trainer.fit(ckpt_path=...)`` to continue. Loop progress, optimiser, scheduler,
the data order's position (``TextDataModule.state_dict``) and stateful callbacks (``KeepBest``,
``WeightAverage``, ``RngState``) travel in that dict; a callback whose state differs between
ranks (``ftlab.strategies.PerRank``: the RNG states; weight averages under FSDP) has every
rank's gathered into it. Under FSDP, ``ftlab.strategies.FSDP`` puts the whole (gathered) model
and optimiser state in the same dict, rank zero writes it; on resume rank zero alone reads the
model and optimiser tensors and sends every rank its shard.

A checkpoint folder is written beside its target and renamed into place (atomic); the one it
replaces is moved aside first and deleted after, so a kill at any moment leaves one complete
checkpoint. ``state.json`` records the stage key: a checkpoint of a changed stage is never
resumed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from ftlab.rules import at_least
from ftlab.strategies import PerRank, gather_per_rank, own_per_rank

log = logging.getLogger(__name__)

# a resumed stage's checkpoint folder is not empty, by design
warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")

#: the checkpoint folder's name inside ``<stage>/checkpoints``
NAME = "state.ckpt"
TENSORS, STATE = "tensors.safetensors", "state.json"


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


# ---- the checkpoint dict <-> safetensors + JSON ------------------------------------------

def split(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """``obj`` as JSON-able data, each tensor replaced by ``{"__tensor__": key}`` (the tensor
    goes into ``tensors[key]``). Tuples and dicts with non-string keys are tagged so that
    ``join`` gives them back as they were."""
    if isinstance(obj, torch.Tensor):
        key = path or "/"
        while key in tensors:
            key += "'"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": split(torch.from_numpy(obj.copy()), tensors, path)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: split(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[k, split(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if isinstance(obj, torch.dtype | torch.device):
        return {"__torch__": str(obj)}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint ({path})")


def join(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``split``."""
    if isinstance(data, list):
        return [join(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors.get(data["__tensor__"])  # None: not read (``skip``)
    if "__ndarray__" in data:
        array = join(data["__ndarray__"], tensors)
        return None if array is None else array.numpy()
    if "__tuple__" in data:
        return tuple(join(v, tensors) for v in data["__tuple__"])
    if "__items__" in data:
        return {k: join(v, tensors) for k, v in data["__items__"]}
    if "__torch__" in data:
        text = data["__torch__"]
        return getattr(torch, text.removeprefix("torch.")) if text.startswith("torch.") \
            else torch.device(text)
    return {k: join(v, tensors) for k, v in data.items()}


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoints as ``<path>/{tensors.safetensors, state.json}``, written atomically.

    Args:
        meta: recorded in ``state.json`` under ``ftlab`` (the stage key).
    """

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self.meta = meta or {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any = None) -> None:
        from ftlab.store import is_rank_zero

        if not is_rank_zero():  # Lightning calls it on rank zero only; this makes sure
            return
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        tree = split(checkpoint, tensors)
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            tmp.mkdir(parents=True)
            save_file(flat, str(tmp / TENSORS))
            (tmp / STATE).write_text(json.dumps({"ftlab": self.meta, "checkpoint": tree}))
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}"
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None,
                        weights_only: bool | None = None,
                        skip: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """The checkpoint dict at ``path``; the tensors whose key (their path in the dict, e.g.
        ``/state_dict/encoder.weight``) ``skip`` picks are not read: None stands in for them."""
        from safetensors import safe_open

        path = Path(path)
        data = json.loads((path / STATE).read_text())
        if skip is None:
            return join(data["checkpoint"], load_file(str(path / TENSORS)))
        with safe_open(str(path / TENSORS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if not skip(k)}
        return join(data["checkpoint"], tensors)

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(folder: Path, key: str | None) -> Path | None:
    """The complete checkpoint in ``folder`` written for stage ``key`` (a checkpoint moved aside
    by a save that was killed midway counts), or None."""
    if not folder.is_dir():
        return None
    found = [folder / NAME, *sorted(folder.glob(f".{NAME}.old-*"))]
    for path in found:
        try:
            meta = json.loads((path / STATE).read_text()).get("ftlab", {})
        except (OSError, ValueError):
            continue
        if not (path / TENSORS).is_file():
            continue
        if not _readable(path / TENSORS):  # truncated (a partial copy, a bad disk)
            log.warning("Not resuming from %s: %s is damaged (truncated or not safetensors).",
                        path, TENSORS)
            continue
        if key is not None and meta.get("stage_key") != key:
            log.warning("Not resuming from %s: it was written for stage %s, this is %s "
                        "(the stage's settings changed). Training the stage from the start.",
                        path, meta.get("stage_key"), key)
            return None
        return path
    return None


def _readable(path: Path) -> bool:
    """Whether safetensors can open ``path`` (it checks the header covers the whole file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # SafetensorError, OSError
        return False


# ---- callbacks -----------------------------------------------------------------------------

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
