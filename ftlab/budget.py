"""How long a stage trains when you do not say: an adaptive budget.

A fixed epoch count is wrong at both ends: one epoch of 1,000 rows is 32 optimiser steps, too
few for a classifier head to leave the majority class, while one epoch of 100k rows is plenty.
So, unless you fix the length yourself, a stage trains for

    epochs = min(max(max_epochs, ceil(min_steps / steps_per_epoch)), budget.max_epochs)

(``max_epochs``: the trainer group's, 1 by default), validates at least every
``val_every_steps`` optimiser steps within long epochs, keeps the best validation state
(``KeepBest``) and stops after ``patience`` validations without improvement of the monitored
metric (Lightning's ``EarlyStopping``).

Precedence (README, "Training loop"): the budget applies only when the stage's length is not
fixed. It is fixed by ``trainer.max_epochs``/``trainer.max_steps`` given explicitly (command
line, ``experiment=``), or by ``pipeline.stages.<name>.trainer.*`` / ``stage.trainer.*``, or by
a stage YAML's own ``trainer.max_epochs``/``max_steps`` (e.g. ``tapt_task``'s 3 TAPT epochs), or
by any ``max_steps`` other than -1, or ``fast_dev_run``; then the trainer node is used exactly
as resolved.
``trainer.budget.min_steps=0`` switches the budget off everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from ftlab.config import bind_schema
from ftlab.errors import FtlabError
from ftlab.overrides import Explicit
from ftlab.rules import at_least

#: the ``trainer`` key holding the budget node (ftlab's, taken out before Lightning sees it)
BUDGET_KEY = "budget"
#: what fixes a stage's length when given by you or the stage's own node
LENGTH_KEYS = ("max_epochs", "max_steps")


@dataclass(frozen=True)
class BudgetSpec:
    """``trainer.budget``: the adaptive training length (module docstring).

    Attributes:
        min_steps: train at least this many optimiser steps, by adding epochs (0: off).
        max_epochs: never more epochs than this for reaching ``min_steps``.
        patience: stop after this many validations without improvement (0: never stop early).
        val_every_steps: validate every this many optimiser steps when an epoch is longer
            (0: once per epoch).
    """

    min_steps: Annotated[int, at_least(0, example="600")] = 600
    max_epochs: Annotated[int, at_least(1, example="20")] = 20
    patience: Annotated[int, at_least(0, example="3")] = 3
    val_every_steps: Annotated[int, at_least(0, example="500")] = 500


def split_budget(trainer: dict[str, Any], own: dict[str, Any], explicit: Explicit,
                 prefix: str, where: str) -> tuple[dict[str, Any], BudgetSpec | None]:
    """(the trainer node without ``budget``, the budget that applies or None when the stage's
    length is fixed). ``own`` is the stage's own trainer node, ``prefix`` its explicit-key
    prefix (``stage``, ``pipeline.stages.<name>``)."""
    node = dict(trainer)
    budget = bind_schema(BudgetSpec, node.pop(BUDGET_KEY, None) or {}, f"{where} trainer.budget",
                         "trainer.budget")
    fixed = (budget.min_steps == 0 or bool(node.get("fast_dev_run"))
             or node.get("max_steps") not in (None, -1)  # a step cap, or 0 (evaluate only)
             or any(explicit.has(f"trainer.{k}") or explicit.has(f"{prefix}.trainer.{k}")
                    or (own or {}).get(k) is not None for k in LENGTH_KEYS))
    return node, None if fixed else budget


def steps_per_epoch(trainer: dict[str, Any], rows: int, batch: int) -> int:
    """Optimiser steps in one epoch of ``rows`` training rows (each device reads its share)."""
    return max(1, batches_per_epoch(trainer, rows, batch)
               // (trainer.get("accumulate_grad_batches") or 1))


def check_val_interval(trainer: dict[str, Any], rows: int, batch: int, where: str) -> None:
    """A whole-number ``val_check_interval`` (in batches) must fit in one epoch unless
    ``check_val_every_n_epoch`` is null (Lightning raises a ValueError when ``fit`` starts)."""
    interval = trainer.get("val_check_interval")
    if not isinstance(interval, int) or isinstance(interval, bool) or \
            trainer.get("check_val_every_n_epoch", 1) is None:
        return
    batches = batches_per_epoch(trainer, rows, batch)
    if interval > batches:
        raise FtlabError(
            f"{where}: trainer.val_check_interval={interval} batches is more than one epoch "
            f"({batches} batches of {batch} from {rows} training rows).",
            f"set trainer.val_check_interval to {batches} or less (or a fraction of an epoch, "
            "e.g. 0.5), or add trainer.check_val_every_n_epoch=null to count across epochs.")


def batches_per_epoch(trainer: dict[str, Any], rows: int, batch: int) -> int:
    """Training batches in one epoch (per device; ``limit_train_batches`` applied): each of
    the job's processes, on every node, reads its share (``devices`` as
    ``threads.processes_per_machine`` reads it: ``[0, 1]``, ``"0,1"`` and ``"2"`` are two)."""
    from ftlab.threads import processes_per_machine

    devices = processes_per_machine(trainer) * max(1, int(trainer.get("num_nodes") or 1))
    batches = math.ceil(rows / (batch * devices))
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, float) and limit <= 1.0:
        batches = max(1, int(batches * limit))
    elif isinstance(limit, int) and limit > 0:
        batches = min(batches, limit)
    return batches


def epochs_for(budget: BudgetSpec, base_epochs: Any, per_epoch: int) -> int:
    """The rule: enough epochs for ``min_steps``, at least the trainer's, at most the cap."""
    base = base_epochs if isinstance(base_epochs, int) and base_epochs > 0 else 1
    return max(base, min(math.ceil(budget.min_steps / per_epoch), budget.max_epochs))


