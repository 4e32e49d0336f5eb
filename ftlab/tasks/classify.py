"""Sequence and sentence-pair classification with a head on the first-token representation.

Labels are class ids (cross-entropy, as the model computes it) or, when the data gives a
probability vector per row, soft targets (cross-entropy against the distribution: distillation,
annotator label distributions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ftlab.data.conll import is_tag_ids
from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_model
from ftlab.rules import at_least, one_of
from ftlab.tasks.base import TaskDefaults, TaskOutput, as_text, check_room, soft_label_loss

#: ``class_weights``: none (plain cross-entropy) | balanced (inverse class frequency)
CLASS_WEIGHTS = ("none", "balanced")


def label_counts(labels: Sequence[Any], n: int) -> torch.Tensor:
    """Rows per class (probability vectors count as their most likely class)."""
    ids = torch.as_tensor(list(labels))
    if ids.is_floating_point():
        ids = ids.argmax(-1)
    return torch.bincount(ids.long(), minlength=n)


def balanced_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights ``rows / (classes * rows of the class)`` (scikit-learn's
    ``class_weight="balanced"``); a class absent from training gets weight 0."""
    counts = counts.double()
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w.float()


def auto_monitor(counts: torch.Tensor | None, ratio: float) -> str:
    """``monitor: auto``: macro-F1 (``f1``) when the largest class of the training labels has
    more than ``ratio`` times the rows of the smallest, else accuracy (``acc``)."""
    if counts is None:
        return "acc"
    present = counts[counts > 0].double()
    return "f1" if present.numel() > 1 and present.max() > ratio * present.min() else "acc"


