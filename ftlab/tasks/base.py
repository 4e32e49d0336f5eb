"""The Task protocol every objective implements."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torchmetrics import MetricCollection

from ftlab.data.sources import RawData
from ftlab.model.backbone import ModelSpec


class Task(Protocol):
    """An objective: how rows become features, which model head, what loss and metrics.

    ``monitor`` (a metric name, e.g. ``acc``) and ``mode`` (``max``/``min``) choose the best
    validation epoch.
    """

    monitor: str
    mode: str

    def bind(self, raw: RawData, tokenizer: Any, text_columns: list[str]) -> None:
        """Learn what depends on the data (label set, columns) before featurising."""

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        """Batched ``datasets.map`` function: raw rows -> token ids (unpadded) + targets."""

    def build_model(self, spec: ModelSpec) -> nn.Module:
        """The model with this task's head, from the pre-trained backbone."""

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """(loss, predictions-or-logits) for a batch."""

    def metrics(self) -> MetricCollection:
        """Fresh metric objects (one collection per split)."""

    def update(self, metrics: MetricCollection, out: Any, batch: dict[str, torch.Tensor]) -> None:
        """Feed a batch's output to ``metrics``."""
