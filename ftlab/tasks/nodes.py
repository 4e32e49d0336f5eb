"""A stage's task node (``stage.task``, a ``_target_`` of ``ftlab/tasks``) built and checked
against the ``Task`` protocol; whether its class predicts numbers, asked before any data is
read. ``ftlab.build.StageBuilder`` and the job runner build tasks through these."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftlab.config import instantiate_checked, load_target, require_protocol
from ftlab.tasks.base import PredictsNumbers, Task

if TYPE_CHECKING:
    from ftlab.pipeline import ResolvedStage

#: how a contributor's task class gets what the ``Task`` protocol asks for
TASK_HINT = ("subclass ftlab.tasks.base.TaskDefaults for pad_values, info and baseline; set "
             "monitor, mode and features in __init__; see ftlab/tasks/classify.py")


def instantiate_task(node: Any, where: str) -> Task:
    """A task node built and checked against the ``Task`` protocol."""
    return require_protocol(instantiate_checked(node, where), Task, where, TASK_HINT)


def stage_task(stage: ResolvedStage) -> Task:
    """The stage's task, with the auxiliary MLM loss around it (``stage.aux_mlm_weight``)."""
    task = instantiate_task(stage.task, f"{stage.where}.task")
    if stage.aux_mlm_weight > 0:
        from ftlab.tasks.aux_mlm import AuxMLM

        task = AuxMLM(task, stage.aux_mlm_weight)
    return task


def reads_numbers(node: Any, where: str) -> bool:
    """Whether a task node's class predicts numbers (``PredictsNumbers``: regression), asked
    of the class so the data can be read accordingly before any task is bound."""
    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str):
        return False
    cls = load_target(target, f"{where}.task")
    return isinstance(cls, type) and issubclass(cls, PredictsNumbers)
