"""The Task protocol every objective implements, and what a task's forward returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MetricCollection

from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec


@dataclass
class TaskOutput:
    """One batch through a task.

    Attributes:
        loss: the scalar training objective (with grad in training).
        logits: per-row scores, when the task has them (classification: ``[batch, classes]``);
            what regularisers (SMART, R3F), ensembles and distillation read.
        extras: anything else the task's metrics or callers need, by name (masked LM:
            ``nll_sum`` and ``count`` for perplexity; AuxMLM: ``aux_mlm_loss``).
    """

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """An objective: how rows become features, which model head, what loss and metrics.

    ``monitor`` (a metric name, e.g. ``acc``) and ``mode`` (``max``/``min``) choose the best
    validation epoch. ``features`` names the columns ``featurize`` emits and the model/task
    consumes (besides ``length``); the datamodule keeps exactly those. ``pad_values`` gives the
    pad value of a sequence feature the collator does not know (it knows ``input_ids`` -> the
    pad id, masks -> 0, token ``labels`` -> -100). ``info`` is merged into the stage's record.
    Subclass :class:`TaskDefaults` for the defaults of ``pad_values``, ``info`` and
    ``baseline``.
    """

    monitor: str
    mode: str
    features: tuple[str, ...]
    pad_values: Mapping[str, int | float]
    info: Mapping[str, Any]

    def bind(self, raw: RawData, tokenizer: Any, text_columns: list[str]) -> None:
        """Learn what depends on the data (label set, columns, feature names) before
        featurising."""

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        """Batched ``datasets.map`` function: raw rows -> ``features`` (unpadded) + ``length``."""

    def build_model(self, spec: ModelSpec) -> nn.Module:
        """The model with this task's head, from the pre-trained backbone."""

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """Loss, logits (if any) and extras for a batch."""

    def metrics(self) -> MetricCollection:
        """Fresh metric objects (one collection per split)."""

    def update(self, metrics: MetricCollection, out: TaskOutput,
               batch: dict[str, torch.Tensor]) -> None:
        """Feed a batch's output to ``metrics``."""

    def baseline(self, labels: Sequence[Any]) -> dict[str, float] | None:
        """Scores of a trivial predictor on these validation labels (None: none defined).

        Higher must be better for each (``ftlab.seedstats.failure`` marks a run whose
        ``val/<metric>`` is at or below its ``baseline_<metric>`` as failed, for the metrics
        in ``failed_by`` if the task has one): give no baseline for a lower-is-better metric
        such as a loss or an error."""


@runtime_checkable
class HasSubtasks(Protocol):
    """A task made of sub-tasks, each with its own data (``stage=multitask``): the builder
    hands it the bound-to-be sub-tasks (name -> ``ftlab.tasks.multitask.Part``) before
    ``bind``, and the datamodule reads ``parts`` and ``probabilities``."""

    parts: Mapping[str, Any]
    probabilities: Mapping[str, float]

    def bind_tasks(self, parts: Mapping[str, Any]) -> None: ...

    def baselines(self, split: str) -> dict[str, float]:
        """Each sub-task's trivial-predictor scores on its own ``split``, as ``<task>/<m>``."""


@runtime_checkable
class SeesPrepared(Protocol):
    """A task that is shown the model as the PEFT method and regulariser prepared it, to link
    what it holds to the modules now in place (a wrapped head) and to raise ``FtlabError``
    when they do not fit the task."""

    def prepared(self, model: nn.Module) -> None: ...


