"""AdamW with linear warmup and linear decay, weight decay off for biases and norms."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimSpec:
    """Optimiser settings of a stage.

    Attributes:
        lr: peak learning rate after warmup.
        weight_decay: decoupled weight decay (not on biases or LayerNorm weights).
        warmup_ratio: fraction of all optimiser steps spent warming up linearly from 0.
        betas / eps: AdamW moments; BERT used (0.9, 0.999) and eps 1e-6.
    """

    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, spec: OptimSpec, total_steps: int):
    """(optimizer, scheduler config) for Lightning's ``configure_optimizers``."""
    groups = [g for g in param_groups(model, spec.weight_decay) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps)
    warmup = int(spec.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, {"scheduler": sched, "interval": "step"}
