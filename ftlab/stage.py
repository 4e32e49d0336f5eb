"""Run one stage: data -> task model -> PEFT/regulariser -> fit -> best -> test -> artefact."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, ProgressBar
from torch import nn

from ftlab.artefact import write_stage_card
from ftlab.budget import check_val_interval, early_stopping, plan
from ftlab.build import StageBuilder
from ftlab.callbacks import (
    FollowsLength,
    GradualUnfreeze,
    HeadWarmup,
    KeepBest,
    NoteStep,
    Throughput,
)
from ftlab.checkpoint import CheckpointSpec, stage_checkpointing
from ftlab.checkpoint_io import checkpoint_elsewhere, clear_stale_writes, latest_checkpoint
from ftlab.compiling import compile_model
from ftlab.config import instantiate_checked
from ftlab.discard import StopsJob
from ftlab.errors import FtlabError
from ftlab.flops import flop_rule
from ftlab.loggers import build_loggers
from ftlab.module import FineTuneModule
from ftlab.peft.base import PeftMethod, Reports, SavesArtefact, count_parameters
from ftlab.pipeline import ResolvedStage
from ftlab.store import inside, is_rank_zero, save_tensors, wait_for_all_ranks
from ftlab.strategies import full_weights
from ftlab.tasks.base import HasSubtasks, WeighsClasses, scored_labels

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    name: str
    metrics: dict[str, float]
    model: nn.Module | dict[str, Any]  # a cache hit holds the stored state dict instead
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunContext:
    """What a stage needs from its run besides its own settings.

    Attributes:
        run_dir: the job's output folder; the stage writes into ``run_dir/<stage name>``.
        callbacks: the run's extra Lightning callback nodes (``callbacks`` group).
        logger: the run's logger nodes (``logger`` group).
        log_context: W&B name/group/tags/config for the loggers that take them.
        on_trained: called with a stage's result once it has trained and been evaluated, before
            its artefact is written (the run records its metrics first: a full disk loses none).
        checkpoint: when stages checkpoint (and resume); None: never.
        save_artefact: the run's policy for full-size artefacts (``best | all | none``): with
            ``none`` a stage training over half the weights writes no ``trainable.safetensors``
            (its card still); ``best`` in a sweep is applied when the sweep ends.
        sweep_dir: the sweep's folder (None: a single run), whose other job folders a stage
            without a checkpoint of its own looks in (an errored job re-launched elsewhere).
    """

    run_dir: Path
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] | None = None
    log_context: dict[str, Any] = field(default_factory=dict)
    on_trained: Callable[[StageResult], None] | None = None
    checkpoint: CheckpointSpec | None = None
    save_artefact: str = "best"
    sweep_dir: Path | None = None


def run_stage(stage: ResolvedStage, builder: StageBuilder, run: RunContext,
              upstream: dict[str, StageResult], key: str | None = None) -> StageResult:
    """Train and evaluate ``stage``; ``upstream`` holds earlier stages of this run. A
    checkpoint in ``<stage>/checkpoints`` written for ``key`` (the stage key) is resumed."""
    stage_dir = inside(run.run_dir, stage.name)  # a name never writes outside the run
    L.seed_everything(stage.seed, workers=True, verbose=False)
    task = builder.task(stage)
    raw = builder.raw(stage)
    subs = [(sub.name, builder.raw(stage, sub.data)) for sub in stage.subtasks]
    transformed = raw.transforms  # the record of data.transforms (teachers relabel the rows)
    if subs:  # each sub-task's own (``raw`` is only the first's), named
        transformed = [{"sub_task": name, **entry} for name, sub_raw in subs
                       for entry in sub_raw.transforms or []]
    if key is not None and any(r.renumbered for r in [raw, *(r for _, r in subs)]):
        # integer labels take the ids of their numbers (2 before 10); an older ftlab's
        # checkpoint of this stage trained the ids of their text order: it is not resumed
        key = f"{key}+labels-by-number"
    taught: dict[str, Any] = {}
    if stage.teachers:  # their averaged soft predictions become the training labels
        from ftlab.distill import label_with_teachers, teachers_of

        raw, taught = label_with_teachers(raw, stage, teachers_of(stage, builder, upstream),
                                          list(stage.data.text_columns))
        if stage.teacher_rows is None:  # soft labels: learnt at the student's temperature
            task.soft_temperature = taught["student_temperature"] = stage.student_temperature
        if isinstance(task, WeighsClasses):  # class_weights count the labels learnt from
            task.weigh_classes(raw.splits["train"]["label"])
    tokenizer = builder.tokenizer(stage.model)
    rt, auto = stage.runtime, stage.batch_size == "auto"
    dm = builder.datamodule(stage, raw)
    source = upstream[stage.init_from].model if stage.init_from != "pretrained" else None
    model, peft, regularizer, handed = builder.model(stage, source)
    counts = count_parameters(model)
    log.info("Stage %s: %s trainable of %s parameters (%.3f%%) with peft=%s, peak lr %g",
             stage.name, f"{counts['params_trainable']:,}", f"{counts['params_total']:,}",
             counts["params_trainable_pct"], peft.name, stage.optim.lr)

    compile_model(model, rt.compile_mode())  # in place: names and state dicts stay the same
    module = FineTuneModule(model, task, regularizer, stage.optim,
                            check_finite_every=rt.check_finite_every_n_steps,
                            cudagraphs=rt.cudagraphs())
    keep, speed = KeepBest(peft, f"val/{task.monitor}", task.mode), Throughput(flop_rule(model))
    spec, ckpt_dir = run.checkpoint, stage_dir / "checkpoints"
    if is_rank_zero():  # a checkpoint write killed midway left its temp folder
        clear_stale_writes(ckpt_dir)
    resume = latest_checkpoint(ckpt_dir, key) if spec and spec.enabled else None
    elsewhere = None  # re-launched into a new folder: the checkpoint its errored run left
    if resume is None and spec and spec.enabled and key and run.sweep_dir is not None:
        from ftlab.resume import other_checkpoints

        resume = elsewhere = checkpoint_elsewhere(
            other_checkpoints(run.sweep_dir, run.run_dir, stage.name), key)
    context = run.log_context | {"name": f"{run.log_context.get('name', 'run')}/{stage.name}",
                                 "job_type": stage.name, "resuming": resume is not None}
    resumed_step = _step(resume)
    if resume is not None:
        log.info("Stage %s resumes from step %s (%s).", stage.name, resumed_step, resume)
    rows = (sum(len(builder.raw(stage, d).splits["train"]) for d in stage.datasets)
            if stage.subtasks else len(raw.splits["train"]))
    node, budget = (plan(stage.budget, stage.trainer, rows, dm.batch_size) if stage.budget
                    else (stage.trainer, None))
    check_val_interval(node, rows, dm.batch_size, stage.where)
    stops = early_stopping(stage.budget, task.monitor, task.mode)
    trainer = _trainer(stage, node, run, stage_dir, [keep, speed, *stops], context, key)
    if auto:
        from ftlab.autobatch import find_batch_size

        find_batch_size(trainer, module, dm, rt, stage.where)
        if budget:  # the budget was planned for the first batch tried: re-plan for the found one
            budget = plan(stage.budget, stage.trainer, rows, dm.batch_size)[1]
            trainer.fit_loop.max_epochs = budget["max_epochs"]
    stops = [c for c in stops if c in trainer.callbacks]  # none with a FollowsLength callback
    if budget and not stops:
        budget["patience"] = 0  # the record says so: no early stop
    if budget:
        log.info("Stage %s: adaptive budget, up to %d epochs of %d steps (min_steps %d, early "
                 "stop after %d validations without gain; trainer.max_epochs/max_steps fix the "
                 "length)", stage.name, budget["max_epochs"], budget["steps_per_epoch"],
                 budget["min_steps"], budget["patience"])
    start = time.perf_counter()
    trainer.fit(module, dm, ckpt_path=str(resume) if resume else None)
    fit_s = time.perf_counter() - start
    if keep.best is None and "validation" in dm.splits:  # max_steps ended before any validation
        trainer.validate(module, dm, verbose=False)
    keep.restore(module)

    metrics: dict[str, float] = {f"val/{k}": v for k, v in keep.metrics.items()}
    if "test" in dm.splits:
        metrics |= {k: float(v) for k, v in trainer.test(module, dm, verbose=False)[0].items()}
    for split, prefix in (("validation", "val"), ("test", "test")):
        if isinstance(task, HasSubtasks):  # each sub-task's on its own data (<task>/acc)
            baseline = task.baselines(split)
        elif (labels := scored_labels(raw, task, split)) is not None:
            # trivial predictors (regression: a constant), for the report
            baseline = task.baseline(labels) or {}
        else:
            continue
        metrics |= {f"{prefix}/baseline_{k}": v for k, v in baseline.items()}
    info = counts | {"lr": module.applied_lr or stage.optim.lr, "batch_size": dm.batch_size,
                     "batch_size_auto": auto, "fit_seconds": round(fit_s, 2), **speed.summary(),
                     "best_epoch": keep.best_epoch, "seed": stage.seed,
                     "train_rows": rows,
                     "global_steps": trainer.global_step, "handed_over": handed, **task.info,
                     **taught}
    if budget:  # the adaptive length (ftlab/budget.py) and where early stopping ended it
        info["budget"] = budget | {"stopped_early": bool(stops and stops[0].stopped_epoch)}
    if transformed:  # what each data transform did (rows added/changed, few-shot k...)
        info["data_transforms"] = transformed
    discarded = next((c.outcome for c in trainer.callbacks
                      if isinstance(c, StopsJob) and c.outcome), None)
    if discarded:  # stopped early (early discard, or a search's pruner): not a complete stage
        info["discarded"] = discarded | {"steps": trainer.global_step}
    info["resumed_from_step"] = resumed_step
    if elsewhere is not None:  # another job folder's (the same stage key)
        info["resumed_from"] = str(elsewhere)
    info["full_size_artefact"] = counts["params_trainable"] * 2 > counts["params_total"]
    result = StageResult(stage.name, metrics, module.model, info)
    if run.on_trained is not None:
        run.on_trained(result)
    with full_weights(trainer):  # FSDP: gather the shards (every rank takes part)
        if isinstance(peft, Reports):  # e.g. the sparsity reached; metrics.json has it
            info["peft"] = peft.report(module.model)  # (run.py records info after the stage)
        if stage.save_artefact and is_rank_zero():  # DDP: every rank holds the same weights
            skip = info["full_size_artefact"] and run.save_artefact == "none"
            info |= _save_artefact(stage, stage_dir, peft, module.model, task, tokenizer,
                                   transformed, weights=not skip)
    if not (spec and spec.keep) and is_rank_zero():  # the stage is done: free the disk
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    wait_for_all_ranks()  # DDP: a later stage may stack on the artefact rank zero just wrote
    return result


def _save_artefact(stage: ResolvedStage, stage_dir: Path, peft: PeftMethod, model: nn.Module,
                   task: Any, tokenizer: Any,
                   data_transforms: list[dict[str, Any]] | None = None,
                   weights: bool = True) -> dict[str, Any]:
    """``trainable.safetensors`` (+ a method's own folder) and the stage card beside it;
    without ``weights`` (``save_artefact: none``, a full-size artefact) the card only."""
    info: dict[str, Any] = {"artefact": None, "artefact_dropped": "save_artefact=none"}
    if weights:
        state = peft.trainable_state(model)
        path = save_tensors(stage_dir / "trainable.safetensors", state,
                            metadata={"peft": peft.name, "stage": stage.name})
        info = {"artefact": str(path), "artefact_kb": round(path.stat().st_size / 1024, 1)}
        if isinstance(peft, SavesArtefact):  # e.g. HF peft's save_pretrained folder
            info["artefact_dir"] = str(peft.save(model, stage_dir))
    write_stage_card(stage_dir, stage, task, tokenizer, data_transforms)
    return info


def _step(checkpoint: Path | None) -> int | None:
    """The optimiser step a stage resumed from (None: it started fresh)."""
    if checkpoint is None:
        return None
    import json

    return json.loads((checkpoint / "state.json").read_text())["checkpoint"]["global_step"]


def _trainer(stage: ResolvedStage, node: dict[str, Any], run: RunContext, stage_dir: Path,
             own: list[L.Callback], context: dict[str, Any],
             stage_key: str | None = None) -> L.Trainer:
    """The stage's Trainer from ``node`` (its trainer node, with the budget planned)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [instantiate_checked(node, f"callbacks.{key}")
                 for key, node in run.callbacks.items() if node is not None]
    if stage.optim.gradual_unfreeze:
        callbacks.append(GradualUnfreeze(stage.key, stage.where))
    if stage.head_warmup_steps:  # LP-FT: the head alone first
        callbacks.append(HeadWarmup(stage.head_warmup_steps, stage.where))
    planned = [type(c).__name__ for c in callbacks
               if isinstance(c, FollowsLength) and c.follows_length()]
    if planned and any(isinstance(c, EarlyStopping) for c in own):
        log.info("Stage %s: the adaptive budget's early stopping is off (%s: scheduled by the "
                 "planned steps); the best validation state is still kept.", stage.name,
                 ", ".join(planned))
        own = [c for c in own if not isinstance(c, EarlyStopping)]
    loggers = build_loggers(run.logger, save_dir=str(stage_dir), **context)
    if stage.trainer.get("enable_progress_bar") is False:  # a bar callback would contradict it
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    saving, plugins = stage_checkpointing(run.checkpoint, stage_dir / "checkpoints",
                                          stage_key)
    try:
        return instantiate_checked(node, f"{stage.where} trainer",
                                   default_root_dir=str(stage_dir),
                                   callbacks=[*callbacks, *own, NoteStep(), *saving],
                                   **({"plugins": plugins} if plugins else {}),
                                   logger=loggers or False, enable_checkpointing=bool(saving),
                                   use_distributed_sampler=False)  # ftlab's sampler shards
    except MisconfigurationException as err:  # e.g. trainer.devices=0: Lightning's own check
        raise FtlabError(f"{stage.where} trainer: {str(err).splitlines()[0]}",
                         "fix the trainer.* setting it names (conf/trainer/*.yaml).") from None
