"""Hand trained weights from one stage to the next (whole model or backbone only)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import backbone_modules, unwrap
from ftlab.peft.base import Mergeable, NotMergeable, PeftMethod

log = logging.getLogger(__name__)


def backbone_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model`` that belong to its backbone (the architecture table's)."""
    model = unwrap(model)
    names = {id(m): n for n, m in model.named_modules()}
    keys: set[str] = set()
    for module in backbone_modules(model):
        prefix = f"{names[id(module)]}." if names[id(module)] else ""
        keys |= {prefix + k for k in module.state_dict()}
    return keys


def hand_over(source: nn.Module | Mapping[str, torch.Tensor], target: nn.Module,
              carry: str) -> dict[str, int]:
    """Copy ``source``'s weights (a model, or a state dict from the stage cache) into
    ``target`` where names and shapes match.

    ``carry="encoder"`` copies only the backbone (per ``ftlab/model/arch.py``; for T5 the
    shared embeddings, encoder and decoder); heads start fresh. Backbone tensors are matched
    with or without the backbone prefix, so a ``T5ForConditionalGeneration`` (no prefix) hands
    over to a ``T5ForSequenceClassification`` (``transformer.``). Returns counts of copied and
    skipped tensors.
    """
    src = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    dst = unwrap(target).state_dict()
    inside = backbone_keys(target)
    prefix = f"{getattr(unwrap(target), 'base_model_prefix', '')}."
    wanted: dict[str, torch.Tensor] = {}
    for key, value in dst.items():
        if key in inside:  # also with/without the backbone prefix (T5 heads differ in that)
            other = key[len(prefix):] if key.startswith(prefix) else prefix + key
            found = key if key in src else other if other in src else None
        else:
            found = key if carry == "model" and key in src else None
        if found is not None and src[found].shape == value.shape:
            wanted[key] = src[found]
    if not any(k in inside for k in wanted):
        raise FtlabError("The earlier stage's model shares no backbone weights with this one.",
                         "chain stages on the same model (model=...) for init_from.")
    unwrap(target).load_state_dict(wanted, strict=False)
    skipped = len(dst) - len(wanted)
    log.info("Handed over %d tensors (%s); %d start fresh.", len(wanted), carry, skipped)
    return {"copied": len(wanted), "fresh": skipped}


def plain_model(model: nn.Module, peft: PeftMethod, name: str) -> nn.Module:
    """Stage ``name``'s trained ``model`` as a plain Transformers model, what a later stage's
    hand-over copies from: under ``peft`` it may be wrapped (``PeftModel``: LoRA, IA3) or
    re-parametrised (diff pruning, intrinsic, movement pruning), whose tensor names match no
    plain model's. Those are merged into a copy (the stage's own model stays as it is, for its
    teachers' and reports' use). Methods that add modules or inputs (adapters, prompt/prefix
    tuning) trained around a frozen backbone: that backbone is handed over, their own weights
    are not (a warning says so)."""
    if isinstance(peft, Mergeable):
        try:
            wrapped = unwrap(model) is not model  # merging folds a wrapper in place
            return peft.merged(copy.deepcopy(model) if wrapped else model)
        except NotMergeable:
            pass
    log.warning("Stage %s's peft=%s weights are not handed over, only the backbone it kept "
                "frozen: use a method that merges (full, lora, ia3, bitfit...) there to carry "
                "what it learnt, or stack adapters (pipeline=madx). (A method of your own "
                "whose model stays plain adds `def merged(self, model): return model`.)",
                name, peft.name)
    return unwrap(model)


def head_labels(task: Any, model: nn.Module) -> Any:
    """The labels of ``model``'s own head: ``task``'s, or for a multi-task model its primary
    sub-task's (the head ``carry: model`` copies; the other sub-tasks' heads are ``mt__``
    modules)."""
    primary = getattr(unwrap(model), "mt_primary", None)
    parts = getattr(task, "parts", None) or {}
    if primary in parts:
        task = parts[primary].task
    return getattr(task, "labels", None)


def warn_other_labels(stage: str, source: str, carry: str, before: Any, after: Any) -> None:
    """``carry: model`` between stages whose label sets differ but have the same size: the
    head's rows were copied (the shapes fit), so each now stands for another class."""
    if carry != "model" or not before or not after or len(before) != len(after):
        return
    if list(before) != list(after):
        log.warning("Stage %s carries the whole model from %s, whose labels %s are not its own "
                    "%s: its head's rows start as %s's classes in that order. Set "
                    "pipeline.stages.%s.carry=encoder for a fresh head (or give both stages the "
                    "same data.labels).", stage, source, list(before), list(after), source, stage)
