"""The Regularizer protocol."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ftlab.tasks.base import Task, TaskOutput


class Regularizer(Protocol):
    """Changes the training loss (adversarial/smoothness terms) or the model (Mixout).

    ``apply`` runs once after the PEFT method; ``training_loss`` replaces the plain
    ``task.forward`` in training steps (evaluation always uses the plain forward). It gets the
    task's :class:`TaskOutput` (``loss``, ``logits``) from ``task.forward(model, batch)`` and
    may call it again on a perturbed batch (e.g. ``inputs_embeds`` instead of ``input_ids``:
    the model's input embeddings are ``model.get_input_embeddings()``); it returns the output
    whose ``loss`` trains. Scalars in its ``extras`` named ``<name>_...`` are logged as
    ``train/<name>_...``.

    Never call ``backward`` inside ``training_loss``: Lightning zeroes the gradients *after*
    the training step, before its own backward. A method that accumulates gradients over
    several passes returns a loss whose gradient is the accumulated one (FreeLB: the mean of
    the K losses at constant perturbations) and takes other gradients with
    ``torch.autograd.grad``; clipping, accumulation and precision then stay the Trainer's.
    """

    name: str

    def apply(self, model: nn.Module) -> nn.Module: ...

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], task: Task
    ) -> TaskOutput: ...


@runtime_checkable
class ChecksTask(Protocol):
    """A regulariser that works only with some tasks: the stage's builder asks it before
    training (and validation before anything trains)."""

    def check_task(self, task: Task) -> None:
        """Raise FtlabError naming the tasks it supports when ``task`` is not one."""


@runtime_checkable
class KeepsState(Protocol):
    """A regulariser with state that training builds up (SMART's momentum teacher): it travels
    in the stage's checkpoint, so a killed and resumed stage ends as an uninterrupted one."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
