"""The Regularizer protocol."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Regularizer(Protocol):
    """Changes the training loss (adversarial/smoothness terms) or the model (Mixout).

    ``apply`` runs once after the PEFT method; ``training_loss`` replaces the plain
    ``task.forward`` loss in training steps (evaluation always uses the plain forward).
    """

    name: str

    def apply(self, model: nn.Module) -> nn.Module: ...

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], task: Any
    ) -> tuple[torch.Tensor, Any]: ...
