"""ftlab's own Lightning callbacks."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning as L
import torch

from ftlab.flops import FlopRule
from ftlab.peft.base import FollowsSteps, PeftMethod
from ftlab.strategies import full_weights


@runtime_checkable
class GatesSelection(Protocol):
    """A callback that says which validations KeepBest may pick (``ftlab.averaging.SWA``:
    only those run on the weight average, not the raw weights before it began). The model has
    its own say too: a ``FollowsSteps`` PEFT model only once ``settled()``."""

    def selectable(self, trainer: L.Trainer) -> bool: ...


@runtime_checkable
class FollowsLength(Protocol):
    """A callback scheduled by fractions of the stage's *planned* optimiser steps (SWA's
    ``start``, snapshot cycles, early discard's ``at``, an EMA ``start`` > 0). The adaptive
    budget's early stopping would end the stage before those points and the callback would
    silently do nothing, so a stage with one trains its planned length (``ftlab/stage.py``)."""

    def follows_length(self) -> bool: ...


class KeepBest(L.Callback):
    """Keep an in-memory copy of the trainable state at the best validation score.

    Cheaper than checkpoint files (PEFT states are small) and restores with
    ``restore(pl_module)`` after fit.
    """

    def __init__(self, peft: PeftMethod, monitor: str, mode: str = "max") -> None:
        self.peft, self.monitor, self.mode = peft, monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None
        self.metrics: dict[str, float] = {}  # every val/* metric at the best epoch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        if not all(c.selectable(trainer) for c in trainer.callbacks
                   if isinstance(c, GatesSelection)):
            return
        model = getattr(pl_module, "model", None)  # a pruning model not yet in its final form
        if isinstance(model, FollowsSteps) and not model.settled():
            return
        score = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (score > self.best if self.mode == "max"
                                       else score < self.best)
        if better:
            self.best, self.best_epoch = score, trainer.current_epoch
            self.metrics = {k[4:]: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith("val/")}
            with full_weights(trainer):  # FSDP: the whole tensors, not this rank's shard
                state = self.peft.trainable_state(pl_module.model)
                self.state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def state_dict(self) -> dict:
        """The best score, epoch, metrics and trainable state so far (saved in checkpoints)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "metrics": self.metrics,
                "state": self.state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_epoch = state_dict["best"], state_dict["best_epoch"]
        self.metrics, self.state = state_dict["metrics"], state_dict["state"]

    def restore(self, pl_module: L.LightningModule) -> None:
        if self.state is not None:
            with full_weights(pl_module._trainer, writeback=True):
                self.peft.load_trainable_state(pl_module.model, self.state)


def check_unfreeze_epochs(epochs: int | None, key: str = "stage",
                          where: str = "the stage") -> None:
    """``gradual_unfreeze`` unfreezes one layer group per epoch: a stage of one epoch would
    train only the top group (heads, pooler), the whole backbone frozen. ``epochs``: the most
    the stage may train (None: not known yet)."""
    from ftlab.errors import FtlabError

    if epochs is not None and 0 < epochs <= 1:
        raise FtlabError(
            f"{where}: optim.gradual_unfreeze unfreezes one more layer group per epoch, and the "
            "stage trains 1 epoch: only its top group (heads, pooler) would learn, the "
            "backbone would stay as it was.",
            f"train more epochs ({key}.trainer.max_epochs=N: epoch e trains the top e+1 "
            f"groups; a 12-layer model has 14), or set {key}.optim.gradual_unfreeze=false "
            f"(to train the head alone first within the epoch: {key}.head_warmup_steps=0.1).")


def most_epochs(trainer: dict, budget: object | None) -> int | None:
    """The most epochs a stage's trainer node (with its adaptive ``budget``, a
    ``BudgetSpec``, or None) lets it train (``max_steps`` may stop it sooner, never later);
    None when steps alone decide it (``max_epochs=-1``)."""
    if trainer.get("fast_dev_run"):
        return None
    epochs = trainer.get("max_epochs")
    if not isinstance(epochs, int) or epochs < 1:
        return None
    return max(epochs, getattr(budget, "max_epochs", 0))


class GradualUnfreeze(L.Callback):
    """ULMFiT's gradual unfreezing: in epoch ``e`` only the top ``e + 1`` layer groups learn
    (epoch 0: heads and pooler; then one more transformer layer each epoch; embeddings last).

    Lower groups get their gradients dropped before the optimiser step rather than
    ``requires_grad`` switched off, so the trainable state (artefact, best-epoch copy) stays
    the same set of parameters throughout. A stage of one epoch is refused (only the top group
    would learn); one of fewer epochs than groups warns which groups never learn.
    """

    def __init__(self, key: str = "stage", where: str = "the stage") -> None:
        self.key, self.where = key, where

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import logging
        import math

        from ftlab.optim import layer_depths

        self.depth, self.top = layer_depths(pl_module.model)
        self.params = dict(pl_module.model.named_parameters())
        if trainer.fast_dev_run:
            return
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or not batches:  # an iterable without a length
            return
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        epochs = math.ceil(int(trainer.estimated_stepping_batches) / per_epoch)
        check_unfreeze_epochs(epochs, self.key, self.where)
        if epochs < self.top + 1:
            logging.getLogger(__name__).warning(
                "%s: gradual_unfreeze over %d epochs unfreezes the top %d of %d layer groups; "
                "the lowest %d (the embeddings first) never learn (%s.trainer.max_epochs=%d "
                "reaches them all).", self.where, epochs, epochs, self.top + 1,
                self.top + 1 - epochs, self.key, self.top + 1)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lowest = self.top - trainer.current_epoch  # groups at or above this depth learn
        for name, p in self.params.items():
            if self.depth[name] < lowest and p.grad is not None:
                p.grad = None


