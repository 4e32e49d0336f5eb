"""BitFit (Ben-Zaken et al. 2022): only the bias terms of the backbone train, plus the head."""

from __future__ import annotations

from torch import nn

from ftlab.peft.base import RequiresGradState
from ftlab.peft.layers import base_model, freeze, head_parameters, top_layer_ops, unfreeze


class BitFit(RequiresGradState):
    name = "bitfit"

    def __init__(self, drop_top: int = 0, reinit_top: int = 0) -> None:
        self.drop_top, self.reinit_top = drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        fresh = top_layer_ops(model, self.drop_top, self.reinit_top)
        freeze(model)
        unfreeze([p for n, p in base_model(model).named_parameters() if n.endswith(".bias")])
        unfreeze(head_parameters(model))
        unfreeze(fresh)
        return model
