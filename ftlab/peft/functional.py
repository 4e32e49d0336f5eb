"""A wrapper for methods that re-parametrise frozen weights (diff pruning, intrinsic
dimension, movement pruning): the original model stays untouched and frozen; each forward
runs it with ``torch.func.functional_call`` on the weights the method computes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call


class Reparametrized(nn.Module):
    """``forward`` = the wrapped model with ``self.weights()`` swapped in for ``self.names``."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def originals(self) -> list[torch.Tensor]:
        own = dict(self.model.named_parameters())
        return [own[n] for n in self.names]

    def weights(self) -> dict[str, torch.Tensor]:  # overridden
        return {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.weights(), args, kwargs, strict=False)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)


def materialize(wrapper: Reparametrized) -> nn.Module:
    """The wrapped model with the computed weights written into it (a plain model again)."""
    with torch.no_grad():
        own = dict(wrapper.model.named_parameters())
        for name, value in wrapper.weights().items():
            own[name].copy_(value)
    return wrapper.model


def dense_state(wrapper: nn.Module, skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Trainable tensors of ``wrapper`` whose names do not start with one of ``skip``."""
    return {n: p.detach() for n, p in wrapper.named_parameters()
            if p.requires_grad and not n.startswith(skip)}
