"""The PEFT protocol and the helpers most methods share."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ftlab.errors import FtlabError


class PeftMethod(Protocol):
    """How a method changes the model and what its artefact holds.

    ``apply`` freezes/injects and returns the model to train (possibly wrapped);
    ``trainable_state`` is what gets saved (small for PEFT methods); ``load_trainable_state``
    puts such a state back into a model that went through ``apply``.

    Optional hooks, each a small Protocol of its own: a method that is also a
    :class:`SavesArtefact` writes an extra artefact; a model returned by ``apply`` that is a
    :class:`Penalized` adds a penalty to the training loss, one that is a :class:`FollowsSteps`
    hears the optimiser step before each training batch, one that is an :class:`OwnGroups`
    trains some parameters at their own LR; a method that is a :class:`Reports` records what
    it did (``peft`` in ``metrics.json``); a method that is a :class:`Mergeable` folds into a
    plain Transformers model (``ftlab-export``, and what a later stage's ``init_from`` gets;
    without it only the frozen backbone is handed over). ``layers.top_layer_ops`` gives
    every method ``drop_top``/``reinit_top``.
    """

    name: str

    def apply(self, model: nn.Module) -> nn.Module: ...

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None: ...


@runtime_checkable
class Penalized(Protocol):
    """A model (as ``PeftMethod.apply`` returns it) whose ``extra_loss()`` is added to every
    training loss, e.g. diff pruning's expected-L0 term."""

    def extra_loss(self) -> torch.Tensor: ...


@runtime_checkable
class OwnGroups(Protocol):
    """A model (as ``PeftMethod.apply`` returns it) some of whose parameters train at their own
    LR and weight decay, in optimiser groups of their own, e.g. diff pruning's gate logits (the
    reference trains them with a separate AdamW at lr 0.1, no decay). ``own_groups()`` maps a
    trainable parameter's name (as in ``named_parameters()``) to ``(lr, weight_decay)``, an lr
    of None for the stage's own (movement pruning's scores: no decay); the stage's warmup and
    decay schedule scales those groups as every other."""

    def own_groups(self) -> dict[str, tuple[float | None, float]]: ...


@runtime_checkable
class FollowsSteps(Protocol):
    """A model (as ``PeftMethod.apply`` returns it) whose training changes with the optimiser
    step, e.g. movement pruning's sparsity schedule or diff pruning's fixed-mask phase.
    ``FineTuneModule`` calls ``at_step(step, total)`` before every training batch: ``step``
    optimiser steps done (the trainer's ``global_step``, so resumption and gradient
    accumulation count right) of the stage's ``total``. ``settled()``: the model has the form
    its artefact will have (the mask fixed, the final sparsity reached); ``KeepBest`` keeps only
    validations of a settled model, so the best epoch's score is the artefact's."""

    def at_step(self, step: int, total: int) -> None: ...

    def settled(self) -> bool: ...


@runtime_checkable
class SavesArtefact(Protocol):
    """A PEFT method that writes an extra artefact after ``trainable.safetensors`` (HF peft's
    ``save_pretrained`` folder); returns where."""

    def save(self, model: nn.Module, directory: str | Path) -> Path: ...


@runtime_checkable
class Reports(Protocol):
    """A PEFT method whose outcome is a number the parameter counts do not show, recorded as
    the stage's ``peft`` entry in ``metrics.json``: the sparsity movement pruning left in the
    artefact, the diff entries diff pruning kept (its trainable count is the dense delta and
    gates). ``report`` sees the trained model as the artefact is saved from it."""

    def report(self, model: nn.Module) -> dict[str, float]: ...


@runtime_checkable
class Mergeable(Protocol):
    """A PEFT method whose trained model folds into a plain Transformers model
    (``ftlab-export --to hf``): LoRA/IA3 merged into the weights, re-parametrised weights
    materialised, or the model as it is (full, last layer, BitFit). ``merged`` may raise
    :class:`NotMergeable` for a configuration that cannot fold (prompt/prefix tuning)."""

    def merged(self, model: nn.Module) -> nn.Module: ...


class NotMergeable(FtlabError):
    """The trained model cannot become a plain Transformers model."""


def requires_grad_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """All parameters that train, by name (detached views, not copies)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_by_name(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's parameters/buffers of the same names."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise FtlabError(f"The artefact has {len(unknown)} tensor(s) the model lacks, e.g. "
                         f"{unknown[:3]}.", "load it with the same model and peft settings it "
                         "was trained with.")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts and the trainable percentage."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable,
            "params_trainable_pct": 100.0 * trainable / max(total, 1)}


class RequiresGradState:
    """The default artefact: every parameter that trains, saved and loaded by name."""

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return requires_grad_state(model)

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_by_name(model, state)
