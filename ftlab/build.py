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

from ftlab.config import instantiate_checked
from ftlab.data.batching import require_one_batch
from ftlab.data.sources import RawData, load_raw
from ftlab.data.transforms.nodes import transform_raw
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_config, load_tokenizer, pretrained_source
from ftlab.peft.base import PeftMethod
from ftlab.pipeline import ResolvedStage
from ftlab.regularizers.base import ChecksTask, Regularizer
from ftlab.tasks.base import ModelAware, ScoresWithLMHead, Task

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

    def raw(self, stage: ResolvedStage) -> RawData:
        """The stage's splits: loaded once per data spec (transforms aside), then its
        ``data.transforms`` applied to the training rows (once per spec and seed)."""
        data = stage.data
        # the seed only picks the rows of a capped training split
        seed = stage.seed if data.max_train_samples is not None else 0
        key = f"{replace(data, transforms=[])!r}/{seed}"
        if key not in self._raw:
            self._raw[key] = load_raw(data, seed)
        if not data.transforms:
            return self._raw[key]
        changed = f"{data!r}/{stage.seed}"
        if changed not in self._raw:
            self._raw[changed] = transform_raw(self._raw[key], data.transforms,
                                               data.text_columns, stage.seed,
                                               f"{stage.where} data.transforms")
        return self._raw[changed]

    def task(self, stage: ResolvedStage) -> Task:
        """The stage's task, bound to its data and tokenizer (once per stage)."""
        if stage.name not in self._tasks:
            raw = self.raw(stage)
            if stage.batch_size != "auto":  # auto never exceeds the split (the tuner caps it)
                require_one_batch(len(raw.splits["train"]), stage.batch_size, f"{stage.where}: ")
            task = _instantiate_task(stage)
            task.bind(raw, self.tokenizer(stage.model), stage.data.text_columns)
            if isinstance(task, ModelAware):
                task.see_model(load_config(stage.model))
            self._tasks[stage.name] = task
            self._stages[stage.name] = stage
        return self._tasks[stage.name]

    def trained(self, name: str, model: nn.Module | dict) -> tuple[nn.Module, Task,
                                                                   ResolvedStage]:
        """(model, bound task, resolved stage) of a stage that ran in this job; ``model`` is its
        trained model, or its state dict when the stage came from the cache."""
        stage = self._stages[name]
        if not isinstance(model, nn.Module):
            state, (model, _, _, _) = model, self.model(stage)
            model.load_state_dict(state, strict=False)
        return model, self._tasks[name], stage

    def saved_task(self, stage: ResolvedStage, labels: list[str] | None, tokenizer: Any) -> Task:
        """The stage's task bound to a finished stage's saved label set and tokenizer, without
        its data (inference); later ``task``/``model`` calls for the stage use it."""
        from datasets import DatasetDict

        task = _instantiate_task(stage)
        task.bind(RawData(DatasetDict(), labels), tokenizer, stage.data.text_columns)
        if isinstance(task, ModelAware):
            task.see_model(load_config(stage.model))
        self._tokenizers[repr(stage.model)] = tokenizer
        self._tasks[stage.name] = task
        return task

    def peft(self, stage: ResolvedStage) -> PeftMethod:
        return instantiate_checked(stage.peft, f"{stage.where} peft")

    def regularizer(self, stage: ResolvedStage) -> Regularizer:
        return instantiate_checked(stage.regularizer, f"{stage.where} regularizer")

    def model(self, stage: ResolvedStage, upstream: Any = None) -> tuple[nn.Module, PeftMethod,
                                                                         Regularizer, dict]:
        """(model ready to train, its PEFT method, regulariser, hand-over counts).

        ``upstream``: the ``init_from`` stage's model or state dict (None: pre-trained).
        """
        task = self.task(stage)
        model = task.build_model(stage.model)
        handed: dict[str, int] = {}
        if upstream is not None:
            from ftlab.handover import hand_over

            handed = hand_over(upstream, model, stage.carry)
        require_trained_head(stage, task, model)
        return *self._prepare(stage, model), handed

    def _prepare(self, stage: ResolvedStage, model: nn.Module
                 ) -> tuple[nn.Module, PeftMethod, Regularizer]:
        """The stage's PEFT method, then its regulariser, applied to ``model``."""
        peft, regularizer = self.peft(stage), self.regularizer(stage)
        if isinstance(regularizer, ChecksTask):  # e.g. R3F needs per-row logits
            regularizer.check_task(self.task(stage))
        return regularizer.apply(peft.apply(model)), peft, regularizer

    def check_fits(self, stage: ResolvedStage) -> None:
        """Build the stage's model on the meta device (no weights) and apply its PEFT method and
        regulariser: a method that does not fit the architecture fails here, in seconds."""
        arch = architecture_twin(stage.model)
        if arch is None:
            return
        task = self.task(stage)
        try:
            with torch.device("meta"):
                model = task.build_model(arch)
        except FtlabError:
            raise
        except Exception as err:  # the real load reports real problems; this is only a check
            log.debug("Skipped the PEFT check (%s: %s).", type(err).__name__, err)
            return
        require_trained_head(stage, task, model)
        try:
            self._prepare(stage, model)
        except FtlabError:
            raise
        except Exception as err:
            log.debug("PEFT check inconclusive on the meta device (%s: %s).",
                      type(err).__name__, err)


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


def _instantiate_task(stage: ResolvedStage) -> Task:
    task = instantiate_checked(stage.task, f"{stage.where}.task")
    if stage.aux_mlm_weight > 0:
        from ftlab.tasks.mlm import AuxMLM

        task = AuxMLM(task, stage.aux_mlm_weight)
    return task


def architecture_twin(spec: ModelSpec) -> ModelSpec | None:
    """A from-config twin of ``spec`` (same architecture, random weights), if it can be had."""
    if spec.name_or_path is None:
        return spec
    try:
        from transformers import AutoConfig

        folder, extra = pretrained_source(spec.name_or_path)  # a .gguf file: its header
        config = AutoConfig.from_pretrained(folder, **extra, **spec.config).to_dict()
    except Exception:
        return None
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in (
        "architectures", "transformers_version", "id2label", "label2id", "num_labels",
        "quantization_config")}
    return ModelSpec(name_or_path=None, tokenizer=spec.tokenizer or spec.name_or_path,
                     config=keep, revision=spec.revision)
