"""What a stacked adapter artefact brings besides its adapters: the LayerNorms it was trained
under (``train_layernorm``), so a stacked language adapter runs under its own norms."""

from __future__ import annotations

import torch
from torch import nn

from ftlab.model.arch import block_modules, unwrap


def block_norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The attention/FFN blocks' LayerNorm (RMSNorm) parameters, by their model names."""
    ids = {id(p) for block in ("attn", "ffn") for _proj, norm in block_modules(model, block)
           if norm is not None for p in norm.parameters()}
    return {n: p for n, p in unwrap(model).named_parameters() if id(p) in ids}


def load_block_norms(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy the block norms found in artefact tensors ``state`` into the model (their
    ``requires_grad`` is left as it is). Returns how many tensors were copied."""
    norms = block_norm_parameters(model)
    found = {n: v for n, v in state.items() if n in norms}
    with torch.no_grad():
        for name, value in found.items():
            norms[name].copy_(value.to(norms[name].dtype))
    return len(found)
