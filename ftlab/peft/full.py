"""Full fine-tuning: every parameter trains; the artefact is the whole model."""

from __future__ import annotations

from torch import nn

from ftlab.peft.base import RequiresGradState
from ftlab.peft.layers import top_layer_ops


class Full(RequiresGradState):
    name = "full"

    def __init__(self, drop_top: int = 0, reinit_top: int = 0) -> None:
        self.drop_top, self.reinit_top = drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        top_layer_ops(model, self.drop_top, self.reinit_top)
        model.requires_grad_(True)
        return model

    def merged(self, model: nn.Module) -> nn.Module:
        """Already a plain Transformers model (only which parameters trained differs)."""
        return model
