"""The LightningModule: a task, a (PEFT-prepared) model, a regulariser and an optimiser."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection

from ftlab.optim import OptimSpec, build_optimizer
from ftlab.peft.base import Penalized
from ftlab.regularizers.base import Regularizer
from ftlab.tasks.base import Task


class FineTuneModule(L.LightningModule):
    """Training/validation/test steps shared by every stage; the task supplies the rest."""

    def __init__(self, model: nn.Module, task: Task, regularizer: Regularizer,
                 optim: OptimSpec) -> None:
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

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.regularizer.training_loss(self.model, batch, self.task)
        loss, rows = out.loss, batch["input_ids"].shape[0]
        for key, value in out.extras.items():  # the regulariser's own terms (train/r3f_kl...)
            if key.startswith(f"{self.regularizer.name}_"):
                self.log(f"train/{key}", value, batch_size=rows)
        if isinstance(self.model, Penalized):  # a PEFT wrapper's penalty (diff pruning's L0)
            loss = loss + self.model.extra_loss()
        if not torch.isfinite(loss):
            from ftlab.errors import Diverged

            raise Diverged(f"The training loss became {loss.item()} at step "
                             f"{self.global_step}; the run is stopped and marked failed.",
                             "lower stage.optim.lr, use trainer.gradient_clip_val, or check the "
                             "data for empty/garbled rows.")
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        return loss

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
        opt, sched = build_optimizer(self.model, self.optim,
                                     int(self.trainer.estimated_stepping_batches),
                                     ndims=self.param_ndims)
        return {"optimizer": opt, "lr_scheduler": sched}
