"""Multi-task training in one stage: one shared encoder, one head per sub-task, single-task
batches drawn by a task-sampling rule (Aghajanyan et al. 2021, Muppet; Raffel et al. 2020, T5
section 3.5.2).

The sub-tasks are ordinary ftlab Tasks (``Classify``, token classification...), each bound to
its own data. ``build_model`` builds every sub-task's model, keeps one of them whole (the
*primary*: the first whose backbone holds every other's backbone weights) and gives each other
model that very backbone module; their heads are registered on the primary as top-level
modules ``mt__<task>__<module>``. So the trained model is an ordinary Transformers model with
extra heads: PEFT methods that change it in place (LoRA's ``modules_to_save`` wrap the extra
heads like the primary's; ``prepared`` links each sub-task's model to the wrapped head), the
stage cache and ``carry: encoder`` hand-over all see one backbone.

A batch carries the name of its sub-task (``batch["task"]``); ``forward`` runs that sub-task's
forward through its model and, in training, scales the loss (the sub-task's ``weight`` times
the ``loss_scaling`` factor; evaluation losses are plain). Metrics are the sub-tasks' own,
prefixed ``<task>/``, plus ``mean`` (the mean of every sub-task's monitored metric) and
``mean/<metric>`` for metric names all sub-tasks share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torchmetrics import MetricCollection

from ftlab.data.multitask import sampling_probabilities
from ftlab.data.sources import RawData
from ftlab.errors import FtlabError, choices_text
from ftlab.model.arch import backbone, unwrap
from ftlab.model.backbone import ModelSpec
from ftlab.tasks.base import Task, TaskDefaults, TaskOutput, scored_labels
from ftlab.tasks.multitask_metrics import TaskMetrics, TaskView

LOSS_SCALING = ("none", "size", "classes")


@dataclass
class Part:
    """One bound sub-task: its Task, raw data, text columns and loss weight."""

    task: Task
    raw: RawData
    text_columns: list[str]
    weight: float = 1.0


def _relink(inner: nn.Module, task: str) -> nn.Module:
    """``task``'s model, its head modules set to those now registered on the primary (a PEFT
    method or strategy may have wrapped them since ``build_model``)."""
    sub = inner.mt_models[task]
    for child, registered in inner.mt_heads[task].items():
        current = getattr(inner, registered)
        if sub._modules.get(child) is not current:
            setattr(sub, child, current)
    return sub


class MultiTask(TaskDefaults):
    """Several sub-tasks on one shared encoder (the stage's ``tasks``).

    Args:
        sampling: how each batch's sub-task is drawn: ``proportional`` (to training rows),
            ``temperature`` or ``uniform``.
        temperature: T of temperature sampling (p_i ~ n_i^(1/T)).
        size_cap: count a sub-task as at most this many rows when drawing (Raffel et al.'s K);
            null: no cap.
        loss_scaling: ``none``; ``size``: each loss times (n_i / N) / p_i, so the expected loss
            is the size-proportional mixture whatever the sampling; ``classes``: each loss
            divided by log(number of classes) (Muppet's loss scaling).
        monitor: ``mean`` (the sub-tasks' monitored metrics averaged) or ``<task>/<metric>``.
        mode: ``max`` or ``min`` for ``monitor``.
    """

    features: tuple[str, ...] = ()  # each sub-task featurises its own data

    def __init__(self, sampling: str = "temperature", temperature: float = 2.0,
                 size_cap: int | None = None, loss_scaling: str = "none",
                 monitor: str = "mean", mode: str = "max") -> None:
        if loss_scaling not in LOSS_SCALING:
            raise FtlabError(f"loss_scaling '{loss_scaling}' is not known.",
                             f"use one of: {choices_text(LOSS_SCALING)}.")
        sampling_probabilities([1], sampling, temperature, size_cap)  # checks names, T, K
        if mode not in ("max", "min"):  # anything else picked the lowest score as the best
            raise FtlabError(f"mode '{mode}' is not known.", "set stage.task.mode to max "
                             "(higher is better: acc, f1) or min (lower is better: loss).")
        self.sampling, self.temperature, self.size_cap = sampling, temperature, size_cap
        self.loss_scaling, self.monitor, self.mode = loss_scaling, monitor, mode
        self.parts: dict[str, Part] = {}
        self.probabilities: dict[str, float] = {}
        self.scales: dict[str, float] = {}
        self.info: dict[str, Any] = {}

    def bind_tasks(self, parts: Mapping[str, Part]) -> None:
        """Take the sub-tasks (before ``bind``); a trained stage's, without data (their label
        sets from its card: ``ftlab.load``), are taken to build its model, with nothing to draw."""
        if not parts:
            raise FtlabError("A multi-task stage has no sub-tasks.",
                             "list them under the stage's tasks (see conf/stage/multitask.yaml).")
        self.parts = dict(parts)
        if not all("train" in p.raw.splits for p in self.parts.values()):
            return
        sizes = {k: len(p.raw.splits["train"]) for k, p in self.parts.items()}
        probs = sampling_probabilities(list(sizes.values()), self.sampling, self.temperature,
                                       self.size_cap)
        self.probabilities = dict(zip(sizes, probs, strict=True))
        total = sum(sizes.values())
        self.scales = {k: self._scale(p, sizes[k] / total, self.probabilities[k])
                       for k, p in self.parts.items()}
        self.info = {"tasks": {k: {"train_rows": sizes[k], "p": round(self.probabilities[k], 4),
                                   "loss_scale": round(self.scales[k], 4)} for k in sizes}}

    def _scale(self, part: Part, share: float, p: float) -> float:
        scale = part.weight
        if self.loss_scaling == "size":
            scale *= share / p
        elif self.loss_scaling == "classes":  # Muppet: L / log n(i)
            n = len(part.raw.labels or getattr(part.task, "labels", None) or [])
            scale /= math.log(n) if n > 1 else 1.0
        return scale

    def bind(self, raw: RawData, tokenizer: Any, text_columns: list[str]) -> None:
        """Bind every sub-task to its own data (``raw`` is the first sub-task's)."""
        if not self.parts:  # e.g. predict/export from a stage card: no sub-task data
            raise FtlabError("A multi-task stage cannot be used without its sub-tasks' data "
                             "(ftlab-predict/export read one task).",
                             "predict with or export a later stage that starts from it "
                             "(init_from + carry: encoder), e.g. pipeline=multitask_task's task.")
        for part in self.parts.values():
            part.task.bind(part.raw, tokenizer, part.text_columns)
        monitors = {k: p.task.monitor for k, p in self.parts.items()}
        modes = {k: p.task.mode for k, p in self.parts.items()}
        if self.monitor == "mean" and set(modes.values()) != {self.mode}:
            raise FtlabError(f"monitor 'mean' averages the sub-tasks' monitored metrics "
                             f"({monitors}), but their modes differ from '{self.mode}': {modes}.",
                             "monitor one sub-task's metric instead, e.g. "
                             f"task.monitor={next(iter(monitors))}/"
                             f"{next(iter(monitors.values()))} with its mode.")

    @property
    def row_logits(self) -> bool:  # type: ignore[override]
        """Per-row class scores in training outputs (R3F/SMART/FreeLB): when every sub-task's
        outputs have them."""
        return all(getattr(p.task, "row_logits", False) for p in self.parts.values())

    def see_model(self, config: Any) -> None:
        """Show the model's config to the sub-tasks whose features depend on it (cloze...)."""
        from ftlab.tasks.base import ModelAware

        for part in self.parts.values():
            if isinstance(part.task, ModelAware):
                part.task.see_model(config)

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        raise FtlabError("A multi-task stage featurises each sub-task's data with that "
                         "sub-task.", "use ftlab.data.multitask.MultiTaskDataModule.")

    def build_model(self, spec: ModelSpec) -> nn.Module:
        from ftlab.handover import backbone_keys

        models = {k: p.task.build_model(spec) for k, p in self.parts.items()}
        keys = {k: backbone_keys(m) for k, m in models.items()}
        primary = next((k for k in models if all(keys[o] <= keys[k] for o in models)), None)
        if primary is None:
            raise FtlabError("The sub-tasks' models have backbones that differ in their "
                             "weights, so they cannot share one encoder.",
                             "use sub-tasks whose models build the same backbone.")
        main = unwrap(models[primary])
        shared, heads, others = backbone(main), {}, {}
        for name, model in models.items():
            if name == primary:
                continue
            inner = unwrap(model)
            prefix = getattr(inner, "base_model_prefix", "")
            if not prefix or backbone(inner) is inner:
                raise FtlabError(f"Sub-task '{name}''s model has no separate backbone "
                                 f"({type(inner).__name__}), so it cannot share one.",
                                 "use a task whose model has a head on a backbone.")
            setattr(inner, prefix, shared)  # one encoder module: every task's gradients meet
            heads[name] = {}
            for child, module in inner.named_children():
                if child != prefix:  # registered once, on the primary (top level: PEFT sees it)
                    heads[name][child] = f"mt__{name}__{child}"
                    main.add_module(heads[name][child], module)
            others[name] = inner
        main.mt_heads = heads  # sub-task -> its head module -> the name it has on the primary
        main.mt_models = others  # plain dicts: nothing is registered twice
        main.mt_primary = primary
        return models[primary]

    def prepared(self, model: nn.Module) -> None:
        """Link each sub-task's model to its head as the PEFT method left it (HF peft wraps
        heads in ``ModulesToSaveWrapper``s), then check that every sub-task's forward sees
        what trains: a method that trains parameters outside the Transformers model (a
        re-parametrising wrapper, prompt tuning) or freezes a head is refused."""
        inner = unwrap(model)
        for name in getattr(inner, "mt_heads", {}):
            _relink(inner, name)
        reach = {id(p) for p in inner.parameters()}
        outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reach]
        if outside:
            raise FtlabError(f"This PEFT method trains parameters outside the model "
                             f"({', '.join(outside[:3])}...) that only the primary sub-task's "
                             "forward would use.", "use a method that changes the model in "
                             "place for stage=multitask: full, bitfit, last_layer, adapters, "
                             "lora, ia3.")
        for name in getattr(inner, "mt_heads", {}):
            head = [p for c, m in inner.mt_models[name].named_children()
                    if c in inner.mt_heads[name] for p in m.parameters()]
            if head and not any(p.requires_grad for p in head):
                raise FtlabError(f"The PEFT method froze sub-task '{name}''s head.",
                                 "use a method that trains every head (full, bitfit, adapters, "
                                 "lora), or add its modules to peft.config.modules_to_save.")

    def model_for(self, model: nn.Module, task: str) -> nn.Module:
        """The model whose forward is ``task``'s: ``model`` itself (the primary) or the other
        sub-task's model that shares its backbone (in ``model``'s train/eval mode)."""
        inner = unwrap(model)
        if task == inner.mt_primary:
            return model
        if not isinstance(model, nn.Module):  # e.g. SMART's teacher: weights swapped per call
            raise FtlabError(f"The model reaches sub-task '{task}' through a {type(model).__name__}"
                             ", whose swapped-in weights only the primary sub-task would use.",
                             "use regularizer=none, r3f, freelb or mixout with stage=multitask "
                             "(or regularizer=smart with regularizer.mu=0: no teacher).")
        sub = _relink(inner, task)  # a strategy may have wrapped a head since (FSDP)
        if sub.training != inner.training:
            sub.train(inner.training)
        return sub

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> TaskOutput:
        name = batch["task"]
        if name not in self.parts:
            raise FtlabError(f"A batch of sub-task '{name}', which this stage does not have.",
                             f"its sub-tasks: {choices_text(self.parts)}.")
        rows = {k: v for k, v in batch.items() if k != "task"}
        out = self.parts[name].task.forward(self.model_for(model, name), rows)
        scale = self.scales.get(name, 1.0) if model.training else 1.0  # evaluation: val/loss
        # is the sub-tasks' plain loss, not the training objective's weighting
        return out if scale == 1.0 else TaskOutput(out.loss * scale, out.logits, out.extras)

    def metrics(self) -> MetricCollection:
        metrics = {f"{k}/{m}": metric for k, p in self.parts.items()
                   for m, metric in p.task.metrics().items(keep_base=True, copy_state=False)}
        return TaskMetrics(metrics, {k: p.task.monitor for k, p in self.parts.items()})

    def update(self, metrics: MetricCollection, out: TaskOutput,
               batch: dict[str, Any]) -> None:
        name = batch["task"]
        rows = {k: v for k, v in batch.items() if k != "task"}
        self.parts[name].task.update(TaskView(metrics, name), out, rows)  # type: ignore[arg-type]

    def baseline(self, labels: Sequence[Any]) -> dict[str, float] | None:
        return None  # one dataset's labels say nothing here: see ``baselines``

    @property
    def failed_by(self) -> tuple[str, ...] | None:  # type: ignore[override]
        """Each bound sub-task's own failure rule under its ``<task>/`` prefix (NER fails at
        entity F1, not token accuracy); None (every baseline) when no sub-task narrows it."""
        rules = {k: getattr(p.task, "failed_by", None) for k, p in self.parts.items()}
        if all(r is None for r in rules.values()):
            return None
        return tuple(f"{k}/{m}" for k, p in self.parts.items()
                     for m in (rules[k] or p.task.metrics().keys()))

    def baselines(self, split: str) -> dict[str, float]:
        """Each sub-task's own baseline on its ``split`` labels, as ``<task>/<metric>``."""
        out: dict[str, float] = {}
        for name, part in self.parts.items():
            labels = scored_labels(part.raw, part.task, split)
            if labels is not None:
                out |= {f"{name}/{k}": v for k, v in (part.task.baseline(labels) or {}).items()}
        return out
