"""Early discard across a sweep (Dodge et al. 2020: bad seeds show early; stop the least
promising after 20-30% of training).

At ``at`` x the stage's training steps, each job of one multirun scores itself on the
validation split (the task's ``monitor``/``mode``) with a validation pass of its own at that
step (the stage's validations fall on epoch ends or ``val_check_interval``, rarely on the
decision step, and always after this hook, so the job is never judged by a stale score nor
its config refused over where validations fall), on the weights the stage evaluates: with
``callbacks=ema|swa`` the average (SWA before its ``start``: the raw weights, as its
validations then). It appends the score to a ledger in the sweep
folder (``early_discard.jsonl``, JSON lines under a file lock, so parallel launchers are safe)
and compares it with the entries already there of the same stage and configuration (the
job's overrides without the seed: seeds of one recipe compete, as in Dodge et al.; a sweep
over ``peft=full,bitfit`` discards within each method, never one method's seeds for the
other's early lead). Jobs that arrive first can
only compare with those before them, so the rule is:

- the first ``k`` jobs to reach the point always go on (nothing to compare with yet);
- ``keep: top_k``: a later job goes on if fewer than ``k`` earlier scores beat it (it is among
  the best ``k`` so far, ties go on);
- ``keep: above_median``: a later job goes on if its score is at least as good as the median of
  the earlier scores.

A discarded job stops there (``trainer.should_stop``); the jobs that go on are untouched (the
callback never changes their schedule). Its metrics so far are kept and the job is recorded as
``status: discarded`` with the steps it trained against the full budget. Outside a multirun the
callback does nothing (logged once).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Annotated, Any

import lightning as L
import torch

from ftlab.averaging import SwapsInAverage
from ftlab.rules import at_least, between, one_of

log = logging.getLogger(__name__)

LEDGER = "early_discard.jsonl"
KEEP = ("top_k", "above_median")


def goes_on(earlier: list[float], score: float, keep: str, k: int, mode: str) -> bool:
    """Whether a job scoring ``score`` goes on, given the ``earlier`` jobs' scores (see the
    module docstring). A non-finite score counts as the worst possible."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, not {keep!r}")
    if len(earlier) < k:
        return True
    sign = 1.0 if mode == "max" else -1.0  # compare "higher is better" values
    worst = -math.inf

    def good(x: float) -> float:
        return sign * x if math.isfinite(x) else worst

    mine = good(score)
    others = [good(x) for x in earlier]
    if keep == "top_k":
        return sum(o > mine for o in others) < k
    return mine >= statistics.median(others)


def sweep_dir() -> Path | None:
    """The multirun's folder (``hydra.sweep.dir``), or None outside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def configuration() -> str:
    """This job's configuration: its overrides without the seed (Hydra's
    ``override_dirname``, which conf/hydra/default.yaml makes leave out ``seed``)."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().job.override_dirname) if HydraConfig.initialized() else ""


