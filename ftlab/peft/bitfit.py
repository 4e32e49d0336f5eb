"""BitFit (Ben-Zaken et al. 2022): only the bias terms of the backbone train, plus the head."""

from __future__ import annotations

from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import ARCHS, arch_of, backbone_modules
from ftlab.peft.base import RequiresGradState
from ftlab.peft.layers import freeze, head_parameters, top_layer_ops, unfreeze


class BitFit(RequiresGradState):
    name = "bitfit"

    def __init__(self, drop_top: int = 0, reinit_top: int = 0) -> None:
        self.drop_top, self.reinit_top = drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        biases = [p for m in backbone_modules(model) for n, p in m.named_parameters()
                  if n.endswith(".bias") and "norm" not in n.lower()]
        if not biases:
            with_bias = sorted({a.family for a in ARCHS.values() if a.biases})
            raise FtlabError(f"BitFit trains bias terms, and a {arch_of(model).family} model "
                             "has none in its linear layers.",
                             f"use a family with biases ({', '.join(with_bias)}), or another "
                             "method for this model (peft=lora or peft=ia3).")
        fresh = top_layer_ops(model, self.drop_top, self.reinit_top)
        freeze(model)
        unfreeze([p for m in backbone_modules(model) for n, p in m.named_parameters()
                  if n.endswith(".bias")])
        unfreeze(head_parameters(model))
        unfreeze(fresh)
        return model

    def merged(self, model: nn.Module) -> nn.Module:
        """Already a plain Transformers model (only which parameters trained differs)."""
        return model