class Classify(TaskDefaults):
    """Cross-entropy over ``len(labels)`` classes; metrics: accuracy and macro-F1.

    ``labels`` in a batch are class ids (long, ``[batch]``) or probability vectors (float,
    ``[batch, classes]``: soft-target cross-entropy; metrics compare with their argmax).

    Args:
        monitor: the validation metric that picks the best epoch (``acc``, ``f1``, ``loss``),
            or ``auto``: ``f1`` when the training labels' largest class has more than
            ``imbalance_ratio`` times the rows of the smallest, else ``acc`` (the whole
            training split's counts, ``RawData.train_counts``, where the loader has them).
        class_weights: ``none`` or ``balanced``: each class's loss is weighted by
            ``rows / (classes * rows of the class)``, so rare classes count as much in total.
    """

    def __init__(self, max_length: Annotated[int, at_least(1, example="128")] = 128,
                 monitor: str = "acc",
                 class_weights: Annotated[str, one_of(*CLASS_WEIGHTS)] = "none",
                 imbalance_ratio: Annotated[float, at_least(1, example="1.5")] = 1.5) -> None:
        self.max_length = max_length
        self.monitor = monitor  # "auto": chosen from the training labels in bind
        self.mode = "min" if monitor == "loss" else "max"
        self.class_weights = class_weights
        self.imbalance_ratio = imbalance_ratio
        self.weight: torch.Tensor | None = None  # per-class loss weights (class_weights)
        self.labels: list[str] = []
        self.features: tuple[str, ...] = ("input_ids", "attention_mask", "labels")

    def bind(self, raw: RawData, tokenizer: Any, text_columns: list[str]) -> None:
        if raw.labels is None:
            raise FtlabError("stage=classify needs labelled data, but data.label_column is null.",
                             "set data.label_column, or use an unlabelled objective (stage=mlm).")
        train = raw.splits["train"] if "train" in raw.splits else None
        if train is not None and is_tag_ids(train.features["label"]):
            raise FtlabError("The data has a tag per word (token classification), not a label "
                             "per row.", "use stage=tokens with this data (e.g. stage=tokens "
                             "data=wnut16).")
        self.labels = raw.labels
        counts = label_counts(train["label"], len(self.labels)) if train is not None else None
        if self.monitor == "auto":  # predict/export (no data): accuracy
            whole = raw.train_counts  # the split before the seed's subset
            self.monitor = auto_monitor(torch.tensor(whole) if whole is not None else counts,
                                        self.imbalance_ratio)
        if train is not None:
            self.weigh_classes(train["label"])
        check_room(self.max_length, tokenizer, len(text_columns))
        self.tokenizer = tokenizer
        self.text_columns = list(text_columns)
        self.features = (*tokenizer.model_input_names, "labels")  # what the tokenizer emits

    def weigh_classes(self, labels: Sequence[Any]) -> None:
        """``class_weights: balanced``: weights from ``labels``, the rows the stage learns from
        (bind's training split, or the rows its teachers labelled)."""
        if self.class_weights == "balanced":
            self.weight = balanced_weights(label_counts(labels, len(self.labels)))

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [[as_text(t) for t in batch[c]] for c in self.text_columns]
        enc = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
        enc["labels"] = batch["label"]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return dict(enc)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return sequence_model(
            spec, getattr(self, "tokenizer", None), num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={name: i for i, name in enumerate(self.labels)},
            problem_type="single_label_classification")

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        # soft targets (HF would take them as multi-label) or class weights: our own CE
        if batch["labels"].is_floating_point() or self.weight is not None:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            return TaskOutput(self.loss(logits, batch["labels"]), logits)
        out = model(**batch)
        return TaskOutput(out.loss, out.logits)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class ids or probability vectors, weighted per class with
        ``class_weights: balanced`` (the weighted mean, as ``torch.nn.CrossEntropyLoss``)."""
        weight = None if self.weight is None else self.weight.to(logits.device)
        if labels.is_floating_point():  # distillation: at the stage's student temperature
            return soft_label_loss(logits, labels, self.soft_temperature, weight)
        return F.cross_entropy(logits.float(), labels, weight=weight)

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits ``[batch, classes]`` (no labels needed): what predictors and teachers
        read."""
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def metrics(self) -> MetricCollection:
        n = len(self.labels)
        return MetricCollection({"acc": MulticlassAccuracy(num_classes=n, average="micro"),
                                 "f1": MulticlassF1Score(num_classes=n, average="macro")})

    def update(self, metrics: MetricCollection, out: TaskOutput,
               batch: dict[str, torch.Tensor]) -> None:
        target = batch["labels"]
        if target.is_floating_point():
            target = target.argmax(-1)
        metrics.update(out.logits.float().argmax(-1), target)

    def baseline(self, labels: Sequence[Any]) -> dict[str, float]:
        """Trivial predictors' scores on these labels; a run at or below either learnt nothing.

        ``acc``: the majority class's share. ``f1``: macro-F1 at chance, the better of always
        predicting the majority class (2p/(1+p) for that class, 0 for the rest) and guessing
        uniformly at random (class i: 2 p_i (1/k) / (p_i + 1/k)), over the k classes present.
        """
        ids = torch.as_tensor(list(labels))
        if ids.is_floating_point():  # probability vectors: their most likely class
            ids = ids.argmax(-1)
        counts = torch.bincount(ids, minlength=len(self.labels)).double()
        p = counts[counts > 0] / counts.sum()
        k = p.numel()
        majority_f1 = (2 * p.max() / (1 + p.max())).item() / k
        uniform_f1 = (2 * p / k / (p + 1 / k)).mean().item()
        return {"acc": p.max().item(), "f1": max(majority_f1, uniform_f1)}


def sequence_model(spec: ModelSpec, tokenizer: Any, **head: Any) -> nn.Module:
    """``AutoModelForSequenceClassification`` for ``spec`` with the ``head`` config keys
    (``num_labels``, ``problem_type``...), told the tokenizer's pad/EOS ids (None: before
    ``bind``, e.g. the meta-device check) and checked that it can find its pooling token."""
    from dataclasses import replace

    from transformers import AutoModelForSequenceClassification

    from ftlab.model.tokenizer_fit import check_pooling_token

    # decoder-only heads pool the last non-pad token, T5's the last EOS: the model must know the
    # tokenizer's ids
    ids = {k: getattr(tokenizer, k) for k in ("pad_token_id", "eos_token_id")
           if getattr(tokenizer, k, None) is not None}
    # problem_type is given, not inferred by the model's first forward with labels: that write
    # to the config made torch.compile compile the forward twice, and DeBERTa-v2's inference
    # path (`labels.nonzero()`) breaks the graph CUDA graphs need. Class ids go to the model
    # only as integers (soft targets take our own loss, `Classify.forward`).
    model = load_model(replace(spec, config={**spec.config, **ids}),
                       AutoModelForSequenceClassification, **head)
    if tokenizer is not None:
        check_pooling_token(model, tokenizer)
    return model
