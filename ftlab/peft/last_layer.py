"""Feature extraction / partial fine-tuning: only the head (plus the top ``top_k`` layers of
the stack nearest the head; T5: the decoder's) trains; everything below stays frozen."""

from __future__ import annotations

from torch import nn

from ftlab.peft.base import RequiresGradState
from ftlab.peft.layers import freeze, head_parameters, top_layer_ops, top_stack, unfreeze


class LastLayer(RequiresGradState):
    name = "last_layer"

    def __init__(self, top_k: int = 0, drop_top: int = 0, reinit_top: int = 0) -> None:
        self.top_k, self.drop_top, self.reinit_top = top_k, drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        fresh = top_layer_ops(model, self.drop_top, self.reinit_top)
        freeze(model)
        unfreeze(head_parameters(model))
        if self.top_k:
            layers = top_stack(model)
            for layer in layers[max(0, len(layers) - self.top_k):]:
                unfreeze(layer)
        unfreeze(fresh)
        return model

    def merged(self, model: nn.Module) -> nn.Module:
        """Already a plain Transformers model (only which parameters trained differs)."""
        return model
