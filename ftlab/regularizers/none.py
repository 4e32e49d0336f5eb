"""No regulariser: the task loss as is."""

from __future__ import annotations

import torch
from torch import nn

from ftlab.tasks.base import Task, TaskOutput


class NoRegularizer:
    name = "none"

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], task: Task
    ) -> TaskOutput:
        return task.forward(model, batch)
