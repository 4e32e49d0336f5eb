"""The LightningModule: a task, a (PEFT-prepared) model, a regulariser and an optimiser."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection

from ftlab.optim import OptimSpec, build_optimizer
from ftlab.peft.base import FollowsSteps, Penalized
from ftlab.regularizers.base import Regularizer
from ftlab.tasks.base import Task


class FineTuneModule(L.LightningModule):
    """Training/validation/test steps shared by every stage; the task supplies the rest."""

    def __init__(self, model: nn.Module, task: Task, regularizer: Regularizer,
                 optim: OptimSpec, check_finite_every: int = 1) -> None:
        """``check_finite_every``: look at the device-side divergence record every this many
        training steps (and at every epoch's end); each look makes the host wait for the GPU."""
        super().__init__()
        self.model = model.train()  # HF loads in eval mode; Lightning keeps modes as found
        self.task = task
        self.regularizer = regularizer
        self.optim = optim
        # shapes as built: under FSDP the optimiser sees flattened 1-D shards (weight decay
        # would then skip every matrix)
        self.param_ndims = {n: p.ndim for n, p in model.named_parameters()}
        self.val_metrics = task.metrics().clone(prefix="val/")
        self.test_metrics = task.metrics().clone(prefix="test/")
        self.check_finite_every = check_finite_every
        self._steps_seen = 0
        self._first_bad: torch.Tensor | None = None  # (global step, loss) of the first NaN/inf
        self.applied_lr: float | None = None  # the peak LR after optim.lr_scaling
        self._total_steps = 0  # the stage's optimiser steps, for FollowsSteps models

    def on_train_start(self) -> None:
        self._total_steps = int(self.trainer.estimated_stepping_batches)

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if isinstance(self.model, FollowsSteps):  # movement/diff pruning schedules
            self.model.at_step(self.trainer.global_step, self._total_steps)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.regularizer.training_loss(self.model, batch, self.task)
        loss, rows = out.loss, batch["input_ids"].shape[0]
        for key, value in out.extras.items():  # the regulariser's own terms (train/r3f_kl...)
            if key.startswith(f"{self.regularizer.name}_"):
                self.log(f"train/{key}", value, batch_size=rows)
        if isinstance(self.model, Penalized):  # a PEFT wrapper's penalty (diff pruning's L0)
            loss = loss + self.model.extra_loss()
        # the progress bar reads its values as numbers every step (a host sync): it shows the
        # loss only where the loss is checked every step anyway (trainer=cpu)
        self.log("train/loss", loss, prog_bar=self.check_finite_every == 1, batch_size=rows)
        self._record_finite(loss)
        return loss

    def _record_finite(self, loss: torch.Tensor) -> None:
        """Keep the first non-finite loss and its step on the device (no host sync); look at
        it every ``check_finite_every`` steps."""
        value = loss.detach().float()
        if self._first_bad is None:
            self._first_bad = torch.tensor([-1.0, 0.0], device=value.device)
        step, seen = self._first_bad.unbind()
        new = (step < 0) & ~torch.isfinite(value)  # a Python number enters as a scalar: no copy
        self._first_bad = torch.stack([torch.where(new, float(self.global_step), step),
                                       torch.where(new, value, seen)])
        self._steps_seen += 1
        if self._steps_seen % self.check_finite_every == 0:
            self.raise_if_diverged()

    def raise_if_diverged(self) -> None:
        """Stop the run if any training loss so far was NaN or infinite."""
        if self._first_bad is None:
            return
        step, value = self._first_bad.tolist()  # the host waits for the device here
        if step >= 0:
            from ftlab.errors import Diverged

            raise Diverged(f"The training loss became {value} at step {int(step)}; the run "
                           "is stopped and marked failed.",
                           "lower stage.optim.lr, use trainer.gradient_clip_val, or check the "
                           "data for empty/garbled rows.")

    def on_train_epoch_end(self) -> None:
        self.raise_if_diverged()

    def on_train_end(self) -> None:
        self.raise_if_diverged()

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: MetricCollection,
                   split: str) -> None:
        out = self.task.forward(self.model, batch)
        self.task.update(metrics, out, batch)
        self.log(f"{split}/loss", out.loss, batch_size=batch["input_ids"].shape[0],
                 sync_dist=True)  # averaged over ranks at epoch end (a no-op on one process)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        # torchmetrics already synced across ranks; sync_dist only silences Lightning's warning
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Norm clipping under FSDP goes through the sharded root module (the norm of the whole
        model, not of one shard); Lightning's FSDP precision plugin refuses it."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.model if self._trainer is not None else None
        if (isinstance(root, FullyShardedDataParallel) and gradient_clip_val
                and gradient_clip_algorithm in (None, "norm")):
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        from dataclasses import replace

        from ftlab.runtime import scaled_lr

        optim, trainer = self.optim, self.trainer
        rows = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule else None
        if optim.lr_scaling != "none" and rows:  # the global batch: devices x accumulation
            batch = rows * trainer.world_size * trainer.accumulate_grad_batches
            optim = replace(optim, lr=scaled_lr(optim.lr, optim.lr_scaling, batch,
                                                optim.reference_batch))
        self.applied_lr = optim.lr
        opt, sched = build_optimizer(self.model, optim, int(trainer.estimated_stepping_batches),
                                     ndims=self.param_ndims)
        return {"optimizer": opt, "lr_scheduler": sched}
