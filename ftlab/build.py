"""One builder of a stage's parts, shared by validation and training.

A job makes one ``StageBuilder``; validation asks it for every stage's task (which loads and
checks the data) and a weightless model (the PEFT method applied on the meta device), training
asks it again and gets the same tokenizer, data and bound task back: nothing is loaded twice.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ftlab.config import instantiate_checked, require_protocol
from ftlab.contracts import PEFT_HINT, REGULARIZER_HINT, check_state, returned_model
from ftlab.data.batching import require_one_batch
from ftlab.data.datamodule import TextDataModule
from ftlab.data.sources import RawData, load_raw
from ftlab.data.spec import DataSpec
from ftlab.data.transforms.nodes import transform_raw
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, architecture_twin, load_config, load_tokenizer
from ftlab.peft.base import PeftMethod
from ftlab.pipeline import ResolvedStage
from ftlab.regularizers.base import ChecksTask, Regularizer
from ftlab.task_fit import (
    fresh_as_in,
    require_positions,
    require_trained_head,
    require_warmup_head,
    trains_head_only,
)
from ftlab.tasks.base import HasSubtasks, ModelAware, SeesPrepared, Task
from ftlab.tasks.nodes import instantiate_task, reads_numbers, stage_task

log = logging.getLogger(__name__)

class StageBuilder:
    """Builds tasks, models, PEFT methods and regularisers from resolved stages; caches the
    tokenizer per model, the raw data per (data, seed) and the bound task per stage."""

    def __init__(self) -> None:
        self._tokenizers: dict[str, Any] = {}
        self._raw: dict[str, RawData] = {}
        self._tasks: dict[str, Task] = {}
        self._stages: dict[str, ResolvedStage] = {}

    def tokenizer(self, spec: ModelSpec) -> Any:
        key = repr(spec)
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(spec)
        return self._tokenizers[key]

    def raw(self, stage: ResolvedStage, data: DataSpec | None = None) -> RawData:
        """The stage's splits (or ``data``'s: one of its sub-tasks'): loaded once per data spec
        (transforms aside), then its ``transforms`` applied to the training rows (once per spec
        and seed). Labels are numbers where the task reading them predicts numbers."""
        tasks = [stage.task] if data is None else [s.task for s in stage.subtasks
                                                   if s.data == data]
        numeric = any(reads_numbers(t, stage.where) for t in tasks)
        data = data or stage.data
        # the seed only picks the rows of a capped training split
        seed = stage.seed if data.max_train_samples is not None else 0
        key = f"{replace(data, transforms=[])!r}/{seed}/{'numbers' if numeric else 'classes'}"
        if key not in self._raw:
            try:
                self._raw[key] = load_raw(data, seed, numeric=numeric)
            except FtlabError as err:  # named at the keys that set this stage's data
                raise (stage.data_error(err) if data is stage.data else err) from None
        if not data.transforms:
            return self._raw[key]
        changed = f"{data!r}/{stage.seed}/{numeric}"
        if changed not in self._raw:
            self._raw[changed] = transform_raw(self._raw[key], data.transforms,
                                               data.text_columns, stage.seed,
                                               f"{stage.where} data.transforms")
        return self._raw[changed]

    def task(self, stage: ResolvedStage) -> Task:
        """The stage's task, bound to its data and tokenizer (once per stage); a multi-task
        stage's task gets its sub-tasks, each bound to its own data."""
        if stage.name not in self._tasks:
            task = stage_task(stage)
            if stage.subtasks or isinstance(task, HasSubtasks):
                self._bind_subtasks(stage, task)
            raw = self.raw(stage)
            if stage.batch_size != "auto":  # auto never exceeds the split (the tuner caps it)
                require_one_batch(len(raw.splits["train"]), stage.batch_size, f"{stage.where}: ",
                                  raw.transforms)
            task.bind(raw, self.tokenizer(stage.model), stage.data.text_columns)
            if isinstance(task, ModelAware):
                task.see_model(load_config(stage.model))
            self._tasks[stage.name] = task
            self._stages[stage.name] = stage
        return self._tasks[stage.name]

    def _bind_subtasks(self, stage: ResolvedStage, task: Task) -> None:
        from ftlab.tasks.multitask import Part

        if not (stage.subtasks and isinstance(task, HasSubtasks)):
            raise FtlabError(
                f"{stage.where} has sub-tasks but a single-task objective, or the other way "
                "round." if stage.subtasks else f"{stage.where}'s multi-task objective has no "
                "sub-tasks.", "use stage=multitask (task: ftlab.tasks.multitask.MultiTask) and "
                "list the sub-tasks under its tasks.")
        if stage.batch_size == "auto":
            raise FtlabError(f"{stage.where}: batch_size 'auto' is not supported for a "
                             "multi-task stage.", "give stage.batch_size a number, e.g. 32.")
        parts = {}
        for sub in stage.subtasks:
            where = f"{stage.where} sub-task '{sub.name}'"
            raw = self.raw(stage, sub.data)
            require_one_batch(len(raw.splits["train"]), stage.batch_size, f"{where}: ",
                              raw.transforms)
            parts[sub.name] = Part(instantiate_task(sub.task, f"{where} task"), raw,
                                   list(sub.data.text_columns), sub.weight)
        task.bind_tasks(parts)

    def datamodule(self, stage: ResolvedStage, raw: RawData | None = None) -> Any:
        """The stage's batches: ``raw``'s (default: the stage's data), or a multi-task stage's
        single-task batches. ``batch_size: auto`` starts at ``runtime.auto_batch_init``."""
        task, pad, rt = self.task(stage), self.tokenizer(stage.model).pad_token_id, stage.runtime
        loader = dict(eval_batch_size=stage.eval_batch_size, seed=stage.seed,
                      num_workers=rt.num_workers)
        if isinstance(task, HasSubtasks):
            from ftlab.data.multitask import MultiTaskDataModule

            return MultiTaskDataModule({k: (p.raw.splits, p.task) for k, p in task.parts.items()},
                                       task.probabilities, pad, batch_size=stage.batch_size,
                                       **loader)
        raw = raw or self.raw(stage)
        size = (min(rt.auto_batch_init, len(raw.splits["train"])) if stage.batch_size == "auto"
                else stage.batch_size)
        return TextDataModule(raw.splits, task, pad, batch_size=size, **loader,
                              pin_memory=rt.pin_memory, persistent_workers=rt.persistent_workers,
                              pad_to_multiple_of=rt.pad_to_multiple_of,
                              pad_to_buckets=rt.pad_to_buckets)

    def trained(self, name: str, model: nn.Module | dict) -> tuple[nn.Module, Task,
                                                                   ResolvedStage]:
        """(model, bound task, resolved stage) of a stage that ran in this job; ``model`` is its
        trained model, or its state dict when the stage came from the cache."""
        stage = self._stages[name]
        if not isinstance(model, nn.Module):
            # a cached state dict is loaded into a model built for it: building draws random
            # numbers, which must not shift the initialisation and data order of the stage
            # being built (a cache hit trains it as a miss would)
            with torch.random.fork_rng(devices=[]):
                state, (model, _, _, _) = model, self.model(stage)
            model.load_state_dict(state, strict=False)
        return model, self._tasks[name], stage

    def plain(self, name: str, trained: nn.Module | dict) -> nn.Module:
        """Stage ``name``'s trained model (or its state dict, from the cache) as a plain
        Transformers model: its PEFT method merged into a copy (``handover.plain_model``)."""
        from ftlab.handover import plain_model

        model, _, stage = self.trained(name, trained)
        return plain_model(model, self.peft(stage), name)

    def saved_task(self, stage: ResolvedStage, labels: list[str] | None, tokenizer: Any,
                   subtask_labels: dict[str, list[str] | None] | None = None) -> Task:
        """The stage's task bound to a finished stage's saved label set and tokenizer, without
        its data (inference); later ``task``/``model`` calls for the stage use it. A multi-task
        stage's sub-tasks are bound to theirs (``subtask_labels``, by name)."""
        from datasets import DatasetDict

        from ftlab.tasks.multitask import Part

        task = stage_task(stage)
        if stage.subtasks and isinstance(task, HasSubtasks) and subtask_labels is not None:
            task.bind_tasks({sub.name: Part(
                instantiate_task(sub.task, f"{stage.where} sub-task '{sub.name}' task"),
                RawData(DatasetDict(), subtask_labels[sub.name]), list(sub.data.text_columns),
                sub.weight) for sub in stage.subtasks})
        task.bind(RawData(DatasetDict(), labels), tokenizer, stage.data.text_columns)
        if isinstance(task, ModelAware):
            task.see_model(load_config(stage.model))
        self._tokenizers[repr(stage.model)] = tokenizer
        self._tasks[stage.name] = task
        self._stages[stage.name] = stage
        return task

    def peft(self, stage: ResolvedStage) -> PeftMethod:
        return require_protocol(instantiate_checked(stage.peft, f"{stage.where} peft"),
                                PeftMethod, f"{stage.where} peft", PEFT_HINT)

    def regularizer(self, stage: ResolvedStage) -> Regularizer:
        where = f"{stage.where} regularizer"
        return require_protocol(instantiate_checked(stage.regularizer, where), Regularizer,
                                where, REGULARIZER_HINT)

    def model(self, stage: ResolvedStage, upstream: Any = None) -> tuple[nn.Module, PeftMethod,
                                                                         Regularizer, dict]:
        """(model ready to train, its PEFT method, regulariser, hand-over counts).

        ``upstream``: the ``init_from`` stage's model or state dict (None: pre-trained).
        """
        task = self.task(stage)
        model = task.build_model(stage.model)
        handed: dict[str, int] = {}
        if upstream is not None:
            from ftlab.handover import hand_over, head_labels, warn_other_labels

            source = self.plain(stage.init_from, upstream)
            handed = hand_over(source, model, stage.carry)
            warn_other_labels(stage.name, stage.init_from, stage.carry,
                              head_labels(self._tasks.get(stage.init_from), source),
                              head_labels(task, model))
        require_trained_head(stage, task, model)
        require_positions(stage, task, model)
        return *self._prepare(stage, model, task), handed

    def _prepare(self, stage: ResolvedStage, model: nn.Module, task: Task
                 ) -> tuple[nn.Module, PeftMethod, Regularizer]:
        """The stage's PEFT method, then its regulariser, applied to ``model`` (then shown to
        the task, if it looks at prepared models)."""
        peft, regularizer = self.peft(stage), self.regularizer(stage)
        if isinstance(regularizer, ChecksTask):  # e.g. R3F needs per-row logits
            regularizer.check_task(self.task(stage))
        model = returned_model(peft.apply(model), peft, f"{stage.where} peft")
        model = returned_model(regularizer.apply(model), regularizer,
                               f"{stage.where} regularizer")
        if not any(p.requires_grad for p in model.parameters()):
            raise FtlabError(f"{stage.where}: peft={peft.name} left no parameter of the "
                             f"{type(model).__name__} to train.",
                             "choose a method that trains some of this model's parameters "
                             "for this stage (peft=full, lora, adapter_houlsby ...); in a "
                             "method of your own, apply() must leave the parameters that "
                             "train with requires_grad=True.")
        if not type(peft).__module__.startswith("ftlab."):  # yours: the artefact's type now,
            check_state(peft.trainable_state(model), peft)  # not after training
        if isinstance(task, SeesPrepared):
            task.prepared(model)
        return model, peft, regularizer

    def check_fits(self, stage: ResolvedStage) -> bool | None:
        """Build the stage's model on the meta device (no weights) and apply its PEFT method and
        regulariser: a method that does not fit the architecture fails here, in seconds.
        Returns whether only the head trains (nothing in the backbone: what ``carry: encoder``
        hands on would be untouched); None when the check could not tell."""
        arch = architecture_twin(stage.model)
        if arch is None:
            return None
        task = self.task(stage)
        try:
            with torch.device("meta"):
                model = task.build_model(arch)
        except FtlabError:
            raise
        except Exception as err:  # the real load reports real problems; this is only a check
            log.debug("Skipped the PEFT check (%s: %s).", type(err).__name__, err)
            return None
        require_trained_head(stage, task, model)
        require_positions(stage, task, model)
        fresh_as_in(model, stage.model)
        try:
            model = self._prepare(stage, model, task)[0]
        except FtlabError as err:  # the PEFT method or regulariser does not fit the stage
            raise MethodMisfit(err.problem, err.fix) from None
        except Exception as err:
            log.debug("PEFT check inconclusive on the meta device (%s: %s).",
                      type(err).__name__, err)
            return None
        require_warmup_head(stage, model)
        return trains_head_only(model)


class MethodMisfit(FtlabError):
    """``check_fits``: the stage's PEFT method or regulariser does not fit its model or task
    (in a pipeline, the run's ``peft=``/``regularizer=`` may be meant for another stage)."""
