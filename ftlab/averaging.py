"""Weight averaging (EMA, SWA) of the *trainable* parameters (snapshot ensembles:
``ftlab/snapshots.py``).

Cheap with PEFT: only the trainable tensors are averaged or snapshotted (for LoRA a few KB).
All work with any ``peft=`` option: they use the parameters with ``requires_grad``. SWA is
built from ``torch.optim.swa_utils`` rather than Lightning's ``StochasticWeightAveraging``,
which copies the whole module, averages at epoch *starts* (a 1-epoch run averages the initial
weights), validates the raw weights during fit and swaps in an epoch-interval scheduler.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import lightning as L
import torch
from torch.optim.swa_utils import SWALR, AveragedModel

from ftlab.errors import FtlabError
from ftlab.rules import between
from ftlab.strategies import HoldsShards

log = logging.getLogger(__name__)


def trainable(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}


def wide(p: torch.Tensor) -> torch.Tensor:
    """``p`` in at least float32: an average of bf16/fp16 weights (``trainer.precision=
    bf16-true``) kept in their own dtype would round every small EMA step away and never move."""
    return p.detach().to(torch.promote_types(p.dtype, torch.float32))


class SwapsInAverage(HoldsShards, L.Callback):
    """Validation and test run on an average of the trainable weights, swapped in place (so
    KeepBest keeps the averaged state); training resumes on the raw weights, kept in
    ``backup`` meanwhile; the model leaves fit with the average."""

    backup: dict[str, torch.Tensor] | None = None

    def averaged(self) -> dict[str, torch.Tensor] | None:
        """The average by parameter name; None while there is none yet."""
        raise NotImplementedError

    @torch.no_grad()
    def _swap_in(self, pl_module: L.LightningModule) -> None:
        average = self.averaged()
        if self.backup is None and average:
            params = trainable(pl_module)
            self.backup = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.copy_(average[n])

    @torch.no_grad()
    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self.backup is not None:
            for n, p in trainable(pl_module).items():
                p.copy_(self.backup[n])
            self.backup = None

    def catch_up(self, trainer: L.Trainer, pl_module: L.LightningModule,
                 batch_idx: int) -> None:
        """Take the update due at this optimiser step, if not taken yet (at most once a step):
        a callback judging the average in its own ``on_train_batch_end`` (early discard) may
        run before this one's."""
        raise NotImplementedError

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                           batch, batch_idx: int) -> None:
        self.catch_up(trainer, pl_module, batch_idx)

    @contextmanager
    def evaluated(self, pl_module: L.LightningModule) -> Iterator[None]:
        """The weights validation would score (the average, once there is one) in place for
        the block; the weights before it come back after."""
        swapped_before = self.backup is not None
        self._swap_in(pl_module)
        try:
            yield
        finally:
            if not swapped_before:
                self._swap_out(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             *args) -> None:
        self._swap_out(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)  # the model leaves fit with the averaged weights


