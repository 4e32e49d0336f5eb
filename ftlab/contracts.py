"""What a PEFT method or regulariser of your own must give back, checked as the stage is built
(before anything trains): ``apply`` returns the model, ``trainable_state`` a dict of names to
tensors; and the hints ``require_protocol``'s message gives for a missing member."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.peft.base import PeftMethod

#: how a contributor's class gets what its Protocol asks for (``require_protocol``'s fix)
PEFT_HINT = ("subclass ftlab.peft.base.RequiresGradState for trainable_state and "
             "load_trainable_state; name is a class attribute, e.g. name = \"mymethod\"; see "
             "ftlab/peft/bitfit.py")
REGULARIZER_HINT = ("name is a class attribute, e.g. name = \"myreg\" (its logged terms are "
                    "train/<name>_...); see ftlab/regularizers/none.py")


def returned_model(model: Any, method: Any, where: str) -> nn.Module:
    """What a PEFT method's or regulariser's ``apply`` returned, which must be the model (a
    method of your own that forgot ``return model`` gave None)."""
    if not isinstance(model, nn.Module):
        cls = f"{type(method).__module__}.{type(method).__qualname__}"
        got = "None" if model is None else type(model).__name__
        raise FtlabError(f"{where}: {cls}.apply returned {got}, not the "
                         "model.", "end apply(self, model) with `return model` (or the "
                         "nn.Module that wraps it).")
    return model


def check_state(state: Any, peft: PeftMethod) -> dict[str, torch.Tensor]:
    """A PEFT method's ``trainable_state``: what ``trainable.safetensors`` holds, by name."""
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        cls = f"{type(peft).__module__}.{type(peft).__qualname__}"
        got = type(state).__name__ if not isinstance(state, dict) else "a dict of " + ", ".join(
            sorted({f"{type(k).__name__}: {type(v).__name__}" for k, v in state.items()}))
        raise FtlabError(f"peft={peft.name}: {cls}.trainable_state returned {got}, not a "
                         "dict of parameter names to tensors.",
                         "return {name: tensor} (e.g. {n: p.detach() for n, p in "
                         "model.named_parameters() if p.requires_grad}, or subclass "
                         "ftlab.peft.base.RequiresGradState).")
    return state
