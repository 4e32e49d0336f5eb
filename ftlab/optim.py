"""AdamW with linear warmup and linear decay, weight decay off for biases and norms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from ftlab.rules import Rule, at_least, between, one_of


@dataclass
class OptimSpec:
    """Optimiser settings of a stage.

    Attributes:
        lr: peak learning rate after warmup; None: the PEFT method's own ``lr`` (its YAML),
            else ``DEFAULT_LR`` (resolved by ``pipeline.stage_optim`` before training).
        weight_decay: decoupled weight decay (not on biases or LayerNorm weights).
        warmup_ratio: fraction of all optimiser steps spent warming up linearly from 0.
        betas / eps: AdamW moments; BERT used (0.9, 0.999) and eps 1e-6.
        layer_decay: layer-wise LR decay (ULMFiT's discriminative fine-tuning): a parameter
            ``d`` layer groups below the top (heads) trains at ``lr * layer_decay**d``; 1.0 off.
        gradual_unfreeze: ULMFiT gradual unfreezing: epoch 0 trains only the top group (heads
            and pooler), each further epoch one more layer below, down to the embeddings.
        lr_scaling / reference_batch: ``lr`` is the peak LR at a global batch (rows per
            optimiser step over all devices) of ``reference_batch``; ``linear`` or ``sqrt``
            scale it to the batch actually used (``ftlab.runtime.LR_RULES``); ``none`` keeps it.
    """

    lr: Annotated[float | None, at_least(0, example="5e-5")] = None
    weight_decay: Annotated[float, at_least(0, example="0.01")] = 0.01
    warmup_ratio: Annotated[float, between(0, 1, hi_open=True, example="0.06")] = 0.06
    betas: Annotated[tuple[float, float], between(0, 1, hi_open=True, each=True,
                                                  example="[0.9,0.999]")] = (0.9, 0.999)
    eps: Annotated[float, Rule(gt=0, example="1e-8")] = 1e-8
    layer_decay: Annotated[float, between(0, 1, lo_open=True, example="0.9")] = 1.0
    gradual_unfreeze: bool = False
    lr_scaling: Annotated[str, one_of("none", "linear", "sqrt")] = "none"  # runtime.LR_RULES
    reference_batch: Annotated[int, at_least(1, example="32")] = 32


#: the peak LR when neither the stage nor the PEFT method sets one (BERT's range: 2e-5..5e-5)
DEFAULT_LR = 5e-5

def layer_depths(model: nn.Module) -> tuple[dict[str, int], int]:
    """(parameter name -> layer group, top group): 0 = embeddings, ``i + 1`` = transformer
    layer ``i`` counted bottom-up through the stacks of the architecture table (T5: the
    encoder's layers, then the decoder's), top = everything else (pooler, final norms, task
    and LM heads, PEFT parameters outside the layers). ``model`` may be a PEFT wrapper."""
    from ftlab.model.arch import embedding_modules, layer_stacks

    depth_of: dict[int, int] = {}
    for module in embedding_modules(model):
        depth_of |= {id(p): 0 for p in module.parameters()}
    layers = [layer for stack in layer_stacks(model) for layer in stack]
    for i, layer in enumerate(layers):
        depth_of |= {id(p): i + 1 for p in layer.parameters()}
    top = len(layers) + 1
    return {n: depth_of.get(id(p), top) for n, p in model.named_parameters()}, top


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 layer_decay: float = 1.0, ndims: dict[str, int] | None = None) -> list[dict]:
    """AdamW groups: weight decay off for biases/norms; with ``layer_decay`` < 1 one group
    pair per layer depth, each with its own ``lr``. ``ndims``: each parameter's number of
    dimensions as built, when the model's own are no longer it (FSDP flattens parameters into
    1-D shards before the optimiser is made). A model that is an ``OwnGroups``
    (``ftlab/peft/base.py``) puts the parameters it names in groups with their own LR and weight
    decay, after the others (an LR of None: the stage's, with its layer decay)."""
    from ftlab.peft.base import OwnGroups

    ndims = ndims or {}
    depth, top = layer_depths(model) if layer_decay != 1.0 else ({}, 0)
    own = model.own_groups() if isinstance(model, OwnGroups) else {}
    # (depth, kind, decay): kind 0 decays, 1 does not (biases, norms), 2 an own decay
    groups: dict[tuple[int, int, float], list] = {}
    apart: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        own_lr, decay = own.get(name, (None, None))
        if own_lr is not None:
            apart.setdefault((own_lr, decay), []).append(p)
            continue
        if decay is None:
            skip = ndims.get(name, p.ndim) < 2 or "norm" in name.lower() or name.endswith(".bias")
            key = (depth.get(name, top), int(skip), 0.0 if skip else weight_decay)
        else:
            key = (depth.get(name, top), 2, decay)
        groups.setdefault(key, []).append(p)
    out = []
    for (d, _kind, decay), params in sorted(groups.items(), key=lambda kv: kv[0]):
        group = {"params": params, "weight_decay": decay}
        if lr is not None:
            group["lr"] = lr * layer_decay ** (top - d)
        out.append(group)
    return out + [{"params": params, "lr": own_lr, "weight_decay": decay}
                  for (own_lr, decay), params in apart.items()]


def fuses(precision: str, device_type: str, sharded: bool = False) -> bool:
    """Whether AdamW runs fused (one kernel over all tensors, ``fused=True``): full precision
    (``32-true``) on a CPU or CUDA device, not sharded. On this 2-core CPU MiniLM's AdamW step
    took 64 ms with torch's CPU default (one tensor at a time) and 16 ms fused (forward +
    backward at batch 32: ~700 ms). Not under mixed precision: Lightning's mixed-precision
    plugins refuse norm clipping with an optimiser that unscales gradients itself, as fused
    AdamW declares (even under bf16, no scaler); not under FSDP (its precision plugin, flat
    parameters)."""
    return precision in ("32-true", "32") and device_type in ("cpu", "cuda") and not sharded


def build_optimizer(model: nn.Module, spec: OptimSpec, total_steps: int,
                    ndims: dict[str, int] | None = None, fused: bool = False):
    """(optimizer, scheduler config) for Lightning's ``configure_optimizers``; ``ndims`` as in
    ``param_groups``; ``fused``: AdamW's fused kernel (see ``fuses``)."""
    lr = spec.lr if spec.lr is not None else DEFAULT_LR
    groups = [g for g in param_groups(model, spec.weight_decay, lr, spec.layer_decay, ndims)
              if g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(spec.betas), eps=spec.eps,
                            fused=True if fused else None)
    warmup = int(spec.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, {"scheduler": sched, "interval": "step"}
