"""Feature extraction / partial fine-tuning: only the head (plus the top ``top_k`` layers of
the stack nearest the head; T5: the decoder's) trains; everything below stays frozen."""

from __future__ import annotations

from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import unwrap
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
        layers = top_stack(model)
        if not 0 <= self.top_k <= len(layers):
            raise FtlabError(f"last_layer's top_k={self.top_k} is not a layer count of a "
                             f"stack of {len(layers)} layers.",
                             f"use peft.top_k between 0 (head only) and {len(layers)} (every "
                             "layer of the stack).")
        for layer in layers[len(layers) - self.top_k:] if self.top_k else []:
            unfreeze(layer)
        unfreeze(fresh)
        if not any(p.requires_grad for p in model.parameters()):
            raise FtlabError(
                f"peft=last_layer with top_k=0 trains the head only, and this "
                f"{type(unwrap(model)).__name__} has no head of its own: its LM head shares "
                "its weights with the input embeddings (part of the frozen backbone), so "
                "nothing would train.",
                "set peft.top_k=1 (or more) to train the top layers too, or use a method that "
                "adds parameters (peft=lora, ia3, adapter_houlsby) for a stage that predicts "
                "tokens with the LM head (stage=clm, text2text, cloze on a decoder).")
        return model

    def merged(self, model: nn.Module) -> nn.Module:
        """Already a plain Transformers model (only which parameters trained differs)."""
        return model