def plan(budget: BudgetSpec, trainer: dict[str, Any], rows: int, batch: int
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Trainer node with the planned ``max_epochs`` and validation interval, a record of
    the plan for ``metrics.json``)."""
    per_epoch = steps_per_epoch(trainer, rows, batch)
    node = dict(trainer, max_epochs=epochs_for(budget, trainer.get("max_epochs"), per_epoch))
    accumulate = trainer.get("accumulate_grad_batches") or 1
    if budget.val_every_steps and per_epoch > budget.val_every_steps \
            and trainer.get("val_check_interval") in (None, 1.0):
        node["val_check_interval"] = budget.val_every_steps * accumulate  # in batches
    return node, {"min_steps": budget.min_steps, "steps_per_epoch": per_epoch,
                  "max_epochs": node["max_epochs"], "patience": budget.patience}


def early_stopping(budget: BudgetSpec | None, monitor: str, mode: str) -> list[Any]:
    """Lightning's ``EarlyStopping`` on ``val/<monitor>`` (none without a budget or patience),
    counting only validations of a settled model: a pruning method's schedule spans the
    planned steps (diff pruning's fixed-mask phase, movement pruning's final sparsity), so,
    as ``KeepBest``, it waits until the model has its artefact's form
    (``ftlab.peft.base.FollowsSteps.settled``)."""
    if budget is None or budget.patience == 0:
        return []
    from lightning.pytorch.callbacks import EarlyStopping

    from ftlab.peft.base import FollowsSteps

    class SettledEarlyStopping(EarlyStopping):
        def on_validation_end(self, trainer, pl_module) -> None:
            model = getattr(pl_module, "model", None)
            if isinstance(model, FollowsSteps) and not model.settled():
                return
            super().on_validation_end(trainer, pl_module)

    return [SettledEarlyStopping(f"val/{monitor}", mode=mode, patience=budget.patience,
                                 strict=False, check_on_train_epoch_end=False)]