def same_group(earlier: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether ``earlier`` is a job ``entry`` competes with: the same stage of the same
    configuration (seeds of one recipe, as Dodge et al.; a ledger line without a
    configuration, from an older ftlab, competes with all)."""
    return earlier.get("stage") == entry["stage"] and earlier.get(
        "config", entry.get("config")) == entry.get("config")


def record(ledger: Path, entry: dict[str, Any], keep: str, k: int, mode: str) -> bool:
    """Append ``entry`` (with its ``score``, ``stage`` and ``config``) to the ledger and decide,
    both under one lock: the entries already there for the same stage and configuration are
    the earlier jobs, each once. A job judged again (it errored after its decision and a
    re-launch ran it from the start, with no checkpoint to resume) is not among its own earlier
    jobs, and later jobs count only its latest score."""
    from filelock import FileLock

    ledger.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(ledger) + ".lock"):
        latest = {(e.get("job"), e["stage"]) if e.get("job") is not None else i: e
                  for i, e in enumerate(read_ledger(ledger))}
        latest.pop((entry.get("job"), entry["stage"]), None)
        earlier = [e["score"] for e in latest.values() if same_group(e, entry)]
        decision = goes_on(earlier, entry["score"], keep, k, mode)
        line = json.dumps(entry | {"decision": "go_on" if decision else "discard",
                                   "earlier": len(earlier)}, allow_nan=True)
        with ledger.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    return decision


def read_ledger(ledger: Path) -> list[dict[str, Any]]:
    if not ledger.is_file():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]


class StopsJob(L.Callback):
    """A callback that may stop its job early (early discard, a search's pruner): ``outcome``
    (None: it did not) is its decision, which the stage records as ``discarded``, and which is
    kept in checkpoints, so a job killed after it stopped resumes stopped."""

    outcome: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.outcome = state_dict.get("outcome")


class EarlyDiscard(StopsJob):
    """Stop this job at ``at`` of its training steps if it is among the least promising of its
    sweep so far (rule: the module docstring).

    Args:
        at: fraction of the stage's optimiser steps at which jobs are compared (0 < at < 1).
        keep: ``top_k`` or ``above_median``.
        k: the first ``k`` jobs always go on; with ``top_k`` the number kept among the best.
    """

    def __init__(self, at: Annotated[float, between(0, 1, lo_open=True, hi_open=True,
                                                    example="0.25")] = 0.25,
                 keep: Annotated[str, one_of(*KEEP)] = "top_k",
                 k: Annotated[int, at_least(1, example="3")] = 3) -> None:
        if not 0 < at < 1:
            raise ValueError(f"at must be a fraction of training in (0, 1), not {at}")
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, not {keep!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, not {k}")
        self.at, self.keep, self.k = at, keep, k
        self.outcome: dict[str, Any] | None = None  # set when this job was discarded
        self._target: int | None = None

    def follows_length(self) -> bool:
        """ftlab.callbacks.FollowsLength: judged at ``at`` x the planned steps (in a multirun;
        outside one it does nothing and leaves the stage's length alone)."""
        return sweep_dir() is not None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.outcome = None
        self._sweep = sweep_dir()
        if self._sweep is None:
            log.info("callbacks=early_discard does nothing outside a multirun (ftlab -m ...).")
            self._target = None
            return
        self._total = int(trainer.estimated_stepping_batches)
        self._target = max(1, math.ceil(self.at * self._total))
        # resumed from this job's checkpoint: its folder is the same job's, so a ledger entry
        # of this folder and stage is its own decision (made before the kill), not a new one
        self._resumed = trainer.ckpt_path is not None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._target is None or trainer.global_step < self._target:
            return
        self._target = None  # once per stage
        task = pl_module.task
        stage_dir = Path(trainer.default_root_dir)
        job, stage = stage_dir.parent.name, stage_dir.name
        earlier = self._resumed and next(
            (e for e in read_ledger(self._sweep / LEDGER)
             if e.get("job") == job and e.get("stage") == stage), None)
        if earlier:  # judged before the kill: the same decision, no second entry
            entry, go = earlier, earlier.get("decision") != "discard"
        else:
            score = judged_score(trainer, pl_module, batch_idx)
            entry = {"job": job, "stage": stage, "config": configuration(),
                     "step": trainer.global_step,
                     "planned_steps": self._total, "metric": f"val/{task.monitor}",
                     "mode": task.mode, "score": score}
            go = True
            if trainer.is_global_zero:
                go = record(self._sweep / LEDGER, entry, self.keep, self.k, task.mode)
        go = trainer.strategy.broadcast(go, src=0)  # every rank stops together
        if not go:
            self.outcome = entry | {"rule": f"{self.keep} (k={self.k}) at {self.at:g}"}
            log.info("Early discard: %s=%.4f at step %d of %d is among the least promising of "
                     "the sweep so far; this job stops here.", entry["metric"], entry["score"],
                     entry["step"], self._total)
            trainer.should_stop = True


def judged_score(trainer: L.Trainer, pl_module: L.LightningModule, batch_idx: int) -> float:
    """The validation score of the weights the stage evaluates: with weight averaging
    (``callbacks=ema|swa``) the average, this step's update taken (the averaging callback may
    come after this one), swapped in for the pass; otherwise the raw weights (snapshot
    ensembles validate those too)."""
    average = next((c for c in trainer.callbacks if isinstance(c, SwapsInAverage)), None)
    if average is None:
        return validation_score(trainer, pl_module)
    average.catch_up(trainer, pl_module, batch_idx)
    with average.evaluated(pl_module):
        return validation_score(trainer, pl_module)


@torch.no_grad()
def validation_score(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
    """The task's monitored metric on the validation split, computed here (the model's own
    train/eval mode is restored; nothing is logged and no random state is used)."""
    task, model = pl_module.task, pl_module.model
    metrics = task.metrics().to(pl_module.device)
    loader = trainer.datamodule.val_dataloader()
    was_training = model.training
    model.eval()
    loss_sum, rows = 0.0, 0
    try:
        for batch in loader:
            batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
            out = task.forward(model, batch)
            task.update(metrics, out, batch)
            n = batch["input_ids"].shape[0]
            loss_sum, rows = loss_sum + float(out.loss) * n, rows + n
    finally:
        model.train(was_training)
    values = {k: float(v) for k, v in metrics.compute().items()}
    return values.get(task.monitor, loss_sum / max(rows, 1))