def as_text(value: Any) -> str:
    """A text column's value as the text a task tokenises: None -> "", a list of words (CoNLL
    data: TAPT on a tagging task's text) -> the words joined by spaces, not its Python repr."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return " ".join(as_text(v) for v in value)
    return str(value)


def check_room(max_length: int, tokenizer: Any, texts: int = 1) -> None:
    """Refuse a ``stage.task.max_length`` that leaves no token of each text beside the
    tokenizer's special tokens: below that, Transformers skips truncation (rows keep their full
    length, the setting is ignored) or keeps the special tokens only."""
    need = tokenizer.num_special_tokens_to_add(pair=texts > 1) + texts
    if max_length < need:
        raise FtlabError(f"stage.task.max_length={max_length} leaves no room for the text: the "
                         f"tokenizer adds {need - texts} special token(s) per row"
                         + (f" and each of its {texts} texts needs one" if texts > 1 else "")
                         + ".", f"set stage.task.max_length to at least {need} (128 is usual).")


class TaskDefaults:
    """Defaults for the Task protocol's optional parts: no extra pad values, no extra info,
    no baseline. Subclass it; override what the task has."""

    pad_values: Mapping[str, int | float] = MappingProxyType({})
    info: Mapping[str, Any] = MappingProxyType({})
    #: training outputs carry per-row class scores in ``logits`` (what R3F/SMART/FreeLB compare)
    row_logits: bool = True
    #: the baselines that decide whether a run failed (``ftlab.seedstats.failure``); None:
    #: every baseline the task reports (the others are shown in reports only)
    failed_by: tuple[str, ...] | None = None
    #: the loss is a mean over predicted tokens/words, ``extras["count"]`` of them per batch:
    #: ``val/loss`` weights each batch by that count (the split's mean, not a mean of batches)
    token_loss: bool = False
    #: T of the loss against probability vectors (distillation): T^2 x CE(scores / T, target)
    #: (PET's and Hinton et al.'s); 1: plain soft cross-entropy. A distillation stage sets it.
    soft_temperature: float = 1.0

    def baseline(self, labels: Sequence[Any]) -> dict[str, float] | None:
        return None


@runtime_checkable
class ScoresWithLMHead(Protocol):
    """A task whose predictions come from the pre-trained language-model head (cloze): that
    head must be trained, in the checkpoint or handed over by an earlier stage
    (``init_from`` + ``carry: model``); a fresh, random one is refused."""

    def untrained_head(self, missing: list[str]) -> Exception:
        """The error for a model whose checkpoint lacks the ``missing`` head tensors."""


@runtime_checkable
class ModelAware(Protocol):
    """A task whose features depend on the model family (a cloze row is the whole pattern for a
    masked LM but the text before the slot for a causal LM): the builder shows it the model's
    ``transformers`` config before it featurises anything."""

    def see_model(self, config: Any) -> None:
        """Learn what the features depend on; raise FtlabError for an unsuitable model."""


@runtime_checkable
class WeighsClasses(Protocol):
    """A task whose loss weighs classes by the training rows' labels (``class_weights:
    balanced``): a distillation stage, whose teachers relabel those rows after ``bind``, has
    it count the labels the student learns from."""

    def weigh_classes(self, labels: Any) -> None:
        """Set the class weights from the training rows' ``labels``."""


@runtime_checkable
class ChecksSettings(Protocol):
    """A task with settings to check against its bound labels and model before training (the
    pre-flight asks; loading a finished run does not, so a run trained with them predicts)."""

    def check_settings(self) -> None:
        """Raise FtlabError for a setting that would make the run mis-score silently."""


@runtime_checkable
class FitsTemplate(Protocol):
    """A task whose rows are its texts set in a template of its own (a cloze pattern, a
    text2text source): texts are cut to the room the template's tokens leave within
    ``max_length``; ``cut_to_fit`` says which rows of ``columns`` (by text column) were."""

    def cut_to_fit(self, columns: Mapping[str, list]) -> list[bool]: ...


@runtime_checkable
class PredictsRows(Protocol):
    """A task whose prediction is not one class per row (token tagging: a tag per word):
    ``ftlab.load(...).predict`` hands it the rows instead of reading class scores."""

    def predict_rows(self, model: nn.Module, rows: list[Any],
                     batch_size: int = 64) -> list[dict[str, Any]]:
        """One prediction per row, in input order (the model is in eval mode)."""


@runtime_checkable
class ProbabilitiesFromScores(Protocol):
    """A task whose class probabilities are not the softmax of its scores (a cloze task with
    contextual calibration): ``ftlab.load(...).predict`` asks it, so a prediction is what the
    task's metrics scored."""

    def probabilities(self, model: nn.Module, scores: torch.Tensor) -> torch.Tensor:
        """``[rows, classes]`` probabilities for ``scores`` (from ``model``, in eval mode)."""


@runtime_checkable
class PredictsNumbers(Protocol):
    """A task whose label is a number per row (``stage=regression``): the data's label column
    is read as floats (no label set is inferred; ``ftlab.data.numeric.numeric_labels``) and
    ``ftlab.load(...).predict`` gives each row's number (``{"value": ...}``) from its one score.
    Only methods, so the builder can ask a task's class (``issubclass``) before loading data."""

    def values(self, scores: torch.Tensor) -> torch.Tensor:
        """``[rows]`` predicted numbers from the task's ``[rows, 1]`` scores."""


def scored_labels(raw: RawData, task: Any, split: str) -> Sequence[Any] | None:
    """The ``split``'s labels a trivial baseline is scored on: class ids, or numbers for a
    ``PredictsNumbers`` task; None for unlabelled text or a missing split."""
    rows = raw.splits.get(split)
    if rows is None or (raw.labels is None and not isinstance(task, PredictsNumbers)):
        return None
    return rows["label"]


def soft_label_loss(scores: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against probability vectors at temperature T, times T^2 (Hinton et al.
    2015; PET's ``distillation_loss``, T^2 x KL, differs by a constant): the gradient keeps a
    hard-label loss's scale. T = 1: plain soft-target cross-entropy."""
    scaled = scores.float() / temperature
    return F.cross_entropy(scaled, target, weight=weight) * temperature**2