class WeightAverage(SwapsInAverage):
    """EMA (``decay`` set) or a per-step running mean (``decay`` null, from ``start``) of the
    trainable weights; for SWA proper (its LR schedule and cadence) see ``SWA``.

    Args:
        decay: EMA decay per optimiser step; null = equal-weight average of every step.
        start: fraction of training steps after which averaging starts (before it the average
            follows the raw weights).
        warmup: the decay of the n-th update is ``min(decay, (1 + n) / (10 + n))``
            (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``), so the first updates
            forget the starting weights (a random head included) quickly; without it, decay
            0.999 keeps ~55% of them after 600 steps.
    """

    def __init__(self, decay: Annotated[float | None, between(0, 1, hi_open=True,
                                                              example="0.999")] = 0.999,
                 start: Annotated[float, between(0, 1, hi_open=True, example="0.0")] = 0.0,
                 warmup: bool = False) -> None:
        self.decay, self.start, self.warmup = decay, start, warmup
        self.shadow: dict[str, torch.Tensor] = {}
        self.backup: dict[str, torch.Tensor] | None = None
        self.count = 0
        self.last_step = 0  # the optimiser step the average last moved at

    def averaged(self) -> dict[str, torch.Tensor] | None:
        return self.shadow

    def follows_length(self) -> bool:
        return self.start > 0  # ftlab.callbacks.FollowsLength

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.shadow:  # a resumed stage has its average back from the checkpoint
            self.shadow = {n: wide(p).clone() for n, p in trainable(pl_module).items()}

    def state_dict(self) -> dict:
        """The average, the step count and (between validation and the next training step)
        the raw weights it stands in for: saved in checkpoints."""
        return {"shadow": self.shadow, "backup": self.backup, "count": self.count,
                "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.shadow, self.backup = state_dict["shadow"], state_dict["backup"]
        self.count, self.last_step = state_dict["count"], state_dict.get("last_step", -1)

    @torch.no_grad()
    def catch_up(self, trainer: L.Trainer, pl_module: L.LightningModule,
                 batch_idx: int) -> None:
        if trainer.global_step == self.last_step:  # accumulating gradients: no step taken
            return
        self.last_step = trainer.global_step
        params = trainable(pl_module)
        if trainer.global_step < self.start * trainer.estimated_stepping_batches:
            for n, p in params.items():
                self.shadow[n].copy_(p)
            return
        decay = self.decay
        if decay is not None and self.warmup:
            decay = min(decay, (1 + self.count) / (10 + self.count))
        self.count += 1
        weight = 1.0 / self.count if decay is None else 1.0 - decay
        for n, p in params.items():
            self.shadow[n].lerp_(wide(p), weight)


class SWA(SwapsInAverage):
    """Stochastic weight averaging (Izmailov et al. 2018) of the trainable parameters, on
    ``torch.optim.swa_utils``: from ``start`` of the optimiser steps the stage's LR schedule
    is replaced by ``SWALR`` (constant ``swa_lr``, optionally annealed to it over
    ``anneal_steps``) and an ``AveragedModel`` of the trainable tensors takes an equal-weight
    snapshot at the end of each epoch (the paper's cadence) or every ``every_n_steps`` steps.

    Args:
        swa_lr: the SWA learning rate for every parameter group; null: ``lr_ratio`` x each
            group's peak LR (keeps layer-wise LR ratios).
        lr_ratio: the SWA LR as a fraction of the peak LR when ``swa_lr`` is null.
        start: fraction of the stage's optimiser steps after which SWA begins.
        every_n_steps: snapshot every N optimiser steps after ``start``; null: at the end of
            each epoch (and of training).
        anneal_steps: steps over which SWALR moves the LR from its value at ``start`` to the
            SWA LR (0: switch at once).
        anneal_strategy: ``cos`` or ``linear`` annealing.
    """

    def __init__(self, swa_lr: float | None = None, lr_ratio: float = 0.5, start: float = 0.75,
                 every_n_steps: int | None = None, anneal_steps: int = 0,
                 anneal_strategy: str = "cos") -> None:
        fix = "see conf/callbacks/swa.yaml for the meaning and the paper's values."
        if swa_lr is not None and swa_lr <= 0 or swa_lr is None and not lr_ratio > 0:
            raise FtlabError("callbacks.swa: swa_lr / lr_ratio must be > 0.", fix)
        if not 0 <= start < 1:
            raise FtlabError(f"callbacks.swa.start={start} is not a fraction in [0, 1).", fix)
        if every_n_steps is not None and every_n_steps < 1 or anneal_steps < 0:
            raise FtlabError("callbacks.swa: every_n_steps must be >= 1 (or null = each "
                             "epoch) and anneal_steps >= 0.", fix)
        if anneal_strategy not in ("cos", "linear"):
            raise FtlabError(f"callbacks.swa.anneal_strategy={anneal_strategy!r}.",
                             "use cos or linear.")
        self.swa_lr, self.lr_ratio, self.start = swa_lr, lr_ratio, start
        self.every_n_steps, self.anneal_steps = every_n_steps, anneal_steps
        self.anneal_strategy = anneal_strategy
        self.average: AveragedModel | None = None
        self.scheduler: SWALR | None = None
        self.names: list[str] = []
        self.last_step, self.start_step = -1, 0
        self._loaded: dict | None = None

    @property
    def count(self) -> int:
        """Snapshots averaged so far."""
        return 0 if self.average is None else int(self.average.n_averaged)

    def averaged(self) -> dict[str, torch.Tensor] | None:
        if not self.count:
            return None
        return dict(zip(self.names, self.average.module.parameters(), strict=True))

    def follows_length(self) -> bool:
        return True  # ftlab.callbacks.FollowsLength: SWA begins at start x the planned steps

    def selectable(self, trainer: L.Trainer) -> bool:
        """KeepBest picks among validations of the average only (in fit, once there is one)."""
        return trainer.state.fn != "fit" or self.count > 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = trainable(pl_module)
        self.names, self._live = list(params), torch.nn.ParameterList(params.values())
        # a copy of the trainable tensors only, in at least float32 (see ``wide``)
        self.average = AveragedModel(torch.nn.ParameterList(
            torch.nn.Parameter(wide(p), requires_grad=False) for p in params.values()))
        self.average.requires_grad_(False)
        total = int(trainer.estimated_stepping_batches)
        self.start_step = int(self.start * total)
        if self._loaded is not None:  # resumed: the average, and SWALR if it had begun
            state, self._loaded = self._loaded, None
            self.average.load_state_dict(state["average"])
            self.last_step, self.backup = state["last_step"], state["backup"]
            if state["started"]:  # before Lightning loads SWALR's state into it
                self._install(trainer)
        batches = trainer.num_training_batches
        if not self.count and math.isfinite(batches) and (snaps := self._planned(
                total, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))) < 2:
            log.warning("SWA will average %d snapshot(s) (%d steps after start, one every %s):"
                        " set callbacks.swa.every_n_steps smaller or start earlier.", snaps,
                        total - self.start_step, self.every_n_steps or "epoch")

    def _planned(self, total: int, per_epoch: int) -> int:
        """Snapshots ``catch_up`` will take in ``total`` optimiser steps: every
        ``every_n_steps`` after ``start``, or at each epoch's end (and training's) after it."""
        if self.every_n_steps:
            return (total - self.start_step) // self.every_n_steps
        ends = {min(total, k * per_epoch) for k in range(1, -(-total // max(1, per_epoch)) + 1)}
        return sum(step > self.start_step for step in ends)

    def state_dict(self) -> dict:
        """The average (with its count), the last snapshot's step, whether SWALR has taken
        over, and the raw weights while the average stands in for them."""
        average = self.average.state_dict() if self.average is not None else None
        return {"average": average, "names": self.names, "last_step": self.last_step,
                "backup": self.backup, "started": self.scheduler is not None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = state_dict  # applied in on_fit_start, once the model is there

    def _install(self, trainer: L.Trainer) -> None:
        """SWALR takes the place of the stage's scheduler (stepped after every step)."""
        from lightning.pytorch.utilities.types import LRSchedulerConfig

        opt = trainer.optimizers[0]
        lrs = [self.swa_lr or self.lr_ratio * g.get("initial_lr", g["lr"])
               for g in opt.param_groups]
        self.scheduler = SWALR(opt, swa_lr=lrs, anneal_epochs=self.anneal_steps,
                               anneal_strategy=self.anneal_strategy)
        config = LRSchedulerConfig(self.scheduler, interval="step")
        trainer.lr_scheduler_configs[:1] = [config]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             *args) -> None:
        super().on_train_batch_start(trainer, pl_module, *args)
        if self.scheduler is None and trainer.global_step >= self.start_step:
            self._install(trainer)

    @torch.no_grad()
    def catch_up(self, trainer: L.Trainer, pl_module: L.LightningModule,
                 batch_idx: int) -> None:
        step = trainer.global_step
        if step <= self.start_step or step == self.last_step:
            return
        if self.every_n_steps:
            due = (step - self.start_step) % self.every_n_steps == 0
        else:  # the epoch's last batch (before the epoch-end validation), or training's end
            due = (batch_idx + 1 == trainer.num_training_batches
                   or step >= trainer.estimated_stepping_batches)
        if due:
            self.average.update_parameters(torch.nn.ParameterList(  # fp32: no copy
                torch.nn.Parameter(wide(p), requires_grad=False) for p in self._live))
            self.last_step = step
