"""No regulariser: the task loss as is."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NoRegularizer:
    name = "none"

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], task: Any
    ) -> tuple[torch.Tensor, Any]:
        return task.forward(model, batch)
