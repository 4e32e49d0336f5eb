"""The LightningModule: a task, a (PEFT-prepared) model, a regulariser and an optimiser."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection

from ftlab.errors import FtlabError
from ftlab.optim import OptimSpec, build_optimizer, fuses
from ftlab.peft.base import FollowsSteps, Penalized
from ftlab.regularizers.base import KeepsState, Regularizer
from ftlab.tasks.base import Task, TaskOutput


class FineTuneModule(L.LightningModule):
    """Training/validation/test steps shared by every stage; the task supplies the rest."""

    def __init__(self, model: nn.Module, task: Task, regularizer: Regularizer,
                 optim: OptimSpec, check_finite_every: int = 1, cudagraphs: bool = False) -> None:
        """``check_finite_every``: look at the device-side divergence record every this many
        training steps (and at every epoch's end); each look makes the host wait for the GPU.
        ``cudagraphs``: the model is compiled with CUDA graphs (``compile: reduce-overhead``);
        every step is then marked as a new iteration of the graph trees (an evaluation step has
        no backward to end one). What CUDA graphs need besides: ftlab/compiling.py."""
        super().__init__()
        self.model = model.train()  # HF loads in eval mode; Lightning keeps modes as found
        # once, not per step: isinstance against a runtime Protocol looks its methods up
        self._penalized = isinstance(model, Penalized)
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
        self._recent: list[tuple[int, torch.Tensor]] = []  # (global step, loss) since a look
        self._first_bad: tuple[int, float] | None = None  # the first NaN/inf loss seen
        self._step_terms: dict[str, torch.Tensor] = {}  # this step's train/* values to log
        self._step_rows = 0
        self._fsdp_root: bool | None = None  # whether the Trainer's model is an FSDP root
        self.applied_lr: float | None = None  # the peak LR after optim.lr_scaling
        self._total_steps = 0  # the stage's optimiser steps, for FollowsSteps models
        self.cudagraphs = cudagraphs

    def on_train_start(self) -> None:
        self._total_steps = int(self.trainer.estimated_stepping_batches)

    def _mark_step(self) -> None:
        if self.cudagraphs:  # one iteration of the CUDA graph trees per step
            torch.compiler.cudagraph_mark_step_begin()

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._mark_step()
        if isinstance(self.model, FollowsSteps):  # movement/diff pruning schedules
            self.model.at_step(self.trainer.global_step, self._total_steps)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.regularizer.training_loss(self.model, batch, self.task)
        if not isinstance(out, TaskOutput):  # a regulariser of your own
            raise FtlabError(f"regularizer={self.regularizer.name}: training_loss returned a "
                             f"{type(out).__name__}, not a TaskOutput.",
                             "return ftlab.tasks.base.TaskOutput(loss, logits, extras), e.g. "
                             "TaskOutput(out.loss + term, out.logits, out.extras) from "
                             "out = task.forward(model, batch).")
        if not out.loss.requires_grad:  # torch would say "element 0 of tensors does not..."
            raise self._no_gradient()
        loss, rows = out.loss, batch["input_ids"].shape[0]
        # the regulariser's own terms (train/r3f_kl...)
        terms = {f"train/{k}": v.detach() for k, v in out.extras.items()
                 if k.startswith(f"{self.regularizer.name}_")} if out.extras else {}
        if self._penalized:  # a PEFT wrapper's penalty (diff pruning's L0)
            loss = loss + self.model.extra_loss()
        terms["train/loss"] = loss.detach()
        # the progress bar reads its values as numbers every step (a host sync): it shows the
        # loss only where the loss is checked every step anyway (trainer=cpu), and then it is
        # logged here, before the bar's hook; otherwise in on_train_batch_end, on the steps
        # Lightning writes to the loggers only (each self.log is ~10 tensor ops and dict work)
        self._step_terms, self._step_rows = terms, rows
        if self.check_finite_every == 1:
            self._log_terms(prog_bar=True)
        self._record_finite(terms["train/loss"])
        return loss

    def _no_gradient(self) -> FtlabError:
        """The training loss has no gradient: the regulariser's doing where it is yours, else
        the task's (ftlab's regularisers pass on ``task.forward``'s loss)."""
        if not type(self.regularizer).__module__.startswith("ftlab."):
            return FtlabError(f"regularizer={self.regularizer.name}: the loss training_loss "
                              "returned has no gradient (detached, or computed under "
                              "torch.no_grad).", "build it from task.forward(model, batch).loss "
                              "without .detach()/.item(); detach only the extras you log.")
        task = f"{type(self.task).__module__}.{type(self.task).__qualname__}"
        return FtlabError(f"The loss {task}.forward returned has no gradient (detached, "
                          "computed under torch.no_grad, or from no parameter that trains).",
                          "compute it from the model's output without .detach()/.item() or "
                          "torch.no_grad (detach only the extras you log); a PEFT method of "
                          "your own must leave trainable parameters that the forward uses.")

    def _log_terms(self, prog_bar: bool = False) -> None:
        for key, value in self._step_terms.items():
            self.log(key, value, prog_bar=prog_bar and key == "train/loss",
                     batch_size=self._step_rows)
        self._step_terms = {}

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Log the step's terms when Lightning writes this step's metrics (every
        ``log_every_n_steps``, or when the run stops): the logged rows stay the same as logging
        every step, since a step-level value is written only on those steps. This hook runs
        after the callbacks' and before Lightning's step logging."""
        trainer = self.trainer
        if self._step_terms and (trainer._logger_connector.should_update_logs
                                 or trainer.fast_dev_run):
            self._log_terms()

    def _record_finite(self, loss: torch.Tensor) -> None:
        """Keep a copy of the step's loss on the device (no host sync; one copy, where the
        running NaN/inf record took ~12 tensor ops a step); look at the kept losses every
        ``check_finite_every`` steps. A copy, not the loss: under CUDA graphs
        (``compile: reduce-overhead``) the next step's replay overwrites the graph's outputs."""
        self._recent.append((self.global_step, loss.clone()))
        self._steps_seen += 1
        if self._steps_seen % self.check_finite_every == 0:
            self.raise_if_diverged()

    def raise_if_diverged(self) -> None:
        """Stop the run if any training loss so far was NaN or infinite (the first one is
        reported, with its global step)."""
        if self._recent:
            steps, losses = zip(*self._recent, strict=True)
            self._recent = []
            values = torch.stack([v.float() for v in losses])
            bad = ~torch.isfinite(values)
            if bad.any():  # the host waits for the device here
                first = int(bad.nonzero()[0, 0])
                self._first_bad = (steps[first], float(values[first]))
        if self._first_bad is not None:
            from ftlab.errors import Diverged

            step, value = self._first_bad
            raise Diverged(f"The training loss became {value} at step {int(step)}; the run "
                           "is stopped and marked failed.",
                           "lower stage.optim.lr, use trainer.gradient_clip_val, or check the "
                           "data for empty/garbled rows.")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if isinstance(self.regularizer, KeepsState):  # SMART's teacher
            checkpoint["regularizer"] = self.regularizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if isinstance(self.regularizer, KeepsState) and "regularizer" in checkpoint:
            self.regularizer.load_state_dict(checkpoint["regularizer"])

    def on_fit_start(self) -> None:
        self._fsdp_root = None  # a new fit may wrap the model differently

    def on_train_epoch_end(self) -> None:
        self.raise_if_diverged()

    def on_train_end(self) -> None:
        self.raise_if_diverged()

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: MetricCollection,
                   split: str) -> None:
        self._mark_step()
        out = self.task.forward(self.model, batch)
        self.task.update(metrics, out, batch)
        # a loss that is a mean over predicted tokens (MLM/CLM: extras["count"]) is weighted by
        # them, so val/loss is the split's mean token NLL (ln val/ppl), not a mean of batch means
        weight = (max(int(out.extras["count"]), 1) if getattr(self.task, "token_loss", False)
                  else batch["input_ids"].shape[0])
        self.log(f"{split}/loss", out.loss, batch_size=weight,
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

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step; after a fused AdamW step, the parameters' version counters are
        bumped as every other in-place update bumps them (torch's fused kernel leaves them
        as they were): SMART's momentum teacher and cloze calibration's p_cf tell changed
        weights by them."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner.defaults.get("fused"):
            from torch.autograd.graph import increment_version

            increment_version([p for group in inner.param_groups for p in group["params"]])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Norm clipping under FSDP goes through the sharded root module (the norm of the whole
        model, not of one shard); Lightning's FSDP precision plugin refuses it."""
        if self._fsdp_root is None:  # once per fit (the model is wrapped before the steps)
            from torch.distributed.fsdp import FullyShardedDataParallel

            root = self.trainer.model if self._trainer is not None else None
            self._fsdp_root = isinstance(root, FullyShardedDataParallel)
        if self._fsdp_root and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
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
        from lightning.pytorch.strategies import FSDPStrategy

        fused = fuses(str(trainer.precision), self.device.type,
                      isinstance(trainer.strategy, FSDPStrategy))
        opt, sched = build_optimizer(self.model, optim, int(trainer.estimated_stepping_batches),
                                     ndims=self.param_ndims, fused=fused)
        return {"optimizer": opt, "lr_scheduler": sched}
