"""Weight averaging (EMA, SWA) and snapshot ensembles of the *trainable* parameters.

Cheap with PEFT: only the trainable tensors are averaged or snapshotted (for LoRA a few KB).
Both work with any ``peft=`` option: they use the parameters with ``requires_grad``.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from ftlab.store import save_tensors


def _trainable(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}


class WeightAverage(L.Callback):
    """EMA (``decay`` set) or SWA (``decay`` null: running mean from ``start`` of training).

    Validation and test run on the averaged weights (swapped in place, so KeepBest keeps the
    averaged state); training resumes on the raw weights.

    Args:
        decay: EMA decay per optimiser step; null = equal-weight average (SWA).
        start: fraction of training steps after which averaging starts (before it the average
            follows the raw weights).
    """

    def __init__(self, decay: float | None = 0.999, start: float = 0.0) -> None:
        self.decay, self.start = decay, start
        self.shadow: dict[str, torch.Tensor] = {}
        self.backup: dict[str, torch.Tensor] | None = None
        self.count = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.shadow:  # a resumed stage has its average back from the checkpoint
            self.shadow = {n: p.detach().clone() for n, p in _trainable(pl_module).items()}

    def state_dict(self) -> dict:
        """The average, the step count and (between validation and the next training step)
        the raw weights it stands in for: saved in checkpoints."""
        return {"shadow": self.shadow, "backup": self.backup, "count": self.count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.shadow, self.backup = state_dict["shadow"], state_dict["backup"]
        self.count = state_dict["count"]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        params = _trainable(pl_module)
        if trainer.global_step < self.start * trainer.estimated_stepping_batches:
            for n, p in params.items():
                self.shadow[n].copy_(p)
            return
        self.count += 1
        weight = 1.0 / self.count if self.decay is None else 1.0 - self.decay
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach(), weight)

    @torch.no_grad()
    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if self.backup is None and self.shadow:
            params = _trainable(pl_module)
            self.backup = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.copy_(self.shadow[n])

    @torch.no_grad()
    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self.backup is not None:
            for n, p in _trainable(pl_module).items():
                p.copy_(self.backup[n])
            self.backup = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             *args) -> None:
        self._swap_out(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)  # the model leaves fit with the averaged weights


class SnapshotEnsemble(L.Callback):
    """Cyclic cosine learning rate with ``cycles`` restarts (Huang et al. 2017); the trainable
    state at each cycle's end is a snapshot (kept in memory and written to
    ``<stage>/snapshots/cycle<i>.safetensors``). At test time the snapshots' averaged softmax
    is scored as ``test/ensemble_acc``.

    Args:
        cycles: number of cosine cycles (= snapshots) over the whole training run.
    """

    def __init__(self, cycles: int = 3) -> None:
        self.cycles = cycles
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.base_lrs: list[float] = []

    def state_dict(self) -> dict:
        return {"snapshots": self.snapshots, "base_lrs": self.base_lrs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.snapshots, self.base_lrs = state_dict["snapshots"], state_dict["base_lrs"]

    def _cycle_len(self, trainer: L.Trainer) -> int:
        return max(1, int(trainer.estimated_stepping_batches) // self.cycles)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             *args) -> None:
        opt = trainer.optimizers[0]
        if not self.base_lrs:
            self.base_lrs = [g.get("initial_lr", g["lr"]) for g in opt.param_groups]
        length = self._cycle_len(trainer)
        t = (trainer.global_step % length) / length
        for group, base in zip(opt.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * t))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        length = self._cycle_len(trainer)
        if trainer.global_step % length == 0 and len(self.snapshots) < self.cycles:
            state = {n: p.detach().clone() for n, p in _trainable(pl_module).items()}
            self.snapshots.append(state)
            save_tensors(Path(trainer.default_root_dir) / "snapshots" /
                         f"cycle{len(self.snapshots)}.safetensors", state)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.correct, self.seen = 0, 0

    @torch.no_grad()
    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                          batch: dict[str, torch.Tensor], *args) -> None:
        if not self.snapshots:
            return
        params = _trainable(pl_module)
        current = {n: p.detach().clone() for n, p in params.items()}
        logits = []
        for snap in self.snapshots:
            for n, p in params.items():
                p.copy_(snap[n])
            logits.append(pl_module.task.forward(pl_module.model, batch).logits)
        for n, p in params.items():
            p.copy_(current[n])
        if logits[0] is None:  # a task without class scores (masked LM): nothing to ensemble
            return
        probs = sum(x.float().softmax(-1) for x in logits)
        target = batch["labels"]
        target = target.argmax(-1) if target.is_floating_point() else target  # soft labels
        self.correct += int((probs.argmax(-1) == target).sum())
        self.seen += int(target.numel())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.seen:
            pl_module.log("test/ensemble_acc", self.correct / self.seen)
