"""Regression: one number per row (STS-B similarity 0-5, a rating, any numeric target) from a
single-output head on the pooled representation; one text column or a sentence pair.

The model is Transformers' own regression head (``AutoModelForSequenceClassification`` with
``num_labels=1``, ``problem_type="regression"``), so an exported folder predicts the same
numbers without ftlab. The loss is the mean squared error against the raw targets, as GLUE's
STS-B baselines train (Devlin et al. 2019; ``run_glue``): targets are not standardised, so the
head's output is the prediction itself and nothing needs inverting at predict or export time.
The training labels' mean and standard deviation are recorded (``label_mean``, ``label_std``);
with targets far from the unit scale (prices, counts in the thousands) rescale the column first.

Metrics: Pearson and Spearman correlation (GLUE reports both for STS-B) and the MSE. A constant
prediction has no correlation: it scores 0, which is also the trivial baseline, so a run that
learnt to predict one value is flagged as failed instead of reporting NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.regression import MeanSquaredError
from torchmetrics.utilities import dim_zero_cat

from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec
from ftlab.rules import at_least, one_of
from ftlab.tasks.base import TaskDefaults, TaskOutput, as_text, check_room
from ftlab.tasks.classify import sequence_model

log = logging.getLogger(__name__)

#: the validation metrics a regression stage can monitor (and ``loss``)
MONITORS = ("pearson", "spearman", "mse", "loss")
#: a training-label mean or std beyond this (in absolute value) is warned about: far from the
#: unit scale the regression head starts at, it trains slowly (targets are not standardised)
FAR = 10.0
#: the one output's name: the card's label set, the head's ``id2label``, predict's key
VALUE = "value"


class Pearson(Metric):
    """Pearson's r over every row seen, in float64 from the kept predictions (a running
    float32 variance turns a constant prediction fed in batches into a spurious r); 0 where it
    is undefined (fewer than two rows, constant predictions or targets) instead of NaN."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(preds.detach().flatten())
        self.target.append(target.detach().flatten())

    def compute(self) -> torch.Tensor:
        x, y = dim_zero_cat(self.preds).double(), dim_zero_cat(self.target).double()
        return correlation(self.transform(x), self.transform(y))

    def transform(self, values: torch.Tensor) -> torch.Tensor:
        return values


class Spearman(Pearson):
    """Spearman's rank correlation: Pearson's r of the ranks, ties given their average rank
    (as ``scipy.stats.spearmanr``); 0 where undefined."""

    def transform(self, values: torch.Tensor) -> torch.Tensor:
        return average_ranks(values)


def correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson's r of two float64 vectors; 0 when either is constant (or has < 2 values)."""
    if x.numel() < 2 or x.max() == x.min() or y.max() == y.min():
        return torch.tensor(0.0)
    xc, yc = x - x.mean(), y - y.mean()
    r = (xc * yc).sum() / (xc.square().sum().sqrt() * yc.square().sum().sqrt())
    return r.clamp(-1, 1).float()


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing the mean of their positions (``rankdata``)."""
    order = values.argsort()
    _, inverse, counts = torch.unique_consecutive(values[order], return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # positions end-count+1 .. end
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


class Regression(TaskDefaults):
    """Mean squared error on one output per row; metrics: ``pearson``, ``spearman``, ``mse``.

    Args:
        max_length: sub-tokens per row (both texts of a pair together); longer rows are cut.
        monitor: the validation metric that picks the best epoch: ``pearson`` (default),
            ``spearman``, ``mse`` or ``loss`` (the last two: lower is better).
    """

    # its [batch, 1] outputs are per-row logits (FreeLB's fixed objective per batch), but no
    # distribution: R3F/SMART refuse it (ftlab.regularizers.embedding.needs_logits)
    row_logits = True

    def __init__(self, max_length: Annotated[int, at_least(1, example="128")] = 128,
                 monitor: Annotated[str, one_of(*MONITORS)] = "pearson") -> None:
        self.max_length = max_length
        self.monitor = monitor
        self.mode = "min" if monitor in ("mse", "loss") else "max"
        self.labels: list[str] = [VALUE]
        self.info: dict[str, Any] = {}
        self.features: tuple[str, ...] = ("input_ids", "attention_mask", "labels")

    def bind(self, raw: RawData, tokenizer: Any, text_columns: list[str]) -> None:
        train = raw.splits["train"] if "train" in raw.splits else None
        if train is not None:  # training (predict/export bind without data)
            feature = train.features.get("label")
            if raw.labels is not None or getattr(feature, "dtype", None) not in ("float32",
                                                                                "float64"):
                raise FtlabError("stage=regression needs a numeric label column, but "
                                 + ("data.label_column is null." if feature is None else
                                    f"the data's labels are classes {raw.labels}."),
                                 "set data.label_column to the column of numbers (e.g. "
                                 "data.label_column=score).")
            y = torch.as_tensor(train.with_format("numpy")["label"], dtype=torch.float64)
            mean, std = y.mean().item(), y.std().item()
            self.info = {"label_mean": round(mean, 6), "label_std": round(std, 6)}
            if abs(mean) > FAR or std > FAR:
                log.warning("stage=regression: the training labels have mean %.4g and std %.4g; "
                            "the head starts near 0 and moves about lr per step, so targets far "
                            "from unit scale train slowly. Rescale the column (e.g. (y - mean) / "
                            "std) and invert the predictions yourself.", mean, std)
        check_room(self.max_length, tokenizer, len(text_columns))
        self.tokenizer = tokenizer
        self.text_columns = list(text_columns)
        self.features = (*tokenizer.model_input_names, "labels")

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [[as_text(t) for t in batch[c]] for c in self.text_columns]
        enc = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
        enc["labels"] = [float(v) for v in batch["label"]]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return dict(enc)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return sequence_model(spec, getattr(self, "tokenizer", None), num_labels=1,
                              id2label={0: VALUE}, label2id={VALUE: 0},
                              problem_type="regression")

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's output ``[batch, 1]`` (no labels needed): what predictors read."""
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def values(self, scores: torch.Tensor) -> torch.Tensor:
        return scores[:, 0]

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        # our own MSE, in fp32 (as the model's MSELoss, which squeezes away a batch of one)
        logits = self.scores(model, batch)
        return TaskOutput(F.mse_loss(logits.float()[:, 0], batch["labels"].float()), logits)

    def metrics(self) -> MetricCollection:
        return MetricCollection({"pearson": Pearson(), "spearman": Spearman(),
                                 "mse": MeanSquaredError()})

    def update(self, metrics: MetricCollection, out: TaskOutput,
               batch: dict[str, torch.Tensor]) -> None:
        metrics.update(out.logits.float()[:, 0], batch["labels"].float())

    def baseline(self, labels: Sequence[Any]) -> dict[str, float]:
        """A constant predictor's scores (the mean of the labels, or any constant): no
        correlation, 0 for both; a run at or below it learnt no ordering of the rows. (Its MSE,
        the labels' variance, is lower-is-better and so no baseline.)"""
        return {"pearson": 0.0, "spearman": 0.0}
