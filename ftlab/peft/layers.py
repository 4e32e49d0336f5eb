"""Shared by every PEFT method: freezing, and the two layer operations any method accepts
(``drop_top``, ``reinit_top``). Where layers, the backbone and the head are comes from the
architecture table (``ftlab/model/arch.py``).

Every method's constructor takes ``drop_top`` and ``reinit_top`` (default 0) and calls
``top_layer_ops`` first in ``apply`` and ``unfreeze`` on what it returns last, so
``peft=<any> +peft.reinit_top=2`` works with no wrapper method.
"""

from __future__ import annotations

import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import head_parameters, pooler, top_stack, unwrap

__all__ = ["freeze", "head_parameters", "top_layer_ops", "top_stack", "unfreeze"]


def freeze(model: nn.Module) -> None:
    model.requires_grad_(False)


#: marks a parameter its checkpoint lacked, created fresh (MiniLM's MLM head): every PEFT
#: method trains it (peft's LoRA, IA3 and prompt methods would freeze it as pre-trained)
FRESH = "_ftlab_fresh"


def mark_fresh(params: list[nn.Parameter]) -> None:
    for p in params:
        setattr(p, FRESH, True)


def mark_fresh_named(model: nn.Module, names: list[str]) -> None:
    """:func:`mark_fresh` the parameters of ``model`` named ``names`` (those it has)."""
    named = dict(model.named_parameters())
    mark_fresh([named[n] for n in names if n in named])


def fresh_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters marked by :func:`mark_fresh`."""
    return [p for p in model.parameters() if getattr(p, FRESH, False)]


def unfreeze(params: list[nn.Parameter] | nn.Module) -> None:
    for p in params.parameters() if isinstance(params, nn.Module) else params:
        p.requires_grad_(True)


def _reinit(model: nn.Module, modules: list[nn.Module]) -> list[nn.Parameter]:
    init = getattr(unwrap(model), "_init_weights", None)
    params: list[nn.Parameter] = []
    for module in modules:
        for sub in module.modules():
            for p in sub.parameters(recurse=False):  # transformers 5 skips flagged params
                if hasattr(p, "_is_hf_initialized"):
                    del p._is_hf_initialized
            if init is not None:
                init(sub)
            elif hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        params += list(module.parameters())
    return params


def top_layer_ops(model: nn.Module, drop_top: int = 0, reinit_top: int = 0) -> list[nn.Parameter]:
    """Drop the top ``drop_top`` layers (Chung et al. 2021), then re-initialise the new top
    ``reinit_top`` layers and the pooler (Zhang et al. 2021).

    "Top" is the stack nearest the head (``arch.top_stack``): the encoder of an encoder model,
    the decoder of a decoder-only model and, for T5, the decoder (its encoder is untouched).
    Returns the re-initialised parameters: they must train (and be saved) in any method, since
    their random start cannot be rebuilt from the pre-trained checkpoint.
    """
    if not drop_top and not reinit_top:
        return []
    layers = top_stack(model)
    if min(drop_top, reinit_top) < 0:
        raise FtlabError(f"drop_top={drop_top}, reinit_top={reinit_top}: a layer count is "
                         "negative.", "use counts >= 0 (0 = off): +peft.drop_top=K, "
                         "+peft.reinit_top=K.")
    if drop_top >= len(layers) or drop_top + reinit_top > len(layers):
        raise FtlabError(f"drop_top={drop_top} + reinit_top={reinit_top} does not fit a stack "
                         f"of {len(layers)} layers (dropping leaves at least one).",
                         f"choose drop_top < {len(layers)} and drop_top + reinit_top <= "
                         f"{len(layers)}.")
    for _ in range(drop_top):
        del layers[len(layers) - 1]
    config = getattr(unwrap(model), "config", None)
    if drop_top and config is not None:
        encdec = getattr(config, "is_encoder_decoder", False)  # T5: the decoder's count
        setattr(config, "num_decoder_layers" if encdec else "num_hidden_layers", len(layers))
    modules = list(layers[len(layers) - reinit_top:]) if reinit_top else []
    if reinit_top and (pool := pooler(model)) is not None:
        modules.append(pool)
    return _reinit(model, modules)


def trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)


def same_device(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(device=like.device, dtype=like.dtype)