class HeadWarmup(L.Callback):
    """LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): for the first
    ``steps`` optimiser steps only the head learns (``ftlab.model.arch.head_parameters``: the
    parameters outside the backbone, untied; a fresh MLM head's transform and bias, not its
    decoder tied to the word embeddings); from then on every parameter the PEFT method made
    trainable.

    As in :class:`GradualUnfreeze`, the others' gradients are dropped before the optimiser step
    (AdamW skips a parameter without a gradient: no update, no weight decay) instead of
    ``requires_grad`` being switched off, so the trainable state and artefact stay the same set.
    Whether a step warms up follows from ``trainer.global_step`` alone, so a run resumed past
    ``steps`` does not freeze again. One LR schedule spans all steps (warm-up steps included);
    the paper's separate LP learning rate is not modelled.
    """

    def __init__(self, steps: float, where: str = "the stage") -> None:
        """``steps``: optimiser steps (>= 1), or below 1 the share of the stage's steps."""
        self.given, self.where = steps, where
        self.steps = int(steps) if steps >= 1 else 0
        self.others: list[torch.nn.Parameter] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ftlab.errors import FtlabError
        from ftlab.model.arch import head_parameters

        total = int(trainer.estimated_stepping_batches)
        if self.given < 1:
            self.steps = int(self.given * total)
        elif self.steps >= total and not trainer.fast_dev_run:
            raise FtlabError(
                f"{self.where}: head_warmup_steps={self.steps} is not below its {total} "
                "optimiser steps, so only the head would ever train.",
                f"lower head_warmup_steps below {total} (stage.head_warmup_steps=..., or "
                "pipeline.stages.<name>.head_warmup_steps=...), or train for longer "
                "(trainer.max_steps / max_epochs); a share below 1 (0.1) scales with the "
                "budget; 0 turns the warm-up off.")
        if not self.steps:  # a share of a short stage: no step to warm up
            self.others = []
            return
        model = pl_module.model
        head = {id(p) for p in head_parameters(model)}
        if not any(p.requires_grad for p in model.parameters() if id(p) in head):
            raise FtlabError(
                f"{self.where}: head_warmup_steps={self.steps}, but the model has no trainable "
                "head (its PEFT method freezes it, or the head is tied to the embeddings).",
                "set head_warmup_steps=0 for this stage, or use a PEFT method that trains "
                "the head (full, LoRA with a classification head...).")
        self.others = [p for p in model.parameters() if p.requires_grad and id(p) not in head]

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step >= self.steps:  # completed optimiser steps: resume-safe
            return
        for p in self.others:
            p.grad = None


class NoteStep(L.Callback):
    """On a stop by signal (``ftlab.status.Stopped``) inside the Trainer, note the global step
    on the exception so that ``metrics.json`` records where the stage stopped."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        from ftlab.status import Stopped

        if isinstance(exception, Stopped) and exception.step is None:
            exception.step = trainer.global_step


class Throughput(L.Callback):
    """Training rows and tokens (padded, as computed) per second of training time: each
    epoch's wall time without its validation. The device is synchronised only at those
    boundaries (a few times per epoch), so the steps run as they would without it. With the
    model's ``FlopRule`` (ftlab.flops) it also counts model FLOPs per second, for MFU."""

    def __init__(self, flops: FlopRule | None = None) -> None:
        self.rows = self.tokens = 0
        self.flops, self.rule = 0.0, flops
        self.seconds = 0.0
        self._start: float | None = None

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        import time

        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def _pause(self, pl_module: L.LightningModule) -> None:
        if self._start is not None:
            self.seconds += self._now(pl_module) - self._start
            self._start = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = batch["input_ids"]
        self.rows, self.tokens = self.rows + ids.shape[0], self.tokens + ids.numel()
        if self.rule is not None and ids.dim() == 2:
            self.flops += self.rule.per_batch(*ids.shape)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":  # validation inside fit: training resumes after it
            self._start = self._now(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause(pl_module)  # max_steps may end an epoch early

    def summary(self) -> dict[str, float]:
        if not self.seconds:
            return {}
        return {"train_seconds": round(self.seconds, 2),
                "train_samples_per_s": round(self.rows / self.seconds, 1),
                "train_tokens_per_s": round(self.tokens / self.seconds, 1),
                **({"train_model_flops_per_s": float(f"{self.flops / self.seconds:.4g}")}
                   if self.flops else {})}
