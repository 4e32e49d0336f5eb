"""Checks that a stage's task fits the model it is given, on the built model (training and
validation alike, through ``ftlab.build.StageBuilder``)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import position_limit
from ftlab.model.backbone import ModelSpec
from ftlab.pipeline import ResolvedStage
from ftlab.tasks.base import ScoresWithLMHead, Task


def require_trained_head(stage: ResolvedStage, task: Task, model: nn.Module) -> None:
    """A task that predicts with the LM head (cloze) needs a trained one: in the checkpoint
    (its tensors are there) or carried from an earlier stage (``carry: model``)."""
    if not isinstance(task, ScoresWithLMHead) or stage.model.name_or_path is None:
        return  # built from a config: every weight is random on purpose (tests, smoke runs)
    if stage.init_from != "pretrained" and stage.carry == "model":
        return
    from ftlab.tasks.mlm import fresh_head

    missing = fresh_head(model, stage.model)
    if missing:
        raise task.untrained_head(missing)


def virtual_tokens(node: object) -> int:
    """Positions a PEFT node's soft tokens take (prompt, prefix and P-tuning:
    ``num_virtual_tokens``, nested anywhere in the node): each row's positions move up by as
    many, for encoders and decoders alike (measured with peft 0.21)."""
    if isinstance(node, dict):
        own = node.get("num_virtual_tokens")
        return (own if isinstance(own, int) else 0) + sum(
            virtual_tokens(v) for k, v in node.items() if k != "num_virtual_tokens")
    if isinstance(node, list | tuple):
        return sum(virtual_tokens(v) for v in node)
    return 0


@runtime_checkable
class AddsPositions(Protocol):
    """A task whose evaluation appends tokens after a ``max_length`` row (text2text on a
    decoder: the targets it ranks, the tokens it generates)."""

    def positions_past_max_length(self) -> tuple[int, str, str | None]:
        """(positions, why, the task key that sets them, if one does)."""
        ...


def require_positions(stage: ResolvedStage, task: Task, model: nn.Module) -> None:
    """A ``max_length`` past the model's learned positions would crash at the first longer
    row (an index error mid-training, or mid-prediction): refuse it before training. A
    multi-task stage's sub-tasks each have their own ``max_length``; soft prompts and prefixes
    take positions too."""
    from ftlab.tasks.multitask import MultiTask

    limit = position_limit(model)
    if not limit:
        return
    parts = {"task.": task}
    if isinstance(task, MultiTask):
        parts |= {f"tasks.{name}.task.": part.task for name, part in task.parts.items()}
    soft = virtual_tokens(stage.peft)
    for key, part in parts.items():
        length = getattr(part, "max_length", None)
        past, why, knob = (part.positions_past_max_length()
                           if isinstance(part, AddsPositions) else (0, "", None))
        room = limit - soft - past
        if isinstance(length, int) and length > room:
            plus = "".join(f" plus {w}" for w in (
                why, f"the PEFT method's {soft} virtual tokens" if soft else "") if w)
            other = [f"lower {stage.key}.{key}{knob}"] if knob else []
            other += ["lower the PEFT method's num_virtual_tokens"] if soft else []
            fewer = f" (or {' or '.join(other)})" if other else ""
            raise FtlabError(f"{stage.where}: {key}max_length={length}{plus} is more than the "
                             f"{limit} positions this model has.",
                             f"set {stage.key}.{key}max_length to at most {max(room, 1)}"
                             f"{fewer}.")


def require_warmup_head(stage: ResolvedStage, model: nn.Module) -> None:
    """``head_warmup_steps`` (LP-FT) trains the head alone first: the prepared ``model`` must
    have a head that trains. Checked before training (``HeadWarmup`` found it only as the
    stage started, after its data and model had loaded, e.g. ``pipeline=tapt_task peft=lora``:
    LoRA keeps the MLM head frozen)."""
    from ftlab.model.arch import head_parameters

    if not stage.head_warmup_steps or any(p.requires_grad for p in head_parameters(model)):
        return
    raise FtlabError(
        f"{stage.where}: head_warmup_steps={stage.head_warmup_steps:g} trains the head alone "
        "first, but the model has no trainable head (its PEFT method freezes it, or the head is "
        "tied to the embeddings), so the warm-up would train nothing.",
        f"set {stage.key}.head_warmup_steps=0, or use a PEFT method that trains the head there "
        "(full, last_layer, bitfit, adapters; LoRA and IA3 train a classification head, not an "
        "LM head).")


def trains_head_only(model: nn.Module) -> bool:
    """Whether every parameter that trains is a head parameter (outside the backbone, in the
    Hugging Face model itself: a re-parametrisation's own tensors are not head)."""
    from ftlab.model.arch import head_parameters

    head = {id(p) for p in head_parameters(model)}
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    return bool(trained) and trained <= head


def fresh_as_in(model: nn.Module, spec: ModelSpec) -> None:
    """Mark the parameters of ``model``, an architecture twin of ``spec`` built from its config
    (all of it random, so its whole head reads as fresh), fresh as the real checkpoint's are:
    the checks then see what a PEFT method will train (a fresh head trains under LoRA, a
    checkpoint's own stays frozen)."""
    from ftlab.peft.layers import FRESH, fresh_parameters, mark_fresh_named
    from ftlab.tasks.mlm import fresh_head

    marked = fresh_parameters(model)
    if not marked or spec.name_or_path is None:
        return
    for p in marked:
        delattr(p, FRESH)
    mark_fresh_named(model, fresh_head(model, spec, say=False))
