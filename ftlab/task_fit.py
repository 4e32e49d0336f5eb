"""Checks that a stage's task fits the model it is given, on the built model (training and
validation alike, through ``ftlab.build.StageBuilder``)."""

from __future__ import annotations

from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import position_limit
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


def require_positions(stage: ResolvedStage, task: Task, model: nn.Module) -> None:
    """A ``max_length`` past the model's learned positions would crash at the first longer
    row (an index error mid-training, or mid-prediction): refuse it before training."""
    limit, length = position_limit(model), getattr(task, "max_length", None)
    if limit and isinstance(length, int) and length > limit:
        raise FtlabError(f"{stage.where}: task.max_length={length} is more than the {limit} "
                         "positions this model has.",
                         f"set stage.task.max_length to at most {limit}.")
