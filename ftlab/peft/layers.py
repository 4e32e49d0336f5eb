"""Shared by every PEFT method: finding encoder layers and the head, freezing, and the two
layer operations any method accepts (``drop_top``, ``reinit_top``).

Every method's constructor takes ``drop_top`` and ``reinit_top`` (default 0) and calls
``top_layer_ops`` first in ``apply`` and ``unfreeze`` on what it returns last, so
``peft=<any> +peft.reinit_top=2`` works with no wrapper method.
"""

from __future__ import annotations

import torch
from torch import nn

from ftlab.errors import FtlabError

#: model families whose encoder layers ftlab's layer-wise methods know how to find
SUPPORTED = "BERT, RoBERTa, XLM-R, ELECTRA, MiniLM (BERT-style `encoder.layer`)"


def base_model(model: nn.Module) -> nn.Module:
    """The backbone of a ``*For...`` model (``model.bert``), or the model itself."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers (``encoder.layer`` in BERT-style models)."""
    encoder = getattr(base_model(model), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise FtlabError(f"Found no encoder layers (encoder.layer) in a '{kind}' model.",
                         f"use a model of a supported family: {SUPPORTED}; or peft=full/lora.")
    return layers


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside the backbone: the task head (classifier)."""
    backbone = {id(p) for p in base_model(model).parameters()}
    if base_model(model) is model:
        return []
    return [p for p in model.parameters() if id(p) not in backbone]


def freeze(model: nn.Module) -> None:
    model.requires_grad_(False)


def unfreeze(params: list[nn.Parameter] | nn.Module) -> None:
    for p in params.parameters() if isinstance(params, nn.Module) else params:
        p.requires_grad_(True)


def top_layer_ops(model: nn.Module, drop_top: int = 0, reinit_top: int = 0) -> list[nn.Parameter]:
    """Drop the top ``drop_top`` layers (Chung et al. 2021), then re-initialise the new top
    ``reinit_top`` layers and the pooler (Zhang et al. 2021).

    Returns the re-initialised parameters: they must train (and be saved) in any method, since
    their random start cannot be rebuilt from the pre-trained checkpoint.
    """
    if not drop_top and not reinit_top:
        return []
    layers = encoder_layers(model)
    if drop_top + reinit_top > len(layers) or min(drop_top, reinit_top) < 0:
        raise FtlabError(f"drop_top={drop_top} + reinit_top={reinit_top} does not fit a model "
                         f"with {len(layers)} layers.", "choose smaller values.")
    for _ in range(drop_top):
        del layers[len(layers) - 1]
    if hasattr(model, "config"):
        model.config.num_hidden_layers = len(layers)
    modules = list(layers[len(layers) - reinit_top:]) if reinit_top else []
    pooler = getattr(base_model(model), "pooler", None)
    if reinit_top and pooler is not None:
        modules.append(pooler)
    init = getattr(model, "_init_weights", None)
    params: list[nn.Parameter] = []
    for module in modules:
        for sub in module.modules():
            if init is not None:
                init(sub)
            elif hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        params += list(module.parameters())
    return params


def trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)


def same_device(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(device=like.device, dtype=like.dtype)
