"""Snapshot ensembles (Huang et al. 2017) of the *trainable* parameters: a cyclic cosine
learning rate, a snapshot at each cycle's end, their averaged predictions scored at test time.
Cheap with PEFT: a snapshot is the small artefact."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import lightning as L
import torch

from ftlab.averaging import trainable
from ftlab.rules import at_least
from ftlab.store import save_tensors
from ftlab.strategies import HoldsShards
from ftlab.tasks.base import TaskOutput


class SnapshotEnsemble(HoldsShards, L.Callback):
    """Cyclic cosine learning rate with ``cycles`` restarts (Huang et al. 2017); the trainable
    state at each cycle's end is a snapshot (kept in memory and written to
    ``<stage>/snapshots/cycle<i>.safetensors``). At test time the snapshots' averaged softmax
    is scored as ``test/ensemble_acc`` (a multi-task stage: ``test/<task>/ensemble_acc`` for
    each sub-task with an accuracy, and ``test/mean/ensemble_acc`` when they all have one).

    Args:
        cycles: number of cosine cycles (= snapshots) over the whole training run.
    """

    def __init__(self, cycles: Annotated[int, at_least(1, example="3")] = 3) -> None:
        self.cycles = cycles
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.base_lrs: list[float] = []

    def follows_length(self) -> bool:
        return True  # ftlab.callbacks.FollowsLength: the cycles divide the planned steps

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
        length, step = self._cycle_len(trainer), trainer.global_step
        # steps left over after the last cycle (the cycles do not divide the steps) stay at
        # its end LR, 0: training ends on the last snapshot, not a restart at the peak
        t = (step % length) / length if step < self.cycles * length else 1.0
        for group, base in zip(opt.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * t))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        length, step = self._cycle_len(trainer), trainer.global_step
        # once per cycle end (accumulating micro-batches share a step; step 0 is no cycle's)
        if step % length == 0 and len(self.snapshots) < min(self.cycles, step // length):
            state = {n: p.detach().clone() for n, p in trainable(pl_module).items()}
            self.snapshots.append(state)
            save_tensors(Path(trainer.default_root_dir) / "snapshots" /
                         f"cycle{len(self.snapshots)}.safetensors", state)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the task's own metrics score the ensemble as they score the model (its targets:
        # class ids, soft labels, token tags without sub-words, text-to-text class ids)
        self.metrics = pl_module.task.metrics().to(pl_module.device)
        # the accuracies scored: ``acc``, or each sub-task's ``<task>/acc`` (multi-task stage)
        self.scored = {k.rpartition("/")[0] for k in self.metrics.keys(keep_base=True)
                       if k == "acc" or k.endswith("/acc")}
        self.seen = 0

    @torch.no_grad()
    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                          batch: dict[str, torch.Tensor], *args) -> None:
        part = batch.get("task", "")  # a multi-task stage's batch is one sub-task's
        if not self.snapshots or part not in self.scored:  # no accuracy (LM, regression)
            return
        params = trainable(pl_module)
        current = {n: p.detach().clone() for n, p in params.items()}
        logits = []
        for snap in self.snapshots:
            for n, p in params.items():
                p.copy_(snap[n])
            logits.append(pl_module.task.forward(pl_module.model, batch).logits)
        for n, p in params.items():
            p.copy_(current[n])
        if logits[0] is None:  # a task without class scores
            return
        probs = sum(x.float().softmax(-1) for x in logits)
        pl_module.task.update(self.metrics, TaskOutput(None, probs, {}), batch)
        self.seen += 1

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scores = self.metrics.compute() if self.seen else {}
        for key, value in scores.items():  # test/ensemble_acc; test/<task>/ensemble_acc
            if key == "acc" or key.endswith("/acc"):
                pl_module.log(f"test/{key[:-3]}ensemble_acc", float(value))
